"""Weight sparsity on the default classifier (issue 11, classifier side): every registered sparsity method at
every pattern, same run, same calibration sentences, on the dense model `make run` fine-tuned.

Every Linear of the 6 MiniLM blocks is pruned (pooler and classifier head stay dense), block by block on the
outputs of the already-pruned blocks. Reported per point: eval accuracy, agreement with the dense predictions,
density of the pruned Linears, mean relative layer reconstruction error, pruning seconds; and, for APT vs
SparseGPT at each pattern, McNemar's exact test on the same eval sentences (which one is right where the other
is wrong), so a gap of a few sentences is labelled as noise.

    python -m benchmarks.sparse_classifier                 # writes metrics/sparse_classifier.json and .md
    python -m benchmarks.sparse_classifier --calib 256 --patterns 0.5 2:4
"""

from __future__ import annotations

import argparse
import copy
import time
from pathlib import Path

import numpy as np
import torch

from pruneflow.adapters import get_adapter
from pruneflow.artifacts import write_json, write_text
from pruneflow.params import load_params
from pruneflow.runtime import Layout, peak_rss_mb
from pruneflow.sparsify import SPARSITY_METHODS, Pattern, density, sparsify_model, sparsity_method
from pruneflow.stats import tokenized_batches
from pruneflow.tasks import get_task, torch_runner


def mcnemar(correct_a: np.ndarray, correct_b: np.ndarray) -> dict:
    """Exact McNemar test on paired correct/incorrect: b = A right & B wrong, c = A wrong & B right."""
    from scipy.stats import binomtest

    b = int((correct_a & ~correct_b).sum())
    c = int((~correct_a & correct_b).sum())
    p = binomtest(b, b + c, 0.5).pvalue if b + c else 1.0
    return {"a_only": b, "b_only": c, "p_value": float(p)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--methods", nargs="+", default=["magnitude", "wanda", "sparsegpt", "apt"])
    parser.add_argument("--patterns", nargs="+", default=["0.5", "0.6", "4:8", "2:4"])
    parser.add_argument("--calib", type=int, default=512, help="calibration sentences (unlabeled)")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--out", default="metrics/sparse_classifier.json")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    for m in args.methods:
        sparsity_method(m)  # unknown names fail before anything loads
    patterns = [Pattern.parse(p) for p in args.patterns]
    params = load_params(args.params)
    layout = Layout(Path("."))
    task = get_task(params.task.kind)
    from transformers import AutoTokenizer

    dense = task.load_model(layout.dense)
    tok = AutoTokenizer.from_pretrained(str(layout.dense))
    calib = task.calibration_texts(layout.prepared, args.calib)
    batches = list(tokenized_batches(tok, calib, params.collect.batch_size, params.collect.max_length, "cpu",
                                     params.collect.max_tokens))
    texts, labels = task.eval_split(layout.prepared)
    ev = params.evaluate
    t0 = time.perf_counter()
    dense_out = task.predict(torch_runner(dense), tok, texts, ev.batch_size, ev.max_length)
    forward_seconds = time.perf_counter() - t0
    labels_np = np.asarray(labels)
    rows, correct = [], {}
    for pattern in patterns:
        for name in args.methods:
            model = copy.deepcopy(dense)
            method = sparsity_method(name)
            rep = sparsify_model(model, get_adapter(model), lambda: iter(batches), method, pattern)
            out = task.predict(torch_runner(model), tok, texts, ev.batch_size, ev.max_length)
            q = task.quality(dense_out, out, labels)
            correct[(pattern.label, name)] = out.argmax(-1) == labels_np
            errs = list(rep.errors.values())
            row = {"method": name, "pattern": pattern.label, **q, "density": round(density(model, rep.plan), 4),
                   "mean_rel_error": float(np.mean(errs)) if errs else None, "seconds": round(rep.seconds, 2),
                   "solve_seconds": round(sum(rep.layer_seconds.values()), 2)}
            rows.append(row)
            print(f"{pattern.label:>4} {name:>10}: accuracy {q['accuracy_pruned']:.4f} agreement {q['agreement']:.4f} "
                  f"density {row['density']:.3f} rel.err {row['mean_rel_error'] or float('nan'):.4f} "
                  f"{row['seconds']:.1f}s", flush=True)
            del model
    tests = {}
    for pattern in patterns:
        if ("apt" in args.methods) and ("sparsegpt" in args.methods):
            tests[pattern.label] = mcnemar(correct[(pattern.label, "apt")], correct[(pattern.label, "sparsegpt")])
    result = {"model": str(layout.dense), "calibration_sentences": len(calib), "n_eval": len(texts),
              "accuracy_dense": float((dense_out.argmax(-1) == labels_np).mean()),
              "eval_forward_seconds": round(forward_seconds, 2), "points": rows,
              "apt_vs_sparsegpt_mcnemar": tests, "peak_rss_mb": round(peak_rss_mb())}
    write_json(args.out, result)
    write_text(Path(args.out).with_suffix(".md"), markdown(result, args.methods, [p.label for p in patterns]))
    print(markdown(result, args.methods, [p.label for p in patterns]))


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
            verdict = "within noise" if t["p_value"] >= 0.05 else ("APT better" if t["a_only"] > t["b_only"] else "SparseGPT better")
            lines.append(f"- {p}: {t['a_only']} / {t['b_only']}, p = {t['p_value']:.3f} ({verdict})")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
