"""Slicing the dense model to a selection and correcting it: the one path the correct stage and the sweep share."""

from __future__ import annotations

import copy
from typing import Callable

from torch import nn

from pruneflow.adapters import get_adapter
from pruneflow.correction import correct_from_stats
from pruneflow.params import CorrectParams
from pruneflow.plan import Plan
from pruneflow.stats import Statistics


def uses_sequential(p: CorrectParams) -> bool:
    """`none` fits nothing, so it is never sequential."""
    return p.sequential and p.method != "none"


def prune_to_selection(dense_model: nn.Module, stats: Statistics, sel: dict, p: CorrectParams, device: str,
                       dense_trace: Callable[[], object] | None = None, in_place: bool = False
                       ) -> tuple[nn.Module, Plan, list[dict]]:
    """A corrected, sliced copy of `dense_model` (in_place: `dense_model` itself, sliced, when nothing else needs
    it, e.g. the dense trace walks its own model from disk); its plan; the per-sublayer fit report.
    dense_trace: makes (or returns a shared) sequential.DenseTrace; needed when the correction is sequential."""
    plan = Plan(sel["keep_heads"], sel["keep_neurons"])
    pruned_model = plan.apply(dense_model if in_place else copy.deepcopy(dense_model))
    if uses_sequential(p):
        from pruneflow.sequential import correct_sequential

        if dense_trace is None:
            raise ValueError("correct.sequential needs the calibration text (a dense trace)")
        report = correct_sequential(pruned_model, p.method, p.ridge, dense_trace(), device)
    else:
        keep = {"attn": sel["keep_heads"], "ffn": sel["keep_neurons"]}
        report = correct_from_stats(get_adapter(dense_model), get_adapter(pruned_model), stats, keep, p.method,
                                    p.ridge)
    return pruned_model, plan, report
