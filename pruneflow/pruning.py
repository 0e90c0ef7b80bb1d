"""Slicing the dense model to a selection and correcting it: the one path the correct stage and the sweep share."""

from __future__ import annotations

import copy
from pathlib import Path
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
                       dense_trace: Callable[[], object] | None = None, spill_dir: Path | None = None,
                       activations_dir: Path | None = None) -> tuple[nn.Module, Plan, list[dict]]:
    """A corrected, sliced copy of `dense_model`; its plan; the per-sublayer fit report.
    dense_trace: makes (or returns a shared) sequential.DenseTrace; needed when the correction is sequential.
    spill_dir (sequential, runtime.offload=disk): `dense_model` is a lazy model (blockwalk.lazy_model), sliced
    layer by layer as the refit reaches it; the finished layers are written to spill_dir, and the returned model
    (that same lazy model, sliced) reads its weights from there and from the checkpoint (`disk_weights`).
    activations_dir (sequential, correct.low_memory): where the refit keeps its per-batch tensors (both streams of
    hidden states, the FFN activations) instead of memory."""
    plan = Plan(sel["keep_heads"], sel["keep_neurons"])
    if spill_dir is not None and not uses_sequential(p):
        raise ValueError("streaming the pruned layers through a spill needs the sequential correction")
    if uses_sequential(p):
        from pruneflow.sequential import StreamedLayers, correct_sequential

        if dense_trace is None:
            raise ValueError("correct.sequential needs the calibration text (a dense trace)")
        if spill_dir is None:
            pruned_model, layers = plan.apply(copy.deepcopy(dense_model)), None
        else:
            pruned_model = dense_model
            layers = StreamedLayers(pruned_model, plan.keep_heads, plan.keep_neurons, spill_dir, device)
        report = correct_sequential(pruned_model, p.method, p.ridge, dense_trace(), device, layers,
                                    first_token_weight=p.first_token_weight,
                                    first_token_where=p.first_token_weight_where, activations_dir=activations_dir)
    else:
        pruned_model = plan.apply(copy.deepcopy(dense_model))
        keep = {"attn": sel["keep_heads"], "ffn": sel["keep_neurons"]}
        report = correct_from_stats(get_adapter(dense_model), get_adapter(pruned_model), stats, keep, p.method,
                                    p.ridge)
    return pruned_model, plan, report
