"""cross_task: every method's accuracy loss over all the classifier tasks, to choose the default on more than one.

reads   metrics/{sweep,calib_size}.json (the default pipeline's RT task) and metrics/datasets/<name>/{sweep,
        calib_size}.json (each entry of params `datasets`, from datasets/dvc.yaml)
writes  metrics/cross_task.json, plots/cross_task.md (the README table)
params  datasets (which tasks), sweep.baseline, rank.method (the default is the spec with no modifiers)
Compared: the methods swept on every task, at the budgets swept on every task; the paired tests are the ones each
task's sweep ran against the baseline on its own eval sentences (pruneflow/cross_task.py).
"""

from __future__ import annotations

import sys

from pruneflow.artifacts import read_json, write_json, write_text
from pruneflow.cross_task import calib_markdown, calib_sizes, compare, markdown
from pruneflow.params import Params
from pruneflow.runtime import Layout, stage_main

# The targets for the default on every task: budget -> most accuracy points lost.
TARGETS = {0.5: 0.5, 0.4: 1.0}


def run(params: Params, layout: Layout) -> dict:
    """Compare the methods over the RT task and every dataset."""
    folders = {"rt": layout.metrics} | {name: layout.metrics / "datasets" / name for name in params.datasets}
    missing = [str(f / name) for f in folders.values() for name in ("sweep.json", "calib_size.json")
               if not (f / name).exists()]
    if missing:
        raise FileNotFoundError(f"no {', '.join(missing)}: run `make sweep` and `make datasets` first")
    tasks = {name: read_json(f / "sweep.json")["points"] for name, f in folders.items()}
    budgets = sorted(set.intersection(*({r["budget"] for r in rows} for rows in tasks.values())), reverse=True)
    default, baseline = params.rank.method, params.sweep.baseline
    summary = compare(tasks, budgets, default, baseline, TARGETS)
    summary["calib_sizes"] = calib_sizes({name: read_json(f / "calib_size.json")["points"]
                                          for name, f in folders.items()}, default, baseline)
    write_json(layout.metrics / "cross_task.json", summary)
    table = markdown(summary) + "\n" + calib_markdown(summary["calib_sizes"], default, baseline)
    write_text(layout.plots / "cross_task.md", table)
    print(table)
    return {"tasks": len(tasks), "best_by_mean": summary["best_by_mean"]}


if __name__ == "__main__":
    sys.exit(stage_main("cross_task", run))
