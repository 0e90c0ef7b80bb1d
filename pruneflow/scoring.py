"""Unit importance: pure functions on weights and calibration statistics (no hooks, no models).

Every method yields, per layer and sublayer, a *removal order* (least important unit first). One shared
routine, `elimination_path`, then walks any order and records the exact calibration reconstruction error of
the remaining set after the closed-form least-squares correction (see correction.py). With no order given it
picks greedily: at each step it removes the units whose removal raises that error least — the optimal-brain-
surgeon step for a structured unit (a neuron = one column of the output projection, a head = a block of
head_dim columns), with the Hessian being the activation covariance C:

    ΔE(Q) = tr(W'_Q [(C⁻¹)_QQ]⁻¹ W'_Qᵀ)        W' ← W' − W'_Q [(C⁻¹)_QQ]⁻¹ (C⁻¹)_Q,:
    C⁻¹   ← C⁻¹ − (C⁻¹)_:,Q [(C⁻¹)_QQ]⁻¹ (C⁻¹)_Q,:

After every step W' is the least-squares-optimal output projection of the remaining units (APT's
multiple-removal update, applied to columns rather than single weights). The error curves it records let the
select stage compare layers (error per FLOP) for every ranking method alike.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from pruneflow.moments import ridge_lambda
from pruneflow.adapters import head_columns


@dataclass
class EliminationPath:
    order: list[int]  # unit ids, least important first (every unit appears once)
    removed: list[int]  # number of units removed at each recorded point (0, ..., all)
    error: list[float]  # reconstruction error E‖Δy‖² of the remaining set after lstsq correction


def elimination_path(C: torch.Tensor, W: torch.Tensor, group: int = 1, order: list[int] | None = None,
                     chunk: int = 1, ridge: float = 1e-4) -> EliminationPath:
    """Remove units (blocks of `group` columns of W) one chunk at a time, in `order` or greedily by least
    error increase; return the order and the error of the remaining set after each chunk.

    C: (N, N) activation covariance; W: (d, N) output projection; N = units * group. The matrices are
    compacted after every step, so the work shrinks with the alive set (≈ N³ / (3·chunk) in all). C⁻¹ lives in
    a preallocated N×N buffer and a second one takes the update's product and the compaction's row gather, so no
    step allocates an N×N matrix: a path holds a fixed 2·N² doubles, and the heap does not grow with the steps."""
    C, W = C.double(), W.double()
    n, units = C.shape[0], C.shape[0] // group
    store = torch.empty(2, n * n, dtype=torch.float64, device=C.device)
    view = lambda b, rows, cols: store[b, : rows * cols].view(rows, cols)  # noqa: E731
    regularised = view(1, n, n).copy_(C)  # C + λI
    regularised.diagonal().add_(ridge_lambda(C, ridge))
    Hinv = torch.linalg.inv(regularised, out=view(0, n, n))
    Wc = W.clone()
    alive = torch.arange(units)  # unit ids still in, in the current (compacted) column order
    position = {u: k for k, u in enumerate(alive.tolist())} if order is not None else None
    removal: list[int] = []
    removed, errors, total = [0], [0.0], 0.0
    while len(alive) > 0:  # down to nothing: an emptied sublayer keeps only its mean output (bias)
        step = min(chunk, len(alive))
        if order is not None:
            pick_ids = order[len(removal) : len(removal) + step]
            pick = torch.tensor([position[int(u)] for u in pick_ids])
        else:
            pick = torch.topk(-_unit_costs(Hinv, Wc, group), step).indices
        Q = head_columns(pick, group)
        HQQ_inv = torch.linalg.inv(Hinv[Q][:, Q])
        WQ = Wc[:, Q]
        total += float(torch.einsum("dq,qr,dr->", WQ, HQQ_inv, WQ))
        rowsQ = HQQ_inv @ Hinv[Q, :]
        Wc.sub_(WQ @ rowsQ)
        m = Hinv.shape[0]
        Hinv.sub_(torch.mm(Hinv[:, Q], rowsQ, out=view(1, m, m)))
        keep_units = torch.ones(len(alive), dtype=torch.bool)
        keep_units[pick] = False
        keep_cols = keep_units.repeat_interleave(group).nonzero().squeeze(1)
        kept = len(keep_cols)
        # rows into the second buffer (its product is used up), then columns back into the first; gather, as
        # index_select along columns is several times slower
        rows = torch.index_select(Hinv, 0, keep_cols, out=view(1, kept, m))
        Hinv = torch.gather(rows, 1, keep_cols.expand(kept, kept), out=view(0, kept, kept))
        Wc = Wc[:, keep_cols]
        removal.extend(alive[pick].tolist())
        alive = alive[keep_units]
        if order is not None:  # where each given unit now sits (greedy picks need no lookup)
            position = {u: k for k, u in enumerate(alive.tolist())}
        removed.append(len(removal))
        errors.append(total)
    return EliminationPath(removal, removed, errors)


def _unit_costs(Hinv: torch.Tensor, W: torch.Tensor, group: int) -> torch.Tensor:
    """ΔE of removing each unit alone: ‖w_j‖²/(C⁻¹)_jj for single columns, tr(W_h (C⁻¹)_hh⁻¹ W_hᵀ) for blocks."""
    if group == 1:
        return (W**2).sum(0) / Hinv.diagonal().clamp_min(1e-30)
    u = W.shape[1] // group
    idx = torch.arange(u * group).view(u, group)
    blocks = Hinv[idx.unsqueeze(-1), idx.unsqueeze(-2)]  # (u, g, g)
    Wb = W.view(W.shape[0], u, group).permute(1, 0, 2)  # (u, d, g)
    sol = torch.linalg.solve(blocks, Wb.transpose(1, 2))  # (u, g, d)
    return torch.einsum("udg,ugd->u", Wb, sol)


# --- simple scores (higher = more important) --------------------------------------------------------

def activation_neuron_scores(second_moment_diag: torch.Tensor, W_out: torch.Tensor) -> torch.Tensor:
    """sqrt(E[a_j²]) · ‖w2_j‖: how much neuron j contributes to the output on calibration data."""
    return second_moment_diag.double().clamp_min(0).sqrt() * W_out.double().norm(dim=0)


def activation_head_scores(second_moment_diag: torch.Tensor, W_out: torch.Tensor, head_dim: int) -> torch.Tensor:
    """sqrt(E‖ctx_h‖²) · ‖W_O[:, h]‖_F: a head's context energy times its output-projection block."""
    energy = second_moment_diag.double().clamp_min(0).view(-1, head_dim).sum(1).sqrt()
    return energy * W_out.double().pow(2).sum(0).view(-1, head_dim).sum(1).sqrt()


def magnitude_neuron_scores(W_in: list[torch.Tensor], W_out: torch.Tensor) -> torch.Tensor:
    """‖w1_j‖ · ‖w2_j‖ (product over every input projection): weights only, no data."""
    score = W_out.double().norm(dim=0)
    for w in W_in:
        score = score * w.double().norm(dim=1)
    return score


def magnitude_head_scores(W_q: torch.Tensor, W_out: torch.Tensor, head_dim: int) -> torch.Tensor:
    """‖W_Q rows of h‖_F · ‖W_O columns of h‖_F."""
    q = W_q.double().pow(2).sum(1).view(-1, head_dim).sum(1).sqrt()
    o = W_out.double().pow(2).sum(0).view(-1, head_dim).sum(1).sqrt()
    return q * o


def random_scores(n: int, seed: int) -> torch.Tensor:
    return torch.rand(n, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def order_from_scores(scores: torch.Tensor) -> list[int]:
    """Least important first; ties broken by index so the order is deterministic."""
    s = scores.double().cpu().numpy()
    return [int(i) for i in np.lexsort((np.arange(len(s)), s))]
