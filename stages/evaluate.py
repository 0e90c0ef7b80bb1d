"""evaluate: task quality of dense vs pruned on the held-out eval split, plus what pruning cost.

reads   data/dense, data/pruned, data/prepared/eval.jsonl, metrics/{collect,rank,select,correct}.json
writes  metrics/quality.json
params  evaluate, runtime
`agreement` (fraction of eval sentences where pruned and dense predict the same class) separates methods
with less noise than accuracy: one sentence of ~2,000 is 0.05 points.
"""

from __future__ import annotations

import logging
import sys

import numpy as np

from pruneflow.artifacts import read_json, read_jsonl, write_json
from pruneflow.params import Params
from pruneflow.runtime import Layout, setup_torch, stage_main
from pruneflow.task import accuracy, load_model, load_tokenizer, predict_logits

log = logging.getLogger("pruneflow.evaluate")


def quality(dense_logits: np.ndarray, pruned_logits: np.ndarray, labels: list[int]) -> dict:
    return {"accuracy_dense": accuracy(dense_logits, labels), "accuracy_pruned": accuracy(pruned_logits, labels),
            "agreement": float((dense_logits.argmax(-1) == pruned_logits.argmax(-1)).mean()),
            "n_eval": len(labels)}


def run(params: Params, layout: Layout) -> dict:
    """Accuracy and agreement of dense vs pruned; collects FLOPs and pruning time into quality.json."""
    p = params.evaluate
    device = setup_torch(params)
    rows = read_jsonl(layout.prepared / "eval.jsonl")
    if not rows or "label" not in rows[0]:
        raise ValueError("evaluate: the eval split has no labels")
    texts, labels = [r["text"] for r in rows], [r["label"] for r in rows]
    tok = load_tokenizer(layout.dense)
    logits = {name: predict_logits(load_model(path), tok, texts, p.batch_size, p.max_length, device, f"eval {name}")
              for name, path in (("dense", layout.dense), ("pruned", layout.pruned))}
    q = quality(logits["dense"], logits["pruned"], labels)
    m = {k: read_json(layout.metrics / f"{k}.json") for k in ("collect", "rank", "select", "correct")}
    manifest = read_json(layout.pruned / "manifest.json")
    out = {
        "budget": m["select"]["budget"], "flops_dense": m["select"]["flops_dense"],
        "flops_pruned": m["select"]["flops_pruned"], "flops_ratio": m["select"]["flops_ratio"],
        "flops_seq_len": m["select"]["seq_len"], **q,
        "accuracy_drop_points": 100 * (q["accuracy_dense"] - q["accuracy_pruned"]),
        "prune_seconds": round(sum(m[k]["seconds"] for k in ("collect", "rank", "select", "correct")), 2),
        "forward_seconds": m["collect"].get("forward_seconds"),
        "calibration_sentences": m["collect"]["sequences"],
        "methods": {"rank": m["rank"]["method"], "heads": m["rank"].get("head_method"),
                    "allocation": m["select"]["allocation"], "correction": m["correct"]["method"],
                    "sequential": m["correct"]["sequential"]},
        "heads_per_layer": [s["heads"] for s in manifest["shape"]],
        "neurons_per_layer": [s["neurons"] for s in manifest["shape"]],
    }
    write_json(layout.metrics / "quality.json", out)
    log.info("accuracy dense %.4f pruned %.4f (drop %.2f points), agreement %.4f at %.3f of dense FLOPs",
             q["accuracy_dense"], q["accuracy_pruned"], out["accuracy_drop_points"], q["agreement"], out["flops_ratio"])
    return {"accuracy_pruned": f"{q['accuracy_pruned']:.4f}", "agreement": f"{q['agreement']:.4f}"}


if __name__ == "__main__":
    sys.exit(stage_main("evaluate", run))
