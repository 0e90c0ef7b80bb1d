"""Mistral: the Llama layout (sliding-window attention changes the mask, not the modules)."""

from __future__ import annotations

from pruneflow.adapters.decoder import DecoderAdapter
from pruneflow.adapters.registry import register


@register
class MistralAdapter(DecoderAdapter):
    family = "mistral"
    model_types = ("mistral",)
