"""sparsify_classifier: weight sparsity on the fine-tuned classifier, every method x pattern in one run.

reads   data/dense (the default pipeline's fine-tuned model), data/prepared/{calib,eval}.jsonl
writes  metrics/sparse_classifier.json (per point: eval accuracy, agreement with dense, density, mean relative
        layer error, pruning seconds; APT vs SparseGPT by McNemar's exact test on the same eval sentences),
        plots/sparse_classifier.{csv,md}
params  sparsify (methods, patterns, calib_sentences, method options), collect (tokenization), evaluate, task,
        runtime

Every Linear of every encoder block is pruned (the pooler and the classification head stay dense), block by
block on the outputs of the already-pruned blocks (pruneflow/sparsify.py).
"""

from __future__ import annotations

import copy
import logging
import sys

import numpy as np

from pruneflow.adapters import get_adapter
from pruneflow.artifacts import write_json, write_text
from pruneflow.params import Params
from pruneflow.runtime import Layout, peak_rss_mb, setup_torch, stage_main
from pruneflow.sparsify import Pattern, check_sparsify_params, density, sparsify_model, sparsity_method
from pruneflow.stats import tokenized_batches
from pruneflow.stats_tests import mcnemar, verdict
from pruneflow.tasks import get_task, torch_runner

log = logging.getLogger("pruneflow")


def run(params: Params, layout: Layout) -> dict:
    """Prune a fresh copy of the dense classifier per (pattern, method) and evaluate it."""
    import time

    from transformers import AutoTokenizer

    sp = params.sparsify
    check_sparsify_params(sp)
    setup_torch(params)
    task = get_task(params.task.kind)
    dense = task.load_model(layout.dense)
    tok = AutoTokenizer.from_pretrained(str(layout.dense))
    calib = task.calibration_texts(layout.prepared, sp.calib_sentences)
    c = params.collect
    batches = list(tokenized_batches(tok, calib, c.batch_size, c.max_length, "cpu", c.max_tokens))
    t0 = time.perf_counter()
    for enc in batches:  # the yardstick for pruning time: plain forward passes over the calibration sentences
        dense(**enc)
    forward_seconds = time.perf_counter() - t0
    texts, labels = task.eval_split(layout.prepared)
    ev = params.evaluate
    dense_out = task.predict(torch_runner(dense), tok, texts, ev.batch_size, ev.max_length)
    labels_np = np.asarray(labels)
    patterns = [Pattern.parse(p) for p in sp.patterns]
    rows, correct = [], {}
    for pattern in patterns:
        for name in sp.methods:
            model = copy.deepcopy(dense)
            rep = sparsify_model(model, get_adapter(model), lambda: iter(batches), sparsity_method(name, sp.section(name)),
                                 pattern)
            out = task.predict(torch_runner(model), tok, texts, ev.batch_size, ev.max_length)
            q = task.quality(dense_out, out, labels)
            correct[(pattern.label, name)] = out.argmax(-1) == labels_np
            errs = list(rep.errors.values())
            row = {"method": name, "pattern": pattern.label, **q, "density": round(density(model, rep.plan), 4),
                   "mean_rel_error": round(float(np.mean(errs)), 6) if errs else None,
                   "prune_seconds": round(rep.seconds, 2), "prune_over_forward": round(rep.seconds / forward_seconds, 2)}
            rows.append(row)
            log.info("%-5s %-10s accuracy %.4f agreement %.4f density %.3f rel.err %s %.1fs", pattern.label, name,
                     q["accuracy_pruned"], q["agreement"], row["density"], row["mean_rel_error"], rep.seconds)
            del model
    tests = {}
    for pattern in patterns:
        if {"apt", "sparsegpt"} <= set(sp.methods):
            t = mcnemar(correct[(pattern.label, "apt")], correct[(pattern.label, "sparsegpt")])
            t["verdict"] = verdict(t["p_value"], t["a_only"] - t["b_only"], False, "apt", "sparsegpt")
            tests[pattern.label] = t
    result = {"model": str(layout.dense), "calibration_sentences": len(calib), "n_eval": len(texts),
              "accuracy_dense": float((dense_out.argmax(-1) == labels_np).mean()),
              "forward_seconds": round(forward_seconds, 2), "points": rows, "apt_vs_sparsegpt_mcnemar": tests,
              "peak_rss_mb": round(peak_rss_mb())}
    write_json(layout / "metrics/sparse_classifier.json", result)
    keys = ["method", "pattern", "accuracy_pruned", "agreement", "density", "prune_seconds"]
    write_text(layout / "plots/sparse_classifier.csv",
               "\n".join([",".join(keys)] + [",".join(str(r[k]) for k in keys) for r in rows]) + "\n")
    text = markdown(result, sp.methods, [p.label for p in patterns])
    write_text(layout / "plots/sparse_classifier.md", text)
    print(text)
    return {"points": len(rows)}


def markdown(result: dict, methods: list[str], patterns: list[str]) -> str:
    cell = {(r["method"], r["pattern"]): r for r in result["points"]}
    lines = [f"Eval accuracy % (agreement with dense %), dense = {100 * result['accuracy_dense']:.2f}%, "
             f"{result['calibration_sentences']} calibration sentences, {result['n_eval']} eval sentences",
             "", "| method | " + " | ".join(patterns) + " |", "|---|" + "---|" * len(patterns)]
    for m in methods:
        vals = [f"{100 * cell[(m, p)]['accuracy_pruned']:.2f} ({100 * cell[(m, p)]['agreement']:.1f})"
                if (m, p) in cell else "" for p in patterns]
        lines.append(f"| {m} | " + " | ".join(vals) + " |")
    if result["apt_vs_sparsegpt_mcnemar"]:
        lines += ["", "APT vs SparseGPT, McNemar exact test on the same eval sentences "
                  "(APT right & SparseGPT wrong / the reverse, p):", ""]
        for p, t in result["apt_vs_sparsegpt_mcnemar"].items():
            lines.append(f"- {p}: {t['a_only']} / {t['b_only']}, p = {t['p_value']:.3f} ({t['verdict']})")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(stage_main("sparsify_classifier", run))
