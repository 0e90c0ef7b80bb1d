"""The Prefect flows, run for real against a temporary Prefect server (one for the whole session, ~15 s to start)
on a tiny git+DVC project whose stages are a small script writing the files the real stages write. So DVC
experiments, overrides, retries and the results artifact are exercised without any ML. Each flow run is one
`dvc exp run --temp`: the checkout's params.yaml and files never change."""

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

from flows.common import (STAGE_RETRIES, StageError, checkout_lock, dvc_env, experiment_name, is_transient,
                          retry_if_transient, stage_task)
from flows.deploy import build_deployment
from flows.pipeline import EXPERIMENT_RETRIES, RESULTS_ARTIFACT_KEY, apply_params, experiment_task, prune_pipeline
from flows.sweep import SWEEP_ARTIFACT_KEY, prune_sweep, sweep_point
from prefect.artifacts import Artifact
from prefect.states import Failed
from pruneflow.params import ParamsError

STAGES = ["prepare", "collect", "select", "evaluate", "export", "benchmark"]

# Stands in for `python -m stages.<name>`. Appends its name to attempts.log (not a DVC output) so a test can
# count real executions, and fails like a real stage (`[stage] error: ...`, exit 2) on a param it rejects.
FAKE_STAGE = '''
import json, os, pathlib, sys
from ruamel.yaml import YAML

name = sys.argv[1]
params = YAML(typ="safe").load(open("params.yaml")) or {}  # YAML 1.2, as pruneflow reads it: 2:4 is "2:4"
budget = params.get("select", {}).get("budget", 0.5)
with open(os.environ["FAKE_ATTEMPTS_LOG"], "a") as f:  # outside the (temporary) workspace
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
elif name == "lm_evaluate":
    lm_budget = (YAML(typ="safe").load(open("lm/params.yaml")) or {}).get("select", {}).get("budget", 0.7)
    dump("metrics/lm/quality.json", {"budget": lm_budget, "flops_ratio": lm_budget, "perplexity_dense": 36.9,
         "perplexity_pruned": 44.0, "next_token_agreement": 0.7, "kl_per_token": 0.2,
         "methods": {"rank": "obs", "correction": "lstsq"}})
elif name == "sparsify_lm":
    patterns = params.get("sparsify", {}).get("patterns", ["50%"])
    dump("metrics/sparse_lm.json", {"points": [{"method": "apt", "pattern": p} for p in patterns]})
    pathlib.Path("plots").mkdir(exist_ok=True)
    pathlib.Path("plots/sparse_lm.md").write_text("| method | " + " | ".join(patterns) + " |\\n")
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
sparsify:
  patterns: ["50%"]
"""


@pytest.fixture(scope="session")
def prefect_server():
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=90):
        yield


GIT = ["git", "-c", "user.name=pruneflow-test", "-c", "user.email=test@pruneflow.invalid"]


LM_DVC_YAML = """
stages:
  evaluate:
    wdir: ..
    cmd: python fake_stage.py lm_evaluate
    deps: [fake_stage.py]
    params:
      - lm/params.yaml: [select]
    metrics:
      - metrics/lm/quality.json: {cache: false}
  sparsify_lm:
    wdir: ..
    cmd: python fake_stage.py sparsify_lm
    deps: [fake_stage.py]
    params: [sparsify]
    metrics:
      - metrics/sparse_lm.json: {cache: false}
    outs:
      - plots/sparse_lm.md: {cache: false}
"""


def make_project(root: Path) -> Path:
    """git init + dvc init (analytics off) + the fake stages, committed (experiments need a commit)."""
    root.mkdir(parents=True, exist_ok=True)
    (root / "fake_stage.py").write_text(FAKE_STAGE)
    (root / "dvc.yaml").write_text(textwrap.dedent(DVC_YAML))
    (root / "lm").mkdir()
    (root / "lm/dvc.yaml").write_text(textwrap.dedent(LM_DVC_YAML))
    (root / "lm/params.yaml").write_text("task:\n  kind: causal_lm\nselect:\n  budget: 0.7\n")
    (root / "params.yaml").write_text(PARAMS_YAML)
    dvc = [sys.executable, "-m", "dvc"]
    for cmd in (["git", "init", "-q"], dvc + ["init", "-q"], dvc + ["config", "core.analytics", "false"],
                ["git", "add", "-A"], GIT + ["commit", "-q", "-m", "project"]):
        subprocess.run(cmd, cwd=root, env=dvc_env(), check=True, capture_output=True)
    return root


@pytest.fixture(autouse=True)
def attempts_log(tmp_path, monkeypatch):
    monkeypatch.setenv("FAKE_ATTEMPTS_LOG", str(tmp_path / "attempts.log"))


def attempts(project: Path) -> list[str]:
    log = project.parent / "attempts.log"
    return log.read_text().split() if log.exists() else []


def checkout_state(project: Path) -> dict:
    """What a run must leave alone: every file of the checkout (DVC's cache and scratch aside: a run adds its
    outputs to the cache), and git's status."""
    files = {str(p.relative_to(project)): p.read_bytes() for p in project.rglob("*")
             if p.is_file() and ".git" not in p.parts and p.relative_to(project).parts[:2] not in
             ((".dvc", "cache"), (".dvc", "tmp"))}
    status = subprocess.run(["git", "status", "--porcelain"], cwd=project, capture_output=True, text=True).stdout
    return {"files": files, "git": status}


def experiments(project: Path) -> dict[str, dict]:
    """{experiment name: {"budget": params select.budget, "quality": metrics/quality.json}} from `dvc exp show`."""
    import json

    shown = subprocess.run([sys.executable, "-m", "dvc", "exp", "show", "--json"], cwd=project, env=dvc_env(),
                           capture_output=True, text=True, check=True).stdout
    out = {}
    for baseline in json.loads(shown):
        for exp in baseline.get("experiments") or []:
            for rev in exp["revs"]:
                data = rev["data"]
                out[rev["name"]] = {"budget": data["params"]["params.yaml"]["data"]["select"]["budget"],
                                    "quality": data["metrics"].get("metrics/quality.json", {}).get("data")}
    return out


def dvc_status(project: Path) -> str:
    return subprocess.run([sys.executable, "-m", "dvc", "status"], cwd=project, env=dvc_env(),
                          capture_output=True, text=True, check=True).stdout


def test_a_run_is_one_experiment_and_leaves_the_checkout_as_it_was(prefect_server, tmp_path):
    project = make_project(tmp_path / "proj")
    before = checkout_state(project)

    first = prune_pipeline(project_dir=str(project), overrides={"select.budget": 0.4}, experiment="with-override")
    assert first["experiment"] == "with-override"
    assert first["stages"] == {s: "ran" for s in STAGES}
    assert attempts(project) == STAGES
    assert checkout_state(project) == before  # params.yaml byte-identical, no metrics or outputs written
    assert (project / "params.yaml").read_text() == PARAMS_YAML
    assert first["budget"] == 0.4 and first["flops_pruned"] == 0.8e9 and first["agreement"] == 0.95
    assert first["onnx_pruned"] == "data/onnx/pruned.onnx" and first["not_run"] == []
    exps = experiments(project)
    assert set(exps) == {"with-override"} and exps["with-override"]["budget"] == 0.4
    assert exps["with-override"]["quality"]["flops_ratio"] == 0.4
    artifact = Artifact.get(RESULTS_ARTIFACT_KEY)
    assert artifact is not None and artifact.type == "markdown"
    assert "speed-up ×1.67" in artifact.data and "data/onnx/pruned.onnx" in artifact.data
    assert "batch 8, seq 128" in artifact.data and "rank=obs, correction=lstsq" in artifact.data
    assert "DVC experiment: `with-override`" in artifact.data and "dvc exp apply with-override" in artifact.data

    # The next run, without overrides, uses the committed params: nothing leaked from the first run.
    second = prune_pipeline(project_dir=str(project), experiment="nightly")
    assert second["budget"] == 0.5 and experiments(project)["nightly"]["budget"] == 0.5
    assert second["stages"]["prepare"] in ("unchanged", "restored")  # upstream of select: the run cache serves
    assert second["stages"]["select"] == "ran"
    assert checkout_state(project) == before


def test_two_runs_with_different_budgets_are_two_experiments_and_a_repeat_recomputes_nothing(prefect_server, tmp_path):
    project = make_project(tmp_path / "proj")
    prune_pipeline(project_dir=str(project), overrides={"select.budget": 0.3}, experiment="b03")
    prune_pipeline(project_dir=str(project), overrides={"select.budget": 0.6}, experiment="b06")
    exps = experiments(project)
    assert {n: e["budget"] for n, e in exps.items()} == {"b03": 0.3, "b06": 0.6}
    assert exps["b03"]["quality"]["flops_pruned"] != exps["b06"]["quality"]["flops_pruned"]
    ran = len(attempts(project))
    again = prune_pipeline(project_dir=str(project), overrides={"select.budget": 0.3}, experiment="b03-again")
    assert set(again["stages"].values()) <= {"unchanged", "restored"}  # DVC's run cache decides
    assert len(attempts(project)) == ran and again["flops_pruned"] == 0.6e9
    # the default experiment name is the flow run's own name
    named = prune_pipeline(project_dir=str(project), overrides={"select.budget": 0.3})
    assert named["experiment"] in experiments(project) and named["experiment"] not in {"b03", "b06", "b03-again"}


def test_the_lm_pipelines_are_a_parameter_of_the_same_flow(prefect_server, tmp_path):
    project = make_project(tmp_path / "proj")
    before = checkout_state(project)
    result = prune_pipeline(project_dir=str(project), pipeline="lm-sparse", experiment="lm-24",
                            overrides={"sparsify.patterns": ["2:4"]})
    assert attempts(project) == ["sparsify_lm"]  # that stage of lm/dvc.yaml only, not the classifier's stages
    assert result["stages"] == {"sparsify_lm": "ran"} and result["table"] == "| method | 2:4 |\n"
    assert "(lm-sparse pipeline), experiment lm-24" in result["markdown"] and "| method | 2:4 |" in result["markdown"]
    assert "| method | 2:4 |" in Artifact.get(RESULTS_ARTIFACT_KEY).data
    # structured: its own params file (lm/params.yaml) takes the override; the table is the task's headline
    result = prune_pipeline(project_dir=str(project), pipeline="lm", experiment="lm-08",
                            overrides={"select.budget": 0.8})
    assert attempts(project) == ["sparsify_lm", "lm_evaluate"]
    assert result["budget"] == 0.8 and result["quality"]["perplexity_pruned"] == 44.0
    assert "| perplexity_pruned | 44 |" in result["markdown"] and "methods: rank=obs" in result["markdown"]
    assert "| perplexity_pruned | 44 |" in Artifact.get(RESULTS_ARTIFACT_KEY).data
    assert checkout_state(project) == before
    with pytest.raises(ValueError, match="pipeline 'vision'"):
        prune_pipeline(project_dir=str(project), pipeline="vision")


def test_experiment_names_are_ref_safe():
    assert experiment_name("glorious-okapi") == "glorious-okapi"
    assert experiment_name("weird name/with:chars~") == "weird-name-with-chars"
    assert experiment_name("") == "run"


def test_a_second_run_on_the_same_checkout_waits_for_the_first(tmp_path):
    import threading
    import time

    (tmp_path / ".dvc").mkdir()
    order = []
    with checkout_lock(tmp_path, "first"):
        def second():
            with checkout_lock(tmp_path, "second", poll_seconds=0.05):
                order.append("second")

        thread = threading.Thread(target=second)
        thread.start()
        time.sleep(0.3)
        order.append("first done")
    thread.join(5)
    assert order == ["first done", "second"]


def test_results_table_says_not_run_for_missing_metrics(prefect_server, tmp_path):
    from flows.pipeline import results_markdown, results_table
    from pruneflow.params import validate_params

    results = results_table(tmp_path, validate_params({}))
    assert results["not_run"] == ["metrics/quality.json", "metrics/latency.json", "metrics/export.json"]
    assert results_markdown(results).count("not run") >= 5


def test_failing_run_fails_with_the_stage_message_and_leaves_the_checkout_unchanged(prefect_server, tmp_path):
    project = make_project(tmp_path / "proj")
    before = checkout_state(project)
    with pytest.raises(StageError, match=r"collect\.max_samples=1 is too few for a covariance") as err:
        prune_pipeline(project_dir=str(project), overrides={"collect.max_samples": 1}, experiment="broken")
    assert err.value.stage == "collect" and err.value.returncode == 2 and not err.value.transient
    # The experiment task retries, but exit 2 is a user error: collect ran once, nothing after it ran.
    assert EXPERIMENT_RETRIES > 0 and experiment_task.retry_condition_fn is retry_if_transient
    assert attempts(project) == ["prepare", "collect"]
    assert checkout_state(project) == before and "broken" not in experiments(project)


def test_bad_override_fails_before_any_stage_runs(prefect_server, tmp_path):
    project = make_project(tmp_path / "proj")
    for overrides, key in [({"select.budget": 1.5}, "select.budget"),        # out of range
                           ({"select.budgett": 0.4}, "select.budgett"),      # unknown key
                           ({"rank.method": "magnitudee"}, "rank.method")]:  # not a method
        with pytest.raises(ParamsError, match=re.escape(key)):
            prune_pipeline(project_dir=str(project), overrides=overrides)
    assert attempts(project) == [] and experiments(project) == {}
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
    lm = build_deployment(cron="0 3 * * *", pipeline="lm")
    assert lm.parameters["pipeline"] == "lm" and lm.parameters["params_file"] == "lm/params.yaml"
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
        layout.metrics.mkdir(parents=True, exist_ok=True)
        layout.plots.mkdir(parents=True, exist_ok=True)
        (layout.metrics / "sweep.json").write_text(str(rows))
        (layout.plots / "sweep.md").write_text("the DVC sweep's table: " + " ".join(r["method"] for r in rows))

    fake = types.ModuleType("pruneflow.sweep")
    fake.points = lambda params: [(m, b) for m in params.sweep.methods for b in params.sweep.budgets]
    fake.run_point, fake.write_report = run_point, write_report
    monkeypatch.setitem(sys.modules, "pruneflow.sweep", fake)

    rows = prune_sweep(project_dir=str(project),
                       overrides={"sweep.methods": ["obs", "magnitude"], "sweep.budgets": [0.5, 0.4]})
    assert [(r["method"], r["budget"]) for r in rows] == [("obs", 0.5), ("obs", 0.4), ("magnitude", 0.5),
                                                           ("magnitude", 0.4)]
    assert attempts(project) == ["prepare", "collect"]  # through `collect` only: what the points read
    assert (project / "params.yaml").read_text() == PARAMS_YAML  # overrides are this run's only
    reports = list((project / "sweeps").glob("*/metrics/sweep.json"))
    assert len(reports) == 1 and not (project / "metrics/sweep.json").exists()
    assert "the DVC sweep's table: obs obs magnitude magnitude" in Artifact.get(SWEEP_ARTIFACT_KEY).data
    with pytest.raises(ParamsError, match="collect.max_samples"):  # upstream outputs are the committed params'
        prune_sweep(project_dir=str(project), overrides={"collect.max_samples": 4})

    # A failing point: the others still finish and are reported, then the flow fails naming the point.
    with pytest.raises(RuntimeError, match=r"1 of 2 sweep points failed.*obs@0\.1"):
        prune_sweep(project_dir=str(project), overrides={"sweep.methods": ["obs"], "sweep.budgets": [0.5, 0.1]})
    assert calls.count(("obs", 0.1)) == 1  # a ValueError is not retried
    assert "obs@0.1" in Artifact.get(SWEEP_ARTIFACT_KEY).data
