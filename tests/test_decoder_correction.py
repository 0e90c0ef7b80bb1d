"""Issue 14: the closed-form correction on bias-free decoders (Llama, Qwen3, Gemma 3, Mistral: o_proj and
down_proj have no bias), and selection meeting the budget on decoders.

- lstsq (and rescale) never raise the calibration reconstruction error above `none`'s, on every layer and
  sublayer, with activations whose means are far from zero (the case where dropping an intercept hurts);
- the intercept-free fit equals numpy's least squares without an intercept; a fit never drops a term:
  write_fit refuses an intercept for a module without a bias, and `bias` is refused on bias-free models;
- select meets every budget from 0.5 to 0.95 on a tiny Llama (no off-by-rounding failure).
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from pruneflow import correction
from pruneflow.adapters import SUBLAYERS, get_adapter
from pruneflow.cost import make_cost
from pruneflow.moments import Accumulator
from pruneflow.params import RankParams, SelectParams
from pruneflow.plan import Plan
from pruneflow.ranking import rank_model
from pruneflow.selection import select_units
from pruneflow.stats import collect_statistics
from tiny import FACTORIES, tiny_inputs

BIAS_FREE = ["llama", "qwen3", "gemma3", "mistral"]


def calibration(seeds=(1, 2, 3)) -> list[dict]:
    out = []
    for s in seeds:
        inp = tiny_inputs(batch=4, seq=12, seed=s)
        inp["attention_mask"] = torch.ones_like(inp["attention_mask"])
        out.append(inp)
    return out


def shifted(family: str):
    """A tiny model whose FFN activations have means far from zero, as trained LMs' do: with up = gate,
    act(g)·g is non-negative for SiLU and GELU, so every down_proj input has a large positive mean."""
    model = FACTORIES[family](layers=3)
    ad = get_adapter(model)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for i in range(ad.num_layers):
            gate, up = ad.ffn_in(i)
            gate.weight.copy_(0.5 * torch.randn(gate.weight.shape, generator=g))
            up.weight.copy_(gate.weight)
    return model


@pytest.mark.parametrize("family", BIAS_FREE)
@pytest.mark.parametrize("method", ["lstsq", "rescale"])
def test_correction_never_worse_than_slicing_on_bias_free_layers(family, method):
    model = shifted(family)
    ad = get_adapter(model)
    assert all(ad.out_proj(i, s).bias is None for i in range(ad.num_layers) for s in SUBLAYERS)
    stats = collect_statistics(model, ad, calibration())
    names = ad.module_names()
    means = [float(stats.modules[names[ad.ffn_out(i)]].mean.abs().mean()) for i in range(ad.num_layers)]
    assert min(means) > 0.1, f"activation means too close to zero for the test to bite: {means}"
    keep = {"attn": [[0, 1]] * ad.num_layers, "ffn": [list(range(0, 48, 2))] * ad.num_layers}
    pruned = Plan(keep["attn"], keep["ffn"]).apply(copy.deepcopy(model))
    report = correction.correct_from_stats(ad, get_adapter(pruned), stats, keep, method, ridge=1e-6)
    for row in report:
        assert row["rel_error_corrected"] <= row["rel_error_sliced"] + 1e-6, row
    ffn = [r for r in report if r["sublayer"] == "ffn"]
    assert all(r["rel_error_corrected"] < 0.9 * r["rel_error_sliced"] for r in ffn) if method == "lstsq" else True
    # the pruned model stays a plain model of its architecture: no bias appeared
    pa = get_adapter(pruned)
    assert all(pa.out_proj(i, s).bias is None for i in range(pa.num_layers) for s in SUBLAYERS)


def test_dropping_the_intercept_of_a_centered_fit_is_what_went_wrong():
    """The old behaviour, for the record: the centered fit without its intercept is worse than no fit."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4000, 6, generator=g, dtype=torch.float64) + 3.0  # large mean
    W = torch.randn(5, 8, generator=g, dtype=torch.float64)
    a = torch.cat([x, x[:, :2] * 0.5 + 0.1 * torch.randn(4000, 2, generator=g, dtype=torch.float64)], 1)
    acc = Accumulator()
    acc.add(a[:, :6], a @ W.T)
    m = acc.moments()
    W_K = W[:, :6]
    none = correction.error(m, W_K, None)
    W_c, b_c = correction.fit("lstsq", m, W_K, torch.zeros(5, dtype=torch.float64), 0.0, intercept=True)
    dropped = correction.error(m, W_c, None)
    W_u, b_u = correction.fit("lstsq", m, W_K, None, 0.0, intercept=False)
    assert b_u is None
    fixed = correction.error(m, W_u, None)
    assert fixed <= none and fixed < dropped


@pytest.mark.parametrize("seed", [0, 1])
def test_intercept_free_lstsq_equals_numpy_lstsq_without_intercept(seed):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(500, 5)) + 2.0
    t = x @ rng.normal(size=(5, 3)) + 0.1 * rng.normal(size=(500, 3)) + 1.0
    acc = Accumulator()
    acc.add(torch.from_numpy(x), torch.from_numpy(t))
    W, b = correction.fit("lstsq", acc.moments(), torch.zeros(3, 5, dtype=torch.float64), None, 0.0, intercept=False)
    expected = np.linalg.lstsq(x, t, rcond=None)[0].T
    np.testing.assert_allclose(W.numpy(), expected, rtol=1e-4, atol=1e-5)
    assert b is None


def test_a_fit_never_drops_a_term():
    model = FACTORIES["llama"](layers=1)
    ad = get_adapter(model)
    W = ad.ffn_out(0).weight.detach().double()
    with pytest.raises(ValueError, match="no bias to hold it"):
        correction.write_fit(ad, 0, "ffn", W, torch.zeros(W.shape[0], dtype=torch.float64))
    acc = Accumulator()
    acc.add(torch.randn(50, 4), torch.randn(50, 3))
    with pytest.raises(ValueError, match="bias"):
        correction.fit("bias", acc.moments(), torch.zeros(3, 4), None, 0.0, intercept=False)


@pytest.fixture(scope="module")
def llama_ranked():
    model = FACTORIES["llama"](layers=3)
    ad = get_adapter(model)
    stats = collect_statistics(model, ad, calibration())
    return model, ad, rank_model(ad, stats, RankParams(method="activation", chunk=0.05), progress=False)


@pytest.mark.parametrize("budget", [0.6, 0.65, 0.7, 0.75, 0.8, 0.85, 0.9, 0.95, 0.799])
def test_select_meets_every_budget_on_a_decoder(budget, llama_ranked):
    model, ad, ranking = llama_ranked  # GQA: 4 query heads over 2 KV heads; the LM head is a fixed cost
    p = SelectParams(budget=budget, uniform_heads=ad.dense_heads, min_neurons=1)
    sel = select_units(model, ad, ranking, p, make_cost("flops", 16), 16)
    assert sel["flops_ratio"] <= budget
    assert sel["flops_ratio"] > budget - 0.03  # the budget is spent, not wasted (one neuron per layer ≈ 0.01)


def test_a_budget_below_the_minimums_names_the_smallest_feasible_one(llama_ranked):
    model, ad, ranking = llama_ranked
    p = SelectParams(budget=0.5, uniform_heads=ad.dense_heads, min_neurons=1)
    with pytest.raises(ValueError, match=r"below the smallest feasible budget 0\.54"):
        select_units(model, ad, ranking, p, make_cost("flops", 16), 16)


@pytest.mark.parametrize("cost", ["params", "nonzeros"])
def test_select_meets_a_parameter_budget(cost):
    model = FACTORIES["qwen2"](layers=2)
    ad = get_adapter(model)
    stats = collect_statistics(model, ad, calibration())
    ranking = rank_model(ad, stats, RankParams(method="magnitude", chunk=0.05), progress=False)
    sel = select_units(model, ad, ranking, SelectParams(budget=0.6, uniform_heads=ad.dense_heads, min_neurons=1,
                                                        cost=cost), make_cost(cost, 16), 16)
    assert sel["cost"] == cost and sel["cost_ratio"] <= 0.6 and sel["cost_ratio"] > 0.5
    pruned = Plan(sel["keep_heads"], sel["keep_neurons"]).apply(copy.deepcopy(model))
    blocks = sum(p.numel() for b in get_adapter(pruned).layers() for p in b.parameters())
    dense = sum(p.numel() for b in ad.layers() for p in b.parameters())
    if cost == "params":
        assert blocks / dense == pytest.approx(sel["cost_ratio"])
