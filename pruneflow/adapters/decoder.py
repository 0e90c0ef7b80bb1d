"""Llama-style pre-norm decoders: model.layers[i].self_attn.{q,k,v,o}_proj and mlp.{gate,up,down}_proj, with
grouped-query attention. Llama itself (SmolLM2 is one) lives here; Mistral, Qwen and Gemma are small
subclasses in their own files, saying only what differs."""

from __future__ import annotations

from pruneflow.adapters.base import Adapter, ConstantSublayer
from pruneflow.adapters.registry import register


class DecoderAdapter(Adapter):
    """Shared by every family whose blocks are `self_attn` (q/k/v/o_proj) + `mlp` (gate/up/down_proj)."""

    ffn_in_names = ("gate_proj", "up_proj")
    post_norm = False

    def layers(self): return self.model.model.layers

    def attn_in(self, i):
        a = self.layers()[i].self_attn
        return [a.q_proj, a.k_proj, a.v_proj]

    def attn_out(self, i): return self.layers()[i].self_attn.o_proj

    def attention_core(self, i): return self.layers()[i].self_attn, True

    def ffn_in(self, i):
        m = self.layers()[i].mlp
        return [m.gate_proj, m.up_proj]

    def ffn_out(self, i): return self.layers()[i].mlp.down_proj

    def residual_norm(self, i, name):
        L = self.layers()[i]
        return L.input_layernorm if name == "attn" else L.post_attention_layernorm

    def constant(self, i, name):
        m = self.layers()[i].self_attn if name == "attn" else self.layers()[i].mlp
        return m if isinstance(m, ConstantSublayer) else None

    def set_attn(self, i, q, k, v, o, heads, kv):
        a = self.layers()[i].self_attn
        a.q_proj, a.k_proj, a.v_proj, a.o_proj = q, k, v, o
        a.num_key_value_groups = heads // kv  # read by repeat_kv in every attention implementation

    def set_ffn(self, i, ins, out):
        m = self.layers()[i].mlp
        m.gate_proj, m.up_proj, m.down_proj = ins[0], ins[1], out
        m.intermediate_size = out.in_features

    def empty_sublayer(self, i, name):
        L = self.layers()[i]
        if name == "attn":
            L.self_attn = ConstantSublayer(self.hidden, self.attn_out(i).bias, None, True)
        else:
            L.mlp = ConstantSublayer(self.hidden, self.ffn_out(i).bias)

    def fixed_macs(self, seq_len):
        head = getattr(self.model, "lm_head", None)
        return seq_len * head.in_features * head.out_features if head is not None else 0


@register
class LlamaAdapter(DecoderAdapter):
    family = "llama"
    model_types = ("llama",)
