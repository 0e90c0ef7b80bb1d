"""ONNX export of Llama-family decoders (dense or pruned) that generates with a KV cache in onnxruntime.

Families: every `DecoderAdapter` (llama, mistral, qwen2, qwen3, gemma3; tested on tiny random models of each).
optimum-onnx pins transformers < 4.58, so the exporter is ours: `KVCacheDecoder` wraps the model in flat
tensors and rebuilds transformers' DynamicCache inside forward, and torch.onnx.export(dynamo=False) traces it
(0.2 s for a tiny model); exporter="dynamo" works too but is ~30x slower to export and names axes s0, s1, ...

One file serves prefill and decode, with the input/output names of Hugging Face's (optimum) decoder exports:
  inputs   input_ids [batch, seq], attention_mask [batch, past+seq], position_ids [batch, seq],
           past_key_values.{i}.key / .value [batch, kv_heads_i, past, head_dim]   (float32)
  outputs  logits [batch, seq, vocab], present.{i}.key / .value [batch, kv_heads_i, past+seq, head_dim]
Prefill feeds empty past tensors (past = 0); each decode step feeds the previous step's present as past.
Batch, seq and past axes are dynamic.

Pruned models: kv_heads_i is read per layer (k_proj.out_features // head_dim), since slicing leaves layers with
different KV and query head counts. A layer whose attention was removed (a `ConstantSublayer`) has no KV cache,
so the file has no past/present tensors for it: the names skip its index i (e.g. past_key_values.0.*,
past_key_values.2.* when layer 1 is constant). `kv_layers(session)` lists the indices a file has. Inside, such
a layer gets transformers' DummyLayer in the cache (see kv_cache). A model with no attention left at all has no
cache, and its file takes input_ids alone (the exporter drops the then unused mask and positions).

Batched prompts are LEFT-padded (attention_mask 0 before the real tokens), as Hugging Face's generate expects
for decoders: every row's newest token is then at the last position, so next-token logits are logits[:, -1]
for all rows and each step appends one column. position_ids count real tokens only (cumsum(mask) - 1; pads
get 1, like transformers' generate, and are never attended to).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from torch import nn
from transformers.cache_utils import DummyLayer, DynamicCache, DynamicLayer

from pruneflow.adapters import UnsupportedArchitecture, get_adapter
from pruneflow.adapters.decoder import DecoderAdapter
from pruneflow.artifacts import atomic_path
from pruneflow.modeling import eager_attention
from pruneflow.onnx_io import make_session, reject_external_data, resolve_provider

INPUT_NAMES = ("input_ids", "attention_mask", "position_ids")
OUTPUT_NAME = "logits"


# --- the model's cache layout ------------------------------------------------------------------------------

def decoder_adapter(model: nn.Module) -> DecoderAdapter:
    """The model's adapter, which must be of the Llama layout (q/k/v/o_proj attention, HF cache)."""
    adapter = get_adapter(model)
    if not isinstance(adapter, DecoderAdapter):
        raise UnsupportedArchitecture(f"ONNX export with a KV cache serves Llama-layout decoders "
                                      f"(llama, mistral, qwen2/3, gemma3), not {adapter.family}")
    return adapter


def kv_layout(model: nn.Module) -> dict[int, tuple[int, int]]:
    """{layer index: (kv_heads, head_dim)} for the layers that keep attention (hence a KV cache). Read per layer
    from k_proj's rows, since slicing leaves layers with different KV head counts."""
    a = decoder_adapter(model)
    return {i: (a.attn_in(i)[1].out_features // a.head_dim, a.head_dim)
            for i in range(a.num_layers) if not a.empty(i, "attn")}


def past_names(i: int) -> tuple[str, str]:
    return f"past_key_values.{i}.key", f"past_key_values.{i}.value"


def present_names(i: int) -> tuple[str, str]:
    return f"present.{i}.key", f"present.{i}.value"


def kv_cache(num_layers: int, past: dict[int, tuple[torch.Tensor, torch.Tensor]]) -> DynamicCache:
    """A DynamicCache holding `past` ({layer: (key, value)}); layers absent from `past` (attention removed) get a
    DummyLayer, which transformers' mask and length code skips, so a constant layer 0 does not read as an
    empty cache (a plain DynamicLayer there would make get_seq_length() return 0 and size the mask wrong)."""
    layers = []
    for i in range(num_layers):
        if i not in past:
            layers.append(DummyLayer())
            continue
        layer = DynamicLayer()
        # Set the tensors directly: DynamicLayer.update on a fresh layer concatenates onto a 1-D empty tensor,
        # which traces into an ONNX Concat of mismatched ranks.
        key, value = past[i]
        layer.dtype, layer.device = key.dtype, key.device
        layer.keys, layer.values, layer.is_initialized = key, value, True
        layers.append(layer)
    cache = DynamicCache()
    cache.layers, cache.layer_class_to_replicate = layers, None  # fixed layer list, no lazy growth
    return cache


def empty_cache(model: nn.Module, batch: int = 1) -> DynamicCache:
    """The cache a prefill starts from: zero-length past for every attention layer (what generate needs too)."""
    p = next(model.parameters())
    past = {i: (torch.zeros(batch, h, 0, d, dtype=p.dtype, device=p.device),) * 2
            for i, (h, d) in kv_layout(model).items()}
    return kv_cache(decoder_adapter(model).num_layers, past)


class KVCacheDecoder(nn.Module):
    """Flat tensors in and out, for export: (input_ids, attention_mask, position_ids, k_a, v_a, k_b, v_b, ...) ->
    (logits, present k_a, v_a, ...), over the attention layers a, b, ... in order."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model
        self.layers = list(kv_layout(model))
        self.num_layers = decoder_adapter(model).num_layers

    def forward(self, input_ids, attention_mask, position_ids, *past):
        # Without any attention layer there is nothing to cache (and transformers' mask code needs one).
        cache = kv_cache(self.num_layers, {i: (past[2 * j], past[2 * j + 1]) for j, i in enumerate(self.layers)}) \
            if self.layers else None
        out = self.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                         past_key_values=cache, use_cache=cache is not None)
        present = [t for i in self.layers for t in (cache.layers[i].keys, cache.layers[i].values)]
        return (out.logits, *present)


# --- export --------------------------------------------------------------------------------------------------

def export_sample(model: nn.Module, batch: int = 3, seq: int = 2, past: int = 4) -> tuple[torch.Tensor, ...]:
    """Trace inputs with distinct batch/seq/past sizes (> 1, past > 0), so the tracer cannot confuse one axis with
    another or fold a size-1 or empty special case into the graph (transformers' cache asks `keys.numel() == 0`
    in Python; with past > 0 the trace keeps the shape arithmetic, which is also right for past = 0). Rows 1+
    are left-padded by one token."""
    p = next(model.parameters())
    ids = torch.randint(5, model.config.vocab_size, (batch, seq), generator=torch.Generator().manual_seed(0))
    mask = torch.ones(batch, past + seq, dtype=torch.long)
    mask[1:, 0] = 0
    positions = (mask.cumsum(-1) - 1).clamp(min=0)[:, past:]
    kv = [torch.randn(batch, h, past, d, dtype=p.dtype, generator=torch.Generator().manual_seed(i))
          for i, (h, d) in kv_layout(model).items() for _ in range(2)]
    return (ids, mask, positions, *kv)


def io_names(model: nn.Module) -> tuple[list[str], list[str], dict[str, dict[int, str]]]:
    """Input names, output names and dynamic axes of the exported file."""
    layers = list(kv_layout(model))
    inputs = list(INPUT_NAMES) + [n for i in layers for n in past_names(i)]
    outputs = [OUTPUT_NAME] + [n for i in layers for n in present_names(i)]
    axes = {"input_ids": {0: "batch", 1: "sequence"}, "attention_mask": {0: "batch", 1: "total_sequence"},
            "position_ids": {0: "batch", 1: "sequence"}, OUTPUT_NAME: {0: "batch", 1: "sequence"}}
    axes |= {n: {0: "batch", 2: "past_sequence"} for i in layers for n in past_names(i)}
    axes |= {n: {0: "batch", 2: "total_sequence"} for i in layers for n in present_names(i)}
    return inputs, outputs, axes


def export_decoder_onnx(model: nn.Module, path: str | Path, opset: int = 18,
                        exporter: Literal["torchscript", "dynamo"] = "torchscript") -> float:
    """Write `model` (a *ForCausalLM of the Llama layout, dense or sliced) to `path` as one self-contained ONNX
    file with past key values as inputs and outputs (layout in the module docstring); returns export seconds."""
    path = Path(path)
    model = model.eval()
    wrapper = KVCacheDecoder(model).eval()
    args = export_sample(model)
    inputs, outputs, axes = io_names(model)
    t0 = time.perf_counter()
    with eager_attention(model), torch.no_grad(), atomic_path(path, ".onnx") as tmp:
        if exporter == "dynamo":
            dyn = torch.export.Dim.DYNAMIC  # lets torch.export infer total = past + seq itself
            shapes = [{0: dyn, 1: dyn}] * 3
            if len(args) > 3:  # forward's *past is one (tuple) argument to torch.export
                shapes.append(tuple([{0: dyn, 2: dyn}] * (len(args) - 3)))
            torch.onnx.export(wrapper, args, str(tmp), dynamo=True, opset_version=opset, external_data=False,
                              input_names=inputs, output_names=outputs, dynamic_shapes=shapes)
        else:
            torch.onnx.export(wrapper, args, str(tmp), dynamo=False, opset_version=opset, input_names=inputs,
                              output_names=outputs, dynamic_axes=axes)
        reject_external_data(tmp)
    return time.perf_counter() - t0


# --- onnxruntime ----------------------------------------------------------------------------------------------

def decoder_session(path: str | Path, provider: Literal["auto", "cpu", "cuda"] = "auto", threads: int | None = 1):
    """onnxruntime session for an exported decoder on the project's provider logic (onnx_io: 'auto' takes CUDA
    only when its provider really loads, and the session's provider is verified)."""
    return make_session(path, resolve_provider(provider), threads)


def kv_layers(session) -> dict[int, tuple[int, int]]:
    """{layer index: (kv_heads, head_dim)} read from a session's past inputs (layers with a KV cache)."""
    layout = {}
    for inp in session.get_inputs():
        if inp.name.startswith("past_key_values.") and inp.name.endswith(".key"):
            layout[int(inp.name.split(".")[1])] = (inp.shape[1], inp.shape[3])
    return dict(sorted(layout.items()))


def check_left_padded(attention_mask: np.ndarray) -> None:
    """Left padding: within a row, no real token (1) may come before a pad (0)."""
    mask = np.asarray(attention_mask)
    if (np.diff(mask, axis=-1) < 0).any():
        raise ValueError("batched prompts must be left-padded (attention_mask 0s before the 1s in every row)")


def prompt_positions(attention_mask: np.ndarray) -> np.ndarray:
    """Positions of left-padded prompts: real tokens 0, 1, 2, ...; pads 1 (as transformers' generate)."""
    positions = np.cumsum(attention_mask, axis=-1) - 1
    return np.where(attention_mask == 0, 1, positions).astype(np.int64)


ORT_FLOAT = {"tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(double)": np.float64}


def empty_past(session, batch: int) -> dict[str, np.ndarray]:
    """Zero-length past key/values for a prefill, in the dtype the file's past inputs have."""
    return {inp.name: np.zeros((batch, inp.shape[1], 0, inp.shape[3]), dtype=ORT_FLOAT[inp.type])
            for inp in session.get_inputs() if inp.name.startswith("past_key_values.")}


def run_decoder(session, input_ids: np.ndarray, attention_mask: np.ndarray, position_ids: np.ndarray,
                past: dict[str, np.ndarray]) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """One onnxruntime call: logits [batch, seq, vocab] and the present key/values renamed as the next past."""
    layers = list(kv_layers(session))
    outputs = [OUTPUT_NAME] + [n for i in layers for n in present_names(i)]
    feed = {"input_ids": np.asarray(input_ids, dtype=np.int64),
            "attention_mask": np.asarray(attention_mask, dtype=np.int64),
            "position_ids": np.asarray(position_ids, dtype=np.int64)} | past
    # A model with no attention left exports without attention_mask/position_ids (the exporter drops unused
    # inputs): feed only what the file takes.
    names = {inp.name for inp in session.get_inputs()}
    logits, *present = session.run(outputs, {k: v for k, v in feed.items() if k in names})
    return logits, dict(zip((n for i in layers for n in past_names(i)), present))


def greedy_generate_onnx(session, input_ids: np.ndarray, attention_mask: np.ndarray,
                         max_new_tokens: int) -> np.ndarray:
    """Greedy decoding in onnxruntime alone: one prefill over the left-padded prompts, then one token per step,
    feeding each step's present key/values back as past. Returns the new tokens, [batch, max_new_tokens]
    (no stop token: exactly max_new_tokens, as a fixed-length reference)."""
    ids = np.asarray(input_ids, dtype=np.int64)
    mask = np.asarray(attention_mask, dtype=np.int64)
    check_left_padded(mask)
    batch = ids.shape[0]
    positions, past = prompt_positions(mask), empty_past(session, batch)
    new = []
    for step in range(max_new_tokens):
        logits, past = run_decoder(session, ids, mask, positions, past)
        ids = logits[:, -1].argmax(-1).astype(np.int64)[:, None]  # left padding: row's newest token is last
        new.append(ids)
        mask = np.concatenate([mask, np.ones((batch, 1), dtype=np.int64)], axis=1)
        positions = mask.sum(-1, keepdims=True) - 1
    return np.concatenate(new, axis=1) if new else np.zeros((batch, 0), dtype=np.int64)


# --- PyTorch reference ------------------------------------------------------------------------------------------

@torch.inference_mode()
def greedy_generate_torch(model: nn.Module, input_ids, attention_mask, max_new_tokens: int) -> np.ndarray:
    """The same greedy decoding by transformers' generate (left-padded prompts, KV cache, no stop token), on a
    cache with DummyLayers for attention-removed layers (see kv_cache). Returns [batch, max_new_tokens].
    generate's own default cache is wrong for a model whose layer 0 lost its attention: that layer's cache stays
    empty, transformers sizes the attention mask from it (past 0), and left-padded rows then attend to their pads
    (seen on a tiny model: the padded row's tokens diverge after 1 step, the unpadded row's do not)."""
    check_left_padded(np.asarray(attention_mask))
    device = next(model.parameters()).device
    ids = torch.as_tensor(np.asarray(input_ids), dtype=torch.long, device=device)
    mask = torch.as_tensor(np.asarray(attention_mask), dtype=torch.long, device=device)
    cache = empty_cache(model, ids.shape[0]) if kv_layout(model) else None
    out = model.generate(input_ids=ids, attention_mask=mask, past_key_values=cache, use_cache=cache is not None,
                         do_sample=False, max_new_tokens=max_new_tokens, min_new_tokens=max_new_tokens,
                         eos_token_id=None, pad_token_id=0)
    return out[:, ids.shape[1]:].cpu().numpy()
