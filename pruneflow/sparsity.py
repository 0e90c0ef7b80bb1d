"""Per-Linear-layer weight sparsity (unstructured and N:M): pure functions on tensors (no hooks, no models).

W is a Linear weight [out, in]; H is the [in, in] second moment of its inputs, X Xᵀ / T (the Hessian of the
layer-wise loss ‖(W+ΔW)X − WX‖²_F up to a factor 2, which no update here depends on). Rows are independent,
and a prune mask is boolean with True = pruned. Everything is computed in float64; weights come back in W's
dtype.

Three ways to fill in the pruned weights (METHODS.md §4 and §6):

- Wanda / magnitude: choose the mask from a score, no update (multiply W by ~mask).
- `sparsegpt`: IST-DASLab's single-removal (OBS) sweep: columns left to right, each pruned weight's error fed
  back into the columns to its right through the upper Cholesky factor of H⁻¹, a column frozen once passed.
- `apt`: the multiple-removal problem. For a row w and pruned set Q, min δHδᵀ s.t. (w+δ)_Q = 0 gives
      δ* = −w_Q [(H⁻¹)_QQ]⁻¹ (H⁻¹)_Q,:
  Solved block by block (the pruned set of one column block at a time, H⁻¹ the inverse of H on the columns not
  yet passed, so every unpruned weight still free absorbs the error); `apt_full` solves it for the whole row at
  once, which is the exact optimum for a given mask.
"""

from __future__ import annotations

import torch

# Batched k×k solves are done in row chunks of at most this many matrix entries (≈128 MB in float64).
_SOLVE_BUDGET = 1 << 24


def damp(H: torch.Tensor, percdamp: float = 0.01) -> tuple[torch.Tensor, torch.Tensor]:
    """H + percdamp·mean(diag H)·I in float64, with dead inputs (diag H = 0: the input is always zero) given
    H_ii = 1 first, as SparseGPT does, so that H stays invertible. Returns (H_damped, dead); callers zero the
    weight columns of dead inputs (they never affect the output)."""
    H = H.detach().to(torch.float64).clone()
    diag = H.diagonal()
    dead = diag == 0
    diag[dead] = 1.0
    if H.shape[0]:
        diag += percdamp * float(diag.mean())
    return H, dead


def magnitude_scores(W: torch.Tensor) -> torch.Tensor:
    """|W|: the data-free baseline score (higher = more important)."""
    return W.detach().to(torch.float64).abs()


def wanda_scores(W: torch.Tensor, H: torch.Tensor) -> torch.Tensor:
    """|W_ij| · ‖X_j‖ (Wanda): |W| times sqrt(diag H) broadcast over rows. H may be the [in, in] matrix or just
    its diagonal [in] (Wanda needs nothing else). The 1/T normalisation scales every score alike."""
    h = H.detach().to(torch.float64)
    diag = h.diagonal() if h.dim() == 2 else h
    return magnitude_scores(W) * diag.clamp_min(0).sqrt().unsqueeze(0)


def _lowest(scores: torch.Tensor, k: int, dim: int = -1) -> torch.Tensor:
    """Boolean mask of the k lowest entries along dim (exactly k, ties broken by topk)."""
    mask = torch.zeros_like(scores, dtype=torch.bool)
    if k > 0:
        mask.scatter_(dim, torch.topk(scores, k, dim=dim, largest=False).indices, True)
    return mask


def nm_mask(scores: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """N:M prune mask: in every row, exactly n of each group of m consecutive input columns, the n lowest."""
    rows, cols = scores.shape
    if m <= 0 or not 0 <= n <= m:
        raise ValueError(f"need 0 <= n <= m and m > 0, got {n}:{m}")
    if cols % m:
        raise ValueError(f"in_features {cols} is not a multiple of m = {m}")
    return _lowest(scores.reshape(rows, cols // m, m), n).reshape(rows, cols)


def unstructured_mask(scores: torch.Tensor, sparsity: float, per_row: bool = True) -> torch.Tensor:
    """Prune the ⌊in·sparsity⌋ lowest scores of every row (Wanda's comparison group), or with per_row=False the
    ⌊numel·sparsity⌋ lowest of the whole matrix (the global quantile)."""
    if not 0.0 <= sparsity <= 1.0:
        raise ValueError(f"sparsity must lie in [0, 1], got {sparsity}")
    if per_row:
        return _lowest(scores, int(scores.shape[1] * sparsity))
    return _lowest(scores.flatten(), int(scores.numel() * sparsity)).view(scores.shape)


def _check_target(shape: torch.Size, sparsity: float | None, n: int, m: int, blocksize: int,
                  mask: torch.Tensor | None) -> None:
    if mask is not None:
        if mask.shape != shape or mask.dtype != torch.bool:
            raise ValueError(f"mask must be a bool tensor of shape {tuple(shape)}")
        return
    if n or m:
        if sparsity is not None:
            raise ValueError("give either sparsity (unstructured) or n:m, not both")
        if m <= 0 or not 0 < n <= m:
            raise ValueError(f"need 0 < n <= m, got {n}:{m}")
        if shape[1] % m or blocksize % m:
            raise ValueError(f"in_features {shape[1]} and blocksize {blocksize} must be multiples of m = {m}")
    elif sparsity is None or not 0.0 <= sparsity <= 1.0:
        raise ValueError("give sparsity in [0, 1] (unstructured), n:m, or a mask")


def _inverse(H: torch.Tensor) -> torch.Tensor:
    """H⁻¹ of a symmetric positive definite matrix, via Cholesky."""
    return torch.cholesky_inverse(torch.linalg.cholesky(H))


def sparsegpt(W: torch.Tensor, H: torch.Tensor, sparsity: float | None = None, n: int = 0, m: int = 0,
              blocksize: int = 128, percdamp: float = 0.01,
              mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """SparseGPT's `fasterprune` (METHODS.md §6.1): returns (W_new, mask).

    U = upper Cholesky factor of H⁻¹, so that U[i, i:]·U_ii is row 0 of (H[i:, i:])⁻¹: the OBS update for
    column i with columns < i frozen. Per block of columns: the unstructured mask takes the lowest saliencies
    w²/U_ii² over the whole block (all rows × block columns; exactly ⌊numel·sparsity⌋ of them); N:M chooses,
    at every column i ≡ 0 mod m, the n lowest saliencies among i..i+m−1 per row, on the weights as updated
    so far. Then column by column err = (w − q)/U_ii, W[:, i:] −= err ⊗ U[i, i:] inside the block, and after
    the block the lazy batch update W[:, i2:] −= Err · U[block, i2:]. With `mask` given it is used as is."""
    _check_target(W.shape, sparsity, n, m, blocksize, mask)
    rows, cols = W.shape
    Wd = W.detach().to(torch.float64).clone()
    Hd, dead = damp(H.to(Wd.device), percdamp)
    Wd[:, dead] = 0
    U = torch.linalg.cholesky(_inverse(Hd), upper=True)
    out = torch.zeros(rows, cols, dtype=torch.bool, device=Wd.device)
    for i1 in range(0, cols, blocksize):
        i2 = min(i1 + blocksize, cols)
        W1 = Wd[:, i1:i2].clone()
        U1 = U[i1:i2, i1:i2]
        d = U1.diagonal()
        Err1 = torch.zeros_like(W1)
        if mask is not None:
            mask1 = mask[:, i1:i2].to(Wd.device)
        elif n:
            mask1 = torch.zeros_like(W1, dtype=torch.bool)
        else:
            mask1 = _lowest((W1**2 / d**2).flatten(), int(W1.numel() * sparsity)).view_as(W1)
        for i in range(i2 - i1):
            if mask is None and n and i % m == 0:
                mask1[:, i : i + m] = nm_mask(W1[:, i : i + m] ** 2 / d[i : i + m] ** 2, n, m)
            w = W1[:, i]
            q = torch.where(mask1[:, i], torch.zeros_like(w), w)
            err = (w - q) / d[i]
            W1[:, i:] -= err.unsqueeze(1) * U1[i, i:].unsqueeze(0)
            W1[:, i] = q  # exactly the kept value / exactly zero (the update leaves it equal up to rounding)
            Err1[:, i] = err
        Wd[:, i1:i2] = W1
        Wd[:, i2:] -= Err1 @ U[i1:i2, i2:]
        out[:, i1:i2] = mask1
    return Wd.to(W.dtype), out


def _mrp_delta(W: torch.Tensor, Hinv: torch.Tensor, Q: torch.Tensor) -> torch.Tensor:
    """δ* = −w_Q [(H⁻¹)_QQ]⁻¹ (H⁻¹)_Q,: for every row at once. W: [rows, c]; Hinv: [c, c]; Q: [rows, b] bool
    over the first b columns (b <= c), True = pruned. Returns δ [rows, c] (δ_Q = −w_Q up to rounding).

    Rows prune different numbers k of columns (unstructured), so the k×k systems are padded to the largest k:
    a padding slot gets an identity row/column and a zero right-hand side, so its unknown is 0 and the real
    unknowns solve the row's own system unchanged. One batched solve per row chunk, no Python loop over rows
    or over distinct k; with N:M every row has the same k and nothing is padded."""
    rows, b = Q.shape
    k = Q.sum(1)
    kmax = int(k.max()) if rows else 0
    if kmax == 0:
        return torch.zeros_like(W)
    # A stable argsort of ~Q lists each row's pruned columns first, then (distinct) kept ones as padding.
    idx = torch.argsort((~Q).to(torch.int8), dim=1, stable=True)[:, :kmax]
    valid = torch.arange(kmax, device=W.device).unsqueeze(0) < k.unsqueeze(1)
    both = valid.unsqueeze(2) & valid.unsqueeze(1)
    eye = torch.eye(kmax, dtype=W.dtype, device=W.device)
    coef = torch.zeros(rows, b, dtype=W.dtype, device=W.device)  # w_Q [(H⁻¹)_QQ]⁻¹, scattered back to columns
    chunk = max(1, _SOLVE_BUDGET // (kmax * kmax))
    for r0 in range(0, rows, chunk):
        r = slice(r0, r0 + chunk)
        ix = idx[r]
        A = torch.where(both[r], Hinv[ix.unsqueeze(2), ix.unsqueeze(1)], eye)
        rhs = torch.where(valid[r], torch.gather(W[r], 1, ix), 0.0)
        # A is symmetric positive definite (a principal submatrix of H⁻¹, padded with identity): Cholesky. A
        # batched LU solve (torch.linalg.solve) failed inside MKL (DLASWP) on MiniLM's 1536-wide layers.
        x = torch.cholesky_solve(rhs.unsqueeze(2), torch.linalg.cholesky(A)).squeeze(2)
        coef[r].scatter_(1, ix, x)  # padding slots get x = 0 at columns not in Q
    return -coef @ Hinv[:b, :]


def apt(W: torch.Tensor, H: torch.Tensor, sparsity: float | None = None, n: int = 0, m: int = 0,
        blocksize: int = 128, percdamp: float = 0.01,
        mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """APT's multiple-removal update, blockwise (METHODS.md §4.2–4.3): returns (W_new, mask).

    Columns go left to right in blocks. Hinv is the inverse of H restricted to the columns not yet passed, R.
    In each block the mask is chosen by the surrogate saliency w²/[Hinv]_qq on the current weights (the whole
    block's lowest ⌊numel·sparsity⌋ for unstructured, as SparseGPT; the n lowest of each group of m for N:M),
    unless `mask` is given. Then every row gets δ* = −w_Q[(Hinv)_QQ]⁻¹(Hinv)_Q,: over all of R, the block's
    kept weights are frozen, and Hinv moves on to the remaining columns by the Schur complement
    (H_R'R')⁻¹ = Hinv_R'R' − Hinv_R'B (Hinv_BB)⁻¹ Hinv_BR' (O(b·|R|²) per block, no re-inversion).
    Freezing keeps each step exact: the current weights on R are then the unconstrained optimum given the
    frozen ones, so the block's own problem is solved exactly (with blocksize >= in this is `apt_full`)."""
    _check_target(W.shape, sparsity, n, m, blocksize, mask)
    rows, cols = W.shape
    Wd = W.detach().to(torch.float64).clone()
    Hd, dead = damp(H.to(Wd.device), percdamp)
    Wd[:, dead] = 0
    Hinv = _inverse(Hd)
    out = torch.zeros(rows, cols, dtype=torch.bool, device=Wd.device)
    for i1 in range(0, cols, blocksize):
        i2 = min(i1 + blocksize, cols)
        b = i2 - i1
        if mask is not None:
            mask1 = mask[:, i1:i2].to(Wd.device)
        else:
            saliency = Wd[:, i1:i2] ** 2 / Hinv.diagonal()[:b]
            mask1 = nm_mask(saliency, n, m) if n else \
                _lowest(saliency.flatten(), int(saliency.numel() * sparsity)).view_as(saliency)
        Wd[:, i1:] += _mrp_delta(Wd[:, i1:], Hinv, mask1)
        Wd[:, i1:i2].masked_fill_(mask1, 0.0)
        out[:, i1:i2] = mask1
        if i2 < cols:
            B, C = Hinv[:b, :b], Hinv[:b, b:]
            Hinv = Hinv[b:, b:] - C.T @ torch.linalg.solve(B, C)
            Hinv = (Hinv + Hinv.T) / 2
    return Wd.to(W.dtype), out


def apt_full(W: torch.Tensor, H: torch.Tensor, mask: torch.Tensor, percdamp: float = 0.01) -> torch.Tensor:
    """The exact multiple-removal solution for a given mask over whole rows (no blocks, nothing frozen):
    δ* = −w_Q[(H⁻¹)_QQ]⁻¹(H⁻¹)_Q,: with H damped as everywhere here. It minimises
    tr(ΔW H ΔWᵀ) over all ΔW with (W+ΔW) zero on the mask, so no method beats it on the same mask."""
    _check_target(W.shape, None, 0, 0, 1, mask)
    Wd = W.detach().to(torch.float64).clone()
    Hd, dead = damp(H.to(Wd.device), percdamp)
    Wd[:, dead] = 0
    Wd += _mrp_delta(Wd, _inverse(Hd), mask.to(Wd.device))
    Wd.masked_fill_(mask.to(Wd.device), 0.0)
    return Wd.to(W.dtype)


def reconstruction_error(W: torch.Tensor, W_new: torch.Tensor, H: torch.Tensor) -> float:
    """tr((W_new − W) H (W_new − W)ᵀ): the summed output error per token, E‖ΔW x‖², when H = X Xᵀ / T."""
    D = W_new.detach().to(torch.float64) - W.detach().to(torch.float64)
    return float(torch.einsum("ri,ij,rj->", D, H.detach().to(torch.float64).to(D.device), D))


def refit_cg(W: torch.Tensor, H: torch.Tensor, mask: torch.Tensor, W0: torch.Tensor | None = None,
             percdamp: float = 0.01, max_iters: int = 100, tol: float = 1e-7) -> tuple[torch.Tensor, int]:
    """The same optimum as `apt_full` (the exact multiple-removal solution for a fixed mask), reached by
    Jacobi-preconditioned conjugate gradients on every row at once: min over Z with Z = 0 on the mask of
    tr((Z − W) H (Z − W)ᵀ), i.e. Z_K H_KK = (W H)_K per row. Each iteration is one [rows, in] × [in, in]
    matmul (BLAS-3), against one k×k Cholesky per row for the direct solve (k ≈ in/2 at 50%): on a 1536-wide
    layer the direct solve costs ~50× SparseGPT, CG from SparseGPT's weights a few iterations.

    Warm-started from W0 (e.g. SparseGPT's result on the same mask), CG decreases the objective monotonically,
    so the result is never worse than W0. Stops when every row's residual is below `tol` relative to ‖(W H)_K‖,
    or after max_iters. Returns (W_new, iterations)."""
    _check_target(W.shape, None, 0, 0, 1, mask)
    Wd = W.detach().to(torch.float64)
    Hd, dead = damp(H.to(Wd.device), percdamp)
    free = ~mask.to(Wd.device)
    free[:, dead] = False  # a dead input (never active) is pruned by every method here: its weight is zeroed
    Wd = Wd.masked_fill(torch.zeros_like(free).index_fill_(1, torch.nonzero(dead).flatten(), True), 0.0)
    Z = (W0.detach().to(torch.float64).clone() if W0 is not None else Wd.clone()).masked_fill(~free, 0.0)
    d = Hd.diagonal().clamp_min(1e-30)
    b = (Wd @ Hd).masked_fill(~free, 0.0)
    r = b - (Z @ Hd).masked_fill(~free, 0.0)
    y = r / d
    p = y.clone()
    rs = (r * y).sum(1)
    b_norm = b.norm(dim=1).clamp_min(1e-30)
    it = 0
    while it < max_iters and bool((r.norm(dim=1) / b_norm > tol).any()):
        Ap = (p @ Hd).masked_fill(~free, 0.0)
        pAp = (p * Ap).sum(1)
        alpha = torch.where(pAp > 0, rs / pAp.clamp_min(1e-300), torch.zeros_like(rs))
        Z += alpha.unsqueeze(1) * p
        r -= alpha.unsqueeze(1) * Ap
        y = r / d
        rs_new = (r * y).sum(1)
        beta = torch.where(rs > 0, rs_new / rs.clamp_min(1e-300), torch.zeros_like(rs))
        p = y + beta.unsqueeze(1) * p
        rs = rs_new
        it += 1
    return Z.masked_fill(~free, 0.0).to(W.dtype), it
