"""Unit importance (pruneflow.scoring) on small random float64 covariances.

It proves: `elimination_path` records, after every chunk, exactly the least-squares residual
tr(W (C − C[:,K] C[K,K]⁻¹ C[K,:]) Wᵀ) of the remaining set K (single columns and head blocks, greedy and with a
forced order, chunk 1 and larger); the greedy path removes the cheapest unit first (and at every step);
its order is a permutation of all units; the buffered path (no N×N allocation per step) equals a plain
reference implementation bit for bit; a unit that is a linear combination of others costs ~0 and goes first;
`order_from_scores` is deterministic with ties broken by index; the simple scores have one entry per unit.
"""

from __future__ import annotations

import pytest
import torch

from pruneflow.scoring import (
    activation_head_scores, activation_neuron_scores, elimination_path, magnitude_head_scores,
    magnitude_neuron_scores, order_from_scores, random_scores,
)


def gen(seed):
    return torch.Generator().manual_seed(seed)


def well_conditioned(n: int, d: int = 5, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = gen(seed)
    A = torch.randn(4 * n, n, generator=g, dtype=torch.float64)
    A = A @ (torch.eye(n, dtype=torch.float64) + 0.4 * torch.randn(n, n, generator=g, dtype=torch.float64))
    C = A.T @ A / A.shape[0] + 0.2 * torch.eye(n, dtype=torch.float64)
    W = torch.randn(d, n, generator=g, dtype=torch.float64)
    return C, W


def residual(C: torch.Tensor, W: torch.Tensor, cols: list[int]) -> float:
    """tr(W (C − C[:,K] C[K,K]⁻¹ C[K,:]) Wᵀ): error of the best linear reconstruction from the columns K."""
    if not cols:
        return float(torch.trace(W @ C @ W.T))
    K = torch.tensor(cols)
    S = C - C[:, K] @ torch.linalg.solve(C[K][:, K], C[K, :])
    return float(torch.trace(W @ S @ W.T))


def columns(units: list[int], group: int) -> list[int]:
    return [u * group + t for u in sorted(units) for t in range(group)]


def remaining_after(path, p: int, n_units: int) -> list[int]:
    gone = set(path.order[: path.removed[p]])
    return [u for u in range(n_units) if u not in gone]


def reference_path(C: torch.Tensor, W: torch.Tensor, group: int, order, chunk: int, ridge: float):
    """The elimination path written plainly (fresh matrices every step): the buffered one must equal it bit
    for bit."""
    from pruneflow.adapters import head_columns
    from pruneflow.scoring import _unit_costs

    C, W = C.double(), W.double()
    Hinv = torch.linalg.inv(C + ridge * float(C.diagonal().mean()) * torch.eye(C.shape[0], dtype=torch.float64))
    Wc, alive, removal, errors, total = W.clone(), list(range(C.shape[0] // group)), [], [0.0], 0.0
    while alive:
        step = min(chunk, len(alive))
        if order is not None:
            pick = torch.tensor([alive.index(u) for u in order[len(removal) : len(removal) + step]])
        else:
            pick = torch.topk(-_unit_costs(Hinv, Wc, group), step).indices
        Q = head_columns(pick, group)
        HQQ_inv = torch.linalg.inv(Hinv[Q][:, Q])
        WQ = Wc[:, Q]
        total += float(torch.einsum("dq,qr,dr->", WQ, HQQ_inv, WQ))
        rowsQ = HQQ_inv @ Hinv[Q, :]
        Wc, Hinv = Wc - WQ @ rowsQ, Hinv - Hinv[:, Q] @ rowsQ
        keep = torch.ones(len(alive), dtype=torch.bool)
        keep[pick] = False
        cols = keep.repeat_interleave(group)
        Hinv, Wc = Hinv[cols][:, cols], Wc[:, cols]
        removal += [alive[k] for k in pick]
        alive = [u for u, k in zip(alive, keep) if k]
        errors.append(total)
    return removal, errors


@pytest.mark.parametrize("forced", [False, True], ids=["greedy", "forced"])
@pytest.mark.parametrize("group,units,chunk", [(1, 40, 3), (8, 6, 1)], ids=["neurons", "heads"])
def test_buffered_path_equals_the_plain_one_bit_for_bit(group, units, chunk, forced):
    C, W = well_conditioned(units * group, d=7, seed=3)
    order = torch.randperm(units, generator=gen(5)).tolist() if forced else None
    path = elimination_path(C, W, group=group, order=order, chunk=chunk, ridge=1e-3)
    assert (path.order, path.error) == reference_path(C, W, group, order, chunk, 1e-3)


# --- (a) recorded errors are the exact residuals -------------------------------------------------------

@pytest.mark.parametrize("chunk", [1, 3])
@pytest.mark.parametrize("forced", [False, True], ids=["greedy", "forced"])
@pytest.mark.parametrize("group,units", [(1, 12), (4, 5)], ids=["neurons", "heads"])
def test_path_error_is_the_least_squares_residual(group, units, forced, chunk):
    C, W = well_conditioned(units * group, seed=units + group)
    order = torch.randperm(units, generator=gen(7)).tolist() if forced else None
    path = elimination_path(C, W, group=group, order=order, chunk=chunk, ridge=0.0)
    if forced:
        assert path.order == order
    assert path.removed[0] == 0 and path.error[0] == 0.0
    assert path.removed[-1] == units  # down to nothing: the last error is the sublayer's whole variance
    assert all(b - a == min(chunk, units - a) for a, b in zip(path.removed, path.removed[1:]))
    assert len(path.error) == len(path.removed)
    for p, err in enumerate(path.error):
        K = remaining_after(path, p, units)
        assert err == pytest.approx(residual(C, W, columns(K, group)), rel=1e-9, abs=1e-12), (p, K)
    assert all(b >= a - 1e-12 for a, b in zip(path.error, path.error[1:]))  # removing more never helps


def test_float32_inputs_are_handled_in_float64():
    C, W = well_conditioned(8, seed=3)
    p64 = elimination_path(C, W, ridge=0.0)
    p32 = elimination_path(C.float(), W.float(), ridge=0.0)
    assert p32.order == p64.order
    assert p32.error == pytest.approx(p64.error, rel=1e-5)


# --- (b) greedy picks the cheapest unit -----------------------------------------------------------------------

@pytest.mark.parametrize("group,units", [(1, 10), (4, 5)], ids=["neurons", "heads"])
def test_greedy_removes_the_cheapest_unit_first_and_at_every_step(group, units):
    C, W = well_conditioned(units * group, seed=11 + group)
    path = elimination_path(C, W, group=group, chunk=1, ridge=0.0)
    alive = list(range(units))
    for step in range(units - 1):
        base = residual(C, W, columns(alive, group))
        costs = {u: residual(C, W, columns([v for v in alive if v != u], group)) - base for u in alive}
        cheapest = min(costs, key=costs.get)
        assert path.order[step] == cheapest, (step, costs)
        alive.remove(cheapest)
    # and the first step's cost really is the smallest single-removal cost of the dense set
    first = path.order[0]
    single = [residual(C, W, columns([v for v in range(units) if v != u], group)) for u in range(units)]
    assert path.error[1] == pytest.approx(min(single), rel=1e-9)
    assert single.index(min(single)) == first


# --- (c) the order is a permutation ---------------------------------------------------------------------------

@pytest.mark.parametrize("chunk", [1, 2, 5, 50])
def test_order_is_a_permutation(chunk):
    C, W = well_conditioned(16, seed=chunk)
    path = elimination_path(C, W, chunk=chunk)
    assert sorted(path.order) == list(range(16))
    hp = elimination_path(C, W, group=4, chunk=chunk)
    assert sorted(hp.order) == list(range(4))


def test_single_unit_path():
    C, W = well_conditioned(1, seed=0)
    path = elimination_path(C, W)
    assert path.order == [0] and path.removed == [0, 1] and path.error[0] == 0.0
    assert path.error[1] == pytest.approx(float(torch.trace(W @ C @ W.T)), rel=1e-3)  # default ridge


# --- (d) redundant units are free -----------------------------------------------------------------------------

def test_linearly_dependent_unit_costs_nothing_and_goes_first():
    g = gen(5)
    T, n = 300, 8
    a = torch.randn(T, n, generator=g, dtype=torch.float64)
    a[:, 5] = 0.7 * a[:, 1] - 1.3 * a[:, 3]  # unit 5 (and so 1 and 3) is a combination of the others
    mu = a.mean(0)
    C = (a - mu).T @ (a - mu) / T
    W = torch.randn(4, n, generator=g, dtype=torch.float64)
    path = elimination_path(C, W, ridge=1e-9)
    assert path.order[0] in {1, 3, 5}
    typical = sorted(e for e in (residual(C + 1e-6 * torch.eye(n, dtype=torch.float64), W,
                                          [v for v in range(n) if v != u]) for u in (0, 2, 4, 6, 7)))[0]
    assert path.error[1] < 1e-6 * typical
    # with the dependent unit forced first its cost is ~0 as well
    forced = elimination_path(C, W, order=[5, 0, 1, 2, 3, 4, 6, 7], ridge=1e-9)
    assert forced.error[1] < 1e-6 * typical


# --- (e) simple scores and ordering ---------------------------------------------------------------------------

def test_order_from_scores_breaks_ties_by_index():
    s = torch.tensor([1.0, 0.0, 1.0, 0.0, 0.5, 1.0])
    assert order_from_scores(s) == [1, 3, 4, 0, 2, 5]
    assert order_from_scores(s) == order_from_scores(s.clone())
    assert order_from_scores(torch.zeros(5)) == [0, 1, 2, 3, 4]
    assert order_from_scores(torch.tensor([3.0, 2.0, 1.0])) == [2, 1, 0]
    assert all(isinstance(i, int) for i in order_from_scores(s))


def test_score_shapes_and_values():
    g = gen(1)
    d, N, H, dh = 6, 10, 3, 4
    W_out = torch.randn(d, N, generator=g)
    W_in = [torch.randn(N, d, generator=g), torch.randn(N, d, generator=g)]
    diag = torch.rand(N, generator=g)
    s = activation_neuron_scores(diag, W_out)
    assert s.shape == (N,) and s.dtype == torch.float64
    torch.testing.assert_close(s, (diag.double().sqrt() * W_out.double().norm(dim=0)))
    m = magnitude_neuron_scores(W_in, W_out)
    assert m.shape == (N,)
    torch.testing.assert_close(m, W_out.double().norm(dim=0) * W_in[0].double().norm(dim=1) * W_in[1].double().norm(dim=1))

    Wo = torch.randn(d, H * dh, generator=g)
    Wq = torch.randn(H * dh, d, generator=g)
    hdiag = torch.rand(H * dh, generator=g)
    ah = activation_head_scores(hdiag, Wo, dh)
    mh = magnitude_head_scores(Wq, Wo, dh)
    assert ah.shape == (H,) and mh.shape == (H,)
    for h in range(H):
        sl = slice(h * dh, (h + 1) * dh)
        assert float(ah[h]) == pytest.approx(float(hdiag[sl].double().sum().sqrt() * Wo[:, sl].double().norm()), rel=1e-6)
        assert float(mh[h]) == pytest.approx(float(Wq[sl].double().norm() * Wo[:, sl].double().norm()), rel=1e-6)
    # negative (round-off) second moments do not produce NaN
    assert torch.isfinite(activation_neuron_scores(-diag, W_out)).all()


def test_random_scores_are_seeded():
    assert torch.equal(random_scores(7, 3), random_scores(7, 3))
    assert not torch.equal(random_scores(7, 3), random_scores(7, 4))
    assert random_scores(7, 3).shape == (7,)
