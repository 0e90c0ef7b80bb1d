"""correct: physically slice the dense model to the selection and correct the kept weights in closed form.

reads   data/dense, data/stats, data/select/selection.json, data/prepared/calib.jsonl (sequential only)
writes  data/pruned/ (model.safetensors, dense config.json, manifest.json, tokenizer), metrics/correct.json
params  correct, collect (tokenization of calibration text, sequential only), runtime
Each pruned sublayer's output projection (and bias) is refit so that it reproduces the dense sublayer's
output on calibration data (pruneflow/correction.py). correct.sequential=true refits each layer on the
inputs of the already-pruned model, with targets from the dense one, which also absorbs drift from earlier
layers. The model reloads with one call: pruneflow.adapters.load_pruned(path).
"""

from __future__ import annotations

import copy
import logging
import sys
import time

import torch

from pruneflow import correction
from pruneflow.adapters import Adapter, get_adapter, save_pruned
from pruneflow.artifacts import read_json, write_json
from pruneflow.params import CorrectParams, Params
from pruneflow.runtime import Layout, setup_torch, stage_main
from pruneflow.stats import Statistics
from pruneflow.task import load_model, load_tokenizer

log = logging.getLogger("pruneflow.correct")


def kept_columns(adapter: Adapter, name: str, keep: list[int]) -> torch.Tensor:
    """Columns of the output projection that the kept units own, in the order slicing leaves them."""
    if name == "ffn":
        return torch.tensor(sorted(keep), dtype=torch.long)
    dh = adapter.head_dim
    return torch.tensor([h * dh + t for h in sorted(keep) for t in range(dh)], dtype=torch.long)


def write_fit(adapter: Adapter, i: int, name: str, W: torch.Tensor, b: torch.Tensor | None) -> None:
    """Put a fitted (W, b) into the sliced model; an emptied sublayer keeps only its bias (= mean output)."""
    with torch.no_grad():
        if adapter.empty(i, name):
            if b is not None:
                adapter.constant(i, name).bias.copy_(b.float())
            return
        lin = adapter.out_proj(i, name)
        lin.weight.copy_(W.to(lin.weight.dtype))
        if b is not None and lin.bias is not None:
            lin.bias.copy_(b.to(lin.bias.dtype))


def correct_from_stats(dense: Adapter, pruned: Adapter, stats: Statistics, keep: dict, p: CorrectParams) -> list[dict]:
    """Non-sequential: targets are the dense sublayer outputs; all moments come from the collected Grams."""
    report = []
    for i in range(dense.num_layers):
        for name in ("attn", "ffn"):
            st, lin = stats.layers[i][name], dense.out_proj(i, name)
            cols = kept_columns(dense, name, keep[name][i])
            W, b = lin.weight.detach(), (lin.bias.detach() if lin.bias is not None else None)
            m = correction.moments_from_dense(st.cov, st.mean, W, b, cols, st.n)
            W_new, b_new = correction.fit(p.method, m, W[:, cols], b, p.ridge)
            report.append(_row(i, name, m, W[:, cols], b, W_new, b_new, st.norm_scale))
            write_fit(pruned, i, name, W_new, b_new)
    return report


def _row(i, name, m, W_K, b, W_new, b_new, scale) -> dict:
    scale = scale or max(m.cov_tt_trace, 1e-12)
    return {"layer": i, "sublayer": name, "kept": int(W_K.shape[1]),
            "rel_error_sliced": correction.error(m, W_K, b) / scale,
            "rel_error_corrected": correction.error(m, W_new, b_new) / scale}


def run(params: Params, layout: Layout) -> dict:
    """Slice to the selection and refit the kept output projections."""
    from stages.collect import load_statistics

    p = params.correct
    device = setup_torch(params)
    t0 = time.perf_counter()
    sel = read_json(layout.selection)
    model = load_model(layout.dense)
    adapter = get_adapter(model)
    pruned_model = copy.deepcopy(model)
    pruned = get_adapter(pruned_model)
    pruned.slice_(sel["keep_heads"], sel["keep_neurons"])
    keep = {"attn": sel["keep_heads"], "ffn": sel["keep_neurons"]}
    if p.sequential and p.method != "none":
        from pruneflow.sequential import DenseTrace, correct_sequential
        from stages.collect import calibration_texts

        texts = calibration_texts(params, layout)[: p.max_samples]
        trace = DenseTrace(model, load_tokenizer(layout.dense), texts, params.collect.batch_size,
                           params.collect.max_length, device)
        report = correct_sequential(pruned_model, p, trace, device)
    else:
        report = correct_from_stats(adapter, pruned, load_statistics(layout, adapter.num_layers), keep, p)
    seconds = time.perf_counter() - t0
    info = {k: sel[k] for k in ("budget", "allocation", "seq_len", "ranking", "flops_dense", "flops_pruned", "flops_ratio")}
    sequential = p.sequential and p.method != "none"
    info |= {"correction": p.method, "sequential": sequential}
    save_pruned(pruned_model, layout.pruned, sel["keep_heads"], sel["keep_neurons"], info, load_tokenizer(layout.dense))
    mean = lambda key: sum(r[key] for r in report) / len(report)  # noqa: E731
    metrics = {"method": p.method, "sequential": sequential, "seconds": round(seconds, 2),
               "mean_rel_error_sliced": mean("rel_error_sliced"), "mean_rel_error_corrected": mean("rel_error_corrected"),
               "layers": report}
    write_json(layout.metrics / "correct.json", metrics)
    log.info("%s correction: mean relative error %.4g -> %.4g", p.method, metrics["mean_rel_error_sliced"],
             metrics["mean_rel_error_corrected"])
    return {"seconds": metrics["seconds"]}


if __name__ == "__main__":
    sys.exit(stage_main("correct", run))
