"""The Prefect flows, run for real against a temporary Prefect server (one for the whole session, ~15 s to start)
on a tiny git+DVC project whose stages are a small script writing the files the real stages write. So DVC,
the per-stage tasks, retries, overrides and the results artifact are exercised without any ML."""

from __future__ import annotations

import os

os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("DO_NOT_TRACK", "1")

import re
import subprocess
import sys
import textwrap
import types
from pathlib import Path

import pytest

from flows.common import STAGE_RETRIES, StageError, dvc_env, is_transient, retry_if_transient, stage_task
from flows.deploy import build_deployment
from flows.pipeline import RESULTS_ARTIFACT_KEY, apply_params, prune_pipeline
from flows.sweep import SWEEP_ARTIFACT_KEY, prune_sweep, sweep_point
from prefect.artifacts import Artifact
from prefect.states import Failed
from pruneflow.params import ParamsError

STAGES = ["prepare", "collect", "select", "evaluate", "export", "benchmark"]

# Stands in for `python -m stages.<name>`. Appends its name to attempts.log (not a DVC output) so a test can
# count real executions, and fails like a real stage (`[stage] error: ...`, exit 2) on a param it rejects.
FAKE_STAGE = '''
import json, pathlib, sys
import yaml

name = sys.argv[1]
params = yaml.safe_load(open("params.yaml")) or {}
budget = params.get("select", {}).get("budget", 0.5)
with open("attempts.log", "a") as f:
    f.write(name + "\\n")

def dump(path, obj):
    p = pathlib.Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text(json.dumps(obj))

print(f"{name}: working")
if name == "prepare":
    dump("data/prepared/calib.json", ["a sentence", "another one"])
elif name == "collect":
    if params.get("collect", {}).get("max_samples") == 1:
        print("[collect] error: collect.max_samples=1 is too few for a covariance; use at least 2", file=sys.stderr)
        sys.exit(2)
    dump("data/stats/gram.json", [[1.0]])
elif name == "select":
    dump("data/select/selection.json", {"budget": budget})
elif name == "evaluate":
    dump("metrics/quality.json", {"budget": budget, "flops_dense": 2.0e9, "flops_pruned": 2.0e9 * budget,
         "flops_ratio": budget, "flops_seq_len": 24, "accuracy_dense": 0.85, "accuracy_pruned": 0.84,
         "agreement": 0.95, "prune_seconds": 1.5, "methods": {"rank": "obs", "correction": "lstsq"}})
elif name == "export":
    dump("data/onnx/dense.onnx", "onnx")
    dump("data/onnx/pruned.onnx", f"onnx pruned to {budget}")
    dump("metrics/export.json", {"files": {"dense": "data/onnx/dense.onnx", "pruned": "data/onnx/pruned.onnx"}})
elif name == "benchmark":
    dump("metrics/latency.json", {"provider": "CPUExecutionProvider", "threads": 1, "ort_ms_dense": 10.0,
         "ort_ms_pruned": 6.0, "torch_ms_dense": 12.0, "torch_ms_pruned": 8.0, "speedup_ort": 10 / 6,
         "flops_ratio": budget, "reference": {"batch": 8, "seq_len": 128}})
'''

DVC_YAML = """
stages:
  prepare:
    cmd: python fake_stage.py prepare
    deps: [fake_stage.py]
    params: [prepare]
    outs: [data/prepared]
  collect:
    cmd: python fake_stage.py collect
    deps: [fake_stage.py, data/prepared]
    params: [collect]
    outs: [data/stats]
  select:
    cmd: python fake_stage.py select
    deps: [fake_stage.py, data/stats]
    params: [select]
    outs: [data/select]
  evaluate:
    cmd: python fake_stage.py evaluate
    deps: [fake_stage.py, data/select]
    params: [select]
    metrics:
      - metrics/quality.json: {cache: false}
  export:
    cmd: python fake_stage.py export
    deps: [fake_stage.py, data/select]
    outs: [data/onnx]
    metrics:
      - metrics/export.json: {cache: false}
  benchmark:
    cmd: python fake_stage.py benchmark
    deps: [fake_stage.py, data/onnx]
    metrics:
      - metrics/latency.json: {cache: false}
"""

PARAMS_YAML = """\
# a user's comment that must survive an override
prepare:
  seed: 0
collect:
  max_samples: null
select:
  budget: 0.5   # fraction of dense FLOPs
"""


@pytest.fixture(scope="session")
def prefect_server():
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=90):
        yield


def make_project(root: Path) -> Path:
    """git init + dvc init (analytics off) + the fake stages."""
    root.mkdir(parents=True, exist_ok=True)
    (root / "fake_stage.py").write_text(FAKE_STAGE)
    (root / "dvc.yaml").write_text(textwrap.dedent(DVC_YAML))
    (root / "params.yaml").write_text(PARAMS_YAML)
    dvc = [sys.executable, "-m", "dvc"]
    for cmd in (["git", "init", "-q"], dvc + ["init", "-q"], dvc + ["config", "core.analytics", "false"]):
        subprocess.run(cmd, cwd=root, env=dvc_env(), check=True, capture_output=True)
    return root


def attempts(project: Path) -> list[str]:
    log = project / "attempts.log"
    return log.read_text().split() if log.exists() else []


def dvc_status(project: Path) -> str:
    return subprocess.run([sys.executable, "-m", "dvc", "status"], cwd=project, env=dvc_env(),
                          capture_output=True, text=True, check=True).stdout


def test_flow_runs_every_stage_then_recomputes_nothing(prefect_server, tmp_path):
    project = make_project(tmp_path / "proj")

    results = prune_pipeline(project_dir=str(project))
    assert results["stages"] == {s: "ran" for s in STAGES}
    assert attempts(project) == STAGES
    assert results["budget"] == 0.5 and results["flops_pruned"] == 1.0e9 and results["agreement"] == 0.95
    assert results["onnx_dense"] == "data/onnx/dense.onnx" and results["onnx_pruned"] == "data/onnx/pruned.onnx"
    assert results["not_run"] == []
    artifact = Artifact.get(RESULTS_ARTIFACT_KEY)
    assert artifact is not None and artifact.type == "markdown"
    assert "speed-up ×1.67" in artifact.data and "data/onnx/pruned.onnx" in artifact.data
    assert "batch 8, seq 128" in artifact.data and "rank=obs, correction=lstsq" in artifact.data
    assert "not run" not in artifact.data
    assert "up to date" in dvc_status(project)  # DVC's lock agrees: nothing left to do for `dvc repro`

    again = prune_pipeline(project_dir=str(project))
    assert again["stages"] == {s: "unchanged" for s in STAGES}
    assert attempts(project) == STAGES  # nothing executed a second time

    # An override is written into params.yaml (comments kept), so DVC re-runs select and what follows only.
    third = prune_pipeline(project_dir=str(project), overrides={"select.budget": 0.4})
    assert third["stages"] == {"prepare": "unchanged", "collect": "unchanged", "select": "ran",
                               "evaluate": "ran", "export": "ran", "benchmark": "ran"}
    assert third["budget"] == 0.4
    text = (project / "params.yaml").read_text()
    assert "budget: 0.4" in text and "# a user's comment" in text and "# fraction of dense FLOPs" in text


def test_results_table_says_not_run_for_missing_metrics(prefect_server, tmp_path):
    from flows.pipeline import results_markdown, results_table
    from pruneflow.params import validate_params

    results = results_table(tmp_path, validate_params({}))
    assert results["not_run"] == ["metrics/quality.json", "metrics/latency.json", "metrics/export.json"]
    assert results_markdown(results).count("not run") >= 5


def test_failing_stage_fails_the_flow_with_its_message_and_is_not_retried(prefect_server, tmp_path):
    project = make_project(tmp_path / "proj")
    with pytest.raises(StageError, match=r"collect\.max_samples=1 is too few for a covariance") as err:
        prune_pipeline(project_dir=str(project), overrides={"collect.max_samples": 1})
    assert err.value.stage == "collect" and err.value.returncode == 2 and not err.value.transient
    # collect has retries, but exit 2 is a user error: it ran once, and nothing after it ran.
    assert STAGE_RETRIES["collect"] > 0
    assert attempts(project) == ["prepare", "collect"]


def test_bad_override_fails_before_any_stage_runs(prefect_server, tmp_path):
    project = make_project(tmp_path / "proj")
    for overrides, key in [({"select.budget": 1.5}, "select.budget"),        # out of range
                           ({"select.budgett": 0.4}, "select.budgett"),      # unknown key
                           ({"rank.method": "magnitudee"}, "rank.method")]:  # not a method
        with pytest.raises(ParamsError, match=re.escape(key)):
            prune_pipeline(project_dir=str(project), overrides=overrides)
    assert attempts(project) == []
    assert not (project / "dvc.lock").exists()
    assert (project / "params.yaml").read_text() == PARAMS_YAML  # nothing written


def test_retries_only_where_a_retry_can_help():
    for stage in ("finetune", "collect", "rank", "correct", "evaluate", "benchmark"):
        assert stage_task(stage).retries == 2, stage
        assert stage_task(stage).retry_condition_fn is retry_if_transient
    for stage in ("prepare", "select", "export", "a_stage_the_user_added"):
        assert stage_task(stage).retries == 0, stage
    assert apply_params.retries == 0
    assert sweep_point.retries == 1
    # On a retrying stage only transient-looking failures are retried: not a user error (exit 2) or a bug.
    assert not is_transient(2, ["[collect] error: collect.max_samples=1 is too few"])
    assert not is_transient(1, ["Traceback (most recent call last):", "ZeroDivisionError: division by zero"])
    assert is_transient(-9, []) and is_transient(137, [])
    assert is_transient(1, ["torch.OutOfMemoryError: CUDA out of memory. Tried to allocate 2.00 GiB"])
    assert is_transient(255, ["ERROR: Unable to acquire lock. Most likely another DVC process is running"])
    assert not retry_if_transient(None, None, Failed(data=StageError("collect", 2, "bad param", transient=False)))
    assert retry_if_transient(None, None, Failed(data=StageError("collect", 137, "killed", transient=True)))


def test_build_deployment_targets_the_gpu_pool_on_a_cron_schedule():
    deployment = build_deployment(cron="0 3 * * *")
    assert deployment.work_pool_name == "gpu"
    assert [s.schedule.cron for s in deployment.schedules] == ["0 3 * * *"]
    assert deployment.entrypoint == "flows/pipeline.py:prune_pipeline"
    assert deployment.parameters["project_dir"] == "."
    with pytest.raises(ParamsError, match="select.budget"):
        build_deployment(overrides={"select.budget": 2})


def test_sweep_flow_runs_points_in_process_after_the_upstream_stages(prefect_server, tmp_path, monkeypatch):
    project = make_project(tmp_path / "proj")
    calls = []

    def run_point(params, layout, method, budget):
        calls.append((method, budget))
        if budget == 0.1:
            raise ValueError("budget 0.1 leaves no units")
        assert (layout.root / "data/stats").is_dir()  # upstream reproduced before any point
        return {"method": method, "budget": budget, "flops_ratio": budget, "accuracy_pruned": 0.8}

    def write_report(rows, layout, params):
        layout.metrics.mkdir(exist_ok=True)
        layout.plots.mkdir(exist_ok=True)
        (layout.metrics / "sweep.json").write_text(str(rows))
        (layout.plots / "sweep.md").write_text("the DVC sweep's table: " + " ".join(r["method"] for r in rows))

    fake = types.ModuleType("stages.sweep")
    fake.points = lambda params: [(m, b) for m in params.sweep.methods for b in params.sweep.budgets]
    fake.run_point, fake.write_report = run_point, write_report
    monkeypatch.setitem(sys.modules, "stages.sweep", fake)

    rows = prune_sweep(project_dir=str(project),
                       overrides={"sweep.methods": ["obs", "magnitude"], "sweep.budgets": [0.5, 0.4]})
    assert [(r["method"], r["budget"]) for r in rows] == [("obs", 0.5), ("obs", 0.4), ("magnitude", 0.5),
                                                           ("magnitude", 0.4)]
    assert attempts(project) == ["prepare", "collect"]  # through `collect` only: what the points read
    assert (project / "metrics/sweep.json").exists()
    assert "the DVC sweep's table: obs obs magnitude magnitude" in Artifact.get(SWEEP_ARTIFACT_KEY).data

    # A failing point: the others still finish and are reported, then the flow fails naming the point.
    with pytest.raises(RuntimeError, match=r"1 of 2 sweep points failed.*obs@0\.1"):
        prune_sweep(project_dir=str(project), overrides={"sweep.methods": ["obs"], "sweep.budgets": [0.5, 0.1]})
    assert calls.count(("obs", 0.1)) == 1  # a ValueError is not retried
    assert "obs@0.1" in Artifact.get(SWEEP_ARTIFACT_KEY).data
