"""activation: sqrt(E[a_j²])·‖w2_j‖ per neuron, context energy × ‖W_O block‖ per head (Wanda-sp / FLAP-style)."""

from __future__ import annotations

from pruneflow import scoring
from pruneflow.methods.base import Method, register, weight_of


@register
class Activation(Method):
    name = "activation"

    def scores(self, ctx, i, sublayer):
        W_out = weight_of(ctx.adapter.out_proj(i, sublayer))
        diag = ctx.sublayer_stats(i, sublayer).second_moment.diagonal()
        if sublayer == "attn":
            return scoring.activation_head_scores(diag, W_out, ctx.adapter.head_dim)
        return scoring.activation_neuron_scores(diag, W_out)
