"""Which heads and neurons each layer keeps so the pruned model's cost fits `select.budget`.

The allocation (pruneflow/allocation.py: uniform, or greedy by error per unit of cost) spends the budget with
the cost's analytic model; the result is then verified by measuring the actually sliced model (fvcore for
FLOPs), and tightened if the measurement disagrees. FLOPs are always reported, whatever the budget's cost.
"""

from __future__ import annotations

import copy
import math
from typing import Callable

from pruneflow import allocation
from pruneflow.adapters import SUBLAYERS, Adapter, get_adapter
from pruneflow.cost import Cost, FlopCost
from pruneflow.params import SelectParams


def resolve_seq_len(seq_len: int | str, stats_info: dict) -> int:
    """select.seq_len, or with 'auto' the mean calibration length (rounded)."""
    return int(seq_len) if seq_len != "auto" else max(1, round(stats_info["mean_length"]))


def keep_heads_by_group(order: list[int], kept: int, group: int) -> list[int]:
    """Grouped-query attention: `kept` query heads, the same number in every KV group (group = query heads per
    KV head), each group keeping its own most important ones (latest in the removal `order`)."""
    groups = len(order) // group
    if kept % groups:
        raise ValueError(f"{kept} heads cannot be split equally over {groups} KV groups")
    rank = {h: pos for pos, h in enumerate(order)}
    per = kept // groups
    return sorted(h for g in range(groups)
                  for h in sorted(range(g * group, (g + 1) * group), key=rank.__getitem__)[group - per:])


def keep_sets(ranking: dict, heads: list[int], neurons: list[int], group: int = 1
              ) -> tuple[list[list[int]], list[list[int]]]:
    """Kept units = the last `k` of each layer's removal order (the most important); heads per KV group when
    the attention is grouped (group > 1)."""
    keep_h, keep_n = [], []
    for layer, h, n in zip(ranking["layers"], heads, neurons):
        a, f = layer["attn"], layer["ffn"]
        if group > 1:
            keep_h.append(keep_heads_by_group(a["order"], h, group))
        else:
            keep_h.append(sorted(a["order"][a["units"] - h:]) if h else [])
        keep_n.append(sorted(f["order"][f["units"] - n:]) if n else [])
    return keep_h, keep_n


def allocate(ranking: dict, p: SelectParams, costs: allocation.Costs, target: int, L: int, H: int, N: int,
             head_step: int = 1, probe: Callable[[list[int]], list[float]] | None = None
             ) -> tuple[list[int], list[int]]:
    if p.allocation in ("uniform", "sensitivity"):
        heads, neurons = allocation.uniform(L, H, N, costs, target, p.min_heads, p.min_neurons, p.multiple_of,
                                            p.uniform_heads, head_step)
        if p.allocation == "uniform":
            return heads, neurons
        if probe is None:
            raise ValueError("select.allocation=sensitivity needs its probe (the model's weights, the statistics and "
                             "calibration text: pruneflow/sensitivity.py)")
        # the tilt keeps the total of neurons, so the cost of the uniform allocation
        return heads, allocation.tilted(probe(neurons), neurons, p.tilt, N, p.min_neurons, p.multiple_of)
    curves = {name: [allocation.Curve(l[name]["units"], l[name]["removed"], l[name]["error"]) for l in ranking["layers"]]
              for name in SUBLAYERS}
    return allocation.by_error(curves["attn"], curves["ffn"], costs, target, p.min_heads, p.min_neurons, p.multiple_of,
                               head_step)


def ranking_keep_sets(ranking: dict, p: SelectParams) -> tuple[list[list[int]], list[list[int]]]:
    """allocation=ranking: the units a global rank method (bonsai) chose itself, for this very budget."""
    if "keep_heads" not in ranking:
        raise ValueError(f"select.allocation=ranking keeps the units the rank method chose, but rank.method="
                         f"{ranking['method']} ranks layer by layer; use uniform or error (or rank.method=bonsai)")
    if (ranking.get("budget"), ranking.get("cost")) != (p.budget, p.cost):
        raise ValueError(f"the ranking was searched for budget {ranking.get('budget')} of {ranking.get('cost')}, not "
                         f"select.budget={p.budget} of {p.cost}: re-run rank")
    return ranking["keep_heads"], ranking["keep_neurons"]


def select_units(model, adapter: Adapter, ranking: dict, p: SelectParams, cost: Cost, seq_len: int,
                 probe: Callable[[list[int]], list[float]] | None = None) -> dict:
    """Allocation under the budget, verified by measuring the sliced model; FLOPs at seq_len reported too.
    probe: the sensitivity allocation's per-layer loss rise at given neuron counts (sensitivity.LayerProbe)."""
    flops = cost if isinstance(cost, FlopCost) else FlopCost(seq_len, p.tolerance)
    dense = cost.measure(model)
    other = dense.total - dense.analytic  # what the analytic model leaves out (norms, softmax, rotary, ...)
    costs = cost.unit_costs(adapter)
    allowed = p.budget * dense.total
    target = math.floor(allowed) - other
    L, H, N = adapter.num_layers, adapter.dense_heads, adapter.dense_neurons
    # Grouped-query attention: every layer keeps the same number of query heads in each KV group (all groups
    # stay, so k/v keep their size and the cost model's per-head price is exact).
    head_step = adapter.dense_kv_heads if adapter.group > 1 else 1

    def slice_and_measure(keep_h, keep_n):
        pruned_model = copy.deepcopy(model)
        get_adapter(pruned_model).slice_(keep_h, keep_n)
        return pruned_model, cost.measure(pruned_model)

    try:
        if p.allocation == "ranking":  # the rank method chose the units for this budget: measure, nothing to tune
            keep_h, keep_n = ranking_keep_sets(ranking, p)
            pruned_model, pruned = slice_and_measure(keep_h, keep_n)
            if pruned.total > allowed:
                raise ValueError(f"the units rank.method={ranking['method']} kept measure {pruned.total / dense.total:.4f} "
                                 f"of dense ({cost.describe()}), over select.budget={p.budget}")
        else:
            for _ in range(5):
                heads, neurons = allocate(ranking, p, costs, target, L, H, N, head_step, probe)
                keep_h, keep_n = keep_sets(ranking, heads, neurons, adapter.group)
                pruned_model, pruned = slice_and_measure(keep_h, keep_n)
                if pruned.total <= allowed:
                    break
                # The model and the measurement disagree (e.g. an emptied sublayer's constant): tighten by at
                # least one neuron's cost so the next allocation differs.
                target -= max(pruned.total - math.floor(allowed), costs.neuron)
            else:
                raise RuntimeError(f"could not meet select.budget={p.budget}: {cost.describe()} measure "
                                   f"{pruned.total / dense.total:.6f} of dense after 5 allocations")
    except allocation.InfeasibleBudget as e:
        smallest = (int(e.args[0]) + other) / dense.total
        raise ValueError(
            f"select.budget={p.budget} is below the smallest feasible budget {smallest:.4f} ({cost.describe()}) "
            f"for min_heads={p.min_heads}, min_neurons={p.min_neurons}"
            + (f", uniform_heads={p.uniform_heads}" if p.uniform_heads is not None else "")
            + " per layer; raise the budget or lower the minimums (0 lets a layer lose a whole sublayer)") from None
    fl_dense = dense if cost is flops else flops.measure(model)
    fl_pruned = pruned if cost is flops else flops.measure(pruned_model)
    return {
        "budget": p.budget, "cost": cost.name, "allocation": p.allocation, "seq_len": seq_len,
        "ranking": ranking["method"], "head_ranking": ranking.get("head_method"),
        "keep_heads": keep_h, "keep_neurons": keep_n,
        "heads_per_layer": [len(h) for h in keep_h], "neurons_per_layer": [len(n) for n in keep_n],
        "cost_dense": dense.total, "cost_pruned": pruned.total, "cost_ratio": pruned.total / dense.total,
        "flops_dense": fl_dense.total, "flops_pruned": fl_pruned.total, "flops_ratio": fl_pruned.total / fl_dense.total,
        "matmul_dense": fl_dense.details["matmul"], "matmul_pruned": fl_pruned.details["matmul"],
        "analytic_dense": fl_dense.analytic, "analytic_pruned": fl_pruned.analytic,
        "fvcore_vs_analytic": max(fl_dense.details["fvcore_vs_analytic"], fl_pruned.details["fvcore_vs_analytic"]),
    }
