"""rank: order every prunable unit (attention heads, FFN neurons) of every layer, least important first.

reads   data/dense (weights; with runtime.offload=disk one layer's at a time), data/stats (calibration
        statistics), the task's calibration data (forward-only methods run the model on it)
writes  data/rank/ranking.json, metrics/rank.json
params  rank, task, collect (tokenization of calibration text), runtime (offload=disk: layer by layer); select
        (budget, cost, seq_len) for a global method (bonsai) that meets the budget itself
rank.method names a registered method (pruneflow/methods/: obs, kcm, activation, magnitude, random, bonsai). Each
layer's order comes with its error curve (pruneflow/ranking.py), which select uses to spend the budget.
"""

from __future__ import annotations

import sys
import time

from pruneflow.adapters import get_adapter
from pruneflow.artifacts import write_json
from pruneflow.blockwalk import Residency
from pruneflow.params import Params
from pruneflow.ranking import plans_globally, rank_model
from pruneflow.selection import resolve_seq_len
from pruneflow.runtime import Layout, load_tokenizer, peak_memory, setup_torch, stage_main
from pruneflow.stats import load_statistics
from pruneflow.tasks import get_task


def run(params: Params, layout: Layout) -> dict:
    """Rank heads and neurons of every layer with rank.method."""
    start = time.perf_counter()
    device = setup_torch(params)
    task, c = get_task(params.task.kind), params.collect
    # A layer-wise method reads one layer's weights at a time: with offload=disk the model stays on the meta
    # device and each layer is read from data/dense while it is ranked (a global search needs the whole model).
    streamed = params.runtime.offload == "disk" and not plans_globally(params.rank)
    model = task.load_lazy(layout.dense) if streamed else task.load_model(layout.dense).to(device)
    adapter = get_adapter(model)
    layer_weights = Residency(model, adapter, device, "disk").layer if streamed else None
    t0 = time.perf_counter()  # `seconds` is the work; loading (mostly importing the model code) is apart

    def calibration():  # only forward-only methods call it
        return task.calibration_batches(layout.prepared, load_tokenizer(layout.dense), c, device)

    stats = load_statistics(layout.stats)
    seq_len = resolve_seq_len(params.select.seq_len, stats.info())
    ranking = rank_model(adapter, stats, params.rank, calibration=calibration, task=task,
                         select=params.select, seq_len=seq_len, layer_weights=layer_weights)
    seconds = time.perf_counter() - t0
    write_json(layout.ranking, ranking)
    write_json(layout.metrics / "rank.json", {"method": params.rank.method, "head_method": ranking["head_method"],
                                              "seconds": round(seconds, 2), "load_seconds": round(t0 - start, 2),
                                              "rounds": ranking.get("rounds"), "offload": params.runtime.offload,
                                              **peak_memory()})
    return {"method": params.rank.method, "seconds": round(seconds, 2)}


if __name__ == "__main__":
    sys.exit(stage_main("rank", run))
