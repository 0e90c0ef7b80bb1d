"""The results table of one pipeline run, read from the metrics files the stages wrote.

Used by the Prefect flow (a markdown artifact) and by `python -m stages.summary` (printed after `make run`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

from pruneflow.artifacts import read_json
from pruneflow.params import Params

METRIC_FILES = {"quality": "metrics/quality.json", "latency": "metrics/latency.json", "export": "metrics/export.json"}


def markdown_table(header: list[str], rows: list[list[Any]]) -> str:
    def cell(v: Any) -> str:
        return "not run" if v is None else str(v).replace("|", "\\|")

    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def file_reader(project_dir: Path) -> Callable[[str], dict | None]:
    """read(rel) -> the JSON file at project_dir/rel, or None where it is missing."""
    return lambda rel: read_json(project_dir / rel) if (project_dir / rel).exists() else None


def _onnx_paths(project_dir: Path, export: dict | None, from_files: bool) -> dict[str, str | None]:
    """The deployable files the export stage wrote (data/onnx/{dense,pruned}.onnx): where present in a
    workspace, or as recorded by the export stage (an experiment's outputs live in DVC's cache)."""
    if from_files:
        return {kind: (f"data/onnx/{kind}.onnx" if (project_dir / f"data/onnx/{kind}.onnx").exists() else None)
                for kind in ("dense", "pruned")}
    files = (export or {}).get("files") or {}
    return {kind: files.get(kind) for kind in ("dense", "pruned")}


def _reference_shape(reference: Any, params: Params) -> list[int]:
    """(batch, seq_len) of the latency numbers: metrics/latency.json's {"batch", "seq_len"}, else params."""
    if isinstance(reference, dict):
        return [reference.get("batch"), reference.get("seq_len")]
    return list(reference or params.benchmark.reference)


def results_table(project_dir: str | Path, params: Params, read: Callable[[str], dict | None] | None = None
                  ) -> dict[str, Any]:
    """The numbers of the results table, None where a stage has not run (its metrics file is missing).
    read: where the metrics come from (default: the files under project_dir; a flow passes an experiment's)."""
    project_dir = Path(project_dir)
    reader = read or file_reader(project_dir)
    m = {name: reader(rel) for name, rel in METRIC_FILES.items()}
    quality, latency = m["quality"] or {}, m["latency"] or {}
    onnx = _onnx_paths(project_dir, m["export"], read is None)
    flops_dense, flops_pruned = quality.get("flops_dense"), quality.get("flops_pruned")
    return {
        "budget": quality.get("budget", params.select.budget if m["quality"] else None),
        "methods": quality.get("methods"),
        "prune_seconds": quality.get("prune_seconds"),
        "prune_over_forward": quality.get("prune_over_forward"),
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


def results_markdown(r: dict[str, Any], stages: dict[str, str] | None = None, experiment: str | None = None) -> str:
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
        if r.get("prune_over_forward") is not None:
            text += f" ({r['prune_over_forward']:.2f}× the plain forward passes over the calibration set)"
    if r["not_run"]:
        text += "\n\nnot run (no metrics file): " + ", ".join(r["not_run"])
    if stages:
        text += "\n\nstages (DVC): " + ", ".join(f"{s} {status}" for s, status in stages.items())
    if experiment:
        text += (f"\n\nDVC experiment: `{experiment}` (`dvc exp show` lists it beside the others; "
                 f"`dvc exp apply {experiment}` brings its params, metrics and outputs into the workspace, "
                 f"`dvc exp branch {experiment} <branch>` keeps it as a branch)")
    return text + "\n"


def quality_markdown(quality: dict[str, Any], task_kind: str) -> str:
    """A pipeline's metrics/quality.json as a table: the task's headline figures, cost and pruning time."""
    from pruneflow.tasks import get_task

    keys = [*get_task(task_kind).headline, "perplexity_ratio", "flops_ratio", "budget", "cost", "prune_seconds",
            "forward_seconds", "prune_over_forward", "load_seconds"]
    rows = [[k, _num(quality[k])] for k in dict.fromkeys(keys) if k in quality]
    text = markdown_table(["", "value"], rows)
    if isinstance(quality.get("methods"), dict):
        text += "\n\nmethods: " + ", ".join(f"{k}={v}" for k, v in quality["methods"].items() if v is not None)
    return text
