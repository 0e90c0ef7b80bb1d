"""Adapters register themselves by config.model_type; get_adapter picks one for a model."""

from __future__ import annotations

from torch import nn

from pruneflow.adapters.base import Adapter, UnsupportedArchitecture

ADAPTERS: list[type[Adapter]] = []


def register(cls: type[Adapter]) -> type[Adapter]:
    ADAPTERS.append(cls)
    return cls


def supported_model_types() -> str:
    return ", ".join(t for a in ADAPTERS for t in a.model_types)


def get_adapter(model: nn.Module) -> Adapter:
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    for cls in ADAPTERS:
        if model_type in cls.model_types:
            return cls(model)
    raise UnsupportedArchitecture(
        f"unsupported architecture {model_type!r} ({type(model).__name__}); supported model types: "
        f"{supported_model_types()}")
