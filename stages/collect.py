"""collect: stream unlabeled calibration text through the dense model; keep per-module sufficient statistics.

reads   data/dense, the task's calibration data (classification: data/prepared/calib.jsonl; causal LM:
        data/lm/prepared/windows.safetensors)
writes  data/stats/{block-NNN.safetensors per block, stats.json}, metrics/collect.json
params  collect, task, runtime (runtime.offload: where the weights are during the walk)
The calibration batches are captured where they enter the first block, then walked block by block
(pruneflow/blockwalk.py): each block runs on every batch with its statistics hooks, its statistics are written,
and the next block follows. Memory is flat in the number of sequences (N×N Gram matrices, one block's at a time,
plus one copy of the calibration hidden states); with runtime.offload=disk only the running block's weights are
in memory. Nothing after the last block (the LM head, a classifier head) runs. The same run also times the
plain forward passes of the whole model over the calibration set (no hooks): the yardstick that pruning time
is reported against (with offload=disk it loads the whole model once; set collect.time_forward=false to keep
the peak at the walk's).
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
from pruneflow.runtime import Layout, load_tokenizer, peak_memory, release_freed_memory_to_os, setup_torch, stage_main
from pruneflow.blockwalk import BlockWalk, Residency
from pruneflow.stats import write_statistics
from pruneflow.tasks import get_task

log = logging.getLogger("pruneflow.collect")


@torch.inference_mode()
def time_forward(model, batches) -> float:
    t0 = time.perf_counter()
    for enc in batches:
        model(**enc)
    return time.perf_counter() - t0


def run(params: Params, layout: Layout) -> dict:
    """Accumulate Gram matrices, means and D2 votes of every sublayer over the calibration set, block by block."""
    p, offload = params.collect, params.runtime.offload
    if p.return_memory:  # flat peak memory: what we keep is O(N²) per layer, never O(samples)
        release_freed_memory_to_os()
    start = time.perf_counter()
    device = setup_torch(params)
    task = get_task(params.task.kind)
    # The calibration data is read (and found empty, if it is) before the model loads.
    tokenizer = load_tokenizer(layout.dense)
    batches = task.calibration_batches(layout.prepared, tokenizer, p, device)
    model = None if offload == "disk" else task.load_model(layout.dense, attn="sdpa").to(device)
    forward_seconds = None
    if p.time_forward:
        full = model if model is not None else task.load_model(layout.dense, attn="sdpa").to(device)
        # over the text the sequential refit reads, the most any stage reads (the LM's refit windows)
        forward_seconds = time_forward(full, task.refit_batches(layout.prepared, tokenizer, p, device))
        del full
    if model is None:
        model = task.load_lazy(layout.dense, attn="sdpa")
    adapter = get_adapter(model)

    t0 = time.perf_counter()  # `seconds` is the walk; loading and the yardstick's forward passes are apart
    load_seconds = t0 - start - (forward_seconds or 0.0)
    walk = BlockWalk(model, adapter, batches, Residency(model, adapter, device, offload))
    with tqdm(total=adapter.num_layers, desc="collect", unit="block") as bar:
        stats, info = write_statistics(walk, layout.stats, p, bar)
    seconds = time.perf_counter() - t0
    metrics = {"seconds": round(seconds, 2), "load_seconds": round(load_seconds, 2),
               "forward_seconds": forward_seconds and round(forward_seconds, 2),
               "offload": offload, **peak_memory(), **stats.info(), **info}
    write_json(layout.metrics / "collect.json", metrics)
    log.info("%d sequences, %d tokens (mean length %.1f): collect %.1fs, plain forward %s s, offload=%s",
             stats.sequences, stats.tokens, stats.mean_length, seconds, metrics["forward_seconds"], offload)
    return {"seconds": metrics["seconds"], "tokens": stats.tokens}


if __name__ == "__main__":
    sys.exit(stage_main("collect", run))
