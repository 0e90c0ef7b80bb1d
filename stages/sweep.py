"""sweep: quality (classifier accuracy, LM perplexity) vs FLOP budget for several pruning configurations, in one run.

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
from pruneflow.tasks import get_task

log = logging.getLogger("pruneflow.sweep")


def run(params: Params, layout: Layout) -> dict:
    """Every (method, budget) point of params.sweep, then the table, CSV and plot."""
    task = get_task(params.task.kind)
    rows = []
    for method, budget in tqdm(points(params), desc="sweep", unit="point"):
        rows.append(run_point(params, layout, method, budget))
        log.info("%-22s budget %.2f: %s %.4f, %s %.4f (flops %.3f)", method, budget, task.primary.key,
                 rows[-1][task.primary.key], task.secondary.key, rows[-1][task.secondary.key], rows[-1]["flops_ratio"])
    write_report(rows, layout, params)
    print(markdown_table(rows, task))
    return {"points": len(rows)}


if __name__ == "__main__":
    sys.exit(stage_main("sweep", run))
