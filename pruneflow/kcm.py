"""KCM's R2D2 neuron ranking (Nova, Dai, Schuurmans, ICML 2023), as far as it can be reconstructed.

Tags: [C-paper] the paper's abstract, [S] secondary sources (the first author's
talk, a review quoting Fig. 1), [C-code, unofficial] the reimplementation `wazenmai/retraining-free-pruning`
(`prune/kcm.py`), [I] our reconstruction, [U] unknown. The paper body was not available, so only the outline is
confirmed; every choice below is a parameter (`rank.kcm.*`, the fields of `pruneflow.methods.kcm.KCM`).

- [C-paper] Gradient-free structured pruning from the fine-tuned weights plus unlabeled data, no retraining.
- [S] R2D2 combines two *ranks* of each layer's FFN neurons: R2 ("representative ranking", from the weights only,
  via a kernelized convex-hull approximation) and D2 ("data-driven", majority voting over activations).
- [C-code, unofficial] R2 details: φ_j = column j of the FFN output weight, K_ij = exp(−‖φ_i − φ_j‖²/σ²) (no 2),
  min_{C≥0} ‖Φ − ΦC‖² by C ← C ⊙ sqrt(K ⊘ KC) from C = 11ᵀ/N, stop when |Σ ΔC| / Σ|C| < α, score C_jj.
  Merge by the product of normalised scores.
- [I] The median-distance bandwidth, the w_in / both representations, the two formalisations of D2 and the
  Borda rank sum.

Caveat (why α and σ matter). For distinct points the Gaussian K is positive definite, so the objective is strictly
convex and C = I is its unique minimiser: run long enough, every neuron's self-weight goes to 1 and R2 ranks
nothing. The ranking is therefore an early-stopping artefact, set by α and σ. Note also that the stopping test
measures the change of C's *total mass*, not of its entries. From C⁰ = 11ᵀ/N the first update gives exactly
C¹_jj = 1/sqrt(N·Σ_k K_jk), an inverse kernel density, and the mass changes little on the first step. On random
MiniLM-sized weights it changed by 6e-4, so α = 0.01 stops after that one step and R2 scores inverse density.

Everything is a pure function of tensors; it runs on the inputs' device, in float64. float16 would underflow the
kernel, and the objective tr(K) − 2tr(KC) + tr(CᵀKC) cancels badly in float32 once it is small.
"""

from __future__ import annotations

from typing import Literal

import torch

Representation = Literal["w_out", "w_in", "both"]


# --- R2: weights only ---------------------------------------------------------------------------------

def neuron_features(w_in: torch.Tensor, w_out: torch.Tensor, representation: Representation = "w_out") -> torch.Tensor:
    """φ_j for each FFN neuron j, as rows of an [N, f] float64 matrix.

    w_in: [N, d], the first FFN linear's weight (row j feeds neuron j). w_out: [d, N], the second one's weight
    (column j is what neuron j writes).
    - "w_out" (default) [C-code, unofficial]: φ_j = w_out[:, j]. The paper's choice is [U].
    - "w_in" [I]: φ_j = w_in[j]. The bias b1_j is left out [I].
    - "both" [I]: [w_out[:, j] / s_out, w_in[j] / s_in], where each s is that block's RMS row norm.
      Squared distances add over the two blocks, so without rescaling the block with the larger weights alone
      would set the kernel. One scalar per block keeps the relative norms inside a block: large-norm neurons
      are the ones on the hull. Scaling each row to unit norm would erase them. With this scaling a fixed σ is
      in units of an average row norm, so use sigma="median" with "both".
    """
    N = w_out.shape[1]
    if w_in.shape != (N, w_out.shape[0]):
        raise ValueError(f"w_in must be [N, d] = {[N, w_out.shape[0]]} to match w_out [d, N]; got {list(w_in.shape)}")
    out_rows = w_out.detach().T.double()
    in_rows = w_in.detach().double()
    if representation == "w_out":
        return out_rows.contiguous()
    if representation == "w_in":
        return in_rows.contiguous()
    if representation == "both":
        def unit_rms(rows: torch.Tensor) -> torch.Tensor:
            return rows / rows.pow(2).sum(1).mean().sqrt().clamp_min(torch.finfo(rows.dtype).tiny)
        return torch.cat([unit_rms(out_rows), unit_rms(in_rows)], dim=1)
    raise ValueError(f"representation must be 'w_out', 'w_in' or 'both'; got {representation!r}")


def pairwise_sq_distances(phi: torch.Tensor) -> torch.Tensor:
    """‖φ_i − φ_j‖² in float64: exactly symmetric, zero diagonal, no negatives from cancellation."""
    phi = phi.double()
    sq_norms = phi.pow(2).sum(1)
    d2 = (sq_norms[:, None] + sq_norms[None, :] - 2.0 * (phi @ phi.T)).clamp_min(0)
    d2 = 0.5 * (d2 + d2.T)  # BLAS may sum (i, j) and (j, i) in different orders
    d2.fill_diagonal_(0)
    return d2


def median_pairwise_distance(sq_dist: torch.Tensor) -> float:
    """Median of the off-diagonal distances (not squared), over each unordered pair once.

    The median of all ordered pairs is the same, since each distance appears twice. An even count takes the mean of
    the two middle values, as numpy does. torch.median would return the lower one.
    """
    N = sq_dist.shape[0]
    if N < 2:
        raise ValueError("the median heuristic needs at least two neurons")
    iu = torch.triu_indices(N, N, offset=1, device=sq_dist.device)
    dist = sq_dist[iu[0], iu[1]].sqrt().sort().values
    m = dist.numel() // 2
    median = dist[m] if dist.numel() % 2 else 0.5 * (dist[m - 1] + dist[m])
    return float(median)


def gaussian_kernel(phi: torch.Tensor, sigma: float | Literal["median"] = "median") -> tuple[torch.Tensor, float]:
    """K_ij = exp(−‖φ_i − φ_j‖² / σ²), float64 [N, N], symmetric with unit diagonal; returns (K, σ used).

    No factor 2 in the exponent [C-code, unofficial]. That code's default is σ = 1.0 on raw weights. The paper's
    bandwidth is [U].
    sigma="median" [I]: σ = median off-diagonal pairwise *distance* (σ itself, not σ²). A pair at the median
    distance then gets e^{-1}. This makes R2 invariant to the weights' overall scale.
    """
    sq_dist = pairwise_sq_distances(phi)
    sigma_used = median_pairwise_distance(sq_dist) if sigma == "median" else float(sigma)
    if not sigma_used > 0:
        raise ValueError(f"sigma must be > 0 (got {sigma_used}; identical neuron features give a zero median)")
    return torch.exp(-sq_dist / sigma_used**2), sigma_used


def hull_objective(K: torch.Tensor, C: torch.Tensor, KC: torch.Tensor) -> float:
    """‖Φ − ΦC‖²_F = tr(K) − 2tr(KC) + tr(CᵀKC), from the KC the update computes anyway."""
    return float(K.diagonal().sum() - 2.0 * KC.diagonal().sum() + (C * KC).sum())


def r2_convex_hull(K: torch.Tensor, alpha: float = 0.01, max_iter: int = 200) -> tuple[torch.Tensor, dict]:
    """Kernel convex-hull approximation min_{C≥0} ‖Φ − ΦC‖²_F by multiplicative updates; returns (C, info).

    [C-code, unofficial] C⁰ = 11ᵀ/N, then C ← C ⊙ sqrt(K ⊘ KC). This is Ding, Li & Jordan's convex-NMF update with
    the second factor fixed to I. For K ≥ 0 elementwise it keeps C ≥ 0 and never increases the objective.
    After each update it stops when |Σ(C_new − C)| / Σ|C| < alpha, or after max_iter updates. At least one update
    is always made, as in that code. No column-sum (simplex) constraint: whether the paper has one is [U].

    The division is guarded only against 0/0 (ε = the dtype's smallest normal): (KC)_ij ≥ K_ii·C_ij = C_ij, so
    the denominator is 0 only where C_ij has underflowed, and the entry stays 0. A larger ε would bias the update.

    Caveat: C = I is the global optimum, so the result depends on alpha (see the module docstring).
    info: iterations (updates made), converged (stopped by alpha rather than max_iter), objective (final),
    objective_history (iterations + 1 values, from C⁰ to the returned C), diag_share (tr C / ΣC: 1/N at C⁰ and
    1 at the identity).
    """
    N = K.shape[0]
    if K.shape != (N, N):
        raise ValueError(f"K must be square; got {list(K.shape)}")
    if (K < 0).any():
        raise ValueError("the multiplicative update needs an elementwise non-negative kernel")
    K = K.double()
    eps = torch.finfo(K.dtype).tiny
    C = torch.full_like(K, 1.0 / N)
    history: list[float] = []
    converged = False
    iterations = 0
    while iterations < max_iter:
        KC = K @ C
        history.append(hull_objective(K, C, KC))
        C_new = C * torch.sqrt(K / (KC + eps))
        rel_change = float((C_new - C).sum().abs() / C.abs().sum())
        C = C_new
        iterations += 1
        if rel_change < alpha:
            converged = True
            break
    history.append(hull_objective(K, C, K @ C))
    info = {
        "iterations": iterations,
        "converged": converged,
        "objective": history[-1],
        "objective_history": history,
        "diag_share": float(C.diagonal().sum() / C.sum()),
    }
    return C, info


def r2_scores(C: torch.Tensor) -> torch.Tensor:
    """r_j = C_jj [C-code, unofficial]: the self-weight a neuron keeps after early stopping.

    A point that the others cannot reconstruct, such as a hull vertex or an isolated point, keeps a large
    self-weight. Interior points are explained by their neighbours.
    """
    return C.diagonal().double().clone()


# --- D2: data -----------------------------------------------------------------------------------------

def d2_votes(votes: torch.Tensor) -> torch.Tensor:
    """Majority voting [S], formalised [I]: how many tokens put neuron j in their top-k of |a_j|·‖w2_j‖.

    The counts come from the collect stage (`pruneflow.stats`, non-pad tokens, k = ceil(vote_topk · N)). Raw
    counts and vote fractions rank alike.
    """
    if votes.dim() != 1:
        raise ValueError(f"votes must be a [N] vector of counts; got {list(votes.shape)}")
    return votes.double()


def d2_energy(second_moment: torch.Tensor, w_out: torch.Tensor) -> torch.Tensor:
    """sqrt(E[a_j²]) · ‖w2_j‖ [I]: the RMS of what neuron j adds to the output.

    The unofficial code's D2 is the activations' L2 norm alone [C-code, unofficial]. This variant weights it
    by ‖w2_j‖, so it measures the neuron's contribution to the output. second_moment is the diagonal of E[aaᵀ]
    [N]; a full [N, N] matrix is also accepted and its diagonal used. A sum over tokens instead of a mean ranks
    alike.
    """
    diag = second_moment.diagonal() if second_moment.dim() == 2 else second_moment
    if diag.shape != (w_out.shape[1],):
        raise ValueError(f"second_moment must have N = {w_out.shape[1]} entries; got {list(second_moment.shape)}")
    return diag.double().clamp_min(0).sqrt() * w_out.detach().double().norm(dim=0)


def d2_scores(w_out: torch.Tensor, votes: torch.Tensor | None, second_moment: torch.Tensor | None,
              kind: Literal["votes", "energy"] = "votes") -> torch.Tensor:
    """Dispatch to d2_votes or d2_energy; only the input the chosen kind needs may be None."""
    if kind == "votes":
        if votes is None:
            raise ValueError("d2='votes' needs the vote counts from the collect stage")
        return d2_votes(votes)
    if kind == "energy":
        if second_moment is None:
            raise ValueError("d2='energy' needs the activation second moment from the collect stage")
        return d2_energy(second_moment, w_out)
    raise ValueError(f"d2 must be 'votes' or 'energy'; got {kind!r}")


# --- merge --------------------------------------------------------------------------------------------

def average_ranks(x: torch.Tensor) -> torch.Tensor:
    """0-based ascending ranks, tied values sharing the mean of their positions (so ties favour no one)."""
    _, inverse, counts = torch.unique(x, sorted=True, return_inverse=True, return_counts=True)
    first = torch.cumsum(counts, 0) - counts
    return (first + (counts - 1) / 2.0).double()[inverse]


def min_max(x: torch.Tensor) -> torch.Tensor:
    """Scale to [0, 1]; a constant vector gives all ones, so it drops out of a product instead of zeroing it."""
    lo, hi = x.min(), x.max()
    return torch.ones_like(x) if hi == lo else (x - lo) / (hi - lo)


def merge_ranks(r2: torch.Tensor, d2: torch.Tensor, how: Literal["rank_sum", "product"] = "rank_sum") -> torch.Tensor:
    """One importance per neuron, higher = more important, float64 [N].

    [S]: R2D2 merges *ranks*, then sorts. The formula is [I].
    - "rank_sum" (Borda) [I]: b_j = rank_R2(j) + rank_D2(j), with average ranks for ties. The neurons are then
      ordered by (b, d2, index) and scored by position 0..N−1, so every score is distinct and repeatable. On a
      full tie the lower index gets the lower score, as `scoring.order_from_scores` breaks ties.
    - "product" [C-code, unofficial]: min_max(r2) · min_max(d2) within the layer. That code z-scores D2 by
      default; min-max keeps the product's factors non-negative. Ties are possible: every neuron with the lowest
      score on one factor gets 0.
    """
    r2, d2 = r2.double(), d2.double()
    if r2.shape != d2.shape or r2.dim() != 1:
        raise ValueError(f"r2 and d2 must be [N] vectors of one length; got {list(r2.shape)} and {list(d2.shape)}")
    if not (torch.isfinite(r2).all() and torch.isfinite(d2).all()):
        raise ValueError("r2 and d2 must be finite")
    if how == "product":
        return min_max(r2) * min_max(d2)
    if how == "rank_sum":
        borda = average_ranks(r2) + average_ranks(d2)
        order = torch.arange(r2.numel(), device=r2.device)  # stable sorts, least significant key first
        order = order[torch.sort(d2[order], stable=True).indices]
        order = order[torch.sort(borda[order], stable=True).indices]
        scores = torch.empty_like(r2)
        scores[order] = torch.arange(r2.numel(), device=r2.device, dtype=r2.dtype)
        return scores
    raise ValueError(f"merge must be 'rank_sum' or 'product'; got {how!r}")


# --- one layer ----------------------------------------------------------------------------------------

def kcm_scores(w_in: torch.Tensor, w_out: torch.Tensor, votes: torch.Tensor | None,
               second_moment: torch.Tensor | None, representation: Representation = "w_out",
               sigma: float | Literal["median"] = "median", alpha: float = 0.01, max_iter: int = 200,
               d2: Literal["votes", "energy"] = "votes", merge: Literal["rank_sum", "product"] = "rank_sum"
               ) -> tuple[torch.Tensor, dict]:
    """R2D2 for one FFN layer: (scores [N] float64, higher = more important, info).

    The steps are neuron_features → gaussian_kernel → r2_convex_hull → r2_scores, then d2_scores, then
    merge_ranks. The votes are counted by the collect stage, with its own collect.vote_topk.
    info: sigma (the one used), iterations, converged, objective (final ‖Φ − ΦC‖²), diag_share (see
    r2_convex_hull).
    """
    phi = neuron_features(w_in, w_out, representation)
    K, sigma_used = gaussian_kernel(phi, sigma)
    C, hull = r2_convex_hull(K, alpha, max_iter)
    r2 = r2_scores(C)
    d2_score = d2_scores(w_out, votes, second_moment, d2).to(r2.device)
    scores = merge_ranks(r2, d2_score, merge)
    info = {"sigma": sigma_used, "iterations": hull["iterations"], "converged": hull["converged"],
            "objective": hull["objective"], "diag_share": hull["diag_share"]}
    return scores, info
