"""A lead for issue 9's perplexity targets: a non-uniform FFN allocation from an end-to-end sensitivity probe
(OWL-like), against the uniform one, on the LM at one budget, with paired tests.

    python -m benchmarks.lm_sensitivity                                   # after `make lm` (about 25 minutes)
    python -m benchmarks.lm_sensitivity --budget 0.7 --heads 6 --lambdas 0.25

The probe prunes one layer's FFN alone to the uniform allocation's kept count (the default ranking, the
closed-form correction from the statistics) and measures the rise of the next-token NLL on `--probe-windows`
calibration windows: Δ_i per layer. The allocation keeps n_i = n̄ (1 + λ z_i) neurons in layer i, z the
standardised Δ (clipped to ±2), rescaled so the total, and so the FLOPs, equal the uniform allocation's; heads are
the same in every layer (`--heads`). Each λ is pruned with the default sequential correction and evaluated on the
held-out windows in memory (pruneflow/sweep.py's context), and compared with the uniform allocation by a paired
bootstrap over the eval windows (per-window NLL). The greedy `select.allocation: error` ranks layers by their
own reconstruction error and lost to uniform here (README); this probe measures what the model's output loses.
The probe here is the one this benchmark was first run with (the whole model copied, sliced and corrected per
layer); `select.allocation: sensitivity` runs a cheaper one (pruneflow/sensitivity.py). Writes
metrics/lm/sensitivity.json and prints a table.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

from pruneflow import sweep
from pruneflow.allocation import tilted
from pruneflow.artifacts import write_json
from pruneflow.params import load_params
from pruneflow.pruning import prune_to_selection
from pruneflow.runtime import Layout, setup_logging
from pruneflow.selection import keep_sets
from pruneflow.stats_tests import paired_bootstrap

ROOT = Path(__file__).resolve().parents[1]


@torch.inference_mode()
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--budget", type=float, default=0.8)
    ap.add_argument("--heads", type=int, default=9, help="query heads kept in every layer (select.uniform_heads)")
    ap.add_argument("--lambdas", type=float, nargs="+", default=[0.25, 0.5, 1.0])
    ap.add_argument("--probe-windows", type=int, default=8)
    args = ap.parse_args()
    setup_logging()
    layout = Layout(ROOT, "data/lm", "metrics/lm", "plots/lm")
    base = load_params(ROOT / "lm/params.yaml")
    params = base.model_copy(update={"select": base.select.model_copy(update={"uniform_heads": args.heads,
                                                                                   "allocation": "uniform"})})
    method = params.rank.method
    uniform = sweep.run_point(params, layout, method, args.budget)
    ctx = sweep.context(params, layout)
    ranking = json.loads(layout.ranking.read_text())
    ad = ctx.adapter
    L, N, H = ad.num_layers, ad.dense_neurons, ad.dense_heads
    heads = uniform["heads_per_layer"]
    calib = ctx.task.calibration_batches(layout.prepared, ctx.tokenizer, params.collect, ctx.device,
                                         args.probe_windows)
    dense_nll = ctx.task.calibration_loss(ctx.model, calib, None)
    closed_form = params.correct.model_copy(update={"sequential": False})
    t0, sens = time.perf_counter(), []
    for i in range(L):  # layer i's FFN alone at the uniform kept count, everything else dense
        neurons = [N] * L
        neurons[i] = uniform["neurons_per_layer"][i]
        kh, kn = keep_sets(ranking, [H] * L, neurons, ad.group)
        model, _, _ = prune_to_selection(ctx.model, ctx.stats, {"keep_heads": kh, "keep_neurons": kn}, closed_form,
                                         ctx.device)
        sens.append(ctx.task.calibration_loss(model, calib, None) - dense_nll)
        del model
    probe_seconds = time.perf_counter() - t0
    print(f"probe ({probe_seconds:.0f} s): NLL rise per layer {[round(s, 4) for s in sens]}", flush=True)
    ref_items = uniform[sweep.ITEMS]["perplexity_pruned"]
    rows = [{"lambda": 0.0, "neurons_per_layer": uniform["neurons_per_layer"],
             "perplexity_pruned": uniform["perplexity_pruned"],
             "next_token_agreement": uniform["next_token_agreement"]}]
    for lam in args.lambdas:
        neurons = tilted(sens, uniform["neurons_per_layer"], lam, N, params.select.min_neurons)
        kh, kn = keep_sets(ranking, heads, neurons, ad.group)
        model, _, _ = prune_to_selection(ctx.model, ctx.stats, {"keep_heads": kh, "keep_neurons": kn},
                                         params.correct, ctx.device, lambda: ctx.dense_trace(params, layout))
        q, items = ctx.task.compare(ctx.reference, model, params.evaluate, ctx.device)
        del model
        rows.append({"lambda": lam, "neurons_per_layer": neurons, "perplexity_pruned": q["perplexity_pruned"],
                     "next_token_agreement": q["next_token_agreement"],
                     "vs_uniform_nll": paired_bootstrap(np.asarray(items["perplexity_pruned"]), ref_items)})
        print(f"lambda {lam}: perplexity {q['perplexity_pruned']:.2f} (uniform {uniform['perplexity_pruned']:.2f})",
              flush=True)
    write_json(layout.metrics / "sensitivity.json",
               {"budget": args.budget, "heads": args.heads, "flops_ratio": uniform["flops_ratio"],
                "perplexity_dense": uniform["perplexity_dense"], "probe_windows": args.probe_windows,
                "probe_seconds": round(probe_seconds, 1), "nll_rise_per_layer": sens, "rows": rows})
    print(f"\n{'lambda':>6} {'perplexity':>10} {'ratio':>6} {'agreement':>9} {'ΔNLL vs uniform [95% CI]':>30} {'p':>7}")
    for r in rows:
        b = r.get("vs_uniform_nll")
        ci = f"{b['mean_diff']:+.4f} [{b['ci_low']:+.4f}, {b['ci_high']:+.4f}]" if b else ""
        print(f"{r['lambda']:6.2f} {r['perplexity_pruned']:10.2f} {r['perplexity_pruned'] / uniform['perplexity_dense']:6.3f} "
              f"{100 * r['next_token_agreement']:8.1f}% {ci:>30} {b['p_value'] if b else '':>7}")


if __name__ == "__main__":
    main()
