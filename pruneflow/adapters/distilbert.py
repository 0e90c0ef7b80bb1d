"""DistilBERT: post-LN encoder, attention.{q,k,v}_lin / out_lin, ffn.lin1 / lin2."""

from __future__ import annotations

from pruneflow.adapters.base import Adapter, ConstantSublayer
from pruneflow.adapters.registry import register


@register
class DistilBertAdapter(Adapter):
    family = "distilbert"
    model_types = ("distilbert",)
    ffn_in_names = ("lin1",)
    post_norm = True
    ort_optimizer_type = "bert"

    def layers(self): return self.model.base_model.transformer.layer

    def attn_in(self, i):
        a = self.layers()[i].attention
        return [a.q_lin, a.k_lin, a.v_lin]

    def attn_out(self, i): return self.layers()[i].attention.out_lin
    def attention_core(self, i): return self.layers()[i].attention, True
    def ffn_in(self, i): return [self.layers()[i].ffn.lin1]
    def ffn_out(self, i): return self.layers()[i].ffn.lin2

    def norm(self, i, name):
        L = self.layers()[i]
        return L.sa_layer_norm if name == "attn" else L.output_layer_norm

    def constant(self, i, name):
        m = self.layers()[i].attention if name == "attn" else self.layers()[i].ffn
        return m if isinstance(m, ConstantSublayer) else None

    def set_attn(self, i, q, k, v, o, heads, kv):
        a = self.layers()[i].attention
        a.q_lin, a.k_lin, a.v_lin, a.out_lin = q, k, v, o
        a.n_heads = heads

    def set_ffn(self, i, ins, out):
        f = self.layers()[i].ffn
        f.lin1, f.lin2 = ins[0], out

    def empty_sublayer(self, i, name):
        L = self.layers()[i]
        if name == "attn":
            L.attention = ConstantSublayer(self.hidden, self.attn_out(i).bias, None, True)
        else:
            L.ffn = ConstantSublayer(self.hidden, self.ffn_out(i).bias)

    def fixed_macs(self, seq_len):
        d, c = self.hidden, self.config.num_labels
        return (d * d + d * c) if hasattr(self.model, "classifier") else 0
