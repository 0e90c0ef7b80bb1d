"""evaluate: task quality of dense vs pruned on the held-out eval split, plus what pruning cost.

reads   data/dense, data/pruned, the task's eval data (data/prepared/eval.jsonl; causal LM: the eval windows),
        metrics/{collect,rank,select,correct}.json
writes  metrics/quality.json
params  evaluate, task, runtime
The task (pruneflow/tasks/) says what quality is: for classifiers accuracy and `agreement` (the fraction of
eval sentences where pruned and dense predict the same class; less noisy than accuracy, where one sentence of
~2,000 is 0.05 points); for causal LMs perplexity of both, next-token top-1 agreement and KL(dense ‖ pruned)
per token on held-out windows.
"""

from __future__ import annotations

import logging
import sys

from pruneflow.artifacts import read_json, write_json
from pruneflow.params import Params
from pruneflow.runtime import Layout, load_tokenizer, setup_torch, stage_main
from pruneflow.tasks import get_task

log = logging.getLogger("pruneflow.evaluate")
PRUNE_STAGES = ("collect", "rank", "select", "correct")


def run(params: Params, layout: Layout) -> dict:
    """Quality of dense vs pruned; collects FLOPs and pruning time into quality.json."""
    p = params.evaluate
    device = setup_torch(params)
    task = get_task(params.task.kind)
    reference = task.reference(task.load_model(layout.dense).to(device), layout.prepared,
                               load_tokenizer(layout.dense), p, device)
    q, _ = task.compare(reference, task.load_model(layout.pruned).to(device), p, device)
    m = {k: read_json(layout.metrics / f"{k}.json") for k in PRUNE_STAGES}
    manifest = read_json(layout.pruned / "manifest.json")
    # the work of the four stages, as forward_seconds is the forward passes of a loaded model; what each stage
    # spent loading its inputs (its own process imports the model code again) is load_seconds
    work, forward = sum(m[k]["seconds"] for k in PRUNE_STAGES), m["collect"].get("forward_seconds")
    out = {
        "budget": m["select"]["budget"], "cost": m["select"].get("cost", "flops"),
        "cost_ratio": m["select"].get("cost_ratio"), "flops_dense": m["select"]["flops_dense"],
        "flops_pruned": m["select"]["flops_pruned"], "flops_ratio": m["select"]["flops_ratio"],
        "flops_seq_len": m["select"]["seq_len"], **q,
        "prune_seconds": round(work, 2),
        "forward_seconds": forward,
        "prune_over_forward": round(work / forward, 2) if forward else None,
        "load_seconds": round(sum(m[k].get("load_seconds", 0.0) for k in PRUNE_STAGES), 2),
        "calibration_sentences": m["collect"]["sequences"],
        "methods": {"rank": m["rank"]["method"], "heads": m["rank"].get("head_method"),
                    "allocation": m["select"]["allocation"], "correction": m["correct"]["method"],
                    "sequential": m["correct"]["sequential"]},
        "heads_per_layer": [s["heads"] for s in manifest["shape"]],
        "neurons_per_layer": [s["neurons"] for s in manifest["shape"]],
    }
    write_json(layout.metrics / "quality.json", out)
    log.info("%s at %.3f of dense FLOPs", ", ".join(f"{k} {q[k]:.4f}" for k in task.headline if k in q),
             out["flops_ratio"])
    return {k: f"{q[k]:.4f}" for k in task.headline if k in q}


if __name__ == "__main__":
    sys.exit(stage_main("evaluate", run))
