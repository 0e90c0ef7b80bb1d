"""correct: physically slice the dense model to the selection and correct the kept weights in closed form.

reads   data/dense, data/stats, data/select/selection.json, data/prepared/calib.jsonl (sequential only)
writes  data/pruned/ (model.safetensors, dense config.json, manifest.json, tokenizer; plus plain/, an ordinary
        Hugging Face checkpoint, when the shape allows: a uniformly pruned Llama-family decoder), metrics/correct.json
params  correct (return_memory and low_memory: a lower peak for more time, by default with offload=disk), collect (tokenization of
        calibration text, sequential only), task, runtime (runtime.offload: with disk and the sequential
        correction, neither model is ever whole in memory: the dense side reads each block from data/dense as it
        runs, the pruned side reads each layer, slices and refits it, and writes it to a spill folder beside
        data/pruned, from which the model is saved one tensor at a time)
Each pruned sublayer's output projection (and bias, where it has one) is refit so that it reproduces the dense
sublayer's output on calibration data (pruneflow/correction.py). correct.sequential=true refits each layer on
the inputs of the already-pruned model, with targets from the dense one (pruneflow/sequential.py). The model
reloads with one call: pruneflow.plan.load_pruned(path).
"""

from __future__ import annotations

import contextlib
import logging
import sys
import tempfile
import time
from pathlib import Path

from pruneflow.artifacts import read_json, write_json
from pruneflow.hf_checkpoint import save_plain_checkpoint
from pruneflow.params import Params
from pruneflow.plan import save_pruned
from pruneflow.pruning import prune_to_selection, uses_sequential
from pruneflow.runtime import Layout, load_tokenizer, peak_memory, release_freed_memory_to_os, setup_torch, stage_main
from pruneflow.stats import load_statistics
from pruneflow.tasks import get_task

log = logging.getLogger("pruneflow.correct")


def with_disk(switch: bool | None, offload: str) -> bool:
    """A memory-for-time switch of correct: on or off as set; null: on only with runtime.offload=disk."""
    return switch if switch is not None else offload == "disk"


def run(params: Params, layout: Layout) -> dict:
    """Slice to the selection and refit the kept output projections."""
    p, c = params.correct, params.collect
    offload = params.runtime.offload
    # glibc keeps the heap that the refit's per-batch tensors free between layers (about 250 MiB on SmolLM2);
    # mmap gives it back, at the price of fresh pages for every large tensor
    if with_disk(p.return_memory, offload):
        release_freed_memory_to_os()
    device = setup_torch(params)
    start = time.perf_counter()
    task = get_task(params.task.kind)
    sel = read_json(layout.selection)
    # offload=disk with the sequential refit streams the pruned model too: no whole model is ever in memory
    streamed = offload == "disk" and uses_sequential(p)
    model = task.load_lazy(layout.dense) if streamed else task.load_model(layout.dense)
    t0 = time.perf_counter()  # `seconds` is the work; loading (mostly importing the model code) is apart
    low_memory = uses_sequential(p) and with_disk(p.low_memory, offload)
    activations_dir = None  # low_memory: where the refit's per-batch tensors wait (set inside the spill folder)

    def dense_trace():
        from pruneflow.sequential import DenseTrace

        batches = task.refit_batches(layout.prepared, load_tokenizer(layout.dense), c, device, p.max_samples,
                                     token_cap=False)
        dense = task.load_lazy(layout.dense) if offload == "disk" else model
        # low_memory: each batch's dense hidden states go to disk as they are captured, not all of them first
        hidden_dir = None if activations_dir is None else activations_dir / "dense"
        return DenseTrace(dense, batches, device, offload=offload, hidden_dir=hidden_dir)

    stats = None if uses_sequential(p) else load_statistics(layout.stats)
    layout.pruned.parent.mkdir(parents=True, exist_ok=True)
    # the streamed layers' spill (and the low-memory refit's activations) sit beside the output and go once the
    # model is saved
    spill = (tempfile.TemporaryDirectory(prefix=f".{layout.pruned.name}-spill-", dir=layout.pruned.parent)
             if streamed or low_memory else contextlib.nullcontext())
    with spill as spill_dir:
        if low_memory:
            activations_dir = Path(spill_dir) / "activations"
            activations_dir.mkdir()
        pruned_model, plan, report = prune_to_selection(model, stats, sel, p, device, dense_trace,
                                                        spill_dir=Path(spill_dir) if streamed else None,
                                                        activations_dir=activations_dir)
        seconds = time.perf_counter() - t0
        info = {k: sel[k] for k in ("budget", "cost", "allocation", "seq_len", "ranking", "flops_dense",
                                    "flops_pruned", "flops_ratio")}
        info |= {"correction": p.method, "sequential": uses_sequential(p)}
        tokenizer = load_tokenizer(layout.dense)
        save_pruned(pruned_model, layout.pruned, plan, info, tokenizer)
        try:  # uniformly pruned decoders are also an ordinary checkpoint of their architecture
            save_plain_checkpoint(pruned_model, layout.pruned / "plain", tokenizer)
            plain = str(layout.pruned / "plain")
        except ValueError as why:
            plain = None
            log.info("no plain Hugging Face checkpoint (the manifest format holds the model): %s", why)
    mean = lambda key: sum(r[key] for r in report) / len(report)  # noqa: E731
    metrics = {"method": p.method, "sequential": uses_sequential(p), "offload": offload, "low_memory": low_memory,
               "seconds": round(seconds, 2),
               "load_seconds": round(t0 - start, 2),
               **peak_memory(),
               "mean_rel_error_sliced": mean("rel_error_sliced"), "mean_rel_error_corrected": mean("rel_error_corrected"),
               "plain_checkpoint": plain, "layers": report}
    write_json(layout.metrics / "correct.json", metrics)
    log.info("%s correction: mean relative error %.4g -> %.4g", p.method, metrics["mean_rel_error_sliced"],
             metrics["mean_rel_error_corrected"])
    return {"seconds": metrics["seconds"]}


if __name__ == "__main__":
    sys.exit(stage_main("correct", run))
