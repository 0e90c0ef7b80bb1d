"""sweep: accuracy vs FLOP budget for several pruning configurations, in one run.

reads   data/dense, data/stats, data/prepared/{eval,calib}.jsonl
writes  metrics/sweep.json, plots/sweep.csv (a dvc plots curve), plots/sweep.md (the README table),
        plots/sweep.png
params  sweep (grid), rank, select, correct, collect, evaluate, task, runtime (defaults for what a point does
        not name)
The points, their method specs and the report are pruneflow/sweep.py's; every point re-uses the one set of
calibration statistics, each rank method is computed once, the dense model's eval predictions once.
"""

from __future__ import annotations

import logging
import sys

from tqdm.auto import tqdm

from pruneflow.params import Params
from pruneflow.runtime import Layout, stage_main
from pruneflow.sweep import markdown_table, points, run_point, write_report

log = logging.getLogger("pruneflow.sweep")


def run(params: Params, layout: Layout) -> dict:
    """Every (method, budget) point of params.sweep, then the table, CSV and plot."""
    rows = []
    for method, budget in tqdm(points(params), desc="sweep", unit="point"):
        rows.append(run_point(params, layout, method, budget))
        log.info("%-22s budget %.2f: acc %.4f agreement %.4f (flops %.3f)", method, budget,
                 rows[-1]["accuracy_pruned"], rows[-1]["agreement"], rows[-1]["flops_ratio"])
    write_report(rows, layout, params)
    print(markdown_table(rows))
    return {"points": len(rows)}


if __name__ == "__main__":
    sys.exit(stage_main("sweep", run))
