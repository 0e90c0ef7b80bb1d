"""Peak memory and time of the stages that walk the model (collect, select's sensitivity probe, correct) per
`runtime.offload` (none | cpu | disk), each stage in a fresh process, on the LM pipeline's model, calibration
windows, ranking and selection; beside them the dense model's
plain inference peak (load + one forward over one calibration batch), its fp32 weight bytes, and the peak of a
process that has imported a stage and built the model with no weights (the floor every stage stands on).

    .venv/bin/python -m benchmarks.offload [--modes none disk] [--device cpu] [--stages collect correct]
    .venv/bin/python -m benchmarks.offload --modes none disk --stages select --out metrics/lm/offload_select.json
    python3 -m benchmarks.offload --random .gpu --device cuda --modes none cpu disk   (a lent GPU machine)

disk-heap is disk with correct.return_memory=false: correct then leaves freed memory to glibc's heap, as the other
modes do (faster, a higher peak); disk-held is disk with correct.low_memory=false: the refit holds one layer's
activations between its passes instead of running attention again and waiting for the FFN activations on disk.
Needs `make lm` up to select (data/lm/dense, data/lm/prepared, data/lm/stats, data/lm/rank, data/lm/select): a
stage left out of --stages is replaced by the pipeline's output (statistics, selection).
--random DIR builds a model of the same shape with random weights from DIR/config.json (plus DIR's tokenizer, windows.safetensors and
selection.json): the real checkpoint is too large to carry to a GPU machine. The stages write into a scratch
project; nothing under data/ changes. Statistics and corrected weights are compared across modes (they must
agree: offload moves weights, it does not change the arithmetic), and with the pipeline's own outputs (the
selection included). Writes --out (default metrics/lm/offload.json; real model only) and prints a table.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from benchmarks.prune_time import describe_differing, differing

ROOT = Path(__file__).resolve().parents[1]
PARAMS = ROOT / "lm/params.yaml"

INFERENCE = """
import json, sys, time, torch
from pruneflow.runtime import peak_memory, setup_logging
from pruneflow.tasks import get_task
from pruneflow.tasks.causal_lm import read_windows
from pathlib import Path
root, device = Path(sys.argv[1]), sys.argv[2]
model = get_task("causal_lm").load_model(root / "data/dense").to(device)
ids = torch.as_tensor(read_windows(root / "data/prepared", "calib")[:4], device=device)
with torch.inference_mode():
    model(input_ids=ids)
print(json.dumps(peak_memory()))
"""

# The floor every stage process stands on: Python, torch, transformers and the model's code imported, the model
# built on the meta device (no weights, no data). What a stage needs for its work is its peak above this.
RUNTIME = """
import json, sys
from pathlib import Path
import stages.collect, stages.correct
from pruneflow.runtime import peak_memory
from pruneflow.tasks import get_task
get_task("causal_lm").load_lazy(Path(sys.argv[1]) / "data/dense")
print(json.dumps(peak_memory()))
"""


def run(cmd: list[str], env: dict) -> str:
    done = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True)
    if done.returncode:
        sys.stderr.write(done.stdout[-3000:] + done.stderr[-6000:])
        raise SystemExit(f"failed: {' '.join(cmd)}")
    return done.stdout


def make_random(src: Path, dest: Path) -> None:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(src), dtype=torch.float32)
    model.save_pretrained(dest)
    for f in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(src / f, dest / f)


def compare(a: Path, b: Path) -> dict:
    """Largest relative difference of the statistics' Gram matrices and of the corrected weights (those there)."""
    import torch
    from safetensors.torch import load_file

    from pruneflow.stats import load_statistics

    out = {}
    if (a / "data/stats").is_dir() and not (a / "data/stats").is_symlink():
        sa, sb = load_statistics(a / "data/stats"), load_statistics(b / "data/stats")
        out["stats_rel_diff"] = max(float((sa.modules[n].sxx - sb.modules[n].sxx).abs().max()
                                          / sb.modules[n].sxx.abs().max()) for n in sb.modules)
    if (a / "data/pruned/model.safetensors").exists():
        wa, wb = load_file(a / "data/pruned/model.safetensors"), load_file(b / "data/pruned/model.safetensors")
        out["weights_rel_diff"] = max(float((wa[k] - wb[k]).abs().max() / wb[k].abs().max().clamp_min(1e-30))
                                      for k in wb)
    return out


STAGES = ("collect", "select", "correct")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--modes", nargs="+", default=["none", "disk", "disk-heap"],
                    choices=["none", "cpu", "disk", "disk-heap", "disk-held"],
                    help="runtime.offload values; disk-heap is disk with correct.return_memory=false (glibc keeps "
                         "freed heap: faster, a higher peak); disk-held is disk with correct.low_memory=false (the "
                         "refit holds a layer's activations between its passes: faster, a higher peak)")
    ap.add_argument("--stages", nargs="+", default=["collect", "correct"], choices=STAGES,
                    help="the stages to run and measure; the others' outputs are the pipeline's (select runs its "
                         "sensitivity probe only with select.allocation: sensitivity, the LM's default)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--random", type=Path, help="a folder with config.json, tokenizer, windows.safetensors, "
                                                "selection.json: random weights of that shape")
    ap.add_argument("--out", type=Path, default=ROOT / "metrics/lm/offload.json")
    args = ap.parse_args()
    stages = [s for s in STAGES if s in args.stages]
    if args.random and "select" in stages:
        raise SystemExit("--random has no ranking to select from: leave select out of --stages")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        pipeline = ROOT / "data/lm"
        if args.random:
            dense, prepared, select = tmp / "dense", args.random.resolve(), args.random.resolve()
            make_random(args.random, dense)
        else:
            dense, prepared, select = pipeline / "dense", pipeline / "prepared", pipeline / "select"
        weights_mb = sum(f.stat().st_size for f in dense.glob("*.safetensors")) / 2**20
        rows, roots = [], {}
        for mode in args.modes:
            root = tmp / mode
            (root / "data/prepared").mkdir(parents=True)
            (root / "data/dense").symlink_to(dense)
            os.symlink(prepared / "windows.safetensors", root / "data/prepared/windows.safetensors")
            if "collect" not in stages:
                (root / "data/stats").symlink_to(pipeline / "stats")
            if "select" in stages:
                (root / "data/rank").symlink_to(pipeline / "rank")
            else:
                (root / "data/select").mkdir(parents=True)
                os.symlink(select / "selection.json", root / "data/select/selection.json")
            offload = mode.split("-")[0]
            sets = ["--set", f"runtime.offload={offload}", "--set", f"runtime.device={args.device}"]
            sets += ["--set", "correct.return_memory=false"] if mode.endswith("-heap") else []
            sets += ["--set", "correct.low_memory=false"] if mode.endswith("-held") else []
            base = ["--root", str(root), "--params", str(PARAMS), "--data", "data", "--metrics", "metrics",
                    "--plots", "plots"]
            row = {"offload": mode}
            for stage in stages:
                extra = ["--set", "collect.time_forward=false"] if stage == "collect" else []
                run([sys.executable, "-m", f"stages.{stage}", *base, *sets, *extra], env)
                m = json.loads((root / f"metrics/{stage}.json").read_text())
                row |= {f"{stage}_seconds": m["seconds"], f"{stage}_peak_rss_mb": m["peak_rss_mb"],
                        f"{stage}_peak_cuda_mb": m.get("peak_cuda_mb")}
            rows.append(row)
            roots[mode] = root
            print(json.dumps(rows[-1]), flush=True)
        (tmp / "inference").mkdir()
        (tmp / "inference/data").mkdir()
        (tmp / "inference/data/dense").symlink_to(dense)
        (tmp / "inference/data/prepared").symlink_to(roots[args.modes[0]] / "data/prepared")
        inference = json.loads(run([sys.executable, "-c", INFERENCE, str(tmp / "inference"), args.device], env)
                               .strip().splitlines()[-1])
        runtime = json.loads(run([sys.executable, "-c", RUNTIME, str(tmp / "inference")], env).strip().splitlines()[-1])
        first = args.modes[0]
        agreement = {m: compare(roots[m], roots[first]) for m in args.modes[1:]}
        # the pipeline's own outputs (make lm), where they are there to compare with: a mode must move no byte
        differs = None if args.random else {m: differing(roots[m] / "data", pipeline) for m in args.modes}
    from transformers import AutoConfig

    from pruneflow.tasks.causal_lm import read_windows

    cfg = AutoConfig.from_pretrained(dense if not args.random else args.random)
    # one copy of the calibration hidden states: windows x tokens x hidden x 4 bytes; collect walks the statistics
    # windows, correct the refit windows (lm.refit_windows)
    hidden_mb = read_windows(prepared, "calib").numel() * cfg.hidden_size * 4 / 2**20
    refit_mb = read_windows(prepared, "refit", fallback="calib").numel() * cfg.hidden_size * 4 / 2**20
    result = {"device": args.device, "random_weights": bool(args.random), "stages": stages,
              "dense_weights_mb": round(weights_mb, 1),
              "hidden_states_mb": round(hidden_mb, 1), "refit_hidden_states_mb": round(refit_mb, 1),
              "inference": inference, "runtime_peak_rss_mb": runtime["peak_rss_mb"], "runs": rows,
              "agreement_with_" + first: agreement, "differs_from_pipeline": differs}
    print(f"\ndense fp32 weights {weights_mb:.0f} MiB, one copy of the calibration hidden states {hidden_mb:.0f} MiB "
          f"(collect) and {refit_mb:.0f} MiB (correct's refit windows), "
          f"dense inference peak RSS {inference['peak_rss_mb']:.0f} MiB"
          + (f", GPU {inference['peak_cuda_mb']:.0f} MiB" if "peak_cuda_mb" in inference else "")
          + f"; a stage process with no weights or data: {runtime['peak_rss_mb']:.0f} MiB")
    print(f"{'offload':10}" + "".join(f" {s + ' s':>10} {'peak RSS':>9} {'GPU MiB':>8}" for s in stages))
    for r in rows:
        print(f"{r['offload']:10}" + "".join(f" {r[s + '_seconds']:10.1f} {r[s + '_peak_rss_mb']:9.0f} "
                                            f"{r[s + '_peak_cuda_mb'] or 0:8.0f}" for s in stages))
    for m, a in agreement.items():
        print(f"{m} vs {first}: " + ", ".join(f"{k} {v:.2e}" for k, v in a.items()))
    for m, names in (differs or {}).items():
        print(f"{m}: outputs {describe_differing(names, str(pipeline.relative_to(ROOT)))}")
    if not args.random:
        args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
