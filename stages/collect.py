"""collect: stream unlabeled calibration text through the dense model; keep per-module sufficient statistics.

reads   data/dense, the task's calibration data (classification: data/prepared/calib.jsonl; causal LM:
        data/lm/prepared/windows.safetensors)
writes  data/stats/{stats.safetensors, stats.json}, metrics/collect.json
params  collect, task, runtime
Memory is flat in the number of sequences (N×N Gram matrices, not activations). The same run also times the
plain forward passes over the calibration set (no hooks), the yardstick that pruning time is reported against.
"""

from __future__ import annotations

import logging
import sys
import time

import torch
from tqdm.auto import tqdm

from pruneflow.adapters import get_adapter
from pruneflow.artifacts import write_json
from pruneflow.params import Params
from pruneflow.runtime import Layout, load_tokenizer, peak_rss_mb, release_freed_memory_to_os, setup_torch, stage_main
from pruneflow.stats import collect_statistics, save_statistics
from pruneflow.tasks import get_task

log = logging.getLogger("pruneflow.collect")


@torch.inference_mode()
def time_forward(model, batches) -> float:
    t0 = time.perf_counter()
    for enc in batches:
        model(**enc)
    return time.perf_counter() - t0


def run(params: Params, layout: Layout) -> dict:
    """Accumulate Gram matrices, means and D2 votes of every sublayer over the calibration set."""
    p = params.collect
    if p.return_memory:  # flat peak memory: what we keep is O(N²) per layer, never O(samples)
        release_freed_memory_to_os()
    device = setup_torch(params)
    task = get_task(params.task.kind)
    # The calibration data is read (and found empty, if it is) before the model loads.
    batches = task.calibration_batches(layout.prepared, load_tokenizer(layout.dense), p, device)
    model = task.load_model(layout.dense, attn="sdpa").to(device)
    adapter = get_adapter(model)

    forward_seconds = time_forward(model, batches) if p.time_forward else None
    t0 = time.perf_counter()
    with tqdm(total=len(batches), desc="collect", unit="seq") as bar:
        stats = collect_statistics(model, adapter, batches, p.vote_topk, bar)
    seconds = time.perf_counter() - t0
    info = {"vote_topk": p.vote_topk, "max_length": p.max_length, "family": adapter.family}
    save_statistics(stats, layout.stats, info)
    metrics = {"seconds": round(seconds, 2), "forward_seconds": forward_seconds and round(forward_seconds, 2),
               "peak_rss_mb": round(peak_rss_mb(), 1), **stats.info(), **info}
    write_json(layout.metrics / "collect.json", metrics)
    log.info("%d sequences, %d tokens (mean length %.1f): collect %.1fs, plain forward %s s",
             stats.sequences, stats.tokens, stats.mean_length, seconds, metrics["forward_seconds"])
    return {"seconds": metrics["seconds"], "tokens": stats.tokens}


if __name__ == "__main__":
    sys.exit(stage_main("collect", run))
