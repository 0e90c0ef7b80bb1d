"""benchmark: measured latency of dense vs pruned, in onnxruntime and PyTorch, beside the FLOP ratio.

reads   data/onnx (ONNX files + tokenizer), data/dense, data/pruned, data/prepared/eval.jsonl
writes  metrics/latency.json, plots/latency.csv
params  benchmark (grid, warm-up, runs, threads, provider), export.atol and evaluate (the accuracy check), task
Protocol: real eval sentences padded/truncated to each sequence length; for every (batch, seq_len) of the grid
and each runtime, warm-up runs then timed runs, dense and pruned taking turns so machine noise hits both;
median and p90 per model; speed-up = dense median / pruned median; ideal speed-up = dense / pruned fvcore
FLOPs at that shape. Also checks that the ONNX models predict the eval split as PyTorch does.
"""

from __future__ import annotations

import itertools
import os
import logging
import platform
import sys
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from pruneflow.adapters import get_adapter
from pruneflow.artifacts import write_json, write_text
from pruneflow.flops import count_flops
from pruneflow.onnx_io import (OUTPUT_NAME, fixed_shape_batch, latency_ms, make_session, resolve_provider,
                               session_runs_on, time_interleaved)
from pruneflow.params import Params
from pruneflow.runtime import Layout, load_tokenizer, stage_main
from pruneflow.tasks import get_task, ort_runner, torch_runner

log = logging.getLogger("pruneflow.benchmark")

MODELS = ("dense", "pruned")
RUNTIMES = ("ort", "torch")
CSV_COLUMNS = ("runtime", "batch", "seq_len", "flops_ratio", "flops_fraction", "speedup", "efficiency",
               "dense_median_ms", "dense_p90_ms", "pruned_median_ms", "pruned_p90_ms")


def cpu_model() -> str:
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def grid_shapes(batch_sizes: list[int], seq_lens: list[int], reference: tuple[int, int]) -> list[tuple[int, int]]:
    """Every (batch, seq_len) of the grid, plus the reference shape if the grid lacks it."""
    return sorted(set(itertools.product(batch_sizes, seq_lens)) | {tuple(reference)})


def flop_ratios(models: dict, seq_lens: list[int], batch: int) -> dict[int, dict]:
    """fvcore FLOPs (one multiply-add = one flop, eager attention) of both models at each length. fvcore counts
    are linear in the batch size, so the ratio at `batch` holds for every batch of the grid."""
    out = {}
    for seq in sorted(set(seq_lens)):
        counts = {name: count_flops(models[name], seq, batch).total for name in MODELS}
        out[seq] = counts | {"batch": batch, "ratio": counts["dense"] / counts["pruned"]}
    return out


def agreement(name: str, torch_logits: np.ndarray, ort_logits: np.ndarray, labels: list[int] | None,
              atol: float) -> dict:
    """Same predictions? A flip is tolerable only where PyTorch's top-2 logit margin is under 2*atol (a
    within-tolerance difference could flip it); any other flip means the ONNX model is not the same model."""
    pred_t, pred_o = torch_logits.argmax(-1), ort_logits.argmax(-1)
    top2 = np.sort(torch_logits, axis=-1)[:, -2:]
    margin = top2[:, 1] - top2[:, 0]
    flips = pred_t != pred_o
    unexplained = int((flips & (margin > 2 * atol)).sum())
    diff = float(np.abs(torch_logits.astype(np.float64) - ort_logits).max())
    if unexplained:
        raise ValueError(f"{name}: the ONNX model predicts {unexplained} eval sentences differently from PyTorch "
                         f"(max abs logit diff {diff:.3g}, export.atol={atol:g}); re-run the export stage")
    acc = (lambda pred: float((pred == np.asarray(labels)).mean())) if labels else (lambda pred: None)
    return {"accuracy_torch": acc(pred_t), "accuracy_ort": acc(pred_o), "n_eval": int(len(pred_t)),
            "n_disagree": int(flips.sum()), "max_abs_diff": diff, "within_atol": diff <= atol}


def time_grid(models: dict, sessions: dict, tokenizer, texts: list[str], shapes: list[tuple[int, int]],
              warmup: int, iters: int) -> list[dict]:
    """One row per (runtime, batch, seq_len) with dense and pruned latency, measured in turns."""
    rows = []
    bar = tqdm(total=len(shapes) * len(RUNTIMES) * (warmup + iters), desc="benchmark", unit="round")
    for (batch, seq), runtime in itertools.product(shapes, RUNTIMES):
        bar.set_postfix_str(f"{runtime} batch {batch} seq {seq}")
        feeds = fixed_shape_batch(tokenizer, texts, batch, seq)
        if runtime == "ort":
            calls = {name: (lambda s=sessions[name]: s.run([OUTPUT_NAME], feeds)) for name in MODELS}
        else:
            tensors = {k: torch.from_numpy(v) for k, v in feeds.items()}
            calls = {name: (lambda m=models[name]: m(**tensors)) for name in MODELS}
        with torch.inference_mode():
            times = time_interleaved(calls, warmup, iters, bar)
        stats = {name: latency_ms(t) for name, t in times.items()}
        rows.append({"runtime": runtime, "batch": batch, "seq_len": seq,
                     **{f"{name}_{k}": v for name in MODELS for k, v in stats[name].items() if k != "n"},
                     "speedup": stats["dense"]["median_ms"] / stats["pruned"]["median_ms"]})
    bar.close()
    return rows


def to_csv(rows: list[dict]) -> str:
    lines = [",".join(CSV_COLUMNS)]
    for r in rows:
        lines.append(",".join(f"{r[c]:.6g}" if isinstance(r[c], float) else str(r[c]) for c in CSV_COLUMNS))
    return "\n".join(lines) + "\n"


def run(params: Params, layout: Layout) -> dict:
    """Time dense vs pruned in onnxruntime and PyTorch over the grid; check ONNX predictions."""
    import onnxruntime
    import transformers

    b = params.benchmark
    onnx_files = {name: layout.onnx / f"{name}.onnx" for name in MODELS}
    for path in [*onnx_files.values(), layout.dense, layout.pruned, layout.prepared / "eval.jsonl"]:
        if not path.exists():
            raise FileNotFoundError(f"{path} not found: run the stages before benchmark (dvc repro benchmark)")
    torch.set_num_threads(b.threads)
    provider = resolve_provider(b.provider)
    sessions = {name: make_session(path, provider, b.threads) for name, path in onnx_files.items()}
    task = get_task(params.task.kind)
    models = {name: task.load_model(src, attn=b.torch_attn) for name, src in (("dense", layout.dense),
                                                                               ("pruned", layout.pruned))}
    tokenizer = load_tokenizer(layout.onnx)
    texts, labels = task.eval_split(layout.prepared)
    if not texts:
        raise ValueError(f"{layout.prepared / 'eval.jsonl'} is empty: the benchmark times real eval sentences")
    shapes = grid_shapes(b.batch_sizes, b.seq_lens, b.reference)
    max_positions = models["dense"].config.max_position_embeddings
    if max(seq for _, seq in shapes) > max_positions:
        raise ValueError(f"benchmark.seq_lens / reference go up to {max(s for _, s in shapes)} tokens but the "
                         f"model has {max_positions} positions; lower them")

    ev = params.evaluate
    quality = {}
    for name in MODELS:
        torch_out = task.predict(torch_runner(models[name], "cpu"), tokenizer, texts, ev.batch_size, ev.max_length,
                                 f"torch {name} eval")
        ort_out = task.predict(ort_runner(sessions[name]), tokenizer, texts, ev.batch_size, ev.max_length,
                               f"onnx {name} eval")
        quality[name] = agreement(name, torch_out, ort_out, labels, params.export.atol)

    ref_batch, ref_seq = b.reference
    flops = flop_ratios(models, [seq for _, seq in shapes], ref_batch)
    rows = time_grid(models, sessions, tokenizer, texts, shapes, b.warmup, b.iters)
    for r in rows:
        ratio = flops[r["seq_len"]]["ratio"]
        r |= {"flops_ratio": ratio, "flops_fraction": 1 / ratio, "efficiency": r["speedup"] / ratio}
    ref = {r["runtime"]: r for r in rows if (r["batch"], r["seq_len"]) == (ref_batch, ref_seq)}
    metrics = {
        "provider": session_runs_on(sessions["pruned"]),
        "threads": b.threads,
        "reference": {"batch": ref_batch, "seq_len": ref_seq},
        **{f"{rt}_ms_{name}": ref[rt][f"{name}_median_ms"] for rt in RUNTIMES for name in MODELS},
        **{f"{rt}_p90_ms_{name}": ref[rt][f"{name}_p90_ms"] for rt in RUNTIMES for name in MODELS},
        "speedup_ort": ref["ort"]["speedup"],
        "speedup_torch": ref["torch"]["speedup"],
        "flops_ratio": flops[ref_seq]["ratio"],
        "efficiency_ort": ref["ort"]["efficiency"],
        "efficiency_torch": ref["torch"]["efficiency"],
        "accuracy": quality,
        "flops": flops,
        "grid": rows,
        "protocol": {
            "inputs": "real eval sentences padded/truncated to seq_len, int64 input_ids + attention_mask",
            "timing": f"{b.warmup} warm-up + {b.iters} timed runs per model and shape, dense/pruned in turns, "
                      "median and p90 of wall time per call",
            "flops": "fvcore total (one multiply-add = one flop), eager attention",
            "accuracy": f"whole eval split, batch {ev.batch_size}, max_length {ev.max_length}",
            "models": {"dense": str(layout.dense), "pruned": str(layout.pruned),
                       "pruned_shape": [[layer.heads, layer.neurons] for layer in get_adapter(models["pruned"]).shape()]},
            "eval_split": {"path": str(layout.prepared / "eval.jsonl"), "n": len(texts)},
            "provider_requested": b.provider,
            "torch_device": "cpu",
            "onnx_providers": sessions["pruned"].get_providers(),
            "torch_attn": b.torch_attn,
            "torch_threads": torch.get_num_threads(),
            "cpu": cpu_model(),
            "cpu_count": len(os.sched_getaffinity(0)),
            "versions": {"torch": torch.__version__, "onnxruntime": onnxruntime.__version__,
                         "transformers": transformers.__version__, "python": platform.python_version()},
            "files": {name: str(path) for name, path in onnx_files.items()},
        },
    }
    write_json(layout.metrics / "latency.json", metrics)
    write_text(layout.plots / "latency.csv", to_csv(rows))
    log.info("batch %d seq %d: onnxruntime %.1f -> %.1f ms (x%.2f), torch %.1f -> %.1f ms (x%.2f), ideal x%.2f",
             ref_batch, ref_seq, metrics["ort_ms_dense"], metrics["ort_ms_pruned"], metrics["speedup_ort"],
             metrics["torch_ms_dense"], metrics["torch_ms_pruned"], metrics["speedup_torch"], metrics["flops_ratio"])
    return {"provider": metrics["provider"], "speedup_ort": f"{metrics['speedup_ort']:.2f}",
            "speedup_torch": f"{metrics['speedup_torch']:.2f}", "flops_ratio": f"{metrics['flops_ratio']:.2f}"}


if __name__ == "__main__":
    sys.exit(stage_main("benchmark", run))
