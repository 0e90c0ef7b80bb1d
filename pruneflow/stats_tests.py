"""Paired tests for "A beats B" on the same evaluation items, so a gap inside the noise is labelled as such."""

from __future__ import annotations

import numpy as np


def mcnemar(correct_a: np.ndarray, correct_b: np.ndarray) -> dict:
    """Exact McNemar test on paired correct/incorrect: a_only = A right & B wrong, b_only = the reverse."""
    from scipy.stats import binomtest

    correct_a, correct_b = np.asarray(correct_a, bool), np.asarray(correct_b, bool)
    b = int((correct_a & ~correct_b).sum())
    c = int((~correct_a & correct_b).sum())
    p = binomtest(b, b + c, 0.5).pvalue if b + c else 1.0
    return {"a_only": b, "b_only": c, "p_value": float(p)}


def paired_bootstrap(values_a: np.ndarray, values_b: np.ndarray, n_boot: int = 10_000, seed: int = 0,
                     level: float = 0.95) -> dict:
    """Mean of a − b over paired items (e.g. per-window NLL of two models) with a percentile bootstrap interval
    and the two-sided sign-flip p-value of a mean difference of zero."""
    d = np.asarray(values_a, float) - np.asarray(values_b, float)
    if d.size == 0:
        raise ValueError("no paired items")
    rng = np.random.default_rng(seed)
    boots = d[rng.integers(0, d.size, (n_boot, d.size))].mean(1)
    lo, hi = np.quantile(boots, [(1 - level) / 2, (1 + level) / 2])
    flips = rng.choice([-1.0, 1.0], (n_boot, d.size))
    null = np.abs((flips * d).mean(1))
    p = float((np.sum(null >= abs(d.mean()) - 1e-15) + 1) / (n_boot + 1))
    return {"mean_diff": float(d.mean()), "ci_low": float(lo), "ci_high": float(hi), "p_value": p, "items": int(d.size)}


def mark(verdict: str | None) -> str:
    """▲ / ▼ for a significant "better" / "worse" verdict; nothing within the noise (or untested)."""
    return {"better": "▲", "worse": "▼"}.get(verdict, "")


def verdict(p_value: float, diff: float, lower_is_better: bool, a: str, b: str, alpha: float = 0.05) -> str:
    if p_value >= alpha:
        return "within noise"
    a_better = diff < 0 if lower_is_better else diff > 0
    return f"{a} better" if a_better else f"{b} better"
