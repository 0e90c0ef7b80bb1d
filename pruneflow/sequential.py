"""Sequential correction: refit each pruned layer on the inputs the *pruned* model actually feeds it.

Layer by layer, the calibration batches flow through two streams: the dense model (targets) and the pruned
model as corrected so far (regressors). Each sublayer adds W a (+ b) to a residual r; we fit the pruned
sublayer's (W', b') on its kept activations a_pruned,K so that r_pruned + W' a_pruned,K (+ b') matches the
dense model at the same point, i.e. to the target t = (dense value) − r_pruned, which also carries the drift of
every earlier layer and so absorbs it.

- post-LN (BERT, DistilBERT): the point is the LayerNorm input s = r + W a + b; t = s_dense − r_pruned, with
  r_pruned = s_pruned − (W a_pruned + b). The layer's output is the FFN LayerNorm of the refit sum.
- pre-norm (Llama, Mistral, Qwen2/3): h' = h + Attn(norm1(h)), out = h' + MLP(norm2(h')). The point is the
  residual stream after the sublayer: t = h'_dense − h_pruned for attention, out_dense − h'_pruned for the MLP
  (h'_pruned with the corrected attention). The output projections have no bias, so the fit is
  intercept-free (correction.fit, uncentered moments). The layer's output is h'_pruned + W' a_pruned,K.
  Gemma 3 normalises each sublayer's output before the residual add (the stream is not linear in W'): refused.

Attention is refit first, then the FFN sees the corrected attention. Per layer this costs one dense pass, one
pruned attention-only pass and one pruned pass in which attention does not run again: it answers with the
output projection's inputs kept from the attention pass, through the refit projection (`_attention_answers`; the
same values it would compute). The layer's output comes from the FFN pass's captures. The dense layer runs on a
batch when the attention pass reaches that batch (`DenseTrace.layer`), so no layer's targets are held for every
batch at once. Each layer gets the call arguments the model gives it (post-LN: layer 0's, the same for every
layer; pre-norm: each layer's own, captured once with use_cache=False: masks and rotary embeddings can differ per
layer type).
Memory: two copies of the calibration hidden states (dense and pruned; post-LN also the FFN targets) plus one
layer's kept FFN activations and attention projection inputs. correct.low_memory (`activations_dir`) holds none
of them for every batch at once: both streams and the FFN activations wait on disk, one file per batch (the
dense stream from its capture on: `DenseTrace(hidden_dir=)`), and attention runs again in the FFN pass, so the
refit holds one batch's tensors (disk traffic: about eight reads or writes of the hidden states per layer). With runtime.offload=cpu only the
layer being refit sits on `device` (plus embeddings); the other layers stay on the CPU (pruneflow.blockwalk).
With runtime.offload=disk no whole model is in memory: the dense side reads each block from the checkpoint as
it runs, and the pruned side (`StreamedLayers`) reads each layer, slices it, refits it and writes it to a spill
file.
"""

from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import torch
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from pruneflow import correction
from pruneflow.adapters import SUBLAYERS, Adapter, get_adapter
from pruneflow.blockwalk import (BlockWalk, Capture, DiskWeights, Offload, Residency, _Stop, forwards_replaced,
                                 gather_rows, moved_to, token_rows)
from pruneflow.moments import Accumulator
from pruneflow.runtime import trim_freed_memory


def _after_layer(i: int, hidden: list[torch.Tensor]) -> None:
    """Test seam: sees the pruned stream after layer i (computed from captures, not by re-running it)."""


class _stop_before:
    """Raise _Stop when `module` is about to run (skips the rest of a layer we do not need)."""

    def __init__(self, module):
        self.handle = None if module is None else module.register_forward_pre_hook(self._raise)

    @staticmethod
    def _raise(module, args):
        raise _Stop

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        if self.handle is not None:
            self.handle.remove()


@contextmanager
def _attention_answers(adapter: Adapter, i: int, x: torch.Tensor | None) -> Iterator[None]:
    """Layer i's attention returns its result on this batch without computing it: `x`, the output projection's
    input captured in the attention pass (same block input, same q/k/v: the same values), through the projection
    as it is now (refit), where the family's attention module applies it. x None: attention runs as usual."""
    if x is None:
        yield
        return
    module, projected = adapter.attention_core(i)
    out = adapter.out_proj(i, "attn")
    with forwards_replaced([(module, lambda *args, **kwargs: (out(x) if projected else x, None))]):
        yield


def _produce(adapter: Adapter, i: int, name: str, out, x: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """What the sublayer currently adds to the residual: W x + b, or an emptied sublayer's constant."""
    if out is not None:
        return torch.nn.functional.linear(x, out.weight, out.bias)
    return adapter.constant(i, name).bias.to(like.dtype).expand_as(like)


class DenseTrace:
    """The dense model's side of the sequential correction: the calibration batches entering layer 0 and, per
    layer, the dense values each sublayer's refit aims at (post-LN: the LayerNorm inputs; pre-norm: the residual
    stream after each sublayer). Computed layer by layer on demand (a blockwalk.BlockWalk); with keep=True the
    targets are kept so several pruned models (a sweep) share one dense pass: in memory, or with `spill_dir`
    in one safetensors file per layer there, read back when a later model asks (bit for bit the same). Kept in
    memory they are two copies of the calibration hidden states per layer (`kept_bytes`): 4.5 GB for SmolLM2 at 64
    windows of 512 tokens, 18 GB at 256."""

    def __init__(self, dense_model, batches, device: str, keep: bool = False, offload: Offload = "none",
                 spill_dir: Path | None = None, hidden_dir: Path | None = None):
        """batches: the calibration batches (Task.calibration_batches) on `device`; each is kept, as hidden states.
        offload: where the dense weights live between layers (blockwalk; "disk" needs blockwalk.lazy_model).
        spill_dir: with keep=True, where the kept targets are written instead of held (an existing directory).
        hidden_dir (correct.low_memory): the dense stream's hidden states in one file per batch there from the
        capture on (BatchesOnDisk), so they are never all in memory, not even as they enter layer 0."""
        self.adapter = get_adapter(dense_model)
        if self.adapter.sublayer_out_norm:
            raise ValueError(f"correct.sequential does not support {self.adapter.family}: its sublayer outputs pass "
                             "through their own norms before the residual add, so the refit target is not linear "
                             "in the output projection (set correct.sequential=false)")
        if keep and hidden_dir is not None:
            raise ValueError("a kept dense trace holds its targets for later models: its stream cannot go to disk")
        self.device, self.offload, self.keep, self.spill_dir = device, offload, keep, spill_dir
        store = None if hidden_dir is None else BatchesOnDisk(hidden_dir)
        self.walk = BlockWalk(dense_model, self.adapter, batches, Residency(dense_model, self.adapter, device, offload),
                              store=store)
        self.streams = self.walk.streams
        self._targets: dict[int, dict[str, list[torch.Tensor]] | Path] = {}
        # every target has the shape of the hidden states entering layer 0, one per sublayer and layer
        self.kept_bytes = len(SUBLAYERS) * self.adapter.num_layers * sum(
            shape.numel() * dtype.itemsize for shape, dtype in self._input_specs())

    def call(self, i: int, b: int) -> tuple[tuple, dict]:
        """The (args, kwargs) layer i gets on batch b, besides the hidden states."""
        return self.walk.call(i, b)

    def _on_disk(self) -> bool:
        return isinstance(self.walk.hidden, BatchesOnDisk)

    def _input_specs(self) -> list[tuple[torch.Size, torch.dtype]]:
        """Per batch, the shape and dtype of the hidden states entering layer 0 (without reading them from disk)."""
        if self._on_disk():
            return [self.walk.hidden.spec(b) for b in range(len(self.streams))]
        return [(s[0].shape, s[0].dtype) for s in self.streams]

    def input_shapes(self) -> list[torch.Size]:
        """Per batch, the shape of the hidden states entering layer 0."""
        return [shape for shape, _ in self._input_specs()]

    def inputs(self, directory: Path | None = None) -> "list[torch.Tensor] | BatchesOnDisk":
        """The calibration hidden states entering layer 0, where a pruned stream starts: a list, or with
        `directory` one file per batch there (BatchesOnDisk; required when the trace was captured to disk, whose
        files are copied). Unless the trace is kept for further pruned models, it lets go of its in-memory
        copy: the hidden states are then held twice (the dense and the pruned stream), not three times."""
        if self._on_disk():
            if directory is None:
                raise ValueError("this dense trace holds its stream on disk: ask for the inputs in a directory")
            return self.walk.hidden.copy_to(directory)
        hidden = [s[0] for s in self.streams]
        if not self.keep:
            self.streams = self.walk.streams = [(None, *s[1:]) for s in self.streams]
        return hidden if directory is None else BatchesOnDisk(directory, hidden)

    def hold_on_disk(self, directory: Path) -> None:
        """The dense stream's hidden states in one file per batch under `directory` from now on (correct.low_memory;
        the stream is read and written one batch at a time); nothing to do where it was captured to disk
        (hidden_dir). Not for a kept trace, whose targets are reused."""
        if self.keep:
            raise ValueError("a kept dense trace holds its targets for later models: it cannot go to disk this way")
        if self._on_disk():
            return
        if self.walk.next != 0:
            raise RuntimeError("the dense stream goes to disk before the first layer runs")
        self.walk.hidden = BatchesOnDisk(directory, self.walk.hidden)

    @contextmanager
    def layer(self, i: int) -> Iterator["DenseLayer | KeptTargets"]:
        """Layer i's dense targets, batch by batch (DenseLayer): per batch, the LayerNorm inputs on the dense stream
        (post-LN), or the residual stream after each sublayer (pre-norm: the FFN's norm input and the layer
        output). The dense layer runs on a batch when that batch's attention target is asked for, so the refit
        holds no layer's targets for every batch at once (pre-norm: none at all beyond the dense stream, whose
        next state is the FFN target). A kept trace serves a later model its stored targets (KeptTargets)."""
        if i in self._targets:
            kept = self._targets[i]
            yield KeptTargets(kept if isinstance(kept, dict) else self._read(kept))
            return
        ad = self.adapter
        watch = ({n: ad.norm(i, n) for n in SUBLAYERS} if ad.post_norm else {"attn": ad.residual_norm(i, "ffn")})
        with self.walk.stepping(i) as step:
            dense = DenseLayer(step, watch, self.keep)
            yield dense
        if self.keep:
            kept = {"attn": dense.kept_attn, "ffn": [dense.target("ffn", b) for b in range(len(self.walk.hidden))]}
            self._targets[i] = kept if self.spill_dir is None else self._write(i, kept)

    def _write(self, i: int, targets: dict[str, list[torch.Tensor]]) -> Path:
        path = Path(self.spill_dir) / f"dense_targets_{i}.safetensors"
        save_file({f"{name}.{b}": t.contiguous() for name, ts in targets.items() for b, t in enumerate(ts)}, path)
        return path

    def _read(self, path: Path) -> dict[str, list[torch.Tensor]]:
        flat = load_file(path, device=str(self.device))
        return {name: [flat[f"{name}.{b}"] for b in range(len(self.walk.hidden))] for name in SUBLAYERS}


class DenseLayer:
    """One dense layer's refit targets, made batch by batch: target("attn", b) runs the layer on batch b (batches in
    order, each once); target("ffn", b) is then that batch's FFN target."""

    def __init__(self, step, watch: dict, keep: bool):
        self.step, self.watch = step, watch
        self.ffn: list[torch.Tensor | None] = []  # None: the target is the layer's output (the walk's hidden states)
        self.kept_attn: list[torch.Tensor] | None = [] if keep else None

    def target(self, name: str, b: int) -> torch.Tensor:
        hidden = self.step.walk.hidden
        if name == "attn":
            values = self.step.run(b, self.watch)
            self.ffn.append(values.get("ffn"))
            t = values.get("attn")
            t = hidden[b] if t is None else t
            if self.kept_attn is not None:
                self.kept_attn.append(t)
            return t
        if b >= self.step.done:
            raise RuntimeError(f"dense trace: batch {b}'s FFN target asked before its attention target")
        return hidden[b] if self.ffn[b] is None else self.ffn[b]


class KeptTargets:
    """A kept trace's targets of one layer, as DenseLayer serves them."""

    def __init__(self, targets: dict[str, list[torch.Tensor]]):
        self.targets = targets

    def target(self, name: str, b: int) -> torch.Tensor:
        return self.targets[name][b]


class SlicedLayers:
    """The pruned model's layers as the refit walks them, for a model already sliced in memory: it lives where
    the dense one does (offload=cpu: on the CPU, each layer moved to the device while it is refit)."""

    def __init__(self, model, device: str, offload: Offload):
        self.layers, self.device, self.move = get_adapter(model).layers(), device, offload != "none"
        model.to("cpu" if self.move else device)

    @contextmanager
    def layer(self, i: int) -> Iterator[torch.nn.Module]:
        with moved_to(self.layers[i], self.device, self.move) as layer:
            yield layer


class StreamedLayers:
    """The pruned model's layers as the refit walks them, for runtime.offload=disk: the model is a lazy one
    (blockwalk.lazy_model, parameters on the meta device, dense shapes). Layer i is read from the dense
    checkpoint when its refit starts, sliced to its kept heads and neurons, and written to `spill_dir` when done
    (blockwalk.DiskWeights.spill), so one layer's weights are in memory, never the model's. The finished model
    keeps `disk_weights` (the checkpoint and the spilled layers), which plan.save_pruned and
    hf_checkpoint.save_plain_checkpoint write from, one tensor at a time."""

    def __init__(self, model, keep_heads: list[list[int]], keep_neurons: list[list[int]], spill_dir: Path,
                 device: str):
        self.model, self.adapter, self.device = model, get_adapter(model), device
        self.adapter.check_layer_count(keep_heads, keep_neurons)
        self.keep_heads, self.keep_neurons, self.spill_dir = keep_heads, keep_neurons, Path(spill_dir)
        self.disk = model.disk_weights = DiskWeights(model.checkpoint_dir)

    @contextmanager
    def layer(self, i: int) -> Iterator[torch.nn.Module]:
        layer = self.adapter.layers()[i]
        self.disk.load(self.model, layer, self.device)
        self.adapter.slice_layer(i, self.keep_heads[i], self.keep_neurons[i])
        yield layer
        self.disk.spill(self.model, layer, self.spill_dir / f"layer-{i:03d}.safetensors")


class BatchesOnDisk:
    """Per batch, a tensor kept in a file of its own under `directory` instead of in memory (correct.low_memory):
    indexed like the list of per-batch tensors it stands for; each read loads that batch's tensor (back on the
    device it came from), each assignment writes it. `pop(b)` reads it and deletes the file, as a dict's would."""

    def __init__(self, directory: Path, tensors: list[torch.Tensor] | None = None):
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        # per batch in a file: its tensor's device (where a read puts it back), shape and dtype
        self.held: dict[int, tuple[torch.device, torch.Size, torch.dtype]] = {}
        for b, x in enumerate(tensors or []):
            self[b] = x

    def _path(self, b: int) -> Path:
        return self.directory / f"batch-{b:05d}.safetensors"

    def __setitem__(self, b: int, x: torch.Tensor) -> None:
        save_file({"x": x.detach().contiguous().cpu()}, self._path(b))
        self.held[b] = (x.device, x.shape, x.dtype)

    def spec(self, b: int) -> tuple[torch.Size, torch.dtype]:
        """Batch b's tensor's shape and dtype, without reading it."""
        return self.held[b][1:]

    def copy_to(self, directory: Path) -> "BatchesOnDisk":
        """The same tensors in files of their own under `directory` (a second stream that starts where this one
        is), file by file: nothing is loaded."""
        import shutil

        other = BatchesOnDisk(directory)
        for b in self.held:
            shutil.copyfile(self._path(b), other._path(b))
        other.held = dict(self.held)
        return other

    def __getitem__(self, b: int) -> torch.Tensor:
        return load_file(self._path(b), device=str(self.held[b][0]))["x"]

    def __len__(self) -> int:
        return len(self.held)

    def pop(self, b: int) -> torch.Tensor:
        x = self[b]
        self._path(b).unlink()
        del self.held[b]
        return x

    def clear(self) -> None:
        for b in list(self.held):
            self.pop(b)


def first_token_weights(mask: torch.Tensor, shape: torch.Size, weight: float,
                        rows: torch.Tensor | None) -> torch.Tensor | None:
    """Per real token of a (B, T) batch, in token_rows order: `weight` at each sequence's first real token, 1
    elsewhere; None when weight is 1 (the unweighted fit, unchanged). mask: the batch's (B*T,) real-token mask."""
    if weight == 1.0:
        return None
    real = mask.view(shape)
    grid = torch.ones(shape, device=mask.device)
    grid[torch.arange(shape[0], device=mask.device), real.int().argmax(1)] = weight
    return gather_rows(grid[..., None], rows)[:, 0]


@torch.inference_mode()
def correct_sequential(pruned_model, method: str, ridge: float, trace: DenseTrace, device: str,
                       layers: SlicedLayers | StreamedLayers | None = None, first_token_weight: float = 1.0,
                       first_token_where: str = "all", activations_dir: Path | None = None) -> list[dict]:
    """Refit every pruned layer in order against the dense model's `trace` (see the module docstring).
    layers: where the pruned layers come from (default: `pruned_model` is sliced and in memory).
    first_token_weight: each sequence's first token counts this many times in every fit. A decoder builds its
    attention sink there (SmolLM2: a massive activation, residual RMS about 940 against 5-30, that later layers'
    attention relies on), one token in 512 that an unweighted fit can get wrong for first tokens it never saw.
    first_token_where: "all" layers' fits, or only those of layers that lose attention heads ("heads_pruned").
    activations_dir (correct.low_memory): hold nothing per batch for every batch at once. The dense and the
    pruned stream of hidden states live in one file per batch under this folder (read and written a batch at a
    time), the FFN pass runs attention again instead of taking its result from the attention pass, and the FFN
    output projection's inputs wait there for the layer's output. Same values, bit for bit; memory holds one
    batch's tensors and one layer's weights and moments."""
    if first_token_where not in ("all", "heads_pruned"):
        raise ValueError(f"first_token_where={first_token_where!r}: expected all or heads_pruned")
    pruned = get_adapter(pruned_model)
    post = pruned.post_norm
    layers = layers or SlicedLayers(pruned_model, device, trace.offload)
    streams = trace.streams
    rows = [token_rows(s[3]) for s in streams]  # real tokens per batch (None: all, nothing to gather)
    weights = [first_token_weights(s[3], shape[:2], first_token_weight, r)
               for s, shape, r in zip(streams, trace.input_shapes(), rows)]
    if activations_dir is None:
        h_pruned = trace.inputs()  # replaced batch by batch, never written in place: no copy needed
    else:  # both streams of hidden states on disk (the dense one maybe since its capture): memory holds one batch's
        h_pruned = trace.inputs(Path(activations_dir) / "pruned")
        trace.hold_on_disk(Path(activations_dir) / "dense")
    report = []
    for i in tqdm(range(pruned.num_layers), desc="correct (sequential)", leave=False):
        trim_freed_memory()  # what slicing freed, then each finished layer's kept activations
        # Each batch's attention target, attention input and spent layer input are let go as soon as used, so
        # a layer holds one set of kept FFN activations at its peak (none with activations_dir), not that plus
        # the targets and inputs.
        attn_inputs: list[torch.Tensor | None] = []  # per batch: the attention output projection's input
        # per batch, the FFN output projection's input, until the layer's output is made from it
        kept = {} if activations_dir is None else BatchesOnDisk(Path(activations_dir) / "ffn")
        with layers.layer(i) as layer, trace.layer(i) as dense:
            weighted = first_token_where == "all" or pruned.shape()[i].heads < trace.adapter.dense_heads
            layer_weights = weights if weighted else [None] * len(weights)
            for name in SUBLAYERS:
                out = None if pruned.empty(i, name) else pruned.out_proj(i, name)
                # post-LN: the LayerNorm input s (residual = s − this sublayer's output); pre-norm: the residual
                # stream entering the sublayer, as the norm in front of it reads it.
                watch = {"x": out} | ({"s": pruned.norm(i, name)} if post else {"r": pruned.residual_norm(i, name)})
                # Each pass stops once its captures are in: the attention pass where the FFN starts; the FFN pass
                # at its output projection (pre-norm: its output is recomputed with the refit weights anyway) or
                # at the LayerNorm after it (post-LN). The layer output comes from the FFN pass's captures.
                if name == "attn":
                    stop_at = None if pruned.empty(i, "ffn") else pruned.ffn_in(i)[0]
                else:
                    stop_at = watch["s"] if post else out
                acc = Accumulator()
                for b in range(len(streams)):
                    args, kwargs = trace.call(i, b)
                    answer = attn_inputs[b] if name == "ffn" and attn_inputs else None
                    with Capture(watch) as cap, _stop_before(stop_at), _attention_answers(pruned, i, answer):
                        try:
                            layer(h_pruned[b], *args, **kwargs)
                        except _Stop:
                            pass
                    if post:
                        s = cap.values["s"]
                        x = cap.values["x"] if out is not None else s[..., :0]
                        residual = s - _produce(pruned, i, name, out, x, s)
                    else:
                        residual = cap.values["r"]
                        x = cap.values["x"] if out is not None else residual[..., :0]
                    t = dense.target(name, b) - residual  # the dense value minus the pruned residual
                    acc.add(gather_rows(x, rows[b]), gather_rows(t, rows[b]), layer_weights[b])
                    if name == "ffn":
                        kept[b] = x
                        h_pruned[b] = residual  # the layer input is spent: the FFN's residual takes its place
                        if attn_inputs:
                            attn_inputs[b] = None
                    elif out is not None and activations_dir is None:  # the FFN pass takes attention's result
                        attn_inputs.append(x)
                m = acc.moments()
                if out is None:
                    W_K, b = m.cov_tx, None  # (d, 0): only the mean output remains
                    W_new, b_new = W_K, m.mean_t
                else:
                    W_K, b = out.weight.detach(), (out.bias.detach() if out.bias is not None else None)
                    W_new, b_new = correction.fit(method, m, W_K, b, ridge, intercept=b is not None)
                report.append(correction.fit_report(i, name, m, W_K, b, W_new, b_new, None))
                correction.write_fit(pruned, i, name, W_new, b_new)
            out = None if pruned.empty(i, "ffn") else pruned.out_proj(i, "ffn")
            for b in range(len(streams)):
                residual = h_pruned[b]
                h = _produce(pruned, i, "ffn", out, kept.pop(b), residual) + residual
                # post-LN: the layer's output is the FFN LayerNorm of (residual + FFN output)
                h_pruned[b] = pruned.norm(i, "ffn")(h) if post else h
        _after_layer(i, h_pruned)
    if activations_dir is not None:  # nothing reads the streams' last states
        h_pruned.clear()
        trace.walk.hidden.clear()
    return report
