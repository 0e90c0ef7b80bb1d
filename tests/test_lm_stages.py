"""The LM pipeline's stages on a tiny random Llama and the user's own text files: lm_prepare cuts held-out
windows and writes the model only when everything is valid; sparsify_lm runs every listed method x pattern, saves
the chosen point as a plain checkpoint (reloads without pruneflow) and in the compressed-tensors format, and
writes the table, the csv and the plot."""

from __future__ import annotations

import json
import random

import pytest
import torch
import yaml

from pruneflow.artifacts import load_tensors
from stages import lm_prepare, sparsify_lm
from pruneflow.runtime import stage_main
from tiny import WORDS, tiny_llama, tiny_tokenizer


def write_text(path, words: int, seed: int) -> str:
    rng = random.Random(seed)
    path.write_text(" ".join(rng.choice(WORDS) for _ in range(words)) + "\n")
    return str(path)


@pytest.fixture
def lm_project(tmp_path):
    src = tmp_path / "src"
    tiny_llama().save_pretrained(str(src))
    tiny_tokenizer(tmp_path / "vocab").save_pretrained(str(src))
    params = {
        "lm": {"model": str(src), "text": "files", "calib_texts": [write_text(tmp_path / "a.txt", 400, 1),
                                                                    write_text(tmp_path / "b.txt", 400, 2)],
               "eval_texts": [write_text(tmp_path / "held_out.txt", 200, 3)], "window": 16, "calib_windows": 8,
               "eval_windows": 4, "batch_size": 4},
        "sparsify": {"methods": ["magnitude", "wanda", "sparsegpt", "apt"], "patterns": ["50%", "2:4"],
                     "save": "apt@2:4", "sparsegpt": {"blocksize": 16}, "apt": {"blocksize": 16}},
        "runtime": {"device": "cpu", "threads": 1},
    }
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    return tmp_path


def run(stage, root, *extra):
    return stage_main(stage.__name__.split(".")[-1], stage.run, ["--params", str(root / "params.yaml"), "--root",
                                                                  str(root), "--data", "data/lm", *extra])


def test_prepare_then_sparsify_end_to_end(lm_project, capsys):
    assert run(lm_prepare, lm_project) == 0
    windows = load_tensors(lm_project / "data/lm/prepared/windows.safetensors")
    assert windows["calib"].shape == (8, 16) and windows["eval"].shape == (4, 16)
    assert run(sparsify_lm, lm_project) == 0
    result = json.loads((lm_project / "metrics/sparse_lm.json").read_text())
    points = {(p["method"], p["pattern"]): p for p in result["points"]}
    assert len(points) == 8
    for p in points.values():
        assert p["density"] == pytest.approx(0.5, abs=0.02) and p["perplexity_pruned"] > 1
        assert 0 <= p["next_token_agreement"] <= 1 and p["kl_per_token"] >= 0
    assert set(result["apt_vs_sparsegpt_window_nll"]) == {"50%", "2:4"}
    assert (lm_project / "plots/sparse_lm.png").stat().st_size > 0
    assert (lm_project / "plots/sparse_lm.csv").read_text().count("\n") == 9
    from transformers import AutoModelForCausalLM

    reloaded = AutoModelForCausalLM.from_pretrained(str(lm_project / "data/lm/sparse/dense"))
    q = reloaded.model.layers[0].self_attn.q_proj.weight
    assert torch.all((q.reshape(q.shape[0], -1, 4) == 0).sum(-1) >= 2)  # 2:4 held in the plain checkpoint
    disk = points[("apt", "2:4")]["disk"]
    assert disk and (lm_project / "data/lm/sparse/compressed/config.json").exists()


@pytest.mark.parametrize("change,message", [
    ({"window": 4096}, "exceeds the model's context"),
    ({"calib_windows": 500}, "fewer than lm.calib_windows"),
    ({"eval_windows": 500}, "too short"),
])
def test_bad_inputs_fail_early_and_write_nothing(lm_project, change, message, capsys):
    params = yaml.safe_load((lm_project / "params.yaml").read_text())
    params["lm"].update(change)
    (lm_project / "params.yaml").write_text(yaml.safe_dump(params))
    assert run(lm_prepare, lm_project) == 2
    assert message in capsys.readouterr().err
    assert not (lm_project / "data/lm/dense").exists() and not (lm_project / "data/lm/prepared/windows.safetensors").exists()


def test_unsupported_architecture_and_missing_model(lm_project, capsys):
    from transformers import GPT2Config, GPT2LMHeadModel

    gpt2 = lm_project / "gpt2"
    GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=120)).save_pretrained(str(gpt2))
    tiny_tokenizer(lm_project / "vocab").save_pretrained(str(gpt2))
    for model, message in ((str(gpt2), "unsupported architecture 'gpt2'"), ("nowhere", "does not exist")):
        params = yaml.safe_load((lm_project / "params.yaml").read_text())
        params["lm"]["model"] = model
        (lm_project / "params.yaml").write_text(yaml.safe_dump(params))
        assert run(lm_prepare, lm_project) == 2
        assert message in capsys.readouterr().err
        assert not (lm_project / "data/lm/dense").exists()


def test_sparsify_params_checked_against_the_registry(lm_project, capsys):
    assert run(lm_prepare, lm_project) == 0
    for override, message in (("sparsify.methods=[sgpt]", "not registered"),
                              ("sparsify.patterns=['4:2']", "0 < N < M"),
                              ("sparsify.apt={solver: lu}", "solver")):
        assert run(sparsify_lm, lm_project, "--set", override) == 2
        assert message in capsys.readouterr().err
    assert not (lm_project / "metrics/sparse_lm.json").exists()


def test_dense_reference_matches_running_the_dense_model():
    """Kept once in float16, the dense log-probabilities give the same quality as re-running the dense model
    (perplexity within 1e-3 relative, KL within 1e-4 nats per token, agreement exact up to ties)."""
    from pruneflow.tasks.causal_lm import DenseReference, lm_quality

    dense, pruned = tiny_llama(seed=0), tiny_llama(seed=1)
    windows = torch.randint(5, 120, (6, 12), generator=torch.Generator().manual_seed(0))
    direct = lm_quality(dense, pruned, windows, batch_size=4)
    cached = lm_quality(DenseReference(dense, windows, batch_size=4), pruned, windows, batch_size=4)
    for key in ("perplexity_dense", "perplexity_pruned"):
        assert cached[key] == pytest.approx(direct[key], rel=1e-3), key
    assert cached["kl_per_token"] == pytest.approx(direct["kl_per_token"], abs=1e-4)
    assert abs(cached["next_token_agreement"] - direct["next_token_agreement"]) <= 1 / direct["tokens"]
    assert cached["window_nll"] == pytest.approx(direct["window_nll"], rel=1e-6)
    with pytest.raises(ValueError, match="batch_size"):
        lm_quality(DenseReference(dense, windows, batch_size=2), pruned, windows, batch_size=4)


# --- structured pruning of a decoder: the same stage modules as the classifier, on the LM layout ----------------

STRUCTURED = ("collect", "rank", "select", "correct", "evaluate")


def structured_params(root, **select) -> str:
    params = yaml.safe_load((root / "params.yaml").read_text())
    params |= {"task": {"kind": "causal_lm"}, "collect": {"batch_size": 4}, "evaluate": {"batch_size": 4},
               "select": {"budget": 0.6, "min_neurons": 4, **select}}
    path = root / "lm_params.yaml"
    path.write_text(yaml.safe_dump(params))
    return str(path)


def run_structured(root, params_file, stages=STRUCTURED, *extra) -> None:
    import importlib

    for name in stages:
        mod = importlib.import_module(f"stages.{name}")
        rc = stage_main(name, mod.run, ["--params", params_file, "--root", str(root), "--data", "data/lm",
                                        "--metrics", "metrics/lm", "--plots", "plots/lm", *extra])
        assert rc == 0, name


def test_structured_chain_on_a_decoder(lm_project):
    """collect -> evaluate on a tiny GQA Llama: grouped heads kept equally per KV group, the budget met, the
    sequential refit run, perplexity and agreement reported, and the pruned model reloads from its manifest."""
    from pruneflow.plan import load_pruned

    assert run(lm_prepare, lm_project) == 0
    run_structured(lm_project, structured_params(lm_project))
    m = lm_project / "metrics/lm"
    sel = json.loads((lm_project / "data/lm/select/selection.json").read_text())
    assert sel["cost_ratio"] <= 0.6 and sel["seq_len"] == 16
    for heads in sel["keep_heads"]:  # 4 query heads in 2 KV groups (0-1, 2-3): the same count in each
        assert len(heads) % 2 == 0 and sum(h < 2 for h in heads) == len(heads) // 2
    q = json.loads((m / "quality.json").read_text())
    assert q["methods"]["sequential"] is True and q["methods"]["rank"] == "obs"
    assert q["perplexity_dense"] > 1 and q["perplexity_pruned"] > 1 and 0 <= q["next_token_agreement"] <= 1
    assert q["n_eval"] == 4 and q["tokens"] == 4 * 15 and q["flops_ratio"] <= 0.6 + 1e-9
    assert q["calibration_sentences"] == 8 and q["forward_seconds"] is not None
    pruned = load_pruned(lm_project / "data/lm/pruned")
    assert pruned.model.layers[0].mlp.down_proj.in_features == sel["neurons_per_layer"][0]
    # uniform allocation: also an ordinary checkpoint of its architecture, computing the same logits
    from transformers import AutoModelForCausalLM

    plain = AutoModelForCausalLM.from_pretrained(str(lm_project / "data/lm/pruned/plain")).eval()
    ids = torch.randint(0, 120, (2, 12))
    with torch.no_grad():
        torch.testing.assert_close(plain(input_ids=ids).logits, pruned(input_ids=ids).logits, rtol=1e-5, atol=1e-5)
    assert json.loads((m / "correct.json").read_text())["plain_checkpoint"].endswith("plain")


def test_structured_sweep_on_a_decoder(lm_project):
    """The sweep stage on the LM layout: perplexity table with paired bootstrap marks against the baseline."""
    assert run(lm_prepare, lm_project) == 0
    path = structured_params(lm_project)
    params = yaml.safe_load(open(path))
    params["sweep"] = {"budgets": [0.8, 0.6], "methods": ["obs", "activation+noseq"], "baseline": "activation+noseq"}
    open(path, "w").write(yaml.safe_dump(params))
    run_structured(lm_project, path, ("collect", "sweep"))
    rows = json.loads((lm_project / "metrics/lm/sweep.json").read_text())["points"]
    assert {(r["method"], r["budget"]) for r in rows} == {(m, b) for m in ("obs", "activation+noseq") for b in (0.8, 0.6)}
    obs = [r for r in rows if r["method"] == "obs"]
    assert all(r["vs_baseline"]["perplexity_pruned"]["items"] == 4 for r in obs)
    table = (lm_project / "plots/lm/sweep.md").read_text()
    assert "Held-out perplexity" in table and "paired bootstrap" in table and "| obs |" in table
    assert (lm_project / "plots/lm/sweep.png").stat().st_size > 0


def test_sweep_spills_the_dense_trace_when_memory_is_short(lm_project, monkeypatch):
    """When the shared dense trace would take more than its share of the free memory, the sweep keeps its targets
    on disk beside the data: the same table to the last digit, and the directory gone with the sweep's context."""
    import gc

    from pruneflow import sequential, sweep

    assert run(lm_prepare, lm_project) == 0
    path = structured_params(lm_project)
    params = yaml.safe_load(open(path))
    params["sweep"] = {"budgets": [0.8, 0.6], "methods": ["obs"], "baseline": None}
    open(path, "w").write(yaml.safe_dump(params))
    run_structured(lm_project, path, ("collect", "sweep"))
    in_memory = json.loads((lm_project / "metrics/lm/sweep.json").read_text())["points"]
    sweep.release_contexts()
    reads = []
    monkeypatch.setattr(sweep, "TRACE_MEMORY_SHARE", 0.0)
    monkeypatch.setattr(sequential.DenseTrace, "_read", lambda self, p, read=sequential.DenseTrace._read:
                        reads.append(p) or read(self, p))
    run_structured(lm_project, path, ("sweep",))
    spilled = json.loads((lm_project / "metrics/lm/sweep.json").read_text())["points"]
    # the second point read them, from beside the project's data
    assert reads and all(p.parent.name.startswith(".dense-trace-") and p.parent.parent == lm_project / "data/lm"
                         for p in reads)
    for a, b in zip(in_memory, spilled):
        assert (a["perplexity_pruned"], a["next_token_agreement"]) == (b["perplexity_pruned"], b["next_token_agreement"])
    sweep.release_contexts()
    gc.collect()
    assert not list((lm_project / "data/lm").glob(".dense-trace-*"))


def test_gqa_budget_below_one_head_per_group_fails_clearly(lm_project):
    assert run(lm_prepare, lm_project) == 0
    path = structured_params(lm_project, budget=0.05, min_neurons=40)
    run_structured(lm_project, path, ("collect", "rank"))
    import importlib

    mod = importlib.import_module("stages.select")
    assert stage_main("select", mod.run, ["--params", path, "--root", str(lm_project), "--data", "data/lm",
                                          "--metrics", "metrics/lm"]) == 2
    assert not (lm_project / "data/lm/select").exists()


def test_lm_benchmark_exports_checks_parity_and_times_both_models(lm_project):
    """KV-cache ONNX files for dense and pruned, prefill logits and greedy tokens checked against PyTorch, then
    prefill and decode timings with their ideal speed-ups (FLOPs; weight bytes per token)."""
    from stages import lm_benchmark

    assert run(lm_prepare, lm_project) == 0
    path = structured_params(lm_project)
    params = yaml.safe_load(open(path))
    params["benchmark"] = {"prefill": [[1, 12], [2, 8]], "decode_batches": [1, 2], "decode_prompt": 6,
                           "decode_new": 4, "warmup": 0, "iters": 1, "iters_decode": 1, "parity_tokens": 5,
                           "reference": [2, 8], "provider": "cpu"}
    open(path, "w").write(yaml.safe_dump(params))
    run_structured(lm_project, path, STRUCTURED[:-1] + ("lm_benchmark",))
    speed = json.loads((lm_project / "metrics/lm/speed.json").read_text())
    for name in ("dense", "pruned"):
        assert (lm_project / f"data/lm/onnx/{name}.onnx").stat().st_size > 0
        assert speed["parity"][name]["greedy_tokens_identical"] and speed["parity"][name]["greedy_tokens"] == 5
    assert [(r["batch"], r["tokens"]) for r in speed["prefill"]] == [(1, 12), (2, 8)]
    assert all(r["ideal_speedup"] > 1 and r["ort"]["speedup"] > 0 and r["torch"]["speedup"] > 0
               for r in speed["prefill"])
    w = speed["weight_bytes_per_token"]
    assert [r["batch"] for r in speed["decode"]] == [1, 2] and speed["decode"][0]["ideal_speedup"] == w["dense"] / w["pruned"]
    # a prompt longer than the eval windows is refused before anything is timed
    params["benchmark"]["decode_prompt"] = 64
    open(path, "w").write(yaml.safe_dump(params))
    rc = stage_main("lm_benchmark", lm_benchmark.run, ["--params", path, "--root", str(lm_project), "--data",
                                                       "data/lm", "--metrics", "metrics/lm"])
    assert rc == 2


def test_structured_chain_with_refit_windows_and_the_sensitivity_allocation(lm_project):
    """lm.refit_windows: lm_prepare cuts a separate, larger set of windows that the sequential refit (and the
    forward-pass yardstick) reads while the statistics keep lm.calib_windows; select.allocation: sensitivity runs
    its probe in select: the neurons are tilted (non-uniform, so no plain checkpoint) at the uniform cost, and
    with runtime.offload=disk (the probe walking layers from the checkpoint) it selects the same bytes."""
    from pruneflow.params import CollectParams
    from pruneflow.tasks import get_task

    params = yaml.safe_load((lm_project / "params.yaml").read_text())
    params["lm"]["refit_windows"] = 12
    (lm_project / "params.yaml").write_text(yaml.safe_dump(params))
    assert run(lm_prepare, lm_project) == 0
    prepared, task, c = lm_project / "data/lm/prepared", get_task("causal_lm"), CollectParams(batch_size=4)
    assert len(task.calibration_batches(prepared, None, c, "cpu")) == 8
    assert len(task.refit_batches(prepared, None, c, "cpu")) == 12
    uniform = structured_params(lm_project)
    run_structured(lm_project, uniform, ("collect", "rank", "select"))
    even = json.loads((lm_project / "data/lm/select/selection.json").read_text())
    run_structured(lm_project, structured_params(lm_project, allocation="sensitivity", tilt=1.0, probe_samples=4),
                   ("select", "correct", "evaluate"))
    sel = json.loads((lm_project / "data/lm/select/selection.json").read_text())
    m = lm_project / "metrics/lm"
    rise = json.loads((m / "select.json").read_text())["probe_loss_rise"]
    assert len(rise) == 2 and sel["heads_per_layer"] == even["heads_per_layer"]
    assert sum(sel["neurons_per_layer"]) == sum(even["neurons_per_layer"]) and sel["cost_ratio"] <= 0.6
    assert sel["neurons_per_layer"][rise.index(max(rise))] > sel["neurons_per_layer"][rise.index(min(rise))]
    assert json.loads((m / "correct.json").read_text())["plain_checkpoint"] is None
    assert json.loads((m / "quality.json").read_text())["perplexity_pruned"] > 1
    # runtime.offload=disk: the probe reads each layer from the checkpoint as it runs; the same selection
    chosen = (lm_project / "data/lm/select/selection.json").read_bytes()
    run_structured(lm_project, structured_params(lm_project, allocation="sensitivity", tilt=1.0, probe_samples=4),
                   ("select",), "--set", "runtime.offload=disk")
    assert (lm_project / "data/lm/select/selection.json").read_bytes() == chosen
    assert json.loads((m / "select.json").read_text())["probe_loss_rise"] == rise
    # and correct with offload=disk (low_memory: the dense stream on disk from its capture, the pruned model
    # streamed layer by layer) writes the same weights as in memory
    weights = (lm_project / "data/lm/pruned/model.safetensors").read_bytes()
    run_structured(lm_project, structured_params(lm_project, allocation="sensitivity", tilt=1.0, probe_samples=4),
                   ("correct",), "--set", "runtime.offload=disk")
    assert json.loads((m / "correct.json").read_text())["low_memory"] is True
    assert (lm_project / "data/lm/pruned/model.safetensors").read_bytes() == weights
