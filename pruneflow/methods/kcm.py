"""kcm: KCM's R2D2 (Nova et al., ICML 2023) as far as it can be reconstructed (the math and what is confirmed
vs inferred: pruneflow/kcm.py). KCM ranks FFN neurons only; heads fall back to `activation`."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from pruneflow import kcm
from pruneflow.methods.base import Method, register, weight_of


@register
class KCM(Method):
    name = "kcm"
    ranks_heads = False

    representation: Literal["w_out", "w_in", "both"] = Field("w_out", description="the vector R2 sees per neuron")
    sigma: float | Literal["median"] = Field("median", description="Gaussian kernel bandwidth")
    alpha: float = Field(0.01, gt=0, description="R2 stops when the relative change of C is below alpha")
    max_iter: int = Field(200, ge=1)
    d2: Literal["votes", "energy"] = "votes"
    merge: Literal["rank_sum", "product"] = "rank_sum"

    def scores(self, ctx, i, sublayer):
        if sublayer != "ffn":
            raise ValueError("kcm ranks FFN neurons only")
        st, ad = ctx.sublayer_stats(i, "ffn"), ctx.adapter
        if st.votes is None and self.d2 == "votes":
            raise ValueError("rank.method=kcm with rank.kcm.d2=votes needs the D2 votes of collect, and collect ran "
                             "with collect.vote_topk=null: set collect.vote_topk (e.g. 0.1) or rank.kcm.d2=energy")
        scores, _ = kcm.kcm_scores(weight_of(ad.ffn_in(i)[0]), weight_of(ad.ffn_out(i)), st.votes,
                                   st.second_moment, self.representation, self.sigma, self.alpha, self.max_iter,
                                   self.d2, self.merge)
        return scores
