"""magnitude: weights only, no data: ‖w1_j‖·‖w2_j‖ per neuron, ‖W_Q rows‖·‖W_O columns‖ per head."""

from __future__ import annotations

from pruneflow import scoring
from pruneflow.methods.base import Method, register, weight_of


@register
class Magnitude(Method):
    name = "magnitude"

    def scores(self, ctx, i, sublayer):
        ad = ctx.adapter
        W_out = weight_of(ad.out_proj(i, sublayer))
        if sublayer == "attn":
            return scoring.magnitude_head_scores(weight_of(ad.attn_in(i)[0]), W_out, ad.head_dim)
        return scoring.magnitude_neuron_scores([weight_of(m) for m in ad.ffn_in(i)], W_out)
