"""Benchmark: the stage runs on a tiny exported project and writes well-formed metrics and plot data; the
timing loop interleaves models; the accuracy check tolerates only near-tie flips."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest

import stages.benchmark
import stages.export
from pruneflow import onnx_io
from pruneflow.params import Params
from test_export import make_project

REQUIRED = ("provider", "threads", "ort_ms_dense", "ort_ms_pruned", "torch_ms_dense", "torch_ms_pruned",
            "speedup_ort", "speedup_torch", "flops_ratio")


def test_benchmark_stage_writes_metrics_and_plot(tmp_path):
    layout = make_project(tmp_path)
    params = Params.model_validate({
        "export": {"optimize": False},
        "benchmark": {"batch_sizes": [1, 3], "seq_lens": [8, 16], "warmup": 1, "iters": 2, "reference": [2, 16]},
    })
    stages.export.run(params, layout)
    stages.benchmark.run(params, layout)

    metrics = json.loads((layout.metrics / "latency.json").read_text())
    for key in REQUIRED:
        assert key in metrics, key
    assert metrics["provider"] in ("cpu", "cuda") and metrics["threads"] == 1
    assert metrics["reference"] == {"batch": 2, "seq_len": 16}
    for key in REQUIRED[2:]:
        assert isinstance(metrics[key], float) and metrics[key] > 0, key
    assert metrics["speedup_ort"] == pytest.approx(metrics["ort_ms_dense"] / metrics["ort_ms_pruned"])
    assert metrics["flops_ratio"] > 1  # the pruned tiny model really has fewer FLOPs
    # grid: 2 batches x 2 lengths, plus the reference shape (2, 16) that the grid lacks, x 2 runtimes
    assert len(metrics["grid"]) == 5 * 2
    assert {(r["runtime"], r["batch"], r["seq_len"]) for r in metrics["grid"]} >= {("ort", 2, 16), ("torch", 2, 16)}
    for name in ("dense", "pruned"):
        q = metrics["accuracy"][name]
        assert q["accuracy_ort"] == q["accuracy_torch"] and q["n_eval"] == 24 and q["within_atol"]
    assert metrics["protocol"]["cpu"] and metrics["protocol"]["versions"]["onnxruntime"]

    with (layout.plots / "latency.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 10
    assert set(stages.benchmark.CSV_COLUMNS) == set(rows[0])
    assert all(float(r["flops_ratio"]) > 1 and float(r["speedup"]) > 0 for r in rows)


def test_benchmark_needs_the_export(tmp_path):
    layout = make_project(tmp_path)
    with pytest.raises(FileNotFoundError, match="dense.onnx"):
        stages.benchmark.run(Params(), layout)


def test_time_interleaved_alternates_and_skips_warmup():
    calls = []
    fns = {"dense": lambda: calls.append("d"), "pruned": lambda: calls.append("p")}
    times = onnx_io.time_interleaved(fns, warmup=1, iters=3)
    assert "".join(calls) == "dppddppd"  # each model goes first every other round
    assert {k: v.shape for k, v in times.items()} == {"dense": (3,), "pruned": (3,)}


def test_grid_includes_reference():
    assert stages.benchmark.grid_shapes([1, 8], [32], (8, 128)) == [(1, 32), (8, 32), (8, 128)]
    assert stages.benchmark.grid_shapes([8], [128], (8, 128)) == [(8, 128)]


def test_agreement_allows_only_near_tie_flips():
    torch_logits = np.array([[0.0, 2.0], [1.0, 1.00001], [3.0, 0.0]], np.float32)
    near_tie = torch_logits.copy()
    near_tie[1] = [1.00001, 1.0]  # flips a sentence whose margin (1e-5) is under 2 * atol
    report = stages.benchmark.agreement("pruned", torch_logits, near_tie, [1, 0, 0], atol=1e-4)
    assert report["n_disagree"] == 1 and report["accuracy_torch"] == pytest.approx(2 / 3)
    wrong = torch_logits.copy()
    wrong[0] = [2.0, 0.0]  # flips a confident prediction
    with pytest.raises(ValueError, match="predicts 1 eval sentences differently"):
        stages.benchmark.agreement("pruned", torch_logits, wrong, [1, 0, 0], atol=1e-4)


def test_calibration_benchmark_windows_follow_the_pipeline_rule_and_hold_out_the_rest():
    """benchmarks.lm_calibration: n refit windows are chosen by the pipeline's own rule (so n = lm.calib_windows
    gives the pipeline's windows), and the held-out check uses only windows no refit saw."""
    import torch

    from benchmarks.lm_calibration import held_out, parse_point, spaced
    from pruneflow.lm_assets import calibration_windows

    class Tokens:  # a tokenizer whose ids are the characters' codes
        def __call__(self, text, add_special_tokens=False):
            return {"input_ids": [ord(c) for c in text]}

    texts = ["abcdefghijklmnopqrstuvwxyz" * 7, "ABCDEFGHIJKLMNOPQRSTUVWXYZ" * 5]
    pool = torch.cat([torch.tensor([ord(c) for c in t[: len(t) // 10 * 10]]).view(-1, 10) for t in texts])
    assert torch.equal(pool[spaced(len(pool), 9)], calibration_windows(Tokens(), texts, 10, 9, None))
    fits = {n: set(spaced(len(pool), n)) for n in (4, 9)}
    check = held_out(len(pool), fits[4] | fits[9], 5)
    assert len(check) == 5 and not set(check) & (fits[4] | fits[9])
    with pytest.raises(ValueError, match="left for the held-out check"):
        held_out(len(pool), fits[9], len(pool))
    assert parse_point("0.8:9") == (0.8, 9) and parse_point("0.7") == (0.7, None)


def test_calibration_benchmark_first_token_rms_reads_the_residual_stream_at_the_first_token():
    """benchmarks.lm_calibration's sink check: per window, the RMS of hidden_states[layer] at position 0, batch
    by batch, the same as one forward over all windows."""
    import torch

    from benchmarks.lm_calibration import first_token_rms
    from tests.tiny import tiny_llama

    model = tiny_llama(layers=2).eval()
    windows = torch.randint(0, model.config.vocab_size, (5, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        hidden = model(input_ids=windows, output_hidden_states=True).hidden_states[1][:, 0].double()
    got = first_token_rms(model, windows, 1, 2, "cpu")
    assert got.shape == (5,)
    torch.testing.assert_close(got, hidden.pow(2).mean(-1).sqrt(), rtol=1e-5, atol=1e-6)


def test_classifier_tilt_resumes_from_its_cache_and_tests_each_tilt_against_the_default(tmp_path, monkeypatch):
    """Every point cached: nothing is pruned again (run_point would fail here: no data), and the report pairs
    each tilt with the default's outcomes on the same sentences."""
    from benchmarks import classifier_tilt
    from pruneflow import sweep

    monkeypatch.setattr(sweep, "run_point", lambda *a, **k: pytest.fail("a cached point was run again"))
    from pruneflow.params import read_raw

    base = float(read_raw(classifier_tilt.PARAMS)["select"]["tilt"])  # the params' own tilt: the reference
    other = 1.0 if base != 1.0 else 0.5
    right = [True] * 10
    def row(tilt, correct, drop):
        return {"task": "rt", "tilt": tilt, "budget": 0.5, "accuracy_dense": 0.9, "accuracy": 0.9 - drop / 100,
                "drop_points": drop, "agreement": 0.95, "n_eval": 10, "flops_ratio": 0.5, "neurons_per_layer": [8],
                "items": {"accuracy_pruned": correct, "agreement": right}}
    cache = tmp_path / "rows.json"
    cache.write_text(json.dumps([row(base, right, 1.0), row(other, [False] * 3 + [True] * 7, 3.0)]))
    out = tmp_path / "tilt.json"
    classifier_tilt.main(["--tilts", str(other), "--budgets", "0.5", "--datasets", "rt", "--cache", str(cache),
                          "--out", str(out)])
    report = json.loads(out.read_text())
    assert report["default_tilt"] == base and report["mean_drop_points"] == {str(base): 1.0, str(other): 3.0}
    default, steep = sorted(report["points"], key=lambda p: p["tilt"] != base)
    assert default["vs_default"] is None and "items" not in steep
    assert steep["vs_default"]["accuracy_pruned"] == {"a_only": 0, "b_only": 3, "p_value": 0.25}
    assert steep["vs_default"]["agreement"]["p_value"] == 1.0
