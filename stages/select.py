"""select: choose which heads and neurons each layer keeps so the pruned model's cost fits the budget.

reads   data/dense (its config only, unless select.cost=nonzeros), data/stats/stats.json (mean calibration
        length), data/rank/ranking.json
writes  data/select/selection.json, metrics/select.json
params  select, task
select.cost says what the budget is a fraction of (fvcore FLOPs at select.seq_len by default, block
parameters, or nonzero weights: pruneflow/cost.py); the sliced model is measured and must fit, or the stage
fails. FLOPs are reported whatever the cost. FLOPs and parameters depend on shapes only, so they are measured
on the model with its parameters on the meta device (fvcore traces it as it would the real one): select loads no
weights and its memory does not grow with the model (cost=nonzeros counts values and loads them).
"""

from __future__ import annotations

import logging
import sys
import time

from pruneflow.adapters import get_adapter
from pruneflow.artifacts import read_json, write_json
from pruneflow.cost import make_cost
from pruneflow.params import Params
from pruneflow.runtime import Layout, peak_memory, stage_main
from pruneflow.selection import resolve_seq_len, select_units
from pruneflow.tasks import get_task

log = logging.getLogger("pruneflow.select")


def run(params: Params, layout: Layout) -> dict:
    """Allocate the budget across layers and verify it on the sliced model."""
    start = time.perf_counter()
    p = params.select
    seq_len = resolve_seq_len(p.seq_len, read_json(layout.stats / "stats.json"))
    cost = make_cost(p.cost, seq_len, p.tolerance)
    task = get_task(params.task.kind)
    model = task.load_model(layout.dense) if cost.reads_weights else task.load_shapes(layout.dense)
    t0 = time.perf_counter()  # `seconds` is the work; loading (mostly importing the model code) is apart
    sel = select_units(model, get_adapter(model), read_json(layout.ranking), p, cost, seq_len)
    timing = {"seconds": round(time.perf_counter() - t0, 2), "load_seconds": round(t0 - start, 2), **peak_memory()}
    write_json(layout.selection, sel)  # what was selected only: the same inputs give the same bytes
    write_json(layout.metrics / "select.json", {k: v for k, v in sel.items() if not k.startswith("keep_")} | timing)
    log.info("budget %.2f of %s -> %.4f; fvcore FLOPs %.4f of dense at length %d; heads/layer %s, neurons/layer %s",
             sel["budget"], sel["cost"], sel["cost_ratio"], sel["flops_ratio"], sel["seq_len"],
             sel["heads_per_layer"], sel["neurons_per_layer"])
    return {"cost_ratio": f"{sel['cost_ratio']:.4f}", "flops_ratio": f"{sel['flops_ratio']:.4f}"}


if __name__ == "__main__":
    sys.exit(stage_main("select", run))
