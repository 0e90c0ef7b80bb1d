"""BERT (and MiniLM, which is a BertModel): post-LN encoder, attention.self.{query,key,value} /
attention.output.dense, intermediate.dense / output.dense."""

from __future__ import annotations

from torch import nn

from pruneflow.adapters.base import Adapter, ConstantSublayer
from pruneflow.adapters.registry import register


@register
class BertAdapter(Adapter):
    family = "bert"
    model_types = ("bert",)
    ffn_in_names = ("intermediate",)
    post_norm = True
    ort_optimizer_type = "bert"

    def layers(self): return self.model.base_model.encoder.layer

    def attn_in(self, i):
        s = self.layers()[i].attention.self
        return [s.query, s.key, s.value]

    def attn_out(self, i): return self.layers()[i].attention.output.dense
    def attention_core(self, i): return self.layers()[i].attention.self, False  # output.dense comes after it
    def ffn_in(self, i): return [self.layers()[i].intermediate.dense]
    def ffn_out(self, i): return self.layers()[i].output.dense

    def norm(self, i, name):
        L = self.layers()[i]
        if name == "ffn":
            return L.output.LayerNorm
        return L.attention.norm if isinstance(L.attention, ConstantSublayer) else L.attention.output.LayerNorm

    def constant(self, i, name):
        L = self.layers()[i]
        m = L.attention if name == "attn" else L.output.dense
        return m if isinstance(m, ConstantSublayer) else None

    def set_attn(self, i, q, k, v, o, heads, kv):
        s = self.layers()[i].attention.self
        s.query, s.key, s.value = q, k, v
        s.num_attention_heads, s.all_head_size = heads, heads * self.head_dim
        self.layers()[i].attention.output.dense = o

    def set_ffn(self, i, ins, out):
        self.layers()[i].intermediate.dense = ins[0]
        self.layers()[i].output.dense = out

    def empty_sublayer(self, i, name):
        L = self.layers()[i]
        if name == "attn":  # the whole attention block: the residual + LayerNorm after it stays inside
            L.attention = ConstantSublayer(self.hidden, L.attention.output.dense.bias, L.attention.output.LayerNorm, True)
        else:
            L.intermediate = nn.Identity()
            L.output.dense = ConstantSublayer(self.hidden, L.output.dense.bias)

    def fixed_macs(self, seq_len):
        d, c = self.hidden, self.config.num_labels
        has_pooler = getattr(self.model.base_model, "pooler", None) is not None
        return (d * d if has_pooler else 0) + (d * c if hasattr(self.model, "classifier") else 0)
