"""Bonsai: the pure parts on synthetic data (the regression recovers a known sparse linear score from antithetic
samples; complements are exact; fixed units are never candidates; quotas are met), and the whole search on a
tiny random Llama (grouped-query attention) and a tiny BERT through the rank and select path."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pruneflow import bonsai
from pruneflow.adapters import get_adapter
from pruneflow.cost import make_cost
from pruneflow.params import RankParams, SelectParams
from pruneflow.ranking import rank_model
from pruneflow.selection import select_units
from pruneflow.stats import collect_statistics
from pruneflow.tasks import get_task
from tiny import tiny_bert, tiny_inputs, tiny_llama


def test_antithetic_pairs_are_exact_complements_and_drop_the_asked_counts():
    rng = np.random.default_rng(0)
    modules = [(np.full(6, 1 / 6), 2), (np.array([0.5, 0.5, 0.0]), 1)]
    for _ in range(20):
        mask, comp = bonsai.sample_antithetic(rng, modules)
        assert np.array_equal(mask + comp, np.ones(9))
        assert (mask[:6] == 0).sum() == 2 and (mask[6:] == 0).sum() == 1 and mask[8] == 1  # p = 0 never dropped


def test_candidates_exclude_the_top_units_and_weight_the_weak_ones():
    prior = torch.tensor([5.0, 1.0, 4.0, 0.5, 3.0, 2.0, 6.0, 0.1, 7.0, 8.0])
    fixed, cand, probs = bonsai.split_candidates(prior, 0.2)  # fixed: top floor(0.6 * 10) = 6
    assert sorted(fixed.tolist()) == [0, 2, 4, 6, 8, 9] and sorted(cand.tolist()) == [1, 3, 5, 7]
    assert probs.sum() == pytest.approx(1) and probs[cand.tolist().index(7)] == probs.max()


def test_the_regression_recovers_a_sparse_linear_score_from_antithetic_samples():
    """y = −(known sparse linear function of the mask bits) + noise: the fitted coefficients order the units as
    the truth does (Kendall τ ≥ 0.9 on the units that matter)."""
    rng = np.random.default_rng(1)
    n_units = 30
    truth = np.zeros(n_units)
    truth[:10] = np.linspace(1.0, 10.0, 10)  # 10 units matter, 20 do not
    X, y = [], []
    for _ in range(60):
        mask, comp = bonsai.sample_antithetic(rng, [(np.full(n_units, 1 / n_units), 8)])
        for m in (mask, comp):
            X.append(m)
            y.append(float(truth @ m) + rng.normal(0, 0.1))  # presence of a useful unit raises y (= −loss)
    beta, info = bonsai.fit_global(np.asarray(X), np.asarray(y), [0.0, 0.01, 0.05, 0.2])
    assert bonsai.kendall_tau(beta[:10], truth[:10]) >= 0.9 and info["cv_tau"] > 0.8
    assert np.abs(beta[10:]).max() < 0.5 * beta[:10].min() + 1e-9  # the irrelevant ones sit near zero
    drop = bonsai.choose_removals(beta, np.ones(n_units), quota=20)
    assert len(drop) == 20 and set(drop.tolist()) == set(range(10, 30))  # quota met, useful units kept


def test_quota_is_met_exactly_or_just_crossed():
    beta = np.array([0.3, 0.1, 0.2, 0.4])
    cost = np.array([2.0, 2.0, 3.0, 1.0])
    assert bonsai.choose_removals(beta, cost, 4).tolist() == [1, 2]  # 2 < 4, then 2 + 3 crosses: taken
    assert bonsai.choose_removals(beta, cost, 2).tolist() == [1]
    assert bonsai.choose_removals(beta, cost, 0).tolist() == []


def test_lasso_without_penalty_is_least_squares():
    rng = np.random.default_rng(2)
    X = rng.normal(size=(50, 4))
    y = X @ np.array([1.0, -2.0, 0.5, 0.0]) + 3.0
    b, b0 = bonsai.lasso(X, y, 0.0, iters=2000, tol=1e-12)
    np.testing.assert_allclose(b, [1.0, -2.0, 0.5, 0.0], atol=1e-6)
    assert b0 == pytest.approx(3.0, abs=1e-6)


def _calibration(model_kind: str):
    if model_kind == "llama":
        ids = torch.randint(5, 120, (4, 12), generator=torch.Generator().manual_seed(3))
        return [{"input_ids": ids[:2], "attention_mask": torch.ones(2, 12, dtype=torch.long)},
                {"input_ids": ids[2:], "attention_mask": torch.ones(2, 12, dtype=torch.long)}]
    return [tiny_inputs(batch=4, seq=10)]


@pytest.mark.parametrize("kind", ["llama", "bert"])
def test_bonsai_runs_through_rank_and_select(kind, one_thread):
    model = tiny_llama(layers=2) if kind == "llama" else tiny_bert(layers=2)
    task = get_task("causal_lm" if kind == "llama" else "classification")
    adapter = get_adapter(model)
    batches = _calibration(kind)
    stats = collect_statistics(model, adapter, batches)
    select = SelectParams(budget=0.75, allocation="ranking", seq_len=12)
    rp = RankParams(method="bonsai", bonsai={"masks_per_round": 8, "samples": 4, "prune_frac": 0.1, "folds": 2})
    before = {k: v.clone() for k, v in model.state_dict().items()}
    ranking = rank_model(adapter, stats, rp, progress=False, calibration=lambda: iter(batches), task=task,
                         select=select, seq_len=12)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())  # the dense model is untouched
    assert ranking["rounds"] and all(r["sub_models"] == 8 for r in ranking["rounds"])
    sel = select_units(model, adapter, ranking, select, make_cost("flops", 12), 12)
    assert sel["cost_ratio"] <= 0.75 and sel["keep_heads"] == ranking["keep_heads"]
    if kind == "llama":  # GQA: whole KV groups (heads 0-1, 2-3) stay or go
        assert all(set(h) in ({0, 1, 2, 3}, {0, 1}, {2, 3}, set()) for h in sel["keep_heads"])
    for layer, keep in zip(ranking["layers"], sel["keep_neurons"]):  # survivors are the last of the order
        assert sorted(layer["ffn"]["order"][len(layer["ffn"]["order"]) - len(keep):]) == keep
    # the same seed gives the same plan
    again = rank_model(adapter, stats, rp, progress=False, calibration=lambda: iter(batches), task=task,
                       select=select, seq_len=12)
    assert again["keep_neurons"] == ranking["keep_neurons"] and again["keep_heads"] == ranking["keep_heads"]
    # the prior-only ablation runs the same rounds without sub-models
    prior = rank_model(adapter, stats, RankParams(method="bonsai", bonsai={"perturb": False, "prune_frac": 0.1}),
                       progress=False, calibration=lambda: iter(batches), task=task, select=select, seq_len=12)
    assert all(r["sub_models"] == 0 for r in prior["rounds"])


def test_allocation_ranking_needs_a_global_method():
    model = tiny_bert(layers=2)
    adapter = get_adapter(model)
    stats = collect_statistics(model, adapter, [tiny_inputs(batch=4, seq=10)])
    ranking = rank_model(adapter, stats, RankParams(method="activation"), progress=False)
    with pytest.raises(ValueError, match="ranks layer by layer"):
        select_units(model, adapter, ranking, SelectParams(budget=0.7, allocation="ranking", seq_len=10),
                     make_cost("flops", 10), 10)


def test_a_module_whose_every_candidate_would_drop_varies_across_pairs():
    """3 KV groups, 1 candidate, 1 to drop: dropping it in every mask would make its bit the mask/complement
    indicator (the same column for every such module); it is dropped with probability 1/2 instead."""
    rng = np.random.default_rng(0)
    bits = [bonsai.sample_antithetic(rng, [(np.ones(1), 1), (np.full(4, 0.25), 1)])[0] for _ in range(40)]
    first = np.array([b[0] for b in bits])
    assert 0 < first.sum() < 40  # both values occur across pairs
    assert all((b[1:] == 0).sum() == 1 for b in bits)  # the ordinary module still drops exactly one
