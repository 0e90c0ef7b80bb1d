"""Peak memory and time of the collect stage vs the number of calibration sentences (dense vs nothing else:
the same model, the same code, only the sample count changes), each in a fresh process.

    .venv/bin/python -m benchmarks.collect_memory [--samples 512 4096]

Needs a finished `dvc repro collect` (data/dense and data/prepared/train.jsonl). Calibration sets larger than
prepare.calib_size are drawn from the train split (seed 0) into a scratch project; nothing in data/ changes.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--samples", type=int, nargs="+", default=[512, 4096])
    args = ap.parse_args()
    train = [json.loads(l)["text"] for l in (ROOT / "data/prepared/train.jsonl").read_text().splitlines() if l]
    texts = random.Random(0).sample(train, max(args.samples))
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        (tmp / "data/prepared").mkdir(parents=True)
        (tmp / "data/dense").symlink_to(ROOT / "data/dense")
        (tmp / "data/prepared/calib.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
        env = dict(os.environ, PYTHONPATH=str(ROOT))
        for n in args.samples:
            cmd = [sys.executable, "-m", "stages.collect", "--root", str(tmp), "--params", str(ROOT / "params.yaml"),
                   "--set", f"collect.max_samples={n}", "--set", "collect.time_forward=false"]
            subprocess.run(cmd, check=True, env=env, cwd=ROOT, capture_output=True)
            m = json.loads((tmp / "metrics/collect.json").read_text())
            rows.append({"samples": n, "tokens": m["tokens"], "collect_seconds": m["seconds"], "peak_rss_mb": m["peak_rss_mb"]})
            print(f"{n:6d} sentences {m['tokens']:7d} tokens: collect {m['seconds']:6.1f} s, peak RSS {m['peak_rss_mb']:7.1f} MiB",
                  flush=True)
    lo, hi = rows[0], rows[-1]
    growth = hi["peak_rss_mb"] / lo["peak_rss_mb"] - 1
    print(f"peak RSS {lo['samples']} -> {hi['samples']} sentences: {growth:+.1%} "
          f"(time x{hi['collect_seconds'] / lo['collect_seconds']:.2f} for x{hi['tokens'] / lo['tokens']:.2f} tokens)")
    out = ROOT / "metrics/collect_memory.json"
    out.write_text(json.dumps({"runs": rows, "peak_rss_growth": growth}, indent=2) + "\n")


if __name__ == "__main__":
    main()
