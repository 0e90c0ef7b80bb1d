"""bonsai: forward-only perturbative structured pruning (Dery et al. 2024; the search is pruneflow/bonsai.py).

Unlike the per-layer scoring methods, Bonsai searches the whole model at once and decides how many units each
layer keeps: it removes units round by round until `select.budget` (in `select.cost`) is met, and writes its
kept sets into the ranking; `select.allocation: ranking` takes them as they are. Its per-layer orders (units
removed first, in round and coefficient order, then survivors by their final prior) keep every other
allocation usable too.

Defaults are scaled for a CPU: the paper runs 32 windows of 4,096 tokens and 200 sub-models per round on a GPU
(METHODS.md §5); here `samples` calibration sequences (the first ones of the calibration set) and
`masks_per_round` sub-models (antithetic pairs) per round, each a forward pass over those samples.
"""

from __future__ import annotations

import math
from typing import ClassVar

import numpy as np
from pydantic import Field

from pruneflow.adapters import get_adapter
from pruneflow.adapters.base import head_columns
from pruneflow.methods.base import Method, register


@register
class Bonsai(Method):
    name = "bonsai"
    global_plan: ClassVar[bool] = True

    prune_frac: float = Field(0.05, gt=0, le=0.5, description="fraction of the original prunable cost per round")
    masks_per_round: int = Field(20, ge=2, description="sub-models scored per round (antithetic pairs); paper: 200")
    samples: int = Field(4, ge=1, description="calibration sequences every sub-model is scored on; paper: 32 x 4096 tokens")
    lambdas: list[float] = Field(default_factory=lambda: [0.0, 0.01, 0.05, 0.2],
                                 description="L1 penalties tried (relative to the one that zeroes every coefficient)")
    folds: int = Field(5, ge=2, description="cross-validation folds (Kendall tau) choosing the penalty")
    perturb: bool = Field(True, description="false: the prior-only ablation (same rounds, lowest prior removed)")

    def scoring_batches(self, calibration) -> list[dict]:
        """The calibration batches every sub-model is scored on: the first ones, up to `samples` sequences."""
        batches, n = [], 0
        for enc in calibration:
            batches.append(enc)
            n += enc["input_ids"].shape[0]
            if n >= self.samples:
                break
        return batches

    def plan(self, ctx) -> dict:
        from pruneflow.bonsai import bonsai_search, unit_prior
        from pruneflow.cost import make_cost

        if ctx.task is None or ctx.select is None or ctx.calibration is None:
            raise ValueError("rank.method=bonsai needs the task, the select params and calibration data")
        model, sp = ctx.adapter.model, ctx.select
        batches = self.scoring_batches(ctx.calibration())
        reference = ctx.task.calibration_reference(model, batches)
        cost = make_cost(sp.cost, ctx.seq_len, sp.tolerance)
        dense = cost.measure(model)
        other = dense.total - dense.analytic
        found = bonsai_search(
            model, batches, lambda m, b: ctx.task.calibration_loss(m, b, reference),
            lambda ad: cost.analytic(ad) + other, math.floor(sp.budget * dense.total), cost.layer_cost, self.prune_frac,
            self.masks_per_round, tuple(self.lambdas), self.folds, self.perturb, ctx.seed)
        final = get_adapter(found["model"])
        orders = {}
        for (i, name), u in found["units"].items():
            survivors = list(u.alive)
            if survivors and found["final_rms"] is not None and (i, name) in found["final_rms"]:
                group = final.head_dim * u.heads_per_unit if name == "attn" else 1
                prior = unit_prior(final.out_proj(i, name).weight, found["final_rms"][(i, name)], group)
                survivors = [survivors[k] for k in np.argsort(prior.numpy(), kind="stable")]
            orders[(i, name)] = head_columns(u.removed + survivors, u.heads_per_unit).tolist()
        return {"order": orders, "keep_heads": found["keep_heads"], "keep_neurons": found["keep_neurons"],
                "rounds": found["rounds"]}
