"""How much calibration text the LM's sequential refit needs: the default pipeline with the refit on more
windows of the calibration novels than `lm.calib_windows`, held-out perplexity and a paired test.

    python -m benchmarks.lm_calibration                         # after `make lm` (about 35 minutes)
    python -m benchmarks.lm_calibration --points 0.7 --windows 64 128
    python -m benchmarks.lm_calibration --points 0.7 --windows 64 256 --first-token-weights 1 16
    python -m benchmarks.lm_calibration --points 0.8:9 --windows 256 --tilts 0 0.25   # after lm_sensitivity

Why: with the default 64 windows the refit fits its own windows almost perfectly and the rest far less well.
At 0.8 of the FLOPs (9 heads) the NLL rise on 16 of its own windows is 0.023 nats, on 16 windows of the same
novels it never saw 0.20, and on the held-out novel 0.28; a larger ridge only makes every figure worse (1e-3, 1e-2,
1e-1: 49.26, 50.62, 61.06 against 49.01). The refit has 576 + ~950 inputs per layer and 30 layers in a chain,
each absorbing the drift of those before it, and 64 windows are too few to pin that down.

Each point is the default pipeline (lm/params.yaml: obs ranking from the committed statistics of 64 windows,
uniform allocation, sequential lstsq) with only the refit's windows changed: n windows evenly spaced over all
the windows of the calibration novels (the pipeline's own rule, `lm_assets.calibration_windows`; n = 64 gives the
pipeline's windows). A point is `budget` or `budget:heads` (select.uniform_heads). Reported per point and n:
perplexity on the held-out novel (the pipeline's 40 eval windows), next-token agreement, the NLL rise on 16
windows of the calibration novels that no refit saw, the refit's seconds, and a paired bootstrap over the eval
windows (per-window NLL) against the first (n, first-token weight). Writes metrics/lm/calibration.json (or --out)
and prints a table.

It also reports the eval window whose NLL rose most over the dense model's, and the eval windows on which the
pruned model loses the attention sink. The first token of every window carries a massive activation in the dense
model's residual stream from layer 11 on (RMS about 940 against 5-30 for the other tokens), which later layers'
attention relies on. The refit on 128 windows (at 0.7) lost it on one eval window: from layer 1 on, the pruned
model failed to build it from that window's first token (" if"), and that window's NLL went from 4.07 (64
windows) to 9.76, more than the whole of 128's loss against 64. A sink counts as lost when the pruned model's
first-token RMS at mid-depth is under half the dense model's.

`--tilts` adds benchmarks/lm_sensitivity.py's non-uniform FFN allocation on top: layer i keeps n̄ (1 + λ z_i)
neurons, z the standardised per-layer NLL rise of metrics/lm/sensitivity.json's probe (run at 0.8 with 9 heads; at
any other point its z-scores are applied as they are, which makes that point a check of the tilt on a budget it
was not chosen at). λ = 0 is the uniform allocation. FLOPs are unchanged (the total neuron count is kept).
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import time
from pathlib import Path

import numpy as np
import torch

from pruneflow import sweep
from pruneflow.allocation import tilted as tilted_neurons
from pruneflow.artifacts import write_json
from pruneflow.cost import make_cost
from pruneflow.lm_assets import read_texts, spaced, window_pool  # the pipeline's own window rule
from pruneflow.params import load_params
from pruneflow.pruning import prune_to_selection
from pruneflow.runtime import Layout, setup_logging
from pruneflow.selection import keep_sets, resolve_seq_len, select_units
from pruneflow.sequential import DenseTrace
from pruneflow.stats_tests import paired_bootstrap
from pruneflow.tasks.causal_lm import read_windows, window_batches


ROOT = Path(__file__).resolve().parents[1]


def held_out(n_pool: int, used: set[int], n: int) -> list[int]:
    """n windows evenly spaced over those no refit uses."""
    free = [i for i in range(n_pool) if i not in used]
    if len(free) < n:
        raise ValueError(f"only {len(free)} calibration windows are left for the held-out check; use fewer windows")
    return [free[j] for j in spaced(len(free), n)]


@torch.inference_mode()
def first_token_rms(model, windows: torch.Tensor, layer: int, batch_size: int, device: str) -> torch.Tensor:
    """Per window, the RMS of the residual stream at the first token after `layer` blocks (hidden_states[layer]):
    where the attention sink's massive activation sits."""
    out = []
    for i in range(0, len(windows), batch_size):
        hidden = model(input_ids=windows[i:i + batch_size].to(device), output_hidden_states=True).hidden_states
        out.append(hidden[layer][:, 0].double().pow(2).mean(-1).sqrt().cpu())
    return torch.cat(out)


def parse_point(text: str) -> tuple[float, int | None]:
    budget, _, heads = text.partition(":")
    return float(budget), (int(heads) if heads else None)


@torch.inference_mode()
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--points", nargs="+", default=["0.8:9", "0.7"],
                    help="budget or budget:heads (select.uniform_heads); default: 0.8 with its better 9 heads, and "
                         "the pipeline's default 0.7")
    ap.add_argument("--windows", type=int, nargs="+", default=[64, 256], help="refit windows; the first is the "
                                                                              "reference of the paired tests")
    ap.add_argument("--first-token-weights", type=float, nargs="+", default=None,
                    help="correct.first_token_weight values to try at every window count (default: lm/params.yaml's)")
    ap.add_argument("--tilts", type=float, nargs="+", default=[0.0],
                    help="λ of the sensitivity-tilted FFN allocation (0: uniform); needs metrics/lm/sensitivity.json")
    ap.add_argument("--held-out", type=int, default=16)
    ap.add_argument("--out", type=Path, default=ROOT / "metrics/lm/calibration.json")
    args = ap.parse_args()
    setup_logging()
    layout = Layout(ROOT, "data/lm", "metrics/lm", "plots/lm")
    base = load_params(ROOT / "lm/params.yaml")
    # the uniform allocation, tilted here by --tilts (select.allocation: sensitivity runs its own probe)
    base = base.model_copy(update={"select": base.select.model_copy(update={"allocation": "uniform"})})
    lm = load_params(ROOT / "params.yaml").lm  # the LM's assets and windows are declared there (lm_prepare)
    ctx = sweep.context(base, layout)
    texts = read_texts(lm.text, ROOT / lm.text_path, lm.calib_texts)
    pool = window_pool(ctx.tokenizer, texts, lm.window)
    if not torch.equal(pool[spaced(len(pool), lm.calib_windows)], read_windows(layout.prepared, "calib")):
        raise SystemExit("data/lm/prepared does not hold lm.calib_windows evenly spaced windows: run `make lm` first")
    fits = {n: spaced(len(pool), n) for n in args.windows}
    check = pool[held_out(len(pool), set().union(*map(set, fits.values())), args.held_out)]
    check_batches = lambda: window_batches(check, base.evaluate.batch_size, ctx.device)  # noqa: E731
    dense_check = ctx.task.calibration_loss(ctx.model, check_batches(), None)
    eval_windows = ctx.reference["windows"]
    mid = ctx.adapter.num_layers // 2
    sink = lambda model: first_token_rms(model, eval_windows, mid, base.evaluate.batch_size, ctx.device)  # noqa: E731
    dense_sink = sink(ctx.model)
    dense_items = ctx.task.compare(ctx.reference, ctx.model, base.evaluate, ctx.device)[1]
    dense_nll = np.asarray(dense_items["perplexity_pruned"])  # the dense model scored as a "pruned" one
    ranking = json.loads(layout.ranking.read_text())
    seq_len = resolve_seq_len(base.select.seq_len, ctx.stats.info())
    print(f"{len(pool)} windows of {lm.window} tokens in the calibration novels; {args.held_out} held out "
          f"(dense perplexity {math.exp(dense_check):.2f} there)", flush=True)
    sensitivity = (json.loads((ROOT / "metrics/lm/sensitivity.json").read_text())["nll_rise_per_layer"]
                   if any(args.tilts) else None)
    rows = []
    for point in args.points:
        budget, heads = parse_point(point)
        select = base.select.model_copy(update={"budget": budget, "uniform_heads": heads})
        uniform = select_units(ctx.model, ctx.adapter, ranking, select,
                               make_cost(select.cost, seq_len, select.tolerance), seq_len)
        reference = None
        for n, weight, tilt in itertools.product(args.windows, args.first_token_weights or
                                                 [base.correct.first_token_weight], args.tilts):
            windows = pool[fits[n]]
            sel = tilted(uniform, ranking, ctx.adapter, tilt, sensitivity, base.select.min_neurons)
            t0 = time.perf_counter()
            trace = lambda: DenseTrace(ctx.model, list(window_batches(windows, base.collect.batch_size, ctx.device)),  # noqa: E731
                                       ctx.device)
            correct = base.correct.model_copy(update={"first_token_weight": weight})
            model, _, _ = prune_to_selection(ctx.model, ctx.stats, sel, correct, ctx.device, trace)
            seconds = time.perf_counter() - t0
            rise = ctx.task.calibration_loss(model, check_batches(), None) - dense_check
            q, items = ctx.task.compare(ctx.reference, model, base.evaluate, ctx.device)
            lost = torch.nonzero(sink(model) < 0.5 * dense_sink)[:, 0].tolist()
            del model
            nll = np.asarray(items["perplexity_pruned"])
            worst = int(np.argmax(nll - dense_nll))
            row = {"budget": budget, "heads": sel["heads_per_layer"][0], "neurons": sel["neurons_per_layer"][0],
                   "flops_ratio": sel["flops_ratio"], "windows": n, "first_token_weight": weight,
                   "tilt": tilt, "neurons_per_layer": sel["neurons_per_layer"],
                   "refit_seconds": round(seconds, 1),
                   "perplexity_dense": q["perplexity_dense"], "perplexity_pruned": q["perplexity_pruned"],
                   "perplexity_ratio": q["perplexity_ratio"], "next_token_agreement": q["next_token_agreement"],
                   "held_out_calib_nll_rise": rise, "eval_windows_sink_lost": lost,
                   "worst_eval_window": {"index": worst, "nll": float(nll[worst]), "nll_dense": float(dense_nll[worst]),
                                         "nll_first": None if reference is None else float(reference[worst])},
                   "vs_first_nll": None if reference is None else paired_bootstrap(nll, reference),
                   "eval_window_nll": nll.tolist()}  # for paired tests between any two rows
            reference = nll if reference is None else reference
            rows.append(row)
            # after every row (atomically), so an interrupted run keeps what it measured
            write_json(args.out,
                       {"held_out_windows": args.held_out, "sink_layer": mid,
                        "dense_first_token_rms": dense_sink.tolist(), "window": lm.window, "pool_windows": len(pool),
                        "held_out_dense_perplexity": math.exp(dense_check), "rows": rows})
            print(f"budget {budget} ({row['heads']} heads, {row['neurons']} neurons), {n} windows, first-token weight "
                  f"{weight:g}, tilt {tilt:g}: perplexity "
                  f"{row['perplexity_pruned']:.2f} (ratio {row['perplexity_ratio']:.3f}), held-out calibration "
                  f"rise {rise:.4f} nats, refit {seconds:.0f} s, sink lost on eval windows {lost}", flush=True)
    print(f"\n{'budget':>6} {'heads':>5} {'windows':>7} {'weight':>6} {'tilt':>5} {'perplexity':>10} {'ratio':>6} {'agreement':>9} "
          f"{'held-out rise':>13} {'ΔNLL vs first [95% CI]':>30} {'p':>7}  worst window: NLL (dense, first)  sink lost")
    for r in rows:
        b = r["vs_first_nll"]
        ci = f"{b['mean_diff']:+.4f} [{b['ci_low']:+.4f}, {b['ci_high']:+.4f}]" if b else ""
        print(f"{r['budget']:6.2f} {r['heads']:5d} {r['windows']:7d} {r['first_token_weight']:6g} {r.get('tilt', 0):5g} "
              f"{r['perplexity_pruned']:10.2f} "
              f"{r['perplexity_ratio']:6.3f} {100 * r['next_token_agreement']:8.1f}% {r['held_out_calib_nll_rise']:13.4f} "
              f"{ci:>30} {b['p_value'] if b else '':>7}  {worst_text(r):>27}  {r['eval_windows_sink_lost']}")


def tilted(uniform: dict, ranking: dict, adapter, tilt: float, sensitivity: list[float] | None, floor: int) -> dict:
    """The uniform selection with its FFN neurons re-allocated by the sensitivity probe (λ = tilt), same total."""
    if tilt == 0:
        return uniform
    neurons = tilted_neurons(sensitivity, uniform["neurons_per_layer"], tilt, adapter.dense_neurons, floor)
    keep_heads, keep_neurons = keep_sets(ranking, uniform["heads_per_layer"], neurons, adapter.group)
    return {**uniform, "keep_heads": keep_heads, "keep_neurons": keep_neurons, "neurons_per_layer": neurons}


def worst_text(row: dict) -> str:
    w = row["worst_eval_window"]
    first = "" if w["nll_first"] is None else f", {w['nll_first']:.2f}"
    return f"#{w['index']}: {w['nll']:.2f} ({w['nll_dense']:.2f}{first})"


if __name__ == "__main__":
    main()
