"""Qwen2 and Qwen3: the Llama layout. Qwen2's q/k/v projections carry biases (sliced with their rows);
Qwen3 adds q_norm/k_norm, RMSNorms over head_dim shared by all heads, which slicing heads leaves alone."""

from __future__ import annotations

from pruneflow.adapters.decoder import DecoderAdapter
from pruneflow.adapters.registry import register


@register
class Qwen2Adapter(DecoderAdapter):
    family = "qwen2"
    model_types = ("qwen2",)


@register
class Qwen3Adapter(DecoderAdapter):
    family = "qwen3"
    model_types = ("qwen3",)
