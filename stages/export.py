"""export: ONNX files of the dense and the pruned model, proven to match PyTorch.

reads   data/dense, data/pruned (models + tokenizer), data/prepared/eval.jsonl (real sentences for the check)
writes  data/onnx/{dense.onnx, pruned.onnx} + the tokenizer files beside them, metrics/export.json
params  export, task
Each file is self-contained (weights inside), takes input_ids + attention_mask with dynamic batch and
sequence axes and returns logits. The stage fails, writing nothing, unless onnxruntime's logits match
PyTorch's within export.atol on real eval batches of mixed lengths (padded) and on a single sentence.
With export.optimize, onnxruntime's transformer optimizer is tried and its file kept only if it still
matches and is measurably faster.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import numpy as np

from pruneflow.adapters import get_adapter
from pruneflow.artifacts import atomic_path, write_json
from pruneflow.onnx_io import (check_parity, export_onnx, latency_ms, make_session, optimize_transformer,
                               parity_batches, parity_diff, set_metadata, time_interleaved)
from pruneflow.params import ExportParams, Params
from pruneflow.runtime import Layout, load_tokenizer, stage_main
from pruneflow.tasks import Task, get_task

log = logging.getLogger("pruneflow.export")


def _try_optimize(model, plain: Path, batches: list[dict[str, np.ndarray]], p: ExportParams) -> dict:
    """Optimize `plain`; replace it with the optimized file only if that is within atol and faster."""
    adapter = get_adapter(model)
    if adapter.ort_optimizer_type is None:
        return {"kept": False, "reason": f"no onnxruntime transformer-optimizer support for family {adapter.family!r}"}
    candidate = plain.with_name(plain.stem + ".optimized.onnx")
    fused = optimize_transformer(plain, candidate, adapter.ort_optimizer_type)
    sessions = {"plain": make_session(plain, "cpu", p.threads), "optimized": make_session(candidate, "cpu", p.threads)}
    diff = parity_diff(model, sessions["optimized"], batches)
    report = {"fused_ops": fused, "max_abs_diff": diff}
    if not diff <= p.atol:
        candidate.unlink()
        return report | {"kept": False, "reason": f"optimized outputs differ by {diff:.3g} > atol {p.atol:g}"}
    timing_batch = batches[0]
    calls = {name: (lambda s=s: s.run(None, timing_batch)) for name, s in sessions.items()}
    times = {name: latency_ms(t) for name, t in time_interleaved(calls, warmup=2, iters=p.optimize_iters).items()}
    faster = times["optimized"]["median_ms"] < times["plain"]["median_ms"]
    if faster:
        candidate.replace(plain)
    else:
        candidate.unlink()
    shape = "x".join(str(n) for n in timing_batch["input_ids"].shape)
    return report | {"kept": faster, "plain_ms": times["plain"]["median_ms"],
                     "optimized_ms": times["optimized"]["median_ms"], "timed_on": f"{shape} real batch, "
                     f"{p.threads} thread(s), median of {p.optimize_iters}",
                     "reason": "faster and within atol" if faster else "not faster than the plain export"}


def _export_one(task: Task, name: str, src: Path, out: Path, tokenizer, texts: list[str], p: ExportParams) -> dict:
    if not src.exists():
        raise FileNotFoundError(f"{src} not found: run the stage that writes it first (dvc repro)")
    model = task.load_model(src)
    max_length = min(tokenizer.model_max_length, model.config.max_position_embeddings)
    batches = parity_batches(tokenizer, texts, p.parity_sentences, max_length)
    sample = {k: v[:2] for k, v in batches[0].items()}
    seconds = export_onnx(model, out, sample, p.opset, p.exporter)
    diff = check_parity(model, make_session(out, "cpu", p.threads), batches, p.atol, f"{name} model ({src})")
    report = {"source": str(src), "export_seconds": round(seconds, 2), "max_abs_diff": diff,
              "parity_batches": [list(b["input_ids"].shape) for b in batches]}
    if p.optimize:
        report["optimize"] = _try_optimize(model, out, batches, p)
        if report["optimize"]["kept"]:
            report["max_abs_diff"] = report["optimize"]["max_abs_diff"]
    set_metadata(out, task.export_metadata(model) | {"pruneflow.model": name, "pruneflow.source": str(src)})
    report["size_mb"] = round(out.stat().st_size / 2**20, 2)
    log.info("%s: exported in %.1fs, %.1f MiB, max |logit diff| %.2g%s", name, seconds, report["size_mb"], diff,
             " (optimized kept)" if report.get("optimize", {}).get("kept") else "")
    return report


def run(params: Params, layout: Layout) -> dict:
    """Export dense and pruned models to ONNX and check onnxruntime against PyTorch."""
    p = params.export
    eval_path = layout.prepared / "eval.jsonl"
    if not eval_path.exists():
        raise FileNotFoundError(f"{eval_path} not found: run the prepare stage first")
    task = get_task(params.task.kind)
    texts, _ = task.eval_split(layout.prepared)
    tokenizer = load_tokenizer(layout.dense)
    models = {"dense": layout.dense, "pruned": layout.pruned}
    with atomic_path(layout.onnx) as tmp:  # all or nothing: a failed check leaves the old data/onnx alone
        tmp.mkdir(parents=True)
        reports = {name: _export_one(task, name, src, tmp / f"{name}.onnx", tokenizer, texts, p)
                   for name, src in models.items()}
        tokenizer.save_pretrained(str(tmp))
    metrics = {"opset": p.opset, "exporter": p.exporter, "atol": p.atol,
               "max_abs_diff": max(r["max_abs_diff"] for r in reports.values()),
               "files": {name: str(layout.onnx / f"{name}.onnx") for name in models}, "models": reports}
    write_json(layout.metrics / "export.json", metrics)
    return {"max_abs_diff": f"{metrics['max_abs_diff']:.2g}",
            "sizes_mb": "/".join(str(r["size_mb"]) for r in reports.values())}


if __name__ == "__main__":
    sys.exit(stage_main("export", run))
