"""Bonsai's peak memory against the dense model's inference peak on the same calibration data, each measured in
a fresh process (peak RSS; and peak CUDA allocation on a GPU).

    python -m benchmarks.bonsai_memory                       # the LM: lm/params.yaml on data/lm, budget 0.8
    python -m benchmarks.bonsai_memory --params params.yaml --data data --budget 0.5    # the classifier

  inference  load the dense model and score it once with the task's label-free loss on the `rank.bonsai.samples`
             calibration sequences every sub-model is scored on: the forward Bonsai repeats, on the dense model
  bonsai     the real rank stage with rank.method=bonsai, select.allocation=ranking at --budget, in a scratch
             folder (links to the pipeline's dense model, prepared data and statistics)
Both processes import the same libraries, so their difference is what the search holds beyond inference. Writes
<metrics>/bonsai_memory.json. The issue's target: bonsai at most 1.5× inference.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from pruneflow.artifacts import write_json

INFERENCE = """
import json, sys
from pruneflow.methods import method_options
from pruneflow.params import load_params
from pruneflow.runtime import load_tokenizer, peak_memory, setup_torch
from pruneflow.tasks import get_task
params = load_params(sys.argv[1], {{}})
device = setup_torch(params)
task = get_task(params.task.kind)
dense = "{dense}"
model = task.load_model(dense).to(device).eval()
batches = method_options(params.rank, "bonsai").scoring_batches(
    task.calibration_batches("{prepared}", load_tokenizer(dense), params.collect, device))
reference = task.calibration_reference(model, batches)
loss = task.calibration_loss(model, batches, reference)
print(json.dumps({{"loss": loss, **peak_memory()}}))
"""

BONSAI = """
import json, sys
from pathlib import Path
from pruneflow.params import load_params
from pruneflow.runtime import Layout, peak_memory
from stages import rank
params = load_params(sys.argv[1], {{"rank.method": "bonsai", "select.allocation": "ranking",
                                    "select.budget": {budget}}})
summary = rank.run(params, Layout(Path("{root}"), "data", "metrics", "plots"))
print(json.dumps({{**summary, **peak_memory()}}))
"""


def _run(code: str, params: str) -> dict:
    out = subprocess.run([sys.executable, "-c", code, params], capture_output=True, text=True,
                         env=os.environ | {"PYTHONPATH": str(Path.cwd())})
    if out.returncode:
        raise SystemExit(f"benchmark process failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--params", default="lm/params.yaml")
    ap.add_argument("--data", default="data/lm")
    ap.add_argument("--metrics", default="metrics/lm")
    ap.add_argument("--budget", type=float, default=0.8)
    args = ap.parse_args(argv)
    data = Path(args.data).resolve()
    inference = _run(INFERENCE.format(dense=data / "dense", prepared=data / "prepared"), args.params)
    print(f"dense inference on Bonsai's calibration samples: peak RSS {inference['peak_rss_mb']:.0f} MiB", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        for sub in ("dense", "prepared", "stats"):
            (Path(tmp) / "data").mkdir(exist_ok=True)
            os.symlink(data / sub, Path(tmp) / "data" / sub)
        bonsai = _run(BONSAI.format(root=tmp, budget=args.budget), args.params)
    ratio = bonsai["peak_rss_mb"] / inference["peak_rss_mb"]
    print(f"bonsai search to {args.budget}: peak RSS {bonsai['peak_rss_mb']:.0f} MiB = {ratio:.2f}x inference "
          f"({bonsai['seconds']:.0f} s)", flush=True)
    out = {"params": args.params, "budget": args.budget, "inference": inference, "bonsai": bonsai,
           "peak_rss_ratio": round(ratio, 3)}
    if "peak_cuda_mb" in inference and "peak_cuda_mb" in bonsai:
        out["peak_cuda_ratio"] = round(bonsai["peak_cuda_mb"] / inference["peak_cuda_mb"], 3)
    write_json(Path(args.metrics) / "bonsai_memory.json", out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
