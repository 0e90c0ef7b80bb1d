"""magnitude: weights only, no data: ‖w1_j‖·‖w2_j‖ per neuron, ‖W_Q rows‖·‖W_O columns‖ per head."""

from __future__ import annotations

from pruneflow import scoring
from pruneflow.methods.base import Method, register


@register
class Magnitude(Method):
    name = "magnitude"

    def scores(self, ctx, i, sublayer):
        ad = ctx.adapter
        W_out = ad.out_proj(i, sublayer).weight.detach().cpu()
        if sublayer == "attn":
            return scoring.magnitude_head_scores(ad.attn_in(i)[0].weight.detach().cpu(), W_out, ad.head_dim)
        return scoring.magnitude_neuron_scores([m.weight.detach().cpu() for m in ad.ffn_in(i)], W_out)
