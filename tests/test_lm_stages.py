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
                                                                  str(root), *extra])


def test_prepare_then_sparsify_end_to_end(lm_project, capsys):
    assert run(lm_prepare, lm_project) == 0
    windows = load_tensors(lm_project / "data/lm/windows.safetensors")
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
    assert not (lm_project / "data/lm/dense").exists() and not (lm_project / "data/lm/windows.safetensors").exists()


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
