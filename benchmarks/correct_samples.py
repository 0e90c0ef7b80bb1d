"""How many calibration sentences the classifier's sequential correction needs: the default pipeline with the
refit on the first n sentences (`correct.max_samples`) against all of them, on every labeled task, with paired
tests.

    python -m benchmarks.correct_samples                             # after `make datasets` (about 15 minutes)
    python -m benchmarks.correct_samples --sizes 1024 --budgets 0.5  # a subset

The refit is about 40% of the classifier's pruning time (issue 12 wants pruning in at most 3x the calibration
forward passes), and its cost is linear in its sentences: a smaller default would be the one lever left that
does not change the statistics or the ranking. Each point is the default pipeline (params.yaml: obs ranking,
sequential lstsq; collect's statistics from all calibration sentences) with `--allocation` (default uniform, what
the README's table measured; the params' own since then is sensitivity) pruned and evaluated in memory
(pruneflow/sweep.py: run_point, as the sweep does), on RT and on every entry of `datasets`. Each size is
compared with all sentences at the same budget by McNemar's exact test on accuracy and on agreement with the
dense model, on the same eval sentences. Writes metrics/correct_samples.json and prints a table.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from pruneflow import sweep
from pruneflow.artifacts import write_json
from pruneflow.params import load_params, read_raw
from pruneflow.runtime import Layout, setup_logging
from pruneflow.stats_tests import mcnemar

ROOT = Path(__file__).resolve().parents[1]
PARAMS = ROOT / "params.yaml"


def task_layout(dataset: str | None) -> Layout:
    data = "data" if dataset is None else f"data/datasets/{dataset}"
    return Layout(ROOT, data, "metrics", "plots")  # run_point writes nothing


def compare(row: dict, full: dict) -> dict:
    a, b = row[sweep.ITEMS], full[sweep.ITEMS]
    return {key: mcnemar(a[key], b[key]) for key in ("accuracy_pruned", "agreement")}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[1024, 512], help="correct.max_samples to try")
    ap.add_argument("--budgets", type=float, nargs="+", default=[0.5, 0.4])
    ap.add_argument("--datasets", nargs="+", default=None,
                    help="tasks: rt and entries of params.yaml's datasets (default: all of them)")
    ap.add_argument("--allocation", default="uniform", help="select.allocation (the README's table: uniform)")
    args = ap.parse_args()
    setup_logging()
    datasets = args.datasets or ["rt", *read_raw(PARAMS).get("datasets", {})]
    results = []
    for name in datasets:
        dataset = None if name == "rt" else name
        layout = task_layout(dataset)
        rows = {}
        for size in [None, *args.sizes]:
            params = load_params(PARAMS, {"correct.max_samples": size, "select.allocation": args.allocation},
                                 dataset)
            for budget in args.budgets:
                rows[size, budget] = row = sweep.run_point(params, layout, params.rank.method, budget)
                print(f"{name} max_samples={size or 'all'} budget={budget}: accuracy {100 * row['accuracy_pruned']:.2f}% "
                      f"(dense {100 * row['accuracy_dense']:.2f}%), agreement {100 * row['agreement']:.2f}%", flush=True)
        for size in args.sizes:
            for budget in args.budgets:
                row, full = rows[size, budget], rows[None, budget]
                results.append({"task": name, "max_samples": size, "budget": budget,
                                "accuracy_dense": row["accuracy_dense"], "accuracy": row["accuracy_pruned"],
                                "accuracy_all": full["accuracy_pruned"], "agreement": row["agreement"],
                                "agreement_all": full["agreement"], "n_eval": row["n_eval"],
                                "vs_all": compare(row, full)})
        sweep.release_contexts()
    write_json(ROOT / "metrics/correct_samples.json", {"params": "params.yaml", "points": results})
    print(f"\n{'task':8} {'n':>5} {'budget':>6} {'acc n':>7} {'acc all':>7} {'p':>6} {'agr n':>7} {'agr all':>7} "
          f"{'n-only/all-only':>16} {'p':>6}")
    for r in results:
        acc, agr = r["vs_all"]["accuracy_pruned"], r["vs_all"]["agreement"]
        print(f"{r['task']:8} {r['max_samples']:5d} {r['budget']:6.2f} {100 * r['accuracy']:7.2f} "
              f"{100 * r['accuracy_all']:7.2f} {acc['p_value']:6.3f} {100 * r['agreement']:7.2f} "
              f"{100 * r['agreement_all']:7.2f} {agr['a_only']:>7d}/{agr['b_only']:<8d} {agr['p_value']:6.3f}")


if __name__ == "__main__":
    main()
