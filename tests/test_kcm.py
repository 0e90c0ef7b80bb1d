"""KCM's R2D2 scoring (pruneflow.kcm): small random tensors, runs in seconds."""

import numpy as np
import pytest
import torch
from scipy.spatial.distance import pdist

from pruneflow.kcm import (
    average_ranks, d2_energy, d2_scores, gaussian_kernel, kcm_scores, merge_ranks, neuron_features,
    r2_convex_hull, r2_scores,
)
from pruneflow.methods.kcm import KCM


def random_points(n=60, dim=5, seed=0):
    return torch.randn(n, dim, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def square_with_interior(n_interior=30, seed=0):
    """The four corners of [-1, 1]² (the hull's vertices) first, then points inside [-0.6, 0.6]²."""
    corners = torch.tensor([[1.0, 1.0], [1.0, -1.0], [-1.0, 1.0], [-1.0, -1.0]], dtype=torch.float64)
    g = torch.Generator().manual_seed(seed)
    interior = (torch.rand(n_interior, 2, generator=g, dtype=torch.float64) - 0.5) * 1.2
    return torch.cat([corners, interior])


def layer(N=48, d=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    w_in = torch.randn(N, d, generator=g) * 0.05
    w_out = torch.randn(d, N, generator=g) * 0.05
    votes = torch.randint(0, 50, (N,), generator=g).double()
    acts = torch.randn(200, N, generator=g).relu()
    return w_in, w_out, votes, acts.T @ acts / acts.shape[0]


# --- kernel -------------------------------------------------------------------------------------------

def test_gaussian_kernel_is_symmetric_with_unit_diagonal():
    K, sigma = gaussian_kernel(random_points(), "median")
    assert torch.equal(K, K.T)
    assert torch.equal(K.diagonal(), torch.ones(K.shape[0], dtype=K.dtype))
    assert (K > 0).all() and (K <= 1).all()


def test_gaussian_kernel_formula_has_no_factor_two():
    X = random_points(8, 3)
    K, sigma = gaussian_kernel(X, 0.7)
    assert sigma == 0.7
    torch.testing.assert_close(K, torch.exp(-torch.cdist(X, X) ** 2 / 0.7**2))


@pytest.mark.parametrize("n", [9, 10])  # odd and even pair counts: 36 and 45 pairs
def test_median_heuristic_is_the_median_pairwise_distance(n):
    X = random_points(n, 4, seed=n)
    _, sigma = gaussian_kernel(X, "median")
    assert sigma == pytest.approx(float(np.median(pdist(X.numpy()))), rel=1e-12)
    _, sigma_scaled = gaussian_kernel(3.0 * X, "median")  # scale-equivariant, so R2 is scale-free
    assert sigma_scaled == pytest.approx(3.0 * sigma, rel=1e-12)


def test_identical_features_are_refused():
    with pytest.raises(ValueError, match="sigma"):
        gaussian_kernel(torch.ones(5, 3), "median")


# --- R2 -----------------------------------------------------------------------------------------------

def test_r2_update_keeps_c_nonnegative_and_never_increases_the_objective():
    K, _ = gaussian_kernel(random_points(80, 4, seed=1), "median")
    C, info = r2_convex_hull(K, alpha=1e-12, max_iter=60)
    assert info["iterations"] == 60 and not info["converged"]
    assert (C >= 0).all()
    history = np.array(info["objective_history"])
    assert len(history) == 61 and history[-1] == info["objective"]
    assert history[0] == pytest.approx(float(K.trace() - K.sum() / K.shape[0]))  # C⁰ = 11ᵀ/N
    assert np.all(np.diff(history) <= 1e-9 * history[0]), "objective went up"
    assert history[-1] < 0.5 * history[0]


def test_objective_is_the_reconstruction_error_on_explicit_features():
    # a linear kernel on nonnegative features is a Gram matrix K = XXᵀ ≥ 0 with Φ = Xᵀ written out
    X = torch.rand(12, 3, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    C, info = r2_convex_hull(X @ X.T, alpha=1e-12, max_iter=3)
    Phi = X.T
    assert info["objective"] == pytest.approx(float((Phi - Phi @ C).pow(2).sum()), rel=1e-10)
    assert np.all(np.diff(info["objective_history"]) <= 1e-12)


def test_first_update_is_inverse_kernel_density():
    K, _ = gaussian_kernel(random_points(30, 3), "median")
    C, info = r2_convex_hull(K, alpha=1e-12, max_iter=1)
    torch.testing.assert_close(r2_scores(C), 1.0 / torch.sqrt(K.shape[0] * K.sum(1)))


@pytest.mark.parametrize("sigma", ["median", 0.5, 1.0])
@pytest.mark.parametrize("alpha,max_iter", [(0.01, 200), (1e-12, 1), (1e-12, 5), (1e-12, 20)])
def test_hull_vertices_score_above_interior_points(sigma, alpha, max_iter):
    K, _ = gaussian_kernel(square_with_interior(), sigma)
    r2 = r2_scores(r2_convex_hull(K, alpha, max_iter)[0])
    assert r2[:4].min() > r2[4:].max()


def test_smaller_alpha_moves_c_towards_the_identity():
    """C = I is the global optimum: the longer R2 runs, the more each column's weight sits on its diagonal."""
    K, _ = gaussian_kernel(random_points(100, 5, seed=2), "median")
    shares, iterations = [], []
    for alpha in [0.5, 1e-2, 1e-3, 1e-6]:
        C, info = r2_convex_hull(K, alpha, max_iter=150)
        shares.append(info["diag_share"])
        iterations.append(info["iterations"])
        assert info["diag_share"] == pytest.approx(float(C.trace() / C.sum()))
    assert iterations == sorted(iterations) and iterations[0] < iterations[-1]
    assert all(a < b for a, b in zip(shares, shares[1:])), shares
    assert shares[-1] > 0.5  # from 1/N = 0.01 at C⁰
    C, _ = r2_convex_hull(K, 1e-6, 150)
    off_diag = C - torch.diag(C.diagonal())
    assert (C.diagonal() > off_diag.max(0).values).all()  # each column's largest entry is its own


def test_r2_runs_in_float64_from_a_float32_kernel():
    K, _ = gaussian_kernel(random_points(20, 3), "median")
    C, _ = r2_convex_hull(K.float(), 0.01, 10)
    assert C.dtype == torch.float64


# --- features and D2 ----------------------------------------------------------------------------------

def test_neuron_features_pick_columns_rows_or_balanced_concatenation():
    w_in, w_out, _, _ = layer(N=10, d=4)
    torch.testing.assert_close(neuron_features(w_in, w_out, "w_out"), w_out.T.double())
    torch.testing.assert_close(neuron_features(w_in, w_out, "w_in"), w_in.double())
    both = neuron_features(w_in, 100.0 * w_out, "both")  # a block 100x larger must not dominate
    assert both.shape == (10, 8)
    for block in (both[:, :4], both[:, 4:]):
        assert float(block.pow(2).sum(1).mean()) == pytest.approx(1.0)
    torch.testing.assert_close(both[:, :4], neuron_features(w_in, w_out, "both")[:, :4])
    with pytest.raises(ValueError):
        neuron_features(w_in.T, w_out, "w_out")


def test_d2_variants():
    w_in, w_out, votes, second_moment = layer()
    assert torch.equal(d2_scores(w_out, votes, None, "votes"), votes.double())
    energy = d2_scores(w_out, None, second_moment, "energy")
    torch.testing.assert_close(energy, second_moment.diagonal().double().sqrt() * w_out.double().norm(dim=0))
    torch.testing.assert_close(d2_energy(second_moment.diagonal(), w_out), energy)
    with pytest.raises(ValueError, match="vote"):
        d2_scores(w_out, None, second_moment, "votes")
    with pytest.raises(ValueError, match="second moment"):
        d2_scores(w_out, votes, None, "energy")


# --- merge --------------------------------------------------------------------------------------------

def test_average_ranks_share_ties():
    assert average_ranks(torch.tensor([3.0, 1.0, 3.0, 2.0])).tolist() == [2.5, 0.0, 2.5, 1.0]


@pytest.mark.parametrize("how", ["rank_sum", "product"])
def test_merge_is_deterministic_and_monotone(how):
    g = torch.Generator().manual_seed(3)
    r2 = torch.rand(50, generator=g, dtype=torch.float64)
    d2 = torch.randint(0, 5, (50,), generator=g).double()  # vote counts: many ties
    r2[7], d2[7] = 2.0, 10.0  # best in both
    scores = merge_ranks(r2, d2, how)
    assert torch.equal(scores, merge_ranks(r2.clone(), d2.clone(), how))
    assert int(scores.argmax()) == 7 and (scores[7] > scores[torch.arange(50) != 7]).all()
    # Pareto dominance never lowers the score (strictly raises it for rank_sum)
    dominates = (r2[:, None] >= r2[None, :]) & (d2[:, None] >= d2[None, :]) & (
        (r2[:, None] > r2[None, :]) | (d2[:, None] > d2[None, :]))
    diff = scores[:, None] - scores[None, :]
    assert (diff[dominates] >= 0).all()
    if how == "rank_sum":
        assert (diff[dominates] > 0).all()
        assert sorted(scores.tolist()) == list(range(50))  # a permutation: no ties left
    else:
        assert scores.min() >= 0 and scores.max() <= 1


def test_rank_sum_ties_break_by_d2_then_index():
    # equal Borda sums: neurons 0 and 1 have (r2, d2) ranks (1, 0) and (0, 1) -> d2 decides
    assert merge_ranks(torch.tensor([2.0, 1.0]), torch.tensor([1.0, 2.0]), "rank_sum").tolist() == [0.0, 1.0]
    # full tie -> the lower index scores lower, as scoring.order_from_scores breaks ties
    assert merge_ranks(torch.ones(3), torch.ones(3), "rank_sum").tolist() == [0.0, 1.0, 2.0]


def test_product_of_constant_factor_keeps_the_other():
    r2 = torch.tensor([0.1, 0.5, 0.3])
    expected = torch.tensor([0.0, 1.0, 0.5], dtype=torch.float64)
    torch.testing.assert_close(merge_ranks(r2, torch.ones(3), "product"), expected)


def test_merge_rejects_nonfinite_and_mismatched():
    with pytest.raises(ValueError):
        merge_ranks(torch.tensor([1.0, float("nan")]), torch.ones(2))
    with pytest.raises(ValueError):
        merge_ranks(torch.ones(3), torch.ones(2))


# --- one layer ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("representation", ["w_out", "w_in", "both"])
@pytest.mark.parametrize("d2", ["votes", "energy"])
@pytest.mark.parametrize("merge", ["rank_sum", "product"])
def test_kcm_scores_for_every_option(representation, d2, merge):
    w_in, w_out, votes, second_moment = layer()
    p = KCM(representation=representation, d2=d2, merge=merge)
    scores, info = kcm_scores(w_in, w_out, votes, second_moment, **p.model_dump())
    assert scores.shape == (48,) and torch.isfinite(scores).all()
    assert info["sigma"] > 0 and 1 <= info["iterations"] <= p.max_iter
    assert np.isfinite(info["objective"]) and info["objective"] >= -1e-9


def test_kcm_scores_fixed_sigma_and_only_the_needed_d2_input():
    w_in, w_out, votes, _ = layer()
    p = KCM(sigma=1.0, alpha=1e-3, max_iter=10)
    scores, info = kcm_scores(w_in, w_out, votes, None, **p.model_dump())
    assert info["sigma"] == 1.0 and info["iterations"] <= 10
    assert torch.isfinite(scores).all()
