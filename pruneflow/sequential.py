"""Sequential correction: refit each pruned layer on the inputs the *pruned* model actually feeds it.

Layer by layer, the calibration batches flow through two streams: the dense model (targets) and the pruned
model as corrected so far (regressors). For a post-LN sublayer the LayerNorm input is s = r + W a + b, with r
the residual. We fit the pruned sublayer's (W', b') so that r_pruned + W' a_pruned,K + b' matches s_dense:
the target t = s_dense − r_pruned also carries the drift of every earlier layer, which this refit absorbs.
Attention is refit first, then the FFN sees the corrected attention. Costs one dense and three pruned passes
per layer over cached hidden states (memory: two copies of the calibration hidden states).
"""

from __future__ import annotations

import torch
from tqdm.auto import tqdm

from pruneflow import correction
from pruneflow.adapters import Adapter, get_adapter
from pruneflow.params import CorrectParams
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


def _norm(adapter: Adapter, i: int, name: str):
    return adapter.attn_norm(i) if name == "attn" else adapter.ffn_norm(i)


def _out(adapter: Adapter, i: int, name: str):
    empty = adapter.attn_empty(i) if name == "attn" else adapter.ffn_empty(i)
    return None if empty else (adapter.attn_out(i) if name == "attn" else adapter.ffn_out(i))


@torch.inference_mode()
def correct_sequential(dense_model, pruned_model, keep: dict, p: CorrectParams, tokenizer, texts: list[str],
                       batch_size: int, max_length: int, device: str) -> list[dict]:
    from stages.correct import constant_of, write_fit

    dense, pruned = get_adapter(dense_model), get_adapter(pruned_model)
    if not all(dense.attn_norm(i) is not None for i in range(dense.num_layers)):
        raise ValueError(f"correct.sequential needs a post-LayerNorm architecture; {dense.family} is not one yet "
                         "(set correct.sequential=false)")
    dense_model.to(device), pruned_model.to(device)
    streams = _layer_inputs(dense_model, dense, tokenized_batches(tokenizer, texts, batch_size, max_length, device))
    h_dense = [s[0] for s in streams]
    h_pruned = [s[0].clone() for s in streams]
    report = []
    for i in tqdm(range(dense.num_layers), desc="correct (sequential)"):
        # Dense targets: the LayerNorm inputs of both sublayers, and the next layer's input.
        s_dense = {"attn": [], "ffn": []}
        for b, (_, args, kwargs, mask) in enumerate(streams):
            with _Capture({n: _norm(dense, i, n) for n in ("attn", "ffn")}) as cap:
                h_next = dense.layers()[i](h_dense[b], *args, **kwargs)
            for n in ("attn", "ffn"):
                s_dense[n].append(cap.values[n])
            h_dense[b] = h_next[0] if isinstance(h_next, tuple) else h_next
        for name in ("attn", "ffn"):
            out = _out(pruned, i, name)
            acc = correction.MomentAccumulator()
            for b, (_, args, kwargs, mask) in enumerate(streams):
                with _Capture({"x": out, "s": _norm(pruned, i, name)}) as cap:
                    pruned.layers()[i](h_pruned[b], *args, **kwargs)
                s = cap.values["s"]
                if out is not None:
                    x = cap.values["x"]
                    produced = torch.nn.functional.linear(x, out.weight, out.bias)
                else:
                    x = s[..., :0]
                    produced = constant_of(pruned, i, name).bias.expand_as(s)
                t = s_dense[name][b] - (s - produced)  # dense LayerNorm input minus the pruned residual
                acc.add(x.reshape(-1, x.shape[-1])[mask], t.reshape(-1, t.shape[-1])[mask])
            m = acc.moments()
            if out is None:
                W_K, b = m.cov_tx, None  # (d, 0)
                W_new, b_new = W_K, m.mean_t
            else:
                W_K, b = out.weight.detach(), (out.bias.detach() if out.bias is not None else None)
                W_new, b_new = correction.fit(p.method, m, W_K, b, p.ridge)
            scale = max(m.cov_tt_trace, 1e-12)
            report.append({"layer": i, "sublayer": name, "kept": int(W_K.shape[1]),
                           "rel_error_sliced": correction.error(m, W_K, b) / scale,
                           "rel_error_corrected": correction.error(m, W_new, b_new) / scale})
            write_fit(pruned, i, name, W_new, b_new)
        for b, (_, args, kwargs, mask) in enumerate(streams):
            h_next = pruned.layers()[i](h_pruned[b], *args, **kwargs)
            h_pruned[b] = h_next[0] if isinstance(h_next, tuple) else h_next
    return report
