"""Sequential correction: refit each pruned layer on the inputs the *pruned* model actually feeds it.

Layer by layer, the calibration batches flow through two streams: the dense model (targets) and the pruned
model as corrected so far (regressors). For a post-LN sublayer the LayerNorm input is s = r + W a + b, with r
the residual. We fit the pruned sublayer's (W', b') so that r_pruned + W' a_pruned,K + b' matches s_dense:
the target t = s_dense − r_pruned also carries the drift of every earlier layer, which this refit absorbs.
Attention is refit first, then the FFN sees the corrected attention. Per layer this costs one dense pass, one
pruned attention-only pass and one pruned pass; the layer's output comes from the FFN pass's captures. Memory:
two copies of the calibration hidden states plus one layer's kept FFN activations.
"""

from __future__ import annotations

import torch
from tqdm.auto import tqdm

from pruneflow import correction
from pruneflow.adapters import SUBLAYERS, Adapter, get_adapter
from pruneflow.moments import Accumulator
from pruneflow.stats import tokenized_batches


class _Stop(Exception):
    pass


def _layer_inputs(model, adapter: Adapter, batches) -> list[tuple[torch.Tensor, tuple, dict, torch.Tensor]]:
    """(hidden, other args, kwargs, token mask) entering layer 0, per batch."""
    captured = []

    def grab(module, args, kwargs):
        captured.append((args[0], args[1:], kwargs))
        raise _Stop

    handle = adapter.layers()[0].register_forward_pre_hook(grab, with_kwargs=True)
    out = []
    try:
        for enc in batches:
            try:
                model(**enc)
            except _Stop:
                pass
            h, args, kwargs = captured.pop()
            out.append((h, args, kwargs, enc["attention_mask"].reshape(-1).bool()))
    finally:
        handle.remove()
    return out


class _Capture:
    """Pre-hooks recording the input of given modules during one call."""

    def __init__(self, modules: dict[str, torch.nn.Module | None]):
        self.values: dict[str, torch.Tensor] = {}
        self.handles = [m.register_forward_pre_hook(self._hook(k)) for k, m in modules.items() if m is not None]

    def _hook(self, key):
        def hook(module, args):
            self.values[key] = args[0]
        return hook

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        for h in self.handles:
            h.remove()


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


def _produce(adapter: Adapter, i: int, name: str, out, x: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """What the sublayer currently adds to the residual: W x + b, or an emptied sublayer's constant."""
    if out is not None:
        return torch.nn.functional.linear(x, out.weight, out.bias)
    return adapter.constant(i, name).bias.to(like.dtype).expand_as(like)


class DenseTrace:
    """The dense model's side of the sequential correction: the calibration batches entering layer 0 and, per
    layer, the LayerNorm inputs of both sublayers (the targets). Computed layer by layer on demand; with
    keep=True the targets are kept so several pruned models (a sweep) share one dense pass."""

    def __init__(self, dense_model, tokenizer, texts: list[str], batch_size: int, max_length: int, device: str,
                 keep: bool = False):
        self.adapter = get_adapter(dense_model)
        if not self.adapter.post_norm:
            raise ValueError(f"correct.sequential needs a post-LayerNorm architecture; {self.adapter.family} is "
                             "not one yet (set correct.sequential=false)")
        dense_model.to(device)
        self.streams = _layer_inputs(dense_model, self.adapter,
                                     tokenized_batches(tokenizer, texts, batch_size, max_length, device))
        self.keep = keep
        self._hidden = [s[0] for s in self.streams]
        self._targets: dict[int, dict[str, list[torch.Tensor]]] = {}
        self._next = 0

    @torch.inference_mode()
    def targets(self, i: int) -> dict[str, list[torch.Tensor]]:
        """LayerNorm inputs of layer i's attention and FFN on the dense stream, per batch."""
        if i in self._targets:
            return self._targets[i]
        if i != self._next:
            raise RuntimeError(f"dense targets are produced in layer order (asked {i}, next {self._next})")
        out = {"attn": [], "ffn": []}
        for b, (_, args, kwargs, _) in enumerate(self.streams):
            with _Capture({n: self.adapter.norm(i, n) for n in SUBLAYERS}) as cap:
                h_next = self.adapter.layers()[i](self._hidden[b], *args, **kwargs)
            for n in SUBLAYERS:
                out[n].append(cap.values[n])
            self._hidden[b] = h_next[0] if isinstance(h_next, tuple) else h_next
        self._next += 1
        if self.keep:
            self._targets[i] = out
        return out


@torch.inference_mode()
def correct_sequential(pruned_model, method: str, ridge: float, trace: DenseTrace, device: str) -> list[dict]:
    """Refit every pruned layer in order against the dense model's `trace` (see the module docstring)."""
    pruned = get_adapter(pruned_model)
    pruned_model.to(device)
    streams = trace.streams
    h_pruned = [s[0].clone() for s in streams]
    report = []
    for i in tqdm(range(pruned.num_layers), desc="correct (sequential)", leave=False):
        s_dense = trace.targets(i)
        for name in SUBLAYERS:
            out = None if pruned.empty(i, name) else pruned.out_proj(i, name)
            # The attention pass can stop where the FFN starts; the FFN pass's captures give the layer output.
            stop_at = pruned.ffn_in(i)[0] if name == "attn" and not pruned.empty(i, "ffn") else None
            acc, kept = Accumulator(), []
            for b, (_, args, kwargs, mask) in enumerate(streams):
                with _Capture({"x": out, "s": pruned.norm(i, name)}) as cap, _stop_before(stop_at):
                    try:
                        pruned.layers()[i](h_pruned[b], *args, **kwargs)
                    except _Stop:
                        pass
                s = cap.values["s"]
                x = cap.values["x"] if out is not None else s[..., :0]
                residual = s - _produce(pruned, i, name, out, x, s)
                t = s_dense[name][b] - residual  # dense LayerNorm input minus the pruned residual
                acc.add(x.flatten(0, -2)[mask], t.flatten(0, -2)[mask])
                if name == "ffn":
                    kept.append((x, residual))
            m = acc.moments()
            if out is None:
                W_K, b = m.cov_tx, None  # (d, 0): only the mean output remains
                W_new, b_new = W_K, m.mean_t
            else:
                W_K, b = out.weight.detach(), (out.bias.detach() if out.bias is not None else None)
                W_new, b_new = correction.fit(method, m, W_K, b, ridge, intercept=b is not None)
            report.append(correction.fit_report(i, name, m, W_K, b, W_new, b_new, None))
            correction.write_fit(pruned, i, name, W_new, b_new)
        norm = pruned.norm(i, "ffn")  # post-LN: the layer's output is the FFN LayerNorm of (residual + FFN output)
        out = None if pruned.empty(i, "ffn") else pruned.out_proj(i, "ffn")
        for b, (x, residual) in enumerate(kept):
            h_pruned[b] = norm(_produce(pruned, i, "ffn", out, x, residual) + residual)
        _after_layer(i, h_pruned)
    return report
