"""The pruneflow pipeline as a Prefect flow: the same DVC stages `dvc repro` runs, one Prefect task each.

    python -m flows.pipeline                                  # default params, temporary local Prefect server
    python -m flows.pipeline --set select.budget=0.4 --set rank.method=magnitude

Each task runs `dvc repro --single-item <stage>` in project_dir, so DVC alone decides what is stale and records
lineage in dvc.lock: after a finished `dvc repro` this flow recomputes nothing, and after this flow `dvc repro`
recomputes nothing. Prefect adds scheduling, retries, logs per stage and a results artifact.

How overrides reach DVC: they are validated with the whole params file exactly as a stage validates it, and
only then written into params_file (atomically, comments kept), because DVC reads params.yaml to decide what
changed. They stay there after the run, as with `dvc exp run -S`, so the workspace, dvc.lock and the outputs
agree. We do not use `dvc exp run -S`: it runs the whole pipeline as one command (no per-stage tasks, logs or
retries), needs a commit, and writes its results into the working files anyway.
Stages read params.yaml (their default --params); a different params_file only matters if dvc.yaml points there.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

# flows.common first: it turns Prefect's telemetry off before prefect is imported.
from flows.common import (
    USER_ERROR_EXIT, StageError, dvc_pull, dvc_push, markdown_table, parse_set, pipeline_stages, resolve_params,
    stage_task,
)
from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NO_CACHE

from pruneflow.artifacts import read_json
from pruneflow.params import Params, ParamsError

RESULTS_ARTIFACT_KEY = "pruneflow-results"
METRIC_FILES = {"quality": "metrics/quality.json", "latency": "metrics/latency.json", "export": "metrics/export.json"}


# No retries: a params error is the user's to fix, and it must stop the flow before any stage runs.
@task(name="validate-params", cache_policy=NO_CACHE, retries=0)
def apply_params(project_dir: str, params_file: str, overrides: dict[str, Any] | None) -> Params:
    return resolve_params(project_dir, params_file, overrides)


# --------------------------------------------------------------------------------------------- results


def _read_metrics(project_dir: Path) -> dict[str, dict | None]:
    out = {}
    for name, rel in METRIC_FILES.items():
        path = project_dir / rel
        out[name] = read_json(path) if path.exists() else None
    return out


def _onnx_paths(export: dict | None, project_dir: Path) -> dict[str, str | None]:
    """The dense and pruned .onnx paths, wherever metrics/export.json keeps them (any string value ending in
    .onnx whose key path says dense or pruned); falls back to the files in data/onnx."""
    found: dict[str, str] = {}

    def walk(node: Any, key: str) -> None:
        if isinstance(node, dict):
            for k, v in node.items():
                walk(v, f"{key}.{k}")
        elif isinstance(node, str) and node.endswith(".onnx"):
            for kind in ("dense", "pruned"):
                if kind in key.lower() or kind in Path(node).name.lower():
                    found.setdefault(kind, node)

    if export is None:
        return {"dense": None, "pruned": None}
    walk(export, "")
    for kind in ("dense", "pruned"):
        if kind not in found:
            files = sorted((project_dir / "data/onnx").glob(f"*{kind}*.onnx"))
            if files:
                found[kind] = str(files[0].relative_to(project_dir))
    return {"dense": found.get("dense"), "pruned": found.get("pruned")}


def _reference_shape(reference: Any, params: Params) -> list[int]:
    """(batch, seq_len) of the latency numbers: metrics/latency.json's {"batch", "seq_len"}, else params."""
    if isinstance(reference, dict):
        return [reference.get("batch"), reference.get("seq_len")]
    return list(reference or params.benchmark.reference)


def results_table(project_dir: str | Path, params: Params) -> dict[str, Any]:
    """The numbers of the results table, None where a stage has not run (its metrics file is missing)."""
    project_dir = Path(project_dir)
    m = _read_metrics(project_dir)
    quality, latency = m["quality"] or {}, m["latency"] or {}
    onnx = _onnx_paths(m["export"], project_dir)
    flops_dense, flops_pruned = quality.get("flops_dense"), quality.get("flops_pruned")
    return {
        "budget": quality.get("budget", params.select.budget if m["quality"] else None),
        "methods": quality.get("methods"),
        "prune_seconds": quality.get("prune_seconds"),
        "flops_dense": flops_dense,
        "flops_pruned": flops_pruned,
        "flops_ratio": quality.get("flops_ratio") or (flops_pruned / flops_dense if flops_dense and flops_pruned
                                                       else None),
        "accuracy_dense": quality.get("accuracy_dense"),
        "accuracy_pruned": quality.get("accuracy_pruned"),
        "agreement": quality.get("agreement"),
        "ort_ms_dense": latency.get("ort_ms_dense"),
        "ort_ms_pruned": latency.get("ort_ms_pruned"),
        "speedup_ort": latency.get("speedup_ort"),
        "torch_ms_dense": latency.get("torch_ms_dense"),
        "torch_ms_pruned": latency.get("torch_ms_pruned"),
        "provider": latency.get("provider"),
        "threads": latency.get("threads"),
        "reference": _reference_shape(latency.get("reference"), params) if m["latency"] else None,
        "flops_seq_len": quality.get("flops_seq_len"),
        "onnx_dense": onnx["dense"],
        "onnx_pruned": onnx["pruned"],
        "not_run": [rel for name, rel in METRIC_FILES.items() if m[name] is None],
    }


def _num(v: Any, fmt: str = ".4g") -> Any:
    return format(v, fmt) if isinstance(v, (int, float)) and not isinstance(v, bool) else v


def results_markdown(r: dict[str, Any], stages: dict[str, str] | None = None) -> str:
    gflops = lambda v: None if v is None else f"{v / 1e9:.3f}"  # noqa: E731
    shape = r["reference"]
    latency_label = (f"latency ORT, ms (batch {shape[0]}, seq {shape[1]}, {r['provider']}, {r['threads']} thread(s))"
                     if shape else "latency ORT, ms")
    rows = [
        ["FLOP budget (fraction of dense)", "1", _num(r["budget"]), ""],
        ["GFLOPs (fvcore, 1 multiply-add = 1 flop" + (f", seq {r['flops_seq_len']})" if r["flops_seq_len"] else ")"), gflops(r["flops_dense"]), gflops(r["flops_pruned"]),
         _num(r["flops_ratio"], ".3f") if r["flops_ratio"] is not None else None],
        ["accuracy (held-out eval)", _num(r["accuracy_dense"]), _num(r["accuracy_pruned"]), ""],
        ["agreement with dense predictions", "1", _num(r["agreement"]), ""],
        [latency_label, _num(r["ort_ms_dense"]), _num(r["ort_ms_pruned"]),
         None if r["speedup_ort"] is None else f"speed-up ×{r['speedup_ort']:.2f}"],
        ["latency PyTorch, ms (same shape)", _num(r["torch_ms_dense"]), _num(r["torch_ms_pruned"]), ""],
        ["ONNX file", r["onnx_dense"], r["onnx_pruned"], ""],
    ]
    text = "## pruneflow results\n\n" + markdown_table(["", "dense", "pruned", "pruned vs dense"], rows)
    if r["methods"] is not None:
        methods = r["methods"]
        if isinstance(methods, dict):  # evaluate writes {"rank": "obs", "allocation": "error", ...}
            methods = ", ".join(f"{k}={v}" for k, v in methods.items() if v is not None)
        text += f"\n\nmethods: {methods}"
    if r["prune_seconds"] is not None:
        text += f"; pruning took {r['prune_seconds']:.1f} s"
    if r["not_run"]:
        text += "\n\nnot run (no metrics file): " + ", ".join(r["not_run"])
    if stages:
        text += "\n\nstages (DVC): " + ", ".join(f"{s} {status}" for s, status in stages.items())
    return text + "\n"


# ------------------------------------------------------------------------------------------------ flow


@flow(name="prune-pipeline")
def prune_pipeline(project_dir: str = ".", params_file: str = "params.yaml",
                   overrides: dict[str, Any] | None = None, dvc_remote: str | None = None) -> dict[str, Any]:
    """Run the DVC stages of project_dir's dvc.yaml in order, one Prefect task each; publish the results table.

    overrides: dotted params, e.g. {"select.budget": 0.4, "rank.method": "magnitude"}; validated with the whole
    params file before anything runs, then written into params_file (DVC reads it).
    dvc_remote: a DVC remote name; when set, `dvc pull` before and `dvc push` after (outputs and run cache),
    so several workers on one pool share results instead of recomputing them.
    Returns the results table as a dict (None where a stage has not run) plus each stage's DVC status.
    """
    logger = get_run_logger()
    project = str(Path(project_dir).resolve())
    params = apply_params(project, params_file, overrides)
    stages = pipeline_stages(project)
    logger.info("stages (dvc.yaml order): %s", ", ".join(stages))
    if dvc_remote:
        dvc_pull(project, "pull", dvc_remote)
    statuses = {stage: stage_task(stage)(project, stage) for stage in stages}
    if dvc_remote:
        dvc_push(project, "push", dvc_remote)
    results = results_table(project, params)
    markdown = results_markdown(results, statuses)
    create_markdown_artifact(markdown=markdown, key=RESULTS_ARTIFACT_KEY,
                             description=f"pruneflow results, budget {results['budget']}, {project}")
    logger.info("\n%s", markdown)
    return results | {"stages": statuses, "markdown": markdown}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m flows.pipeline", description=(__doc__ or "").split("\n")[0])
    parser.add_argument("--project-dir", default=".", help="the DVC project (default: .)")
    parser.add_argument("--params", default="params.yaml", help="params file inside project-dir")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a param, e.g. --set select.budget=0.4 (written into the params file)")
    parser.add_argument("--dvc-remote", default=None, help="dvc pull before / dvc push after, with this remote")
    args = parser.parse_args(argv)
    try:
        results = prune_pipeline(project_dir=args.project_dir, params_file=args.params,
                                 overrides=parse_set(args.overrides) or None, dvc_remote=args.dvc_remote)
    except (ParamsError, StageError, ValueError, FileNotFoundError) as err:
        print(f"[flow] error: {err}", file=sys.stderr)  # the log above has the details
        return USER_ERROR_EXIT
    print(results["markdown"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
