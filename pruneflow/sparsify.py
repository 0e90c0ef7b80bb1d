"""Weight sparsity for a whole model: every Linear of every block pruned to an unstructured fraction or to N:M,
block by block, each block calibrated on the outputs of the already-pruned blocks before it (the protocol of
SparseGPT and Wanda, METHODS.md §6). The per-layer math is in sparsity.py (pure functions); this module holds
the methods (small typed classes, registered by name, their fields are their options) and the hook plumbing.

One pass per block, architecture-agnostic: the calibration batches run through the model with input hooks on
the block's Linears (H = X Xᵀ / T in float64, padding tokens excluded), and the forward stops at the end of
that block, so pruning an L-block model costs about L/2 full forward passes plus the per-layer solves. All of a
block's Linears see the still-dense block's inputs in that one pass, then all are pruned.
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass
from typing import Callable, ClassVar, Iterable

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import nn

from pruneflow import sparsity as sp
from pruneflow.adapters import Adapter
from pruneflow.plan import Plan


@dataclass(frozen=True)
class Pattern:
    """What to prune in every Linear: `sparsity` of each row (unstructured) or n of every m consecutive weights."""
    sparsity: float | None = None
    n: int = 0
    m: int = 0

    @classmethod
    def parse(cls, spec: str | float) -> "Pattern":
        """0.5 / "50%" / "0.5" (unstructured) or "2:4" (N:M: 2 zeros in every 4 consecutive weights of a row)."""
        text = str(spec).strip()
        nm = re.fullmatch(r"(\d+):(\d+)", text)
        if nm:
            n, m = int(nm.group(1)), int(nm.group(2))
            if not 0 < n < m:
                raise ValueError(f"sparsity pattern {text!r}: N:M needs 0 < N < M, e.g. '2:4'")
            return cls(n=n, m=m)
        try:
            frac = float(text[:-1]) / 100 if text.endswith("%") else float(text)
        except ValueError:
            raise ValueError(f"sparsity pattern {text!r}: give a fraction in (0, 1) such as 0.5, or N:M such as 2:4") from None
        if not 0 < frac < 1:
            raise ValueError(f"sparsity {frac}: the pruned fraction must be in (0, 1)")
        return cls(sparsity=frac)

    @property
    def label(self) -> str:
        return f"{self.n}:{self.m}" if self.n else f"{self.sparsity:.0%}"

    @property
    def plan_pattern(self) -> str:
        return f"{self.n}:{self.m}" if self.n else "unstructured"

    def mask(self, scores: torch.Tensor) -> torch.Tensor:
        """Prune mask (True = pruned) from scores, per output row: Wanda's comparison group."""
        return sp.nm_mask(scores, self.n, self.m) if self.n else sp.unstructured_mask(scores, self.sparsity)


class SparsityMethod(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    name: ClassVar[str]
    needs_hessian: ClassVar[bool] = True  # False: only diag H is used (no [in, in] accumulation)

    def prune(self, W: torch.Tensor, H: torch.Tensor, pattern: Pattern) -> tuple[torch.Tensor, torch.Tensor]:
        """(new weight, prune mask with True = pruned) for one Linear weight W [out, in] and input moments H."""
        raise NotImplementedError


SPARSITY_METHODS: dict[str, type[SparsityMethod]] = {}


def register(cls: type[SparsityMethod]) -> type[SparsityMethod]:
    if cls.name in SPARSITY_METHODS:
        raise ValueError(f"sparsity method {cls.name!r} registered twice")
    SPARSITY_METHODS[cls.name] = cls
    return cls


@register
class Magnitude(SparsityMethod):
    """|W| per row, no update: the data-free baseline."""
    name: ClassVar[str] = "magnitude"
    needs_hessian: ClassVar[bool] = False

    def prune(self, W, H, pattern):
        mask = pattern.mask(sp.magnitude_scores(W))
        return W.masked_fill(mask, 0), mask


@register
class Wanda(SparsityMethod):
    """|W_ij|·‖X_j‖ per output row, no update (Sun et al. 2023)."""
    name: ClassVar[str] = "wanda"
    needs_hessian: ClassVar[bool] = False

    def prune(self, W, H, pattern):
        mask = pattern.mask(sp.wanda_scores(W, H))
        return W.masked_fill(mask, 0), mask


@register
class SparseGPT(SparsityMethod):
    """Column-by-column OBS with lazy batch updates (Frantar & Alistarh 2023), as IST-DASLab's code."""
    name: ClassVar[str] = "sparsegpt"
    blocksize: int = Field(128, ge=1)
    percdamp: float = Field(0.01, ge=0)

    def prune(self, W, H, pattern):
        return sp.sparsegpt(W, H, pattern.sparsity, pattern.n, pattern.m, self.blocksize, self.percdamp)


@register
class APT(SparsityMethod):
    """The multiple-removal problem (Zhao, Sun et al. 2024): the mask is chosen block by block by the blocked
    MRP sweep (surrogate saliency w²/[H⁻¹]_qq on the updated weights), then, with `refit: full`, the kept
    weights of each row are refitted by the exact one-shot solution for that mask (every kept weight absorbs
    the error; nothing frozen). Full refit makes APT's error at most SparseGPT's on the same mask, by
    construction; it costs one k×k solve per row (k = pruned weights in the row), cheap at these widths."""
    name: ClassVar[str] = "apt"
    blocksize: int = Field(128, ge=1)
    percdamp: float = Field(0.01, ge=0)
    refit: str = Field("full", pattern="^(full|blocked)$")

    def prune(self, W, H, pattern):
        W_new, mask = sp.apt(W, H, pattern.sparsity, pattern.n, pattern.m, self.blocksize, self.percdamp)
        if self.refit == "full":
            W_new = sp.apt_full(W, H, mask, self.percdamp)
        return W_new, mask


def sparsity_method(name: str, options: dict | None = None) -> SparsityMethod:
    if name not in SPARSITY_METHODS:
        raise ValueError(f"sparsity method {name!r} is not registered (registered: {', '.join(sorted(SPARSITY_METHODS))})")
    return SPARSITY_METHODS[name].model_validate(options or {})


# ------------------------------------------------------------------------------------------ the model walk


class _StopForward(Exception):
    """Raised by a hook at the end of the block being calibrated: later blocks need not run."""


def block_linears(block: nn.Module, prefix: str) -> dict[str, nn.Linear]:
    return {f"{prefix}.{name}": mod for name, mod in block.named_modules() if isinstance(mod, nn.Linear)}


@torch.inference_mode()
def block_moments(model: nn.Module, block: nn.Module, linears: dict[str, nn.Linear], batches: Iterable[dict],
                  diagonal_only: bool = False) -> dict[str, torch.Tensor]:
    """X Xᵀ / T (float64) of every Linear in `linears` over the real tokens of `batches`; the forward stops
    after `block`. With diagonal_only, just the diagonal (what Wanda and magnitude need)."""
    sums: dict[str, torch.Tensor] = {}
    count = {"tokens": 0}
    keep: dict[str, torch.Tensor | None] = {"rows": None}
    handles = []
    for name, lin in linears.items():
        def on_input(module, args, name=name):
            x = args[0].reshape(-1, args[0].shape[-1])
            if keep["rows"] is not None and keep["rows"].numel() == x.shape[0]:
                x = x[keep["rows"]]
            x = x.to(torch.float64)
            s = (x * x).sum(0) if diagonal_only else x.T @ x
            sums[name] = sums[name] + s if name in sums else s
        handles.append(lin.register_forward_pre_hook(on_input))

    def stop(module, args, output):
        raise _StopForward

    handles.append(block.register_forward_hook(stop))
    try:
        for enc in batches:
            keep["rows"] = enc["attention_mask"].reshape(-1).bool() if "attention_mask" in enc else None
            count["tokens"] += int(keep["rows"].sum()) if keep["rows"] is not None else enc["input_ids"].numel()
            try:
                model(**enc)
            except _StopForward:
                pass
    finally:
        for h in handles:
            h.remove()
    if not count["tokens"]:
        raise ValueError("no calibration text: the calibration set is empty")
    return {name: s / count["tokens"] for name, s in sums.items()}


@dataclass
class SparsifyReport:
    plan: Plan
    seconds: float
    layer_seconds: dict[str, float]
    errors: dict[str, float]  # relative reconstruction error per Linear: tr(ΔW H ΔWᵀ) / tr(W H Wᵀ)


def sparsify_model(model: nn.Module, adapter: Adapter, batches: Callable[[], Iterable[dict]],
                   method: SparsityMethod, pattern: Pattern, progress=None) -> SparsifyReport:
    """Prune every Linear of every block of `model` in place (weights zeroed and updated), block by block on
    fresh calibration batches (`batches()` returns a new iterator each call). Returns the plan (masks, True =
    kept) and per-layer timings and errors."""
    t0 = time.perf_counter()
    names = {mod: name for name, mod in model.named_modules()}
    masks, patterns, layer_seconds, errors = {}, {}, {}, {}
    for i, block in enumerate(adapter.layers()):
        linears = block_linears(block, names[block])
        moments = block_moments(model, block, linears, batches(), diagonal_only=not method.needs_hessian)
        for name, lin in linears.items():
            if pattern.n and lin.in_features % pattern.m:
                raise ValueError(f"{name}: {lin.in_features} inputs is not a multiple of {pattern.m} ({pattern.label})")
            t1 = time.perf_counter()
            W = lin.weight.data
            H = moments[name]
            W_new, pruned = method.prune(W, H, pattern)
            layer_seconds[name] = time.perf_counter() - t1
            if H.dim() == 2:
                base = sp.reconstruction_error(W, torch.zeros_like(W), H)
                errors[name] = sp.reconstruction_error(W, W_new, H) / max(base, 1e-30)
            lin.weight.data.copy_(W_new.to(W.dtype).masked_fill(pruned.to(W.device), 0))
            masks[name] = ~pruned.cpu()
            patterns[name] = pattern.plan_pattern
        if progress is not None:
            progress.update(1)
    return SparsifyReport(Plan(masks=masks, patterns=patterns), time.perf_counter() - t0, layer_seconds, errors)


def density(model: nn.Module, plan: Plan) -> float:
    """Fraction of nonzero weights over the masked Linears."""
    mods = dict(model.named_modules())
    kept = sum(int((mods[n].weight != 0).sum()) for n in plan.masks)
    total = sum(mods[n].weight.numel() for n in plan.masks)
    return kept / max(total, 1)


__all__ = ["Pattern", "SparsityMethod", "SPARSITY_METHODS", "register", "sparsity_method", "block_moments",
           "sparsify_model", "SparsifyReport", "density"]
