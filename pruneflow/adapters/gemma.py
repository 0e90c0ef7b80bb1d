"""Gemma 3 (text): the Llama module layout plus post-sublayer norms (post_attention_layernorm and
post_feedforward_layernorm normalise each sublayer's output before the residual add) and q/k norms over
head_dim. head_dim is its own config value (not hidden / heads). An emptied sublayer's constant still passes
through its post-norm, which the decoder layer applies after the call."""

from __future__ import annotations

from pruneflow.adapters.decoder import DecoderAdapter
from pruneflow.adapters.registry import register


@register
class Gemma3Adapter(DecoderAdapter):
    family = "gemma3"
    model_types = ("gemma3_text",)
    sublayer_out_norm = True

    def residual_norm(self, i, name):  # Gemma's post_attention_layernorm normalises the attention output
        L = self.layers()[i]
        return L.input_layernorm if name == "attn" else L.pre_feedforward_layernorm
