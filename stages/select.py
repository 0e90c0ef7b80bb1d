"""select: choose which heads and neurons each layer keeps so the pruned model's FLOPs fit the budget.

reads   data/dense, data/stats/stats.json (mean calibration length), data/rank/ranking.json
writes  data/select/selection.json, metrics/select.json
params  select
FLOPs are fvcore's, on the actually sliced architecture with eager attention, at select.seq_len tokens
(default: the mean calibration length), cross-checked against the adapter's analytic count (select.tolerance).
The pruned model's FLOPs are at most select.budget × the dense model's, or the stage fails.
"""

from __future__ import annotations

import copy
import logging
import sys
import time

from pruneflow import allocation
from pruneflow.adapters import Adapter, get_adapter
from pruneflow.artifacts import read_json, write_json
from pruneflow.flops import count_flops
from pruneflow.params import Params, SelectParams
from pruneflow.runtime import Layout, stage_main
from pruneflow.task import load_model

log = logging.getLogger("pruneflow.select")


def keep_sets(ranking: dict, heads: list[int], neurons: list[int]) -> tuple[list[list[int]], list[list[int]]]:
    """Kept units = the last `k` of each layer's removal order (the most important)."""
    keep_h, keep_n = [], []
    for layer, h, n in zip(ranking["layers"], heads, neurons):
        a, f = layer["attn"], layer["ffn"]
        keep_h.append(sorted(a["order"][a["units"] - h:]) if h else [])
        keep_n.append(sorted(f["order"][f["units"] - n:]) if n else [])
    return keep_h, keep_n


def select_units(model, adapter: Adapter, ranking: dict, p: SelectParams, seq_len: int) -> dict:
    """Allocation under the budget, verified by fvcore on the sliced model."""
    dense = count_flops(model, seq_len, tolerance=p.tolerance)
    other = dense.total - dense.matmul  # layer norms etc.: fvcore counts them, no unit removal changes them
    head_macs, neuron_macs = adapter.unit_macs(seq_len)
    costs = allocation.Costs(head=head_macs, neuron=neuron_macs, fixed=adapter.fixed_macs(seq_len))
    L, H, N = adapter.num_layers, adapter.dense_heads, adapter.dense_neurons
    target = int(p.budget * dense.total) - other
    try:
        for _ in range(3):
            heads, neurons = allocate(ranking, p, costs, target, L, H, N)
            keep_h, keep_n = keep_sets(ranking, heads, neurons)
            pruned_model = copy.deepcopy(model)
            get_adapter(pruned_model).slice_(keep_h, keep_n)
            pruned = count_flops(pruned_model, seq_len, tolerance=p.tolerance)
            if pruned.total <= p.budget * dense.total:
                break
            target -= pruned.total - int(p.budget * dense.total)  # should not happen: the cost model is exact
        else:
            raise RuntimeError(f"could not meet select.budget={p.budget}: fvcore counts {pruned.total / dense.total:.4f}")
    except allocation.InfeasibleBudget as e:
        smallest = (int(e.args[0]) + other) / dense.total
        raise ValueError(
            f"select.budget={p.budget} is below the smallest feasible budget {smallest:.4f} for "
            f"min_heads={p.min_heads}, min_neurons={p.min_neurons}"
            + (f", uniform_heads={p.uniform_heads}" if p.uniform_heads is not None else "")
            + " per layer; raise the budget or lower the minimums (0 lets a layer lose a whole sublayer)") from None
    return {
        "budget": p.budget, "allocation": p.allocation, "seq_len": seq_len,
        "ranking": ranking["method"], "head_ranking": ranking.get("head_method"),
        "keep_heads": keep_h, "keep_neurons": keep_n,
        "heads_per_layer": [len(h) for h in keep_h], "neurons_per_layer": [len(n) for n in keep_n],
        "flops_dense": dense.total, "flops_pruned": pruned.total, "flops_ratio": pruned.total / dense.total,
        "matmul_dense": dense.matmul, "matmul_pruned": pruned.matmul,
        "analytic_dense": dense.analytic, "analytic_pruned": pruned.analytic,
        "fvcore_vs_analytic": max(dense.rel_diff, pruned.rel_diff),
    }


def allocate(ranking: dict, p: SelectParams, costs: allocation.Costs, target: int, L: int, H: int, N: int
             ) -> tuple[list[int], list[int]]:
    if p.allocation == "uniform":
        return allocation.uniform(L, H, N, costs, target, p.min_heads, p.min_neurons, p.multiple_of, p.uniform_heads)
    curves = {name: [allocation.Curve(l[name]["units"], l[name]["removed"], l[name]["error"]) for l in ranking["layers"]]
              for name in ("attn", "ffn")}
    return allocation.by_error(curves["attn"], curves["ffn"], costs, target, p.min_heads, p.min_neurons, p.multiple_of)


def resolve_seq_len(p: SelectParams, layout: Layout) -> int:
    if p.seq_len != "auto":
        return int(p.seq_len)
    return max(1, round(read_json(layout.stats / "stats.json")["mean_length"]))


def run(params: Params, layout: Layout) -> dict:
    """Allocate the FLOP budget across layers and verify it with fvcore."""
    t0 = time.perf_counter()
    model = load_model(layout.dense)
    sel = select_units(model, get_adapter(model), read_json(layout.ranking), params.select,
                       resolve_seq_len(params.select, layout))
    sel["seconds"] = round(time.perf_counter() - t0, 2)
    write_json(layout.selection, sel)
    write_json(layout.metrics / "select.json", {k: v for k, v in sel.items() if not k.startswith("keep_")})
    log.info("budget %.2f -> fvcore FLOPs %.4f of dense at length %d; heads/layer %s, neurons/layer %s",
             sel["budget"], sel["flops_ratio"], sel["seq_len"], sel["heads_per_layer"], sel["neurons_per_layer"])
    return {"flops_ratio": f"{sel['flops_ratio']:.4f}"}


if __name__ == "__main__":
    sys.exit(stage_main("select", run))
