"""How many heads and neurons each layer keeps under a multiply-add budget: pure functions.

uniform  the same kept fraction of heads and of neurons in every layer (the largest that fits).
error    greedy across layers: repeatedly take the removal step (one head, or one chunk of neurons, in the
         ranking's order) with the least increase of relative reconstruction error per multiply-add saved,
         until the budget holds; then give leftover budget back to the neurons whose removal hurt most.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Curve:
    """One sublayer's error after removing removed[p] units in ranking order (error[0] = 0)."""

    units: int
    removed: list[int]
    error: list[float]


@dataclass(frozen=True)
class Costs:
    head: int  # multiply-adds of one head (with its k, v for multi-head attention)
    neuron: int
    fixed: int  # matmul multiply-adds no unit removal changes (classifier, pooler, lm head)


class InfeasibleBudget(ValueError):
    pass


def _round_down(n: int, multiple: int, floor: int) -> int:
    return max(floor, (n // multiple) * multiple) if multiple > 1 else max(floor, n)


def macs(heads: list[int], neurons: list[int], c: Costs) -> int:
    return c.fixed + c.head * sum(heads) + c.neuron * sum(neurons)


def minimum(n_layers: int, H: int, N: int, c: Costs, min_heads: int, min_neurons: int) -> int:
    return macs([min(min_heads, H)] * n_layers, [min(min_neurons, N)] * n_layers, c)


def check_feasible(target: int, n_layers: int, H: int, N: int, c: Costs, min_heads: int, min_neurons: int) -> None:
    low = minimum(n_layers, H, N, c, min_heads, min_neurons)
    if target < low:
        raise InfeasibleBudget(low)


def head_counts(H: int, min_heads: int, head_step: int) -> list[int]:
    """The head counts a layer may keep: multiples of head_step (grouped-query attention keeps the same number
    of query heads in each of its head_step KV groups), from the smallest at or above min_heads (0 allowed
    when min_heads is 0) up to H."""
    low = min(H, -(-min_heads // head_step) * head_step)  # a floor above H is clamped to H
    return list(range(low, H + 1, head_step))


def uniform(n_layers: int, H: int, N: int, c: Costs, target: int, min_heads: int = 1, min_neurons: int = 0,
            multiple_of: int = 1, heads: int | None = None, head_step: int = 1) -> tuple[list[int], list[int]]:
    """The same counts in every layer: the largest common fraction f of heads (round(f·H)) that leaves room for
    at least f·N neurons (with grouped-query attention: the fewest allowed heads whose kept fraction is at least
    the neurons' kept fraction they leave room for), then as many neurons per layer as the rest of the budget
    pays for (heads come in coarse steps, so without this fill the budget would be under-spent by up to a head
    per layer)."""
    allowed = head_counts(H, min_heads, head_step)
    min_heads = allowed[0]
    check_feasible(target, n_layers, H, N, c, min_heads, min_neurons)

    def heads_at(f: float) -> int:
        return min(H, max(min_heads, round(f * H)))  # head_step is 1 here (the bisection branch)

    def neurons_fitting(h: int) -> int:
        room = (target - c.fixed - n_layers * h * c.head) // (n_layers * c.neuron)
        return min(N, _round_down(int(room), multiple_of, 0))

    if heads is not None:
        h = min(H, max(min_heads, heads))
        if h % head_step:
            raise ValueError(f"select.uniform_heads={heads}: grouped-query attention keeps the same number of query "
                             f"heads in each KV group; give a multiple of {head_step}")
    elif head_step > 1:
        # Grouped-query attention makes head counts coarse (SmolLM2: 3, 6 or 9 of 9), and the bisection below
        # would then jump a whole step (at 0.9 of the FLOPs it kept 6 heads and 97% of the neurons). Where the
        # heads' and the neurons' kept fractions cross, a step of heads is a third of the attention at once while
        # the neurons absorb the rest of the budget finely: take the step at or above the crossing, the fewest
        # heads whose kept fraction is at least the neurons'. On SmolLM2 this is the better of the three counts
        # at each of 0.9, 0.8, 0.7 and 0.6 of the FLOPs (README, benchmarks/lm_heads.py); the closest fraction
        # was wrong at 0.8 and 0.6.
        fits = [h for h in allowed if neurons_fitting(h) >= min(min_neurons, N)]
        if not fits:
            raise InfeasibleBudget(macs([allowed[0]] * n_layers, [min(min_neurons, N)] * n_layers, c))
        h = next((h for h in fits if h / H >= neurons_fitting(h) / N), fits[-1])
    else:
        lo, hi = 0.0, 1.0
        for _ in range(60):
            mid = (lo + hi) / 2
            ok = neurons_fitting(heads_at(mid)) >= max(min_neurons, mid * N)
            lo, hi = (mid, hi) if ok else (lo, mid)
        h = heads_at(lo)
    n = neurons_fitting(h)
    if n < min(min_neurons, N):
        raise InfeasibleBudget(macs([h] * n_layers, [min(min_neurons, N)] * n_layers, c))
    return [h] * n_layers, [n] * n_layers


def by_error(attn: list[Curve], ffn: list[Curve], c: Costs, target: int, min_heads: int = 1, min_neurons: int = 0,
             multiple_of: int = 1, head_step: int = 1) -> tuple[list[int], list[int]]:
    """Greedy allocation by error per multiply-add; returns kept heads and kept neurons per layer. With
    head_step > 1 (grouped-query attention) kept heads are rounded down to a multiple of it at the end, which
    only lowers the cost; the leftover goes to neurons."""
    L = len(attn)
    min_heads = head_counts(attn[0].units, min_heads, head_step)[0]
    check_feasible(target, L, attn[0].units, ffn[0].units, c, min_heads, min_neurons)
    curves = [(l, "attn", attn[l]) for l in range(L)] + [(l, "ffn", ffn[l]) for l in range(L)]
    pos = {(l, s): 0 for l, s, _ in curves}
    kept = {(l, s): cv.units for l, s, cv in curves}
    floor = {"attn": min_heads, "ffn": min_neurons}
    unit = {"attn": c.head, "ffn": c.neuron}
    last_rate = {}

    def current() -> int:
        return macs([kept[(l, "attn")] for l in range(L)], [kept[(l, "ffn")] for l in range(L)], c)

    total = current()
    while total > target:
        best = None
        for l, s, cv in curves:
            p = pos[(l, s)]
            if p + 1 >= len(cv.removed):
                continue
            step = cv.removed[p + 1] - cv.removed[p]
            step = min(step, kept[(l, s)] - floor[s])
            if step <= 0:
                continue
            rate = (cv.error[p + 1] - cv.error[p]) / (step * unit[s])
            if best is None or rate < best[0]:
                best = (rate, l, s, step)
        if best is None:  # every sublayer at its floor: check_feasible guarantees the target holds there
            raise InfeasibleBudget(minimum(L, attn[0].units, ffn[0].units, c, min_heads, min_neurons))
        rate, l, s, step = best
        pos[(l, s)] += 1
        kept[(l, s)] -= step
        last_rate[(l, s)] = rate
        total -= step * unit[s]

    neurons = [_round_down(kept[(l, "ffn")], multiple_of, min(min_neurons, ffn[l].units)) for l in range(L)]
    heads = [max(min_heads, kept[(l, "attn")] // head_step * head_step) for l in range(L)]
    # Leftover budget (the last step overshoots by up to one chunk): return neurons to the layers whose last
    # removed chunk cost the most error per multiply-add.
    slack = target - macs(heads, neurons, c)
    for l in sorted(range(L), key=lambda l: -last_rate.get((l, "ffn"), 0.0)):
        room = ffn[l].units - neurons[l]
        add = min(room, slack // c.neuron)
        add = (add // multiple_of) * multiple_of
        if add > 0:
            neurons[l] += add
            slack -= add * c.neuron
    return heads, neurons


def tilted(rise: list[float], neurons: list[int], tilt: float, dense: int, floor: int = 0, multiple_of: int = 1
           ) -> list[int]:
    """Neurons re-allocated towards the layers whose pruning costs the model most (select.allocation:
    sensitivity; OWL's idea, with a measured rise instead of outlier counts): layer i keeps n̄ (1 + tilt·z_i)
    neurons, z_i the standardised loss rise of pruning layer i alone (pruneflow/sensitivity.py), clipped to ±2,
    rescaled so the total, and so the cost, is the uniform allocation's `neurons`; kept counts stay within
    [floor, dense] and multiples of `multiple_of`. tilt 0 returns `neurons`."""
    import numpy as np

    if tilt == 0:
        return list(neurons)
    m = multiple_of
    s = np.asarray(rise, dtype=float)
    z = np.clip((s - s.mean()) / max(s.std(), 1e-12), -2, 2)
    total, weight = sum(neurons) // m, 1 + tilt * z
    low, high = -(-floor // m), dense // m
    n = np.clip(np.round(total * weight / weight.sum()), low, high).astype(int)
    for i in np.argsort(-z) if n.sum() < total else np.argsort(z):  # settle the rounding on the extremes
        step = int(np.clip(total - n.sum(), low - n[i], high - n[i]))
        n[i] += step
        if n.sum() == total:
            break
    return [int(v) * m for v in n]
