"""The cross-task comparison: losses and means computed from the sweeps' rows, only methods swept everywhere,
the default's targets checked, the paired verdicts carried through, and the stage's clear error when a task's
sweep is missing."""

from __future__ import annotations

import json

import pytest

from pruneflow.cross_task import compare, markdown


def row(method, budget, acc, verdict=None, dense=0.85, agreement=0.95):
    r = {"method": method, "budget": budget, "accuracy_dense": dense, "accuracy_pruned": acc,
         "agreement": agreement, "n_eval": 100}
    if verdict:
        r["vs_baseline"] = {"baseline": "base", "accuracy_pruned": {"verdict": verdict}}
    return r


TASKS = {
    "rt": [row("obs", 0.5, 0.85, "within noise"), row("obs", 0.4, 0.84, "better"),
           row("base", 0.5, 0.84), row("base", 0.4, 0.82), row("only_rt", 0.5, 0.9), row("only_rt", 0.4, 0.9)],
    "tweets": [row("obs", 0.5, 0.90, "within noise", dense=0.91), row("obs", 0.4, 0.88, "worse", dense=0.91),
               row("base", 0.5, 0.905, dense=0.91), row("base", 0.4, 0.90, dense=0.91)],
}


def test_losses_means_and_checks():
    s = compare(TASKS, [0.5, 0.4], "obs", "base", {0.5: 0.5, 0.4: 1.0})
    assert set(s["methods"]) == {"obs", "base"}  # only_rt was not swept on tweets
    obs = s["methods"]["obs"]
    assert obs["loss"]["rt"] == pytest.approx({0.5: 0.0, 0.4: 1.0})
    assert obs["loss"]["tweets"] == pytest.approx({0.5: 1.0, 0.4: 3.0})
    assert obs["mean_loss"] == pytest.approx(1.25)
    assert s["methods"]["base"]["mean_loss"] == pytest.approx((1 + 3 + 0.5 + 1) / 4)
    assert s["best_by_mean"] == "obs"
    assert (obs["wins"], obs["losses"]) == (1, 1)
    met = {(c["task"], c["budget"]): c["met"] for c in s["checks"] if "budget" in c}
    assert met == {("rt", 0.5): True, ("rt", 0.4): True, ("tweets", 0.5): False, ("tweets", 0.4): False}
    worse = {c["task"]: c["worse_at"] for c in s["checks"] if "worse_at" in c}
    assert worse == {"rt": [], "tweets": [0.4]}
    md = markdown(s)
    assert "| **obs** | 1.25 |" in md and "3.00▼" in md and "1.00▲" in md and "NOT met" in md


def test_no_common_method_is_a_clear_error():
    with pytest.raises(ValueError, match="no method was swept on every task"):
        compare({"a": [row("x", 0.5, 0.8)], "b": [row("y", 0.5, 0.8)]}, [0.5], "x", "y", {})


def test_stage_compares_rt_with_every_dataset_and_names_a_missing_sweep(tmp_path, capsys):
    from pruneflow.params import validate_params
    from pruneflow.runtime import Layout, stage_main
    from stages import cross_task

    params = validate_params({"datasets": {"tweets": {"prepare.source": "tweet_snippets"}}, "sweep": {"baseline": "base"}})
    (tmp_path / "metrics/datasets/tweets").mkdir(parents=True)
    calib = [row("obs", 0.5, 0.84, "within noise") | {"calib_size": 128}, row("base", 0.5, 0.83) | {"calib_size": 128}]
    for folder in ("metrics", "metrics/datasets/tweets"):
        (tmp_path / folder / "calib_size.json").write_text(json.dumps({"points": calib}))
    (tmp_path / "metrics/sweep.json").write_text(json.dumps({"points": TASKS["rt"]}))
    with pytest.raises(FileNotFoundError, match="tweets/sweep.json"):
        cross_task.run(params, Layout(tmp_path))
    (tmp_path / "metrics/datasets/tweets/sweep.json").write_text(json.dumps({"points": TASKS["tweets"]}))
    assert cross_task.run(params, Layout(tmp_path)) == {"tasks": 2, "best_by_mean": "obs"}
    saved = json.loads((tmp_path / "metrics/cross_task.json").read_text())
    assert saved["tasks"] == ["rt", "tweets"] and saved["budgets"] == [0.5, 0.4]
    c = saved["calib_sizes"]["tweets"]["0.5"]["128"]
    assert c["loss_points"] == pytest.approx(1.0) and c["vs_baseline_points"] == pytest.approx(1.0)
    md = (tmp_path / "plots/cross_task.md").read_text()
    assert md.startswith("Accuracy points lost") and "| 128 | 1.00 (+1.00) | 1.00 (+1.00) |" in md
    params_file = tmp_path / "params.yaml"
    params_file.write_text("datasets:\n  nyt: {prepare.source: nyt_snippets}\n")
    assert stage_main("cross_task", cross_task.run, ["--params", str(params_file), "--root", str(tmp_path)]) == 2
    assert "make datasets" in capsys.readouterr().err
