"""Architecture adapters, one file per family (SliceGPT-style); see base.py for the interface."""

from pruneflow.adapters import bert, decoder, distilbert, gemma, mamba, mistral, qwen  # noqa: F401  (registration)
from pruneflow.adapters.base import (  # noqa: F401
    SUBLAYERS, Adapter, BlockAdapter, ConstantSublayer, LayerShape, SparsityOnlyAdapter, StructuredPruningUnsupported,
    UnsupportedArchitecture, head_columns, slice_linear,
)
from pruneflow.adapters.registry import ADAPTERS, get_adapter, register, supported_model_types  # noqa: F401
