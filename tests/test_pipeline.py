"""The pipeline end to end on tiny random models: the real dvc.yaml under `dvc repro`, every stage's CLI,
the in-process chain on BERT and DistilBERT for every method, and the bad inputs a user can give."""

from __future__ import annotations

import importlib
import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from conftest import make_tiny_project, project_env
from pruneflow.params import load_params
from pruneflow.runtime import Layout

STAGES = ["prepare", "finetune", "collect", "rank", "select", "correct", "evaluate", "export", "benchmark"]
PRUNE_CHAIN = ["prepare", "finetune", "collect", "rank", "select", "correct", "evaluate"]


def dvc(root: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "dvc", *args], cwd=root, env=project_env(), capture_output=True, text=True)


def cli(root: Path, stage: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", f"stages.{stage}", *args], cwd=root, env=project_env(),
                          capture_output=True, text=True)


def run_chain(root: Path, stages=PRUNE_CHAIN, overrides: dict | None = None) -> None:
    params = load_params(root / "params.yaml", overrides)
    for name in stages:
        importlib.import_module(f"stages.{name}").run(params, Layout(root))


def test_dvc_pipeline_end_to_end_then_up_to_date(tiny_project):
    first = dvc(tiny_project, "repro")
    assert first.returncode == 0, first.stderr[-3000:]
    for stage in STAGES:
        assert f"Running stage '{stage}'" in first.stdout
    m = tiny_project / "metrics"
    quality = json.loads((m / "quality.json").read_text())
    assert quality["flops_pruned"] <= 0.6 * quality["flops_dense"]
    assert 0 <= quality["agreement"] <= 1 and quality["methods"]["rank"] == "obs"
    # pruning time: the four stages' work (loading apart), against the plain forward passes collect timed
    stage = {k: json.loads((m / f"{k}.json").read_text()) for k in ("collect", "rank", "select", "correct")}
    assert quality["prune_seconds"] == pytest.approx(sum(s["seconds"] for s in stage.values()), abs=0.02)
    assert quality["load_seconds"] == pytest.approx(sum(s["load_seconds"] for s in stage.values()), abs=0.02)
    assert all(s["load_seconds"] >= 0 for s in stage.values())
    if quality["forward_seconds"]:  # a tiny model's forward can round to 0.00 s
        assert quality["prune_over_forward"] == pytest.approx(quality["prune_seconds"] / quality["forward_seconds"],
                                                              rel=0.01)
    latency = json.loads((m / "latency.json").read_text())
    assert latency["provider"] in ("cpu", "cuda") and latency["ort_ms_pruned"] > 0
    assert json.loads((m / "finetune.json").read_text())["n_eval"] == 40
    assert (tiny_project / "data/onnx/pruned.onnx").exists()

    again = dvc(tiny_project, "repro")  # nothing changed: nothing runs
    assert again.returncode == 0 and "Running stage" not in again.stdout, again.stdout

    # The budget re-runs rank (a global method such as bonsai searches for it), select and what depends on
    # them, never the stages before; a correction parameter re-runs correct onwards only.
    params = yaml.safe_load((tiny_project / "params.yaml").read_text())
    params["select"]["budget"] = 0.5
    (tiny_project / "params.yaml").write_text(yaml.safe_dump(params))
    status = dvc(tiny_project, "status", "--json")
    changed = set(json.loads(status.stdout))
    assert {"rank", "select"} <= changed and not changed & {"prepare", "finetune", "collect"}, changed
    params["select"]["budget"] = 0.6
    params.setdefault("correct", {})["ridge"] = 0.02
    (tiny_project / "params.yaml").write_text(yaml.safe_dump(params))
    changed = set(json.loads(dvc(tiny_project, "status", "--json").stdout))
    assert "correct" in changed and not changed & {"prepare", "finetune", "collect", "rank", "select"}, changed


@pytest.mark.parametrize("family", ["bert", "distilbert"])
@pytest.mark.parametrize("method,allocation,correction,sequential", [
    ("obs", "error", "lstsq", False),
    ("kcm", "uniform", "rescale", False),
    ("activation", "uniform", "lstsq", True),
    ("magnitude", "error", "none", False),
    ("random", "uniform", "bias", False),
])
def test_chain_every_method(tmp_path, family, method, allocation, correction, sequential):
    root = make_tiny_project(tmp_path / "p")
    if family == "distilbert":
        from tiny import tiny_distilbert, tiny_tokenizer

        tiny_distilbert().save_pretrained(str(root / "base"))
        tiny_tokenizer(root / "vocab").save_pretrained(str(root / "base"))
    run_chain(root, overrides={"rank.method": method, "select.allocation": allocation, "select.budget": 0.5,
                               "correct.method": correction, "correct.sequential": sequential})
    q = json.loads((root / "metrics/quality.json").read_text())
    assert q["flops_pruned"] <= 0.5 * q["flops_dense"]
    assert q["methods"] == {"rank": method, "heads": q["methods"]["heads"], "allocation": allocation,
                            "correction": correction, "sequential": sequential}
    manifest = json.loads((root / "data/pruned/manifest.json").read_text())
    assert manifest["family"] == family and manifest["info"]["budget"] == 0.5


def test_selection_is_deterministic(tmp_path):
    root = make_tiny_project(tmp_path / "p")
    run_chain(root, PRUNE_CHAIN[:5], {"rank.method": "random"})
    first = json.loads((root / "data/select/selection.json").read_text())
    run_chain(root, ["rank", "select"], {"rank.method": "random"})
    second = json.loads((root / "data/select/selection.json").read_text())
    assert first["keep_heads"] == second["keep_heads"] and first["keep_neurons"] == second["keep_neurons"]


def test_every_stage_has_a_cli_that_rejects_bad_params(tiny_project):
    for stage in STAGES + ["sweep", "calib_size", "cross_task"]:
        r = cli(tiny_project, stage, "--set", "select.budget=1.5")
        assert r.returncode == 2, (stage, r.stderr[-500:])
        assert "select.budget" in r.stderr and "less than or equal to 1" in r.stderr
        assert "Traceback" not in r.stderr
    r = cli(tiny_project, "prepare", "--set", "prepare.colour=blue")
    assert r.returncode == 2 and "prepare.colour: unknown key" in r.stderr


# --- bad inputs fail early, clearly, and leave no half-written artifact --------------------------------

def test_empty_calibration_data_fails_clearly(tiny_project):
    run_chain(tiny_project, ["prepare", "finetune"])
    (tiny_project / "data/prepared/calib.jsonl").write_text("")
    r = cli(tiny_project, "collect")
    assert r.returncode == 2 and "empty calibration data" in r.stderr
    assert not (tiny_project / "data/stats").exists()


def test_empty_source_fails_in_prepare(tiny_project):
    (tiny_project / "raw/sentences.jsonl").write_text("")
    r = cli(tiny_project, "prepare")
    assert r.returncode == 2 and "no usable text rows" in r.stderr


@pytest.mark.parametrize("budget", ["0", "1.5", "-0.2"])
def test_budget_outside_unit_interval(tiny_project, budget):
    r = cli(tiny_project, "select", "--set", f"select.budget={budget}")
    assert r.returncode == 2 and "select.budget" in r.stderr


def test_infeasible_budget_names_smallest_feasible(tmp_path):
    root = make_tiny_project(tmp_path / "p")
    run_chain(root, PRUNE_CHAIN[:4])
    r = cli(root, "select", "--set", "select.budget=0.05", "--set", "select.min_heads=2", "--set", "select.min_neurons=24")
    assert r.returncode == 2 and "smallest feasible budget" in r.stderr, r.stderr[-800:]
    smallest = float(r.stderr.split("smallest feasible budget ")[1].split()[0])
    ok = cli(root, "select", "--set", f"select.budget={smallest + 0.01}", "--set", "select.min_heads=2",
             "--set", "select.min_neurons=24")
    assert ok.returncode == 0, ok.stderr[-800:]


def test_missing_model_path_fails_clearly(tiny_project):
    run_chain(tiny_project, ["prepare"])
    r = cli(tiny_project, "finetune", "--set", "finetune.task_model=no/such/model")
    assert r.returncode == 2 and "no/such/model" in r.stderr and "config.json" in r.stderr


def test_unsupported_architecture_names_supported_ones(tiny_project):
    import transformers

    cfg = transformers.GPT2Config(vocab_size=120, n_embd=32, n_layer=1, n_head=2, n_positions=32)
    transformers.GPT2ForSequenceClassification(cfg).save_pretrained(str(tiny_project / "gpt2"))
    run_chain(tiny_project, ["prepare"])
    r = cli(tiny_project, "finetune", "--set", "finetune.task_model=gpt2")
    assert r.returncode == 2 and "unsupported architecture 'gpt2'" in r.stderr and "bert" in r.stderr
    assert not (tiny_project / "data/dense").exists()


def test_user_task_model_is_adopted_without_training(tmp_path):
    root = make_tiny_project(tmp_path / "p")
    run_chain(root, ["prepare", "finetune"])
    adopted = make_tiny_project(tmp_path / "q", {"finetune": {"task_model": str(root / "data/dense")}})
    run_chain(adopted, ["prepare", "finetune"])
    m = json.loads((adopted / "metrics/finetune.json").read_text())
    assert m["trained"] is False and m["accuracy"] == json.loads((root / "metrics/finetune.json").read_text())["accuracy"]


def test_sweep_writes_table_csv_and_plot(tmp_path):
    root = make_tiny_project(tmp_path / "p", {"sweep": {"methods": ["obs", "activation+noseq", "magnitude+none"]}})
    run_chain(root, PRUNE_CHAIN[:3] + ["sweep"])
    rows = json.loads((root / "metrics/sweep.json").read_text())["points"]
    assert {(r["method"], r["budget"]) for r in rows} == {(m, b) for m in ("obs", "activation+noseq", "magnitude+none")
                                                          for b in (0.8, 0.5)}
    assert all(r["flops_ratio"] <= r["budget"] + 1e-9 for r in rows)
    assert all(r["vs_baseline"]["accuracy_pruned"]["verdict"] in ("better", "worse", "within noise")
               for r in rows if r["method"] != "activation+noseq") and "_items" not in rows[0]
    table = (root / "plots/sweep.md").read_text()
    assert "| obs |" in table and "| magnitude+none |" in table
    assert (root / "plots/sweep.png").stat().st_size > 0
    assert (root / "plots/sweep.csv").read_text().startswith("method,budget,flops_ratio")


def test_calib_size_prunes_from_the_first_n_sentences(tmp_path):
    root = make_tiny_project(tmp_path / "p", {"sweep": {"calib_sizes": [8, 24, 500], "calib_budgets": [0.6]}})
    run_chain(root, PRUNE_CHAIN[:2] + ["calib_size"])
    result = json.loads((root / "metrics/calib_size.json").read_text())
    rows = result["points"]
    assert (result["default"], result["baseline"]) == ("obs", "activation+noseq")
    assert [(r["calib_size"], r["method"]) for r in rows] == [(n, m) for n in (8, 24, 500)
                                                              for m in ("obs", "activation+noseq")]
    assert [r["calib_sentences"] for r in rows[::2]] == [8, 24, 48]  # the tiny project has 48 calibration sentences
    assert all(r["flops_ratio"] <= 0.6 + 1e-9 for r in rows)
    assert all("vs_baseline" in r for r in rows if r["method"] == "obs") and "_items" not in rows[0]
    assert "| 24 |" in (root / "plots/calib_size.md").read_text()
    assert (root / "plots/calib_size.png").stat().st_size > 0
    assert not (root / "data/stats").exists()  # scratch statistics only


def test_sparsify_classifier_writes_table_and_paired_tests(tmp_path):
    root = make_tiny_project(tmp_path / "p", {"sparsify": {"methods": ["wanda", "sparsegpt", "apt"],
                                                           "patterns": ["50%", "2:4"], "calib_sentences": 32,
                                                           "sparsegpt": {"blocksize": 16}, "apt": {"blocksize": 16}}})
    run_chain(root, PRUNE_CHAIN[:2] + ["sparsify_classifier"])
    result = json.loads((root / "metrics/sparse_classifier.json").read_text())
    assert {(r["method"], r["pattern"]) for r in result["points"]} == {(m, p) for m in ("wanda", "sparsegpt", "apt")
                                                                       for p in ("50%", "2:4")}
    assert all(abs(r["density"] - 0.5) < 0.02 and 0 <= r["agreement"] <= 1 for r in result["points"])
    assert set(result["apt_vs_sparsegpt_mcnemar"]) == {"50%", "2:4"} and result["calibration_sentences"] == 32
    assert "| apt |" in (root / "plots/sparse_classifier.md").read_text()
    r = cli(root, "sparsify_classifier", "--set", "sparsify.methods=[obs]")
    assert r.returncode == 2 and "not registered" in r.stderr and "Traceback" not in r.stderr


def test_sweep_labels_differences_by_a_paired_test(tmp_path):
    from pruneflow.sweep import paired_tests

    n = 200
    base = {"accuracy_pruned": [True] * 100 + [False] * 100, "agreement": [True] * 150 + [False] * 50}
    much_better = {"accuracy_pruned": [True] * 160 + [False] * 40, "agreement": [True] * 151 + [False] * 49}
    rows = [{"method": "b", "budget": 0.5, "_items": base}, {"method": "m", "budget": 0.5, "_items": much_better},
            {"method": "m", "budget": 0.4, "_items": much_better}]
    paired_tests(rows, "b")
    t = rows[1]["vs_baseline"]
    assert t["accuracy_pruned"]["verdict"] == "better" and t["accuracy_pruned"]["a_only"] == 60
    assert t["agreement"]["verdict"] == "within noise"  # one sentence apart
    assert "vs_baseline" not in rows[0] and "vs_baseline" not in rows[2]  # no baseline point at 0.4
    assert n == len(base["agreement"])
