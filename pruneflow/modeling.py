"""Small views of a Hugging Face model shared by FLOP counting, ONNX export and timing."""

from __future__ import annotations

import contextlib
import inspect
from typing import Iterator

import torch
from torch import nn


class LogitsOnly(nn.Module):
    """Tensor-in, tensor-out view of a HF model: (input_ids, attention_mask) -> logits, for tracing and export.
    Models that take `use_cache` (decoders) run without a KV cache, so the graph has no past/present tensors."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model
        self.extra = {"use_cache": False} if "use_cache" in inspect.signature(model.forward).parameters else {}

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids=input_ids, attention_mask=attention_mask, **self.extra).logits


@contextlib.contextmanager
def eager_attention(model: nn.Module) -> Iterator[nn.Module]:
    """Attention as plain matmul + softmax while inside: what fvcore can count (it skips sdpa silently) and
    what exports the same on every ONNX exporter."""
    prev = model.config._attn_implementation
    model.config._attn_implementation = "eager"
    try:
        yield model
    finally:
        model.config._attn_implementation = prev


def is_token_level(model: nn.Module) -> bool:
    """Causal LMs give logits per token (a sequence axis on the output); classifiers one row per input."""
    return "use_cache" in inspect.signature(model.forward).parameters and hasattr(model, "lm_head")


def dummy_inputs(model: nn.Module, batch: int, seq_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Deterministic random token ids (no padding) of the given shape."""
    ids = torch.randint(5, model.config.vocab_size, (batch, seq_len), generator=torch.Generator().manual_seed(0))
    return ids, torch.ones(batch, seq_len, dtype=torch.long)
