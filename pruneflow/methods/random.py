"""random: the chance baseline (seeded per layer and sublayer)."""

from __future__ import annotations

from pruneflow import scoring
from pruneflow.methods.base import Method, register


@register
class Random(Method):
    name = "random"

    def scores(self, ctx, i, sublayer):
        offset = 500 if sublayer == "attn" else 0
        return scoring.random_scores(ctx.adapter.units(sublayer), ctx.seed * 1000 + offset + i)
