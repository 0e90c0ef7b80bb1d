"""Bonsai on the causal LM against its own prior (and, corrected, against the default), at given budgets.

    python -m benchmarks.bonsai_lm --budgets 0.8 0.7          # after `make lm` (reuses data/lm/{dense,prepared,stats})

Per budget, through the real stage functions on lm/params.yaml with overrides, each in its own data folder
(data/lm_bonsai/<variant>@<budget>, links to the LM's dense model, windows and statistics):
  bonsai        rank.method=bonsai, select.allocation=ranking, correct.method=none   (uncorrected search)
  bonsai+lstsq  the same kept units, sequential lstsq correction                        (our training-free PPA)
  prior         rank.bonsai.perturb=false (same rounds, lowest prior removed), no correction
Writes metrics/lm/bonsai.json (perplexity, agreement, rank seconds per round and per sub-model, paired bootstrap
of bonsai vs prior on the eval windows) and prints a table. The issue's target: bonsai below prior at 0.8 and
0.7, and the search to 0.8 within 45 minutes on the 2-core CPU.
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

from pruneflow.artifacts import read_json, write_json
from pruneflow.params import load_params
from pruneflow.runtime import Layout, peak_rss_mb, setup_logging
from pruneflow.stats_tests import paired_bootstrap
from pruneflow.tasks import get_task

VARIANTS = {
    "bonsai": {"rank.method": "bonsai", "select.allocation": "ranking", "correct.method": "none"},
    "bonsai+lstsq": {"rank.method": "bonsai", "select.allocation": "ranking"},
    "prior": {"rank.method": "bonsai", "rank.bonsai": {"perturb": False}, "select.allocation": "ranking",
              "correct.method": "none"},
}


def linked_layout(root: Path, name: str) -> Layout:
    data = Path("data/lm_bonsai") / name
    (root / data).mkdir(parents=True, exist_ok=True)
    for sub in ("dense", "prepared", "stats"):
        link = root / data / sub
        if not link.exists():
            os.symlink((root / "data/lm" / sub).resolve(), link)
    return Layout(root, str(data), str(data / "metrics"), str(data / "plots"))


def main(argv: list[str] | None = None) -> int:
    from stages import correct, rank, select

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--budgets", type=float, nargs="+", default=[0.8, 0.7])
    ap.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    ap.add_argument("--params", default="lm/params.yaml")
    args = ap.parse_args(argv)
    setup_logging()
    root = Path(".")
    out = {"points": [], "params": args.params}
    task = get_task("causal_lm")
    reference = items = None
    for budget in args.budgets:
        row_items = {}
        for variant in args.variants:
            over = {"select.budget": budget} | VARIANTS[variant]
            params = load_params(args.params, over)
            layout = linked_layout(root, f"{variant}@{budget}")
            (root / layout.metrics_dir).mkdir(parents=True, exist_ok=True)
            write_json(layout.metrics / "collect.json", read_json(root / "metrics/lm/collect.json"))
            kept = f"bonsai@{budget}"
            if variant == "bonsai+lstsq" and (root / f"data/lm_bonsai/{kept}/rank").exists():
                # the same search: reuse bonsai's ranking rather than repeating it
                src = root / f"data/lm_bonsai/{kept}"
                (root / layout.data / "rank").mkdir(parents=True, exist_ok=True)
                (root / layout.data / "rank/ranking.json").write_text((src / "rank/ranking.json").read_text())
                write_json(layout.metrics / "rank.json", read_json(src / "metrics/rank.json"))
            else:
                rank.run(params, layout)
            t0 = time.perf_counter()
            select.run(params, layout)
            correct.run(params, layout)
            if reference is None:
                reference = task.reference(task.load_model(layout.dense), layout.prepared, None, params.evaluate, "cpu")
            q, items = task.compare(reference, task.load_model(layout.pruned), params.evaluate, "cpu")
            rank_m = read_json(layout.metrics / "rank.json")
            rounds = rank_m.get("rounds") or []
            subs = sum(r["sub_models"] for r in rounds)
            row = {"variant": variant, "budget": budget, "flops_ratio": read_json(layout.metrics / "select.json")["flops_ratio"],
                   "perplexity_pruned": q["perplexity_pruned"], "perplexity_dense": q["perplexity_dense"],
                   "next_token_agreement": q["next_token_agreement"], "kl_per_token": q["kl_per_token"],
                   "rank_seconds": rank_m["seconds"], "rounds": len(rounds), "sub_models": subs,
                   "seconds_per_round": rank_m["seconds"] / max(len(rounds), 1),
                   "select_correct_seconds": round(time.perf_counter() - t0, 1), "round_log": rounds}
            row_items[variant] = items["perplexity_pruned"]
            out["points"].append(row)
            print(f"{variant:13s} @ {budget}: ppl {q['perplexity_pruned']:.2f} agreement "
                  f"{100 * q['next_token_agreement']:.1f}% (FLOPs {row['flops_ratio']:.3f}); rank {rank_m['seconds']:.0f} s, "
                  f"{len(rounds)} rounds, {subs} sub-models", flush=True)
        if "bonsai" in row_items and "prior" in row_items:
            t = paired_bootstrap(row_items["bonsai"], row_items["prior"])
            out.setdefault("bonsai_vs_prior_window_nll", {})[str(budget)] = t
            print(f"bonsai - prior, per-window NLL @ {budget}: {t['mean_diff']:+.4f} [{t['ci_low']:+.4f}, "
                  f"{t['ci_high']:+.4f}], p={t['p_value']:.4g}", flush=True)
    out["peak_rss_mb"] = round(peak_rss_mb(), 1)
    write_json(root / "metrics/lm/bonsai.json", out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
