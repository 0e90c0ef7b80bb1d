"""The sensitivity allocation's tilt (`select.tilt`) on every labeled task: the default pipeline at each tilt and
budget, each tilt against the params' own on the same eval sentences (McNemar's exact test, accuracy and
agreement with the dense model), and the mean accuracy loss per tilt over tasks and budgets.

    python -m benchmarks.classifier_tilt                                  # after `make datasets` (about an hour)
    python -m benchmarks.classifier_tilt --tilts 0.25 0.5 --budgets 0.5   # a subset

Issue 12 asks for at most 0.5 / 1.0 points lost at 0.5 / 0.4 on every task; the default (tilt 0.25, the LM's)
misses them on Amazon only. This says whether another tilt would meet them, and at what cost elsewhere. Each
point is pruned and evaluated in memory (pruneflow/sweep.py: run_point). Points already in --cache (with their
per-sentence outcomes) are not run again, so an interrupted run resumes. Writes --out (default
metrics/classifier_tilt.json) and prints a table.
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

from benchmarks.correct_samples import task_layout
from pruneflow import sweep
from pruneflow.artifacts import write_json
from pruneflow.params import load_params, read_raw
from pruneflow.runtime import setup_logging
from pruneflow.stats_tests import mcnemar

ROOT = Path(__file__).resolve().parents[1]
PARAMS = ROOT / "params.yaml"


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tilts", type=float, nargs="+", default=[0.25, 0.5, 1.0])
    ap.add_argument("--budgets", type=float, nargs="+", default=[0.6, 0.5, 0.4, 0.3])
    ap.add_argument("--datasets", nargs="+", default=None,
                    help="tasks: rt and entries of params.yaml's datasets (default: all of them)")
    ap.add_argument("--cache", type=Path, default=ROOT / "data/classifier_tilt_rows.json",
                    help="every point's row with its per-sentence outcomes (resumed from)")
    ap.add_argument("--out", type=Path, default=ROOT / "metrics/classifier_tilt.json")
    args = ap.parse_args(argv)
    setup_logging()
    raw = read_raw(PARAMS)
    default = float(raw["select"]["tilt"])
    tilts = sorted({default, *args.tilts})
    datasets = args.datasets or ["rt", *raw.get("datasets", {})]
    cached = json.loads(args.cache.read_text()) if args.cache.exists() else []
    rows = {(r["task"], r["tilt"], r["budget"]): r for r in cached}
    for name in datasets:
        dataset = None if name == "rt" else name
        for tilt in tilts:
            params = load_params(PARAMS, {"select.tilt": tilt}, dataset)
            for budget in args.budgets:
                if (name, tilt, budget) in rows:
                    continue
                r = sweep.run_point(params, task_layout(dataset), params.rank.method, budget)
                rows[name, tilt, budget] = {
                    "task": name, "tilt": tilt, "budget": budget, "accuracy_dense": r["accuracy_dense"],
                    "accuracy": r["accuracy_pruned"], "drop_points": r["accuracy_drop_points"],
                    "agreement": r["agreement"], "n_eval": r["n_eval"], "flops_ratio": r["flops_ratio"],
                    "neurons_per_layer": r["neurons_per_layer"],
                    "items": {k: [bool(x) for x in r[sweep.ITEMS][k]] for k in ("accuracy_pruned", "agreement")}}
                print(f"{name} tilt {tilt} budget {budget}: accuracy {100 * r['accuracy_pruned']:.2f}% "
                      f"(dense {100 * r['accuracy_dense']:.2f}%), agreement {100 * r['agreement']:.2f}%", flush=True)
                args.cache.parent.mkdir(parents=True, exist_ok=True)
                args.cache.write_text(json.dumps(list(rows.values())))
        sweep.release_contexts()

    points = []
    for (name, tilt, budget), r in sorted(rows.items()):
        if name not in datasets or tilt not in tilts or budget not in args.budgets:
            continue
        ref = rows[name, default, budget]
        vs = None if tilt == default else {k: mcnemar(r["items"][k], ref["items"][k]) for k in r["items"]}
        points.append({k: v for k, v in r.items() if k != "items"} | {"vs_default": vs})
    means = {str(t): statistics.mean(p["drop_points"] for p in points if p["tilt"] == t) for t in tilts}
    write_json(args.out, {"default_tilt": default, "mean_drop_points": means, "points": points})
    print(f"\n{'task':8} {'budget':>6} {'tilt':>5} {'lost':>6} {'agree':>6}   vs tilt {default}: "
          f"accuracy (this-only/default-only, p), agreement")
    for p in points:
        vs = p["vs_default"]
        cmp = "" if vs is None else "   " + ", ".join(
            f"{v['a_only']}/{v['b_only']} p={v['p_value']:.2f}" for v in (vs["accuracy_pruned"], vs["agreement"]))
        print(f"{p['task']:8} {p['budget']:6.2f} {p['tilt']:5.2f} {p['drop_points']:6.2f} {100 * p['agreement']:6.2f}{cmp}")
    print("mean points lost: " + ", ".join(f"tilt {t}: {m:.3f}" for t, m in means.items()))


if __name__ == "__main__":
    main()
