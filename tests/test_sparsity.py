"""Weight sparsity (pruneflow.sparsity) on tiny random float64 layers.

It proves: `apt_full` is the constrained least-squares optimum (brute-force lstsq per row, damped and not);
blocked `apt` equals a naive re-inverting reference, equals `apt_full` with one block, and on SparseGPT's own
mask its error lies between `apt_full` and SparseGPT's (unstructured 50%, 2:4, 4:8); N:M and unstructured
masks prune exactly what they should (pruned weights exactly zero); with H = I nothing but masking is
possible and Wanda = magnitude; dead inputs give no NaN and zero columns; `sparsegpt` (Cholesky factor, lazy
batch updates) equals a plain column-by-column OBS loop with explicit inverses.
"""

from __future__ import annotations

import pytest
import torch

from pruneflow import sparsity as sparsity_module
from pruneflow.sparsity import (
    apt, apt_full, damp, magnitude_scores, nm_mask, reconstruction_error, refit_cg, sparsegpt, unstructured_mask,
    wanda_scores,
)

F64 = torch.float64


pytestmark = pytest.mark.usefixtures("one_thread")


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def layer(seed: int, rows: int = 16, cols: int = 32, T: int = 96) -> tuple[torch.Tensor, torch.Tensor]:
    """W [rows, cols] and calibration inputs X [cols, T] with correlated features (so updates matter)."""
    g = gen(seed)
    A = torch.eye(cols, dtype=F64) + 0.3 * torch.randn(cols, cols, generator=g, dtype=F64)
    X = A @ torch.randn(cols, T, generator=g, dtype=F64)
    return torch.randn(rows, cols, generator=g, dtype=F64), X


def second_moment(X: torch.Tensor) -> torch.Tensor:
    return X @ X.T / X.shape[1]


def random_mask(rows: int, cols: int, seed: int) -> torch.Tensor:
    """Rows with different numbers of pruned columns, including none and nearly all."""
    g = gen(seed)
    frac = torch.linspace(0.0, 0.9, rows).unsqueeze(1)
    mask = torch.rand(rows, cols, generator=g, dtype=F64) < frac
    mask[-1, : cols - 1] = True
    return mask


def check_nm(mask: torch.Tensor, n: int, m: int) -> None:
    assert (mask.view(mask.shape[0], -1, m).sum(-1) == n).all()


# 1 ---------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("percdamp", [0.0, 0.01])
def test_apt_full_is_constrained_least_squares(percdamp, monkeypatch):
    W, X = layer(1, rows=7, cols=20, T=60)
    H = second_moment(X)
    mask = random_mask(7, 20, seed=2)
    lam = percdamp * float(H.diagonal().mean())
    Xa = torch.cat([X / X.shape[1] ** 0.5, lam**0.5 * torch.eye(20, dtype=F64)], 1)  # Xa Xaᵀ = H + λI
    ref = torch.zeros_like(W)
    for r in range(7):
        free = ~mask[r]
        if free.any():  # min ‖v_F Xa_F − w Xa‖ over the unpruned weights v_F; the pruned ones are 0
            sol = torch.linalg.lstsq(Xa[free].T, (W[r] @ Xa).unsqueeze(1)).solution.squeeze(1)
            ref[r, free] = sol
    out = apt_full(W, H, mask, percdamp=percdamp)
    assert torch.allclose(out, ref, atol=1e-8, rtol=0)
    assert (out[mask] == 0).all()
    assert (out[0] == W[0]).all()  # a row with nothing pruned is untouched
    monkeypatch.setattr(sparsity_module, "_SOLVE_BUDGET", 500)  # the batched solves in row chunks of 1–2 rows
    assert torch.allclose(apt_full(W, H, mask, percdamp=percdamp), ref, atol=1e-8, rtol=0)


# 2 ---------------------------------------------------------------------------------------------------------

def naive_apt(W: torch.Tensor, H: torch.Tensor, mask: torch.Tensor, blocksize: int) -> torch.Tensor:
    """Blocked APT with every inverse computed afresh: (H_RR)⁻¹ on the columns not yet passed, one row at a time."""
    Hd, _ = damp(H)
    W = W.clone()
    cols = W.shape[1]
    for i1 in range(0, cols, blocksize):
        Hinv = torch.linalg.inv(Hd[i1:, i1:])
        for r in range(W.shape[0]):
            Q = torch.nonzero(mask[r, i1 : i1 + blocksize]).flatten()
            if len(Q):
                w = W[r, i1:]
                W[r, i1:] = w - torch.linalg.solve(Hinv[Q][:, Q], w[Q]) @ Hinv[Q, :]
    return W


@pytest.mark.parametrize("target", [dict(sparsity=0.5), dict(n=2, m=4), dict(n=4, m=8)])
def test_apt_beats_sparsegpt_on_the_same_mask(target):
    W, X = layer(3)
    H = second_moment(X)
    Hd, _ = damp(H)  # the objective every method minimises
    Ws, mask = sparsegpt(W, H, blocksize=8, **target)
    Wa, mask_a = apt(W, H, blocksize=8, mask=mask)
    Wf = apt_full(W, H, mask)
    assert torch.equal(mask_a, mask)
    assert torch.allclose(Wa, naive_apt(W, H, mask, 8), atol=1e-9, rtol=0)  # the Schur updates are exact
    es, ea, ef = (reconstruction_error(W, x, Hd) for x in (Ws, Wa, Wf))
    plain = reconstruction_error(W, W * ~mask, Hd)
    assert ef <= ea * (1 + 1e-12) and ea < es < plain
    # One block = nothing frozen: blocked APT is then the exact solution, and beats SparseGPT at any blocksize.
    assert torch.allclose(apt(W, H, blocksize=32, mask=mask)[0], Wf, atol=1e-10, rtol=0)


def test_blocked_apt_beats_sparsegpt_over_seeds():
    """Blocked APT is not guaranteed to beat SparseGPT on every layer (both freeze passed columns, differently);
    on random layers it wins in total and on most of them."""
    wins, total_s, total_a = 0, 0.0, 0.0
    for seed in range(10, 20):
        W, X = layer(seed)
        H = second_moment(X)
        Hd, _ = damp(H)
        Ws, mask = sparsegpt(W, H, sparsity=0.5, blocksize=8)
        es, ea = reconstruction_error(W, Ws, Hd), reconstruction_error(W, apt(W, H, blocksize=8, mask=mask)[0], Hd)
        wins += ea < es
        total_s, total_a = total_s + es, total_a + ea
    assert wins >= 8 and total_a < 0.97 * total_s


# 3 ---------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("n,m", [(2, 4), (4, 8), (1, 4)])
def test_nm_masks_valid(n, m):
    W, X = layer(4)
    H = second_moment(X)
    scores = wanda_scores(W, H)
    mask = nm_mask(scores, n, m)
    check_nm(mask, n, m)
    s = scores.view(16, -1, m)
    g = mask.view(16, -1, m)
    pruned_max = torch.where(g, s, -torch.inf).amax(-1)
    kept_min = torch.where(g, torch.inf, s).amin(-1)
    assert (pruned_max <= kept_min).all()  # the n lowest of every group
    for method in (sparsegpt, apt):
        Wn, mk = method(W, H, n=n, m=m, blocksize=16)
        check_nm(mk, n, m)
        assert (Wn[mk] == 0).all() and (Wn[~mk] != 0).all()
    # APT's own choice in a single block: the lowest surrogate saliencies w²/[H⁻¹]_qq of each group
    Hd, _ = damp(H)
    assert torch.equal(apt(W, H, n=n, m=m, blocksize=32)[1], nm_mask(W**2 / torch.linalg.inv(Hd).diagonal(), n, m))
    with pytest.raises(ValueError):
        nm_mask(torch.rand(4, 30), 2, 4)
    with pytest.raises(ValueError):
        sparsegpt(W, H, n=2, m=4, blocksize=6)  # groups would straddle blocks


# 4 ---------------------------------------------------------------------------------------------------------

def test_unstructured_sparsity_exact():
    g = gen(5)
    for scores in (torch.rand(10, 30, generator=g, dtype=F64),
                   torch.randint(0, 3, (10, 30), generator=g).to(F64)):  # heavy ties
        mask = unstructured_mask(scores, 0.37)
        assert (mask.sum(1) == int(30 * 0.37)).all()
        assert (torch.where(mask, scores, -torch.inf).amax(1) <= torch.where(mask, torch.inf, scores).amin(1)).all()
        mask = unstructured_mask(scores, 0.37, per_row=False)
        assert abs(int(mask.sum()) - 300 * 0.37) < 1
        assert scores[mask].max() <= scores[~mask].min()
        assert mask.sum(1).unique().numel() > 1 or scores.unique().numel() <= 3  # the global cut is not per row
    W, X = layer(6)
    for method in (sparsegpt, apt):  # whole-block quantile: exactly ⌊rows·block·s⌋ per block
        Wn, mk = method(W, second_moment(X), sparsity=0.3, blocksize=8)
        assert [int(mk[:, i : i + 8].sum()) for i in range(0, 32, 8)] == [int(16 * 8 * 0.3)] * 4
        assert (Wn[mk] == 0).all()
    Hd, _ = damp(second_moment(X))
    saliency = W**2 / torch.linalg.inv(Hd).diagonal()
    assert torch.equal(apt(W, second_moment(X), sparsity=0.3, blocksize=32)[1],
                       unstructured_mask(saliency, 0.3, per_row=False))


# 5 ---------------------------------------------------------------------------------------------------------

def test_identity_hessian_is_plain_masking():
    W, _ = layer(7)
    W32 = W.float()
    eye = torch.eye(32, dtype=F64)
    mask = unstructured_mask(magnitude_scores(W), 0.5)
    for out in (sparsegpt(W32, eye, mask=mask, blocksize=8)[0], apt(W32, eye, mask=mask, blocksize=8)[0],
                apt_full(W32, eye, mask)):
        assert out.dtype == torch.float32
        assert torch.equal(out, W32 * ~mask)
    assert torch.equal(wanda_scores(W, eye), magnitude_scores(W))
    X = layer(7)[1]
    assert torch.allclose(wanda_scores(W, second_moment(X)), W.abs() * X.norm(dim=1) / X.shape[1] ** 0.5)
    assert torch.equal(wanda_scores(W, torch.ones(32, dtype=F64)), magnitude_scores(W))
    # and a layer with correlated inputs does get an update
    assert not torch.equal(sparsegpt(W, second_moment(layer(7)[1]), mask=mask, blocksize=8)[0], W * ~mask)


# 6 ---------------------------------------------------------------------------------------------------------

def test_dead_inputs():
    W, X = layer(8)
    dead = torch.zeros(32, dtype=torch.bool)
    dead[[3, 17, 30]] = True
    X[dead] = 0
    H = second_moment(X)
    Hd, found = damp(H)
    assert torch.equal(found, dead) and (Hd.diagonal() > 0).all()
    lam = 0.01 * float((H.diagonal() + dead).mean())
    assert torch.allclose(Hd, H + torch.diag(dead.to(F64)) + lam * torch.eye(32, dtype=F64))
    outs = [sparsegpt(W, H, sparsity=0.5, blocksize=8), sparsegpt(W, H, n=2, m=4, blocksize=8),
            apt(W, H, sparsity=0.5, blocksize=8), apt(W, H, n=2, m=4, blocksize=8)]
    outs.append((apt_full(W, H, outs[0][1]), outs[0][1]))
    for Wn, mk in outs:
        assert torch.isfinite(Wn).all()
        assert (Wn[:, dead] == 0).all() and (Wn[mk] == 0).all()
    s = wanda_scores(W, H)
    assert torch.isfinite(s).all() and (s[:, dead] == 0).all()


# 7 ---------------------------------------------------------------------------------------------------------

def reference_sparsegpt(W, H, sparsity=None, n=0, m=0, blocksize=8):
    """METHODS.md §6.1 without the tricks: for column i, the OBS row of (H[i:, i:])⁻¹ by explicit inversion,
    the update applied to the whole rest of W at once (no lazy batches)."""
    Hd, _ = damp(H)
    W = W.clone()
    rows, cols = W.shape
    inv_rows = [torch.linalg.inv(Hd[i:, i:])[0] for i in range(cols)]  # row 0 of each trailing inverse
    d2 = torch.stack([r[0] for r in inv_rows])  # = U_ii² of the Cholesky factor
    mask = torch.zeros(rows, cols, dtype=torch.bool)
    for i1 in range(0, cols, blocksize):
        if not n:
            sal = (W[:, i1 : i1 + blocksize] ** 2 / d2[i1 : i1 + blocksize]).flatten()
            k = int(sal.numel() * sparsity)
            block = torch.zeros(sal.numel(), dtype=torch.bool)
            block[torch.argsort(sal)[:k]] = True
            mask[:, i1 : i1 + blocksize] = block.view(rows, -1)
        for i in range(i1, min(i1 + blocksize, cols)):
            if n and i % m == 0:
                sal = W[:, i : i + m] ** 2 / d2[i : i + m]
                low = torch.argsort(sal, dim=1)[:, :n]
                mask[torch.arange(rows).unsqueeze(1), i + low] = True
            w = W[:, i].clone()
            q = torch.where(mask[:, i], 0.0, w)
            W[:, i:] -= torch.outer((w - q) / d2[i], inv_rows[i])
            W[:, i] = q
    return W, mask


@pytest.mark.parametrize("target", [dict(sparsity=0.5), dict(n=2, m=4)])
def test_sparsegpt_matches_plain_loop(target):
    W, X = layer(9, rows=12, cols=32)
    H = second_moment(X)
    ref_W, ref_mask = reference_sparsegpt(W, H, blocksize=8, **target)
    out_W, out_mask = sparsegpt(W, H, blocksize=8, **target)
    assert torch.equal(out_mask, ref_mask)
    assert torch.allclose(out_W, ref_W, atol=1e-10, rtol=0)
    given_W, _ = sparsegpt(W, H, blocksize=16, mask=ref_mask)  # a given mask: the blocksize does not matter
    assert torch.allclose(given_W, ref_W, atol=1e-10, rtol=0)


# 8 ---------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("target", [dict(sparsity=0.5), dict(n=2, m=4)])
def test_refit_cg_reaches_the_exact_solution_and_never_loses_to_its_start(target):
    """Conjugate gradients over all rows at once converge to apt_full's exact multiple-removal solution, and
    from SparseGPT's weights every iterate is at least as good as SparseGPT (CG is monotone on the objective)."""
    W, X = layer(11, rows=24, cols=48, T=200)
    H = second_moment(X)
    X[5] = 0  # one dead input
    H_dead = second_moment(X)
    for Hm in (H, H_dead):
        Hd, _ = damp(Hm)
        Ws, mask = sparsegpt(W, Hm, blocksize=8, **target)
        exact = apt_full(W, Hm, mask)
        got, iters = refit_cg(W, Hm, mask, Ws, max_iters=500, tol=1e-12)
        assert torch.allclose(got, exact, atol=1e-8, rtol=0) and iters < 500
        assert (got[mask] == 0).all()
        es = reconstruction_error(W, Ws, Hd)
        previous = es
        for k in (1, 2, 4, 8):
            err = reconstruction_error(W, refit_cg(W, Hm, mask, Ws, max_iters=k, tol=0.0)[0], Hd)
            assert err <= previous * (1 + 1e-12)
            previous = err
        assert reconstruction_error(W, exact, Hd) <= previous * (1 + 1e-12) and previous < es
