"""Pruning time against the plain forward passes over the calibration set, over several runs: the machine is
shared, so quote the median ratio and its range.

    python -m benchmarks.prune_time                                            # the classifier, 3 runs
    python -m benchmarks.prune_time --params lm/params.yaml --data data/lm --metrics metrics/lm --runs 1   # SmolLM2

Each run is the pipeline's own stages, collect, rank, select and correct, each in a fresh process as `dvc repro`
runs them, in a scratch project linked to <data>/dense and <data>/prepared (nothing under data/ changes). Per
run: each stage's work `seconds` and `load_seconds`, collect's plain-forward seconds (timed in the same process,
before its walk), and prune seconds / forward seconds, the figure `metrics/quality.json` reports as
`prune_over_forward` (issue targets: at most 3), and which of its outputs (statistics, ranking, selection, pruned
weights) are not byte-identical to the pipeline's own under <data>/ (a speed-up must not move a result; with
other params than the pipeline's they differ by design). Writes <metrics>/prune_time.json and prints a table.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from pruneflow.artifacts import write_json

STAGES = ("collect", "rank", "select", "correct")


def one_run(params: str, data: Path, scratch: Path, rel: str) -> dict:
    (scratch / rel).mkdir(parents=True, exist_ok=True)
    for sub in ("dense", "prepared"):
        link = scratch / rel / sub
        if not link.exists():
            os.symlink(data / sub, link)
    env = os.environ | {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "PYTHONPATH": str(Path.cwd())}
    for stage in STAGES:
        done = subprocess.run([sys.executable, "-m", f"stages.{stage}", "--params", params, "--root", str(scratch),
                               "--data", rel, "--metrics", "metrics", "--plots", "plots"],
                              env=env, capture_output=True, text=True)
        if done.returncode:
            raise SystemExit(f"{stage} failed:\n{done.stderr[-3000:]}")
    m = {s: json.loads((scratch / "metrics" / f"{s}.json").read_text()) for s in STAGES}
    work = sum(m[s]["seconds"] for s in STAGES)
    forward = m["collect"]["forward_seconds"]
    return {"seconds": {s: m[s]["seconds"] for s in STAGES}, "load_seconds": {s: m[s]["load_seconds"] for s in STAGES},
            "prune_seconds": round(work, 2), "forward_seconds": forward, "prune_over_forward": round(work / forward, 3),
            "differs_from_pipeline": differing(scratch / rel, data)}


# what each stage writes that a timing change must leave as it was
OUTPUTS = ("stats/*.safetensors", "rank/ranking.json", "select/selection.json", "pruned/model.safetensors")


def differing(run: Path, data: Path) -> list[str] | None:
    """The outputs of this run that are not byte-identical to the pipeline's own (<data>/...), or None where the
    pipeline has not produced them (or its params differ: then they are not comparable anyway)."""
    names = sorted(str(f.relative_to(run)) for pattern in OUTPUTS for f in run.glob(pattern))
    if not all((data / n).exists() for n in names):
        return None
    return [n for n in names if (run / n).read_bytes() != (data / n).read_bytes()]


def describe_differing(names: list[str] | None, data: str) -> str:
    """differing()'s answer in words, for the benchmarks' printouts."""
    if names is None:
        return f"not compared with {data}/ (the pipeline has not produced these outputs)"
    return f"differing from {data}/: {', '.join(names)}" if names else f"byte-identical to {data}/"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--params", default="params.yaml")
    ap.add_argument("--data", default="data", help="the pipeline's data folder (its dense/ and prepared/ are used)")
    ap.add_argument("--metrics", default="metrics")
    ap.add_argument("--runs", type=int, default=3)
    args = ap.parse_args(argv)
    data = Path(args.data).resolve()
    if not (data / "dense").exists() or not (data / "prepared").exists():
        raise SystemExit(f"{data}/dense and {data}/prepared are needed: run the pipeline up to finetune/prepare first")
    runs = []
    with tempfile.TemporaryDirectory(prefix="prune_time-") as tmp:
        for r in range(args.runs):
            runs.append(one_run(args.params, data, Path(tmp), args.data))
            x = runs[-1]
            print(f"run {r + 1}: " + ", ".join(f"{s} {x['seconds'][s]:.1f} s" for s in STAGES)
                  + f" = {x['prune_seconds']:.1f} s; forward {x['forward_seconds']:.1f} s; "
                  f"ratio {x['prune_over_forward']:.2f}; outputs "
                  f"{describe_differing(x['differs_from_pipeline'], args.data)}", flush=True)
    ratios = [x["prune_over_forward"] for x in runs]
    out = {"params": args.params, "runs": runs, "median_prune_over_forward": round(statistics.median(ratios), 3),
           "min": min(ratios), "max": max(ratios)}
    write_json(Path(args.metrics) / "prune_time.json", out)
    print(f"prune / forward: median {out['median_prune_over_forward']:.2f} (range {out['min']:.2f}-{out['max']:.2f}, "
          f"{len(runs)} runs)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
