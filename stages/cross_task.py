"""cross_task: every method's accuracy loss over all the classifier tasks, to choose the default on more than one.

reads   metrics/sweep.json (the default pipeline's RT sweep) and metrics/datasets/<name>/sweep.json (each entry of
        params `datasets`, from datasets/dvc.yaml)
writes  metrics/cross_task.json, plots/cross_task.md (the README table)
params  datasets (which tasks), sweep.baseline, rank.method (the default is the spec with no modifiers)
Compared: the methods swept on every task, at the budgets swept on every task; the paired tests are the ones each
task's sweep ran against the baseline on its own eval sentences (pruneflow/cross_task.py).
"""

from __future__ import annotations

import sys

from pruneflow.artifacts import read_json, write_json, write_text
from pruneflow.cross_task import compare, markdown
from pruneflow.params import Params
from pruneflow.runtime import Layout, stage_main

# The targets for the default on every task: budget -> most accuracy points lost.
TARGETS = {0.5: 0.5, 0.4: 1.0}


def run(params: Params, layout: Layout) -> dict:
    """Compare the methods over the RT task and every dataset."""
    paths = {"rt": layout.metrics / "sweep.json"}
    paths |= {name: layout.metrics / "datasets" / name / "sweep.json" for name in params.datasets}
    missing = [str(p) for p in paths.values() if not p.exists()]
    if missing:
        raise FileNotFoundError(f"no sweep for {', '.join(missing)}: run `make sweep` and `make datasets` first")
    tasks = {name: read_json(p)["points"] for name, p in paths.items()}
    budgets = sorted(set.intersection(*({r["budget"] for r in rows} for rows in tasks.values())), reverse=True)
    summary = compare(tasks, budgets, params.rank.method, params.sweep.baseline, TARGETS)
    write_json(layout.metrics / "cross_task.json", summary)
    table = markdown(summary)
    write_text(layout.plots / "cross_task.md", table)
    print(table)
    return {"tasks": len(tasks), "best_by_mean": summary["best_by_mean"]}


if __name__ == "__main__":
    sys.exit(stage_main("cross_task", run))
