"""ONNX decoders with a KV cache: dense and sliced tiny Llama-family models export to one file whose prefill
logits match PyTorch, whose cached decode matches a full re-forward, and whose greedy generation in
onnxruntime alone gives the same 32 tokens as transformers' generate, for a batch of two left-padded prompts
of different lengths."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch
from torch import nn

from pruneflow.adapters import get_adapter
from pruneflow.onnx_decoder import (
    decoder_session, empty_past, export_decoder_onnx, greedy_generate_onnx, greedy_generate_torch, kv_layers,
    kv_layout, prompt_positions, run_decoder,
)
from tiny import tiny_gemma3, tiny_llama, tiny_mistral, tiny_qwen2, tiny_qwen3

# The tracer warns where it fixes a Python branch of transformers' cache/mask code; each such branch is one the
# decode/re-forward tests below run both ways (past 0 and > 0, padded and not).
pytestmark = pytest.mark.filterwarnings("ignore::torch.jit.TracerWarning")
torch.set_num_threads(1)  # tiny models: threads only add overhead on a shared machine

# Per-layer kept (dense) heads and neurons. Dense tiny models have 4 query heads in 2 KV groups, 48 neurons.
UNIFORM = ([[2, 3]] * 2, [list(range(0, 48, 2))] * 2)  # keep KV group 1 whole: 2 query heads, 1 KV head per layer
NONUNIFORM = (  # 4 layers: attention removed in layer 0 (no cache), 2/2, 1/1, 4/2 query/KV heads; layer 3 no FFN
    [[], [0, 2], [3], [0, 1, 2, 3]],
    [list(range(40)), list(range(10)), list(range(5, 30)), []],
)
CASES = {
    "dense-llama": (tiny_llama, 2, None),
    "dense-mistral": (tiny_mistral, 2, None),  # head_dim set in the config
    "uniform-llama": (tiny_llama, 2, UNIFORM),
    "uniform-qwen2": (tiny_qwen2, 2, UNIFORM),  # q/k/v biases sliced with their rows
    "nonuniform-llama": (tiny_llama, 4, NONUNIFORM),
    "uniform-qwen3": (tiny_qwen3, 2, UNIFORM),  # q/k norms, head_dim 12 (not hidden / heads)
    "dense-gemma3": (tiny_gemma3, 2, None),  # sliding window of 4 < prompt: the mask, not the cache, slides
}
NEW_TOKENS = 32


def lively(model: nn.Module, std: float = 0.3) -> nn.Module:
    """Redraw every Linear and embedding with a larger std, and give the LM head its own weights. At the default
    init (0.02), and with the head tied to the embedding, a tiny model just repeats its last token forever, so
    equal generations would prove nothing about the cache."""
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        model.lm_head.weight = nn.Parameter(model.lm_head.weight.detach().clone(), requires_grad=False)  # untie
        for m in model.modules():
            if isinstance(m, (nn.Linear, nn.Embedding)):
                m.weight.copy_(torch.randn(m.weight.shape, generator=g) * std)
                if getattr(m, "bias", None) is not None:
                    m.bias.copy_(torch.randn(m.bias.shape, generator=g) * std)
    return model


def build(case: str) -> nn.Module:
    factory, layers, plan = CASES[case]
    model = lively(factory(layers=layers))
    if plan is not None:
        get_adapter(model).slice_(*plan)
    return model


def prompts() -> tuple[np.ndarray, np.ndarray]:
    """Two left-padded prompts of 5 and 9 tokens."""
    ids = np.array([[0, 0, 0, 0, 11, 12, 13, 14, 15], [21, 22, 23, 24, 25, 26, 27, 28, 29]], dtype=np.int64)
    mask = (np.arange(9)[None] >= np.array([[4], [0]])).astype(np.int64)
    return ids, mask


@torch.inference_mode()
def full_logits(model: nn.Module, ids: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """PyTorch logits of the whole sequence at once, no cache (same positions convention as generation)."""
    return model(input_ids=torch.as_tensor(ids), attention_mask=torch.as_tensor(mask),
                 position_ids=torch.as_tensor(prompt_positions(mask)), use_cache=False).logits.numpy()


@pytest.fixture(scope="module", params=sorted(CASES))
def exported(request, tmp_path_factory):
    model = build(request.param)
    path = tmp_path_factory.mktemp(request.param) / "decoder.onnx"
    export_decoder_onnx(model, path)
    return model, decoder_session(path, "cpu"), path


def test_file_layout(exported):
    """One file; past/present per attention layer with that layer's KV head count; none for a constant layer."""
    model, session, path = exported
    assert [p.name for p in path.parent.iterdir()] == ["decoder.onnx"]  # weights inside: no .onnx.data
    layout = kv_layout(model)
    assert kv_layers(session) == layout
    names = [i.name for i in session.get_inputs()]
    assert names[:3] == ["input_ids", "attention_mask", "position_ids"]
    assert names[3:] == [f"past_key_values.{i}.{kv}" for i in layout for kv in ("key", "value")]
    assert [o.name for o in session.get_outputs()] == ["logits"] + [f"present.{i}.{kv}" for i in layout
                                                                    for kv in ("key", "value")]
    for inp in onnx.load(str(path)).graph.input:
        dims = inp.type.tensor_type.shape.dim
        dynamic = [0, 1] if not inp.name.startswith("past") else [0, 2]
        assert all(dims[a].dim_param for a in dynamic), inp.name


def test_prefill_logits_match_torch(exported):
    model, session, _ = exported
    ids, mask = prompts()
    logits, present = run_decoder(session, ids, mask, prompt_positions(mask), empty_past(session, 2))
    real = mask == 1  # logits at left pads are never used
    assert np.abs(logits - full_logits(model, ids, mask))[real].max() < 1e-4
    assert all(t.shape[2] == ids.shape[1] for t in present.values())


def test_cached_decode_matches_full_forward(exported):
    """Prefill, then 6 one-token steps on the cache: each step's logits equal a full no-cache forward's."""
    model, session, _ = exported
    ids, mask = prompts()
    steps = np.array([[31, 32, 33, 34, 35, 36], [41, 42, 43, 44, 45, 46]], dtype=np.int64)
    _, past = run_decoder(session, ids, mask, prompt_positions(mask), empty_past(session, 2))
    full_ids, full_mask = np.concatenate([ids, steps], 1), np.concatenate([mask, np.ones_like(steps)], 1)
    expected = full_logits(model, full_ids, full_mask)
    for t in range(steps.shape[1]):
        step_mask = full_mask[:, : ids.shape[1] + t + 1]
        logits, past = run_decoder(session, steps[:, t:t + 1], step_mask, step_mask.sum(-1, keepdims=True) - 1, past)
        assert np.abs(logits[:, 0] - expected[:, ids.shape[1] + t]).max() < 1e-4, t


def test_greedy_generation_matches_transformers(exported):
    model, session, _ = exported
    ids, mask = prompts()
    got = greedy_generate_onnx(session, ids, mask, NEW_TOKENS)
    expected = greedy_generate_torch(model, ids, mask, NEW_TOKENS)
    assert got.shape == (2, NEW_TOKENS)
    np.testing.assert_array_equal(got, expected)
    assert len(np.unique(got)) > 4  # the tokens vary: the test exercises the cache, not a fixed point
    for row in range(2):  # each prompt alone (batch 1, no padding) continues the same: padding changes nothing
        real = mask[row] == 1
        alone = greedy_generate_onnx(session, ids[row:row + 1, real], mask[row:row + 1, real], NEW_TOKENS)
        np.testing.assert_array_equal(alone[0], got[row])


def test_model_without_attention_generates(tmp_path):
    """Every layer's attention removed: no cache at all, and the exporter drops the then unused mask/positions
    inputs; generation still runs (each token depends on the previous one only)."""
    model = lively(tiny_llama())
    get_adapter(model).slice_([[], []], [list(range(40))] * 2)
    export_decoder_onnx(model, tmp_path / "m.onnx")
    session = decoder_session(tmp_path / "m.onnx", "cpu")
    assert kv_layers(session) == {}
    ids, mask = prompts()
    np.testing.assert_array_equal(greedy_generate_onnx(session, ids, mask, 8),
                                  greedy_generate_torch(model, ids, mask, 8))


def test_right_padding_is_refused(exported):
    _, session, _ = exported
    ids, mask = prompts()
    with pytest.raises(ValueError, match="left-padded"):
        greedy_generate_onnx(session, ids, mask[:, ::-1].copy(), 2)


def test_dynamo_exporter_also_generates(tmp_path):
    """torch.onnx.export(dynamo=True) gives a working file too (slower to export: ~7 s vs 0.2 s here)."""
    model = build("nonuniform-llama")
    export_decoder_onnx(model, tmp_path / "d.onnx", exporter="dynamo")
    session = decoder_session(tmp_path / "d.onnx", "cpu")
    ids, mask = prompts()
    np.testing.assert_array_equal(greedy_generate_onnx(session, ids, mask, NEW_TOKENS),
                                  greedy_generate_torch(model, ids, mask, NEW_TOKENS))
