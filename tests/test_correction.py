"""Closed-form output-projection correction (pruneflow.correction), on small random float64 data.

It proves: lstsq is exact when the pruned activations are affine functions of the kept ones; the method
families are nested, so the calibration error satisfies lstsq <= rescale <= bias <= none; `error()` computed
from moments equals the empirical mean squared error on the data; streaming moments equal one-shot moments and
`moments_from_dense` equals the moments of (x = a_K, t = W a + b); lstsq with ridge 0 is numpy's least squares
with an intercept column; unknown methods raise.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pruneflow import correction
from pruneflow.correction import METHODS, error, fit, moments_from_dense
from pruneflow.moments import Accumulator, Moments, add_gram


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def activations(T=400, N=12, seed=0) -> torch.Tensor:
    """Correlated, non-centred, non-Gaussian activations (T, N), float64."""
    g = gen(seed)
    z = torch.randn(T, N, generator=g, dtype=torch.float64)
    mix = torch.randn(N, N, generator=g, dtype=torch.float64) / N**0.5 + torch.eye(N, dtype=torch.float64)
    return torch.nn.functional.gelu(z @ mix) + 0.3


def projection(d=6, N=12, seed=1) -> tuple[torch.Tensor, torch.Tensor]:
    g = gen(seed)
    return torch.randn(d, N, generator=g, dtype=torch.float64), torch.randn(d, generator=g, dtype=torch.float64)


def data_moments(a: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Population mean and covariance of rows of a."""
    mu = a.mean(0)
    c = a - mu
    return c.T @ c / a.shape[0], mu


def direct_moments(x: torch.Tensor, t: torch.Tensor) -> Moments:
    mx, mt = x.mean(0), t.mean(0)
    xc, tc = x - mx, t - mt
    T = x.shape[0]
    return Moments(n=T, mean_x=mx, mean_t=mt, cov_xx=xc.T @ xc / T, cov_tx=tc.T @ xc / T,
                   cov_tt_trace=float((tc * tc).sum() / T))


def assert_moments_close(m1: Moments, m2: Moments, rtol=1e-10, atol=1e-12):
    assert m1.n == m2.n
    for f in ("mean_x", "mean_t", "cov_xx", "cov_tx"):
        torch.testing.assert_close(getattr(m1, f), getattr(m2, f), rtol=rtol, atol=atol, msg=lambda m: f"{f}: {m}")
    assert m1.cov_tt_trace == pytest.approx(m2.cov_tt_trace, rel=rtol, abs=atol)


def empirical_error(a, W, b, keep, W_new, b_new) -> float:
    t = a @ W.T + b
    y = a[:, keep] @ W_new.T + (0 if b_new is None else b_new)
    return float(((t - y) ** 2).sum(1).mean())


# --- (a) exactness -------------------------------------------------------------------------------------------

@pytest.mark.parametrize("seed", [0, 1, 2])
def test_lstsq_is_exact_when_pruned_units_are_affine_in_kept_ones(seed):
    T, N = 300, 10
    g = gen(100 + seed)
    perm = torch.randperm(N, generator=g)
    keep, pruned = perm[:6].sort().values, perm[6:].sort().values
    a = torch.zeros(T, N, dtype=torch.float64)
    a[:, keep] = torch.randn(T, 6, generator=g, dtype=torch.float64).relu() + 0.1 * torch.randn(T, 6, generator=g, dtype=torch.float64)
    M = torch.randn(6, 4, generator=g, dtype=torch.float64)
    const = torch.randn(4, generator=g, dtype=torch.float64)
    a[:, pruned] = a[:, keep] @ M + const
    W, b = projection(5, N, seed)
    cov, mean = data_moments(a)
    m = moments_from_dense(cov, mean, W, b, keep, T)
    W_new, b_new = fit("lstsq", m, W[:, keep], b, ridge=0.0)
    err = error(m, W_new, b_new)
    assert abs(err) / m.cov_tt_trace < 1e-8
    assert empirical_error(a, W, b, keep, W_new, b_new) / m.cov_tt_trace < 1e-8
    # and the exact solution is what it should be: W_K + W_P Mᵀ, b + W_P const
    torch.testing.assert_close(W_new, W[:, keep] + W[:, pruned] @ M.T, rtol=1e-7, atol=1e-8)
    torch.testing.assert_close(b_new, b + W[:, pruned] @ const, rtol=1e-7, atol=1e-8)
    # a plain slice is far from exact on the same data
    assert error(m, *fit("none", m, W[:, keep], b)) / m.cov_tt_trace > 1e-2


# --- (b) the families are nested --------------------------------------------------------------------------------

@pytest.mark.parametrize("seed", range(5))
def test_error_order_lstsq_rescale_bias_none(seed):
    a = activations(seed=seed)
    W, b = projection(seed=seed + 10)
    cov, mean = data_moments(a)
    keep = torch.randperm(a.shape[1], generator=gen(seed))[: 3 + seed].sort().values
    m = moments_from_dense(cov, mean, W, b, keep, a.shape[0])
    errs = {}
    for method in ("none", "bias", "rescale", "lstsq"):
        W_new, b_new = fit(method, m, W[:, keep], b, ridge=0.0)
        errs[method] = error(m, W_new, b_new)
        # error() from moments equals the empirical error on the data
        assert errs[method] == pytest.approx(empirical_error(a, W, b, keep, W_new, b_new), rel=1e-9)
    tol = 1e-9 * errs["none"]
    assert errs["lstsq"] <= errs["rescale"] + tol
    assert errs["rescale"] <= errs["bias"] + tol
    assert errs["bias"] <= errs["none"] + tol
    assert errs["lstsq"] < errs["none"]
    # with the default ridge (which pulls rescale toward s = 1) rescale <= bias <= none still holds
    e_bias = error(m, *fit("bias", m, W[:, keep], b))
    e_resc = error(m, *fit("rescale", m, W[:, keep], b))
    assert e_resc <= e_bias + tol and e_bias <= errs["none"] + tol


def test_none_and_bias_keep_the_kept_weights():
    a = activations()
    W, b = projection()
    cov, mean = data_moments(a)
    keep = torch.tensor([0, 3, 4, 9])
    m = moments_from_dense(cov, mean, W, b, keep, a.shape[0])
    W0, b0 = fit("none", m, W[:, keep], b)
    assert torch.equal(W0, W[:, keep]) and torch.equal(b0, b)
    assert fit("none", m, W[:, keep], None)[1] is None
    W1, b1 = fit("bias", m, W[:, keep], b)
    assert torch.equal(W1, W[:, keep])
    # FLAP: the bias absorbs the pruned units' mean contribution
    pruned = torch.tensor([j for j in range(a.shape[1]) if j not in keep.tolist()])
    torch.testing.assert_close(b1, b + W[:, pruned] @ mean[pruned], rtol=1e-10, atol=1e-12)
    # the bias-corrected output is mean-unbiased: shifting b' by δ adds exactly ‖δ‖² to the error
    delta = torch.tensor([0.5, -1.0, 0.0, 2.0, 0.1, -0.3], dtype=torch.float64)
    torch.testing.assert_close(m.mean_t - W1 @ m.mean_x - b1, torch.zeros_like(b1), rtol=0, atol=1e-12)
    assert error(m, W1, b1 + delta) == pytest.approx(error(m, W1, b1) + float(delta @ delta), rel=1e-12)


def test_rescale_is_a_diagonal_rescaling():
    a = activations(seed=3)
    W, b = projection(seed=4)
    cov, mean = data_moments(a)
    keep = torch.tensor([1, 2, 5, 7, 8])
    m = moments_from_dense(cov, mean, W, b, keep, a.shape[0])
    W_new, _ = fit("rescale", m, W[:, keep], b, ridge=1e-3)
    s = W_new[0] / W[0, keep]
    torch.testing.assert_close(W_new, W[:, keep] * s, rtol=1e-10, atol=1e-12)
    # a huge ridge pins s to 1
    W_pin, _ = fit("rescale", m, W[:, keep], b, ridge=1e9)
    torch.testing.assert_close(W_pin, W[:, keep], rtol=1e-6, atol=1e-8)


# --- (c) moments ---------------------------------------------------------------------------------------------------

def dyadic(T: int, n: int, seed: int) -> torch.Tensor:
    """Quarter-integers in [-8, 8]: their float32 products and sums are exact, so any per-batch float32
    arithmetic is exact and streamed moments can be compared with one-shot float64 moments to round-off."""
    return torch.randint(-32, 33, (T, n), generator=gen(seed)).double() / 4


def chunked_and_one_shot(x, t, bounds):
    one = Accumulator()
    one.add(x, t)
    chunked = Accumulator()
    for lo, hi in bounds:
        chunked.add(x[lo:hi], t[lo:hi])
    return chunked.moments(), one.moments()


BOUNDS = ((0, 1), (1, 40), (40, 41), (41, 170), (170, 256))


def test_moment_accumulator_in_chunks_equals_one_shot_float64():
    x = dyadic(256, 4, seed=5) + 1.5
    t = dyadic(256, 3, seed=6)
    chunked, one = chunked_and_one_shot(x, t, BOUNDS)
    # float32 per-batch products (by design): chunking changes only float32 rounding
    assert_moments_close(chunked, one, rtol=1e-5, atol=1e-4)
    assert_moments_close(one, direct_moments(x, t), rtol=1e-5, atol=1e-4)
    for f in ("mean_x", "mean_t", "cov_xx", "cov_tx"):
        assert getattr(one, f).dtype == torch.float64
    f32 = Accumulator()
    f32.add(x.float(), t.float())  # float32 input: the same float64 moments
    assert_moments_close(f32.moments(), one, rtol=1e-13, atol=1e-13)


@pytest.mark.parametrize("K", [191, 400, 777])
def test_blocked_gram_is_the_full_product_and_exactly_symmetric(K):
    """add_gram computes the blocks on and above the diagonal only: on exact (dyadic) data it must equal cᵀc
    entry for entry, whatever the block edges, and on random data be exactly symmetric and equal to cᵀc to
    float32 round-off (on this CPU's MKL it is bit-identical; the pipelines' byte comparisons check that)."""
    c = dyadic(300, K, seed=K).float()
    acc = torch.full((K, K), 0.5, dtype=torch.float64)  # it adds to what is there
    add_gram(acc, c)
    assert torch.equal(acc, 0.5 + (c.double().T @ c.double()))
    r = torch.randn(500, K, generator=gen(K)) + 0.3
    acc = torch.zeros(K, K, dtype=torch.float64)
    add_gram(acc, r)
    assert torch.equal(acc, acc.T)
    torch.testing.assert_close(acc, (r.T @ r).double(), rtol=1e-5, atol=1e-3)


def test_moment_accumulator_on_random_data_agrees_to_float32_precision():
    """Per-batch products are float32 by design (correction.py), summed in float64."""
    a = activations(T=250, N=8, seed=5)
    x = a[:, [0, 2, 3, 6]]
    t = a @ torch.randn(8, 5, generator=gen(6), dtype=torch.float64) + 2.0
    chunked, one = chunked_and_one_shot(x, t, ((0, 1), (1, 40), (40, 41), (41, 170), (170, 250)))
    assert_moments_close(chunked, one, rtol=1e-5, atol=1e-5)
    assert_moments_close(chunked, direct_moments(x, t), rtol=1e-5, atol=1e-5)
    assert_moments_close(one, direct_moments(x, t), rtol=1e-5, atol=1e-5)


def test_moment_accumulator_covariance_survives_an_offset():
    g = gen(9)
    x = 30 + 0.3 * torch.randn(2048, 4, generator=g, dtype=torch.float64)  # mean/std = 100
    acc = Accumulator()
    for lo in range(0, 2048, 256):
        acc.add(x[lo:lo + 256], x[lo:lo + 256, :2])
    C = direct_moments(x, x[:, :2]).cov_xx
    assert float((acc.moments().cov_xx - C).abs().max() / C.abs().max()) < 1e-4


@pytest.mark.parametrize("with_bias", [True, False])
def test_moments_from_dense_equal_direct_moments(with_bias):
    a = activations(T=300, N=10, seed=7)
    W, b = projection(d=4, N=10, seed=8)
    b = b if with_bias else None
    keep = torch.tensor([0, 1, 4, 8])
    cov, mean = data_moments(a)
    m = moments_from_dense(cov.float(), mean.float(), W.float(), None if b is None else b.float(), keep, a.shape[0])
    assert m.cov_xx.dtype == torch.float64
    m = moments_from_dense(cov, mean, W, b, keep, a.shape[0])
    t = a @ W.T + (0 if b is None else b)
    assert_moments_close(m, direct_moments(a[:, keep], t), rtol=1e-9, atol=1e-11)
    acc = Accumulator()
    acc.add(a[:, keep], t)
    assert_moments_close(m, acc.moments(), rtol=1e-5, atol=1e-5)  # float32 per-batch products


def test_moments_from_dense_equal_accumulated_moments_exactly():
    a = dyadic(256, 6, seed=11) + 0.5
    W = dyadic(3, 6, seed=12)
    b = torch.tensor([0.25, -1.0, 2.0], dtype=torch.float64)
    keep = torch.tensor([1, 2, 5])
    cov, mean = data_moments(a)
    m = moments_from_dense(cov, mean, W, b, keep, 256)
    acc = Accumulator()
    for lo in range(0, 256, 64):
        acc.add(a[lo:lo + 64, keep], a[lo:lo + 64] @ W.T + b)
    assert_moments_close(m, acc.moments(), rtol=1e-6, atol=1e-6)


# --- (d) lstsq equals numpy least squares with an intercept ----------------------------------------------------

@pytest.mark.parametrize("seed", [0, 1])
def test_lstsq_ridge0_equals_numpy_lstsq_with_intercept(seed):
    a = activations(T=200, N=9, seed=20 + seed)
    W, b = projection(d=3, N=9, seed=30 + seed)
    keep = torch.tensor([0, 2, 3, 5, 8])
    cov, mean = data_moments(a)
    m = moments_from_dense(cov, mean, W, b, keep, a.shape[0])
    W_new, b_new = fit("lstsq", m, W[:, keep], b, ridge=0.0)
    X = np.hstack([a[:, keep].numpy(), np.ones((a.shape[0], 1))])
    Y = (a @ W.T + b).numpy()
    B, *_ = np.linalg.lstsq(X, Y, rcond=None)
    np.testing.assert_allclose(W_new.numpy(), B[:-1].T, rtol=1e-5, atol=1e-6)  # float32 per-batch products
    np.testing.assert_allclose(b_new.numpy(), B[-1], rtol=1e-4, atol=1e-5)


def test_lstsq_with_streamed_sequential_moments_equals_numpy():
    """The sequential variant: x from a drifted (pruned) model, t from the dense one."""
    x = dyadic(160, 4, seed=40) + 1
    t = x @ dyadic(4, 3, seed=41) + dyadic(160, 3, seed=42) / 8
    acc = Accumulator()
    for lo in range(0, 160, 50):
        acc.add(x[lo:lo + 50], t[lo:lo + 50])
    W_new, b_new = fit("lstsq", acc.moments(), torch.zeros(3, 4, dtype=torch.float64), None, ridge=0.0)
    B, *_ = np.linalg.lstsq(np.hstack([x.numpy(), np.ones((160, 1))]), t.numpy(), rcond=None)
    np.testing.assert_allclose(W_new.numpy(), B[:-1].T, rtol=1e-5, atol=1e-6)  # float32 per-batch products
    np.testing.assert_allclose(b_new.numpy(), B[-1], rtol=1e-4, atol=1e-5)


# --- (e) errors -------------------------------------------------------------------------------------------------------

def test_unknown_method_raises():
    a = activations(T=50, N=4)
    W, b = projection(d=2, N=4)
    cov, mean = data_moments(a)
    m = moments_from_dense(cov, mean, W, b, torch.tensor([0, 1]), 50)
    with pytest.raises(ValueError, match="unknown correction method") as info:
        fit("ols", m, W[:, :2], b)
    for method in METHODS:
        assert method in str(info.value)
    assert correction.METHODS == ("none", "bias", "rescale", "lstsq")


def test_weighted_rows_count_as_repeated_rows():
    """Accumulator.add(weight=w): a row of integer weight w gives the moments of that row repeated w times, for
    the centered and the uncentered moments alike; weight None is the unweighted sum."""
    g = torch.Generator().manual_seed(3)
    x, t = torch.randn(40, 6, generator=g) + 2.0, torch.randn(40, 4, generator=g) - 1.0
    w = torch.randint(1, 5, (40,), generator=g)
    weighted, repeated = Accumulator(), Accumulator()
    for a, b in ((0, 17), (17, 40)):  # in two batches, as the refit streams them
        weighted.add(x[a:b], t[a:b], w[a:b].float())
        repeated.add(x[a:b].repeat_interleave(w[a:b], 0), t[a:b].repeat_interleave(w[a:b], 0))
    mw, mr = weighted.moments(), repeated.moments()
    assert mw.n == pytest.approx(mr.n) == int(w.sum())
    for name in ("mean_x", "mean_t", "cov_xx", "cov_tx", "second_xx", "second_tx"):
        torch.testing.assert_close(getattr(mw, name), getattr(mr, name), rtol=1e-5, atol=1e-5)
    assert mw.cov_tt_trace == pytest.approx(mr.cov_tt_trace, rel=1e-5)
    plain, ones = Accumulator(), Accumulator()
    plain.add(x, t)
    ones.add(x, t, None)
    assert torch.equal(plain.moments().cov_xx, ones.moments().cov_xx)
