"""The ranking-method interface. A method is a small pydantic class: its fields are its params (the
`rank.<name>` section of params.yaml, validated, unknown keys rejected), its `scores` says how important each
unit of one sublayer is (higher = keep), and it is registered by name. Adding a method is one new file in this
package with a `@register`ed class, plus its tests; nothing else changes.

A method sees a `RankContext`: the adapter (weights, layout), the collected calibration statistics, the seed,
and, for forward-only methods, `forward(batches)` to run the live model on calibration batches, under unit
masks applied by hooks (`adapter.masked`), without copying the model.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, ClassVar, Iterable

import torch
from pydantic import BaseModel, ConfigDict

from pruneflow.adapters import Adapter
from pruneflow.stats import ModuleStats, Statistics


def weight_of(module: torch.nn.Module) -> torch.Tensor:
    """A module's weight as the ranking math reads it: detached, on the CPU beside the statistics (the model
    itself may sit on an accelerator, for forward-only methods)."""
    return module.weight.detach().cpu()


@dataclass
class RankContext:
    adapter: Adapter
    stats: Statistics
    seed: int = 0
    calibration: Callable[[], Iterable[dict]] | None = None  # fresh iterator of tokenized calibration batches
    task: Any = None  # the task (global methods score sub-models by its calibration_loss)
    select: Any = None  # the select params (global methods that meet the budget themselves)
    seq_len: int | None = None  # the length FLOPs are counted at

    def sublayer_stats(self, i: int, name: str) -> ModuleStats:
        return self.stats.sublayer(self.adapter, i, name)

    @torch.inference_mode()
    def forward(self, batches: Iterable[dict], masks: dict[tuple[int, str], torch.Tensor] | None = None) -> list:
        """Model outputs on `batches`, with unit masks {(layer, "attn"|"ffn"): (units,)} applied by hooks."""
        with self.adapter.masked(masks or {}):
            return [self.adapter.model(**enc) for enc in batches]


class Method(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    name: ClassVar[str]
    ranks_heads: ClassVar[bool] = True  # False: heads are ranked by `activation` unless rank.heads says otherwise
    greedy: ClassVar[bool] = False  # True: no scores, the elimination path picks units greedily (obs)
    # True: one search over the whole model (`plan`) gives every layer's order and the kept units themselves
    # (bonsai); select.allocation=ranking then keeps exactly those.
    global_plan: ClassVar[bool] = False

    def plan(self, ctx: RankContext) -> dict:
        """Global methods: {"order": {(layer, sublayer): dense unit ids, least important first},
        "keep_heads": [[...] per layer], "keep_neurons": [[...] per layer], "rounds": [...]}."""
        raise NotImplementedError(f"{type(self).__name__} ranks layer by layer")

    def scores(self, ctx: RankContext, i: int, sublayer: str) -> torch.Tensor:
        """Importance of every unit of layer i's sublayer ("attn": heads, "ffn": neurons), higher = keep."""
        raise NotImplementedError(f"{type(self).__name__} has no per-layer scores (it ranks greedily or plans globally)")


METHODS: dict[str, type[Method]] = {}


def register(cls: type[Method]) -> type[Method]:
    if cls.name in METHODS:
        raise ValueError(f"rank method {cls.name!r} registered twice")
    METHODS[cls.name] = cls
    return cls
