"""Adapters register themselves by config.model_type; get_adapter picks one for a model.

The registry holds structured adapters (`Adapter`) and sparsity-only ones (`SparsityOnlyAdapter`) alike;
`adapter.structured` tells them apart (see base.py)."""

from __future__ import annotations

from torch import nn

from pruneflow.adapters.base import BlockAdapter, UnsupportedArchitecture

ADAPTERS: list[type[BlockAdapter]] = []


def register(cls: type[BlockAdapter]) -> type[BlockAdapter]:
    ADAPTERS.append(cls)
    return cls


def supported_model_types() -> str:
    return ", ".join(t if a.structured else f"{t} (weight sparsity only)" for a in ADAPTERS for t in a.model_types)


def get_adapter(model: nn.Module) -> BlockAdapter:
    """The registered adapter serving `model` (an `Adapter` when its family has heads and neurons)."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    for cls in ADAPTERS:
        if model_type in cls.model_types:
            return cls(model)
    raise UnsupportedArchitecture(
        f"unsupported architecture {model_type!r} ({type(model).__name__}); supported model types: "
        f"{supported_model_types()}")
