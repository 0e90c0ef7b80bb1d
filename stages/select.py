"""select: choose which heads and neurons each layer keeps so the pruned model's cost fits the budget.

reads   data/dense (its config only, unless select.cost=nonzeros or select.allocation=sensitivity),
        data/stats/stats.json (mean calibration length), data/rank/ranking.json; with allocation=sensitivity also
        the statistics and select.probe_samples sequences of the calibration data
writes  data/select/selection.json, metrics/select.json
params  select, task; with allocation=sensitivity also collect (batching of the calibration data), runtime
select.cost says what the budget is a fraction of (fvcore FLOPs at select.seq_len by default, block
parameters, or nonzero weights: pruneflow/cost.py); the sliced model is measured and must fit, or the stage
fails. FLOPs are reported whatever the cost. FLOPs and parameters depend on shapes only, so they are measured
on the model with its parameters on the meta device (fvcore traces it as it would the real one): select loads no
weights and its memory does not grow with the model (cost=nonzeros counts values and loads them).
allocation=sensitivity runs forward passes: a probe prunes each layer's FFN alone and measures the calibration
loss (pruneflow/sensitivity.py), then the neurons are tilted towards the layers that cost the most. The probe
obeys runtime.offload as collect and correct do: with disk it reads each layer's weights from the checkpoint
when the layer runs, so no whole model is in memory, and freed memory goes back to the OS at once (SmolLM2:
the peak falls from 3.5 GB to 2.1 GB, most of it one batch's logits; README).
"""

from __future__ import annotations

import logging
import sys
import time

from pruneflow.adapters import get_adapter
from pruneflow.artifacts import read_json, write_json
from pruneflow.cost import make_cost
from pruneflow.params import Params
from pruneflow.runtime import (Layout, load_tokenizer, peak_memory, release_freed_memory_to_os, setup_torch,
                               stage_main)
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
    probing = p.allocation == "sensitivity"
    # offload=disk: the probe reads the weights layer by layer (a cost that counts values still loads them all)
    streamed = probing and params.runtime.offload == "disk" and not cost.reads_weights
    if streamed:
        # The memory-bound mode, as correct's return_memory: freed tensors go back to the OS at once. The probe's
        # batches of ever-different tensors otherwise leave glibc's heap holding gigabytes (SmolLM2: 3.6 GB peak
        # against 2.1; the rest of it is one batch's logits). It costs time: 253 s against 189 s in memory.
        release_freed_memory_to_os()
        model = task.load_lazy(layout.dense)
    else:
        model = task.load_model(layout.dense) if cost.reads_weights or probing else task.load_shapes(layout.dense)
    ranking = read_json(layout.ranking)
    t0 = time.perf_counter()  # `seconds` is the work; loading (mostly importing the model code) is apart
    probe = make_probe(params, layout, task, model, ranking, streamed) if probing else None
    sel = select_units(model, get_adapter(model), ranking, p, cost, seq_len, probe)
    timing = {"seconds": round(time.perf_counter() - t0, 2), "load_seconds": round(t0 - start, 2), **peak_memory()}
    if probe is not None:
        timing["probe_loss_rise"] = list(probe.seen.values())[-1]  # per layer, at the uniform neuron counts
    write_json(layout.selection, sel)  # what was selected only: the same inputs give the same bytes
    write_json(layout.metrics / "select.json", {k: v for k, v in sel.items() if not k.startswith("keep_")} | timing)
    log.info("budget %.2f of %s -> %.4f; fvcore FLOPs %.4f of dense at length %d; heads/layer %s, neurons/layer %s",
             sel["budget"], sel["cost"], sel["cost_ratio"], sel["flops_ratio"], sel["seq_len"],
             sel["heads_per_layer"], sel["neurons_per_layer"])
    return {"cost_ratio": f"{sel['cost_ratio']:.4f}", "flops_ratio": f"{sel['flops_ratio']:.4f}"}


def make_probe(params: Params, layout: Layout, task, model, ranking: dict, streamed: bool):
    """The sensitivity allocation's probe, on select.probe_samples calibration sequences; the weights where
    runtime.offload puts them (streamed: a lazy model, read from disk layer by layer)."""
    from pruneflow.blockwalk import Residency
    from pruneflow.sensitivity import LayerProbe
    from pruneflow.stats import load_statistics

    device = setup_torch(params)
    adapter = get_adapter(model)
    offload = "disk" if streamed else ("none" if params.runtime.offload == "disk" else params.runtime.offload)
    batches = task.calibration_batches(layout.prepared, load_tokenizer(layout.dense), params.collect, device,
                                       params.select.probe_samples)
    log.info("sensitivity probe: each layer's FFN pruned alone, loss on %d calibration sequences", batches.sequences)
    return LayerProbe(model, adapter, load_statistics(layout.stats), ranking, batches, task, "lstsq",
                      params.select.probe_ridge, Residency(model, adapter, device, offload))


if __name__ == "__main__":
    sys.exit(stage_main("select", run))
