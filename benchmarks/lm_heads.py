"""How many query heads the uniform allocation should keep on a grouped-query decoder: every allowed head count
against the allocation's own choice, at given budgets, with paired tests.

    python -m benchmarks.lm_heads                                   # after `make lm` (reads data/lm/{dense,prepared,stats})
    python -m benchmarks.lm_heads --budgets 0.8 0.7 --heads 6 9     # a subset

SmolLM2 has 9 query heads in 3 KV groups, so a layer keeps 3, 6 or 9 of them and each step of 3 heads is worth
about 240 MLP neurons per layer in FLOPs. `select.allocation: uniform` takes the fewest heads whose kept fraction
is at least the neurons' (until 2026-11-30: the closest fraction, which metrics/lm/heads.json's "allocation's
choice" rows are; it was wrong at 0.8 and 0.6); `select.uniform_heads: h` forces one and spends the rest of the budget on neurons. Each
point is the default pipeline (lm/params.yaml: obs ranking, sequential lstsq) pruned and evaluated in memory
(pruneflow/sweep.py: run_point, as `make lm-sweep` does), sharing the statistics, the ranking and the dense trace.
Every forced count is compared with the allocation's choice at the same budget by a paired bootstrap over the
held-out windows (per-window mean NLL; per-window next-token agreement). Writes metrics/lm/heads.json and prints
a table.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from pruneflow import sweep
from pruneflow.allocation import head_counts
from pruneflow.artifacts import write_json
from pruneflow.params import load_params
from pruneflow.runtime import Layout, setup_logging
from pruneflow.stats_tests import paired_bootstrap


def point(params, layout: Layout, budget: float, heads: int | None) -> dict:
    p = params.model_copy(update={"select": params.select.model_copy(update={"uniform_heads": heads})})
    t0 = time.perf_counter()
    row = sweep.run_point(p, layout, params.rank.method, budget)
    row["forced_heads"], row["seconds_with_eval"] = heads, round(time.perf_counter() - t0, 1)
    return row


def compare(row: dict, chosen: dict) -> dict:
    a, b = row[sweep.ITEMS], chosen[sweep.ITEMS]
    return {"nll_per_window": paired_bootstrap(a["perplexity_pruned"], b["perplexity_pruned"]),
            "agreement": paired_bootstrap(a["next_token_agreement"], b["next_token_agreement"])}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--params", default="lm/params.yaml")
    ap.add_argument("--data", default="data/lm")
    ap.add_argument("--metrics", default="metrics/lm")
    ap.add_argument("--budgets", type=float, nargs="+", default=[0.9, 0.8, 0.7, 0.6])
    ap.add_argument("--heads", type=int, nargs="+", default=None, help="head counts to force (default: every allowed)")
    args = ap.parse_args()
    setup_logging()
    params = load_params(args.params)
    layout = Layout(Path("."), args.data, args.metrics, "plots")
    out = {"params": args.params, "budgets": []}
    for budget in args.budgets:
        chosen = point(params, layout, budget, None)
        ctx = sweep.context(params, layout)
        step = ctx.adapter.dense_kv_heads if ctx.adapter.group > 1 else 1  # as select_units: one head per KV group
        counts = args.heads or head_counts(ctx.adapter.dense_heads, params.select.min_heads, step)
        rows = [chosen]
        for h in counts:
            if h == chosen["heads_per_layer"][0]:
                continue
            try:
                rows.append(point(params, layout, budget, h))
            except ValueError as e:  # the budget cannot pay for this many heads and the minimum neurons
                print(f"budget {budget}, {h} heads: {e}")
                continue
            rows[-1]["vs_allocation"] = compare(rows[-1], chosen)
        for r in rows:
            r.pop(sweep.ITEMS)
            print(f"budget {budget}: {r['heads_per_layer'][0]} heads, {r['neurons_per_layer'][0]} neurons"
                  f"{' (allocation)' if r['forced_heads'] is None else ''}: perplexity {r['perplexity_pruned']:.2f}, "
                  f"agreement {100 * r['next_token_agreement']:.2f}%", flush=True)
        out["budgets"].append({"budget": budget, "rows": rows})
        write_json(Path(args.metrics) / "heads.json", out)  # after each budget: a long run keeps what it measured
    print("\n| budget | heads (neurons) | perplexity | agreement % | vs the allocation's choice: NLL per window, 95% CI |")
    print("|---|---|---|---|---|")
    for b in out["budgets"]:
        for r in b["rows"]:
            v = r.get("vs_allocation")
            cmp = ("(the allocation's choice)" if v is None else
                   f"{v['nll_per_window']['mean_diff']:+.3f} [{v['nll_per_window']['ci_low']:+.3f}, "
                   f"{v['nll_per_window']['ci_high']:+.3f}], p = {v['nll_per_window']['p_value']:.4f}; agreement "
                   f"{100 * v['agreement']['mean_diff']:+.2f} pts, p = {v['agreement']['p_value']:.4f}")
            print(f"| {b['budget']} | {r['heads_per_layer'][0]} ({r['neurons_per_layer'][0]}) | "
                  f"{r['perplexity_pruned']:.2f} | {100 * r['next_token_agreement']:.1f} | {cmp} |")


if __name__ == "__main__":
    main()
