"""Weight sparsity for a whole model: every Linear of every block pruned to an unstructured fraction or to N:M,
block by block, each block calibrated on the outputs of the already-pruned blocks before it (the protocol of
SparseGPT and Wanda, METHODS.md §6). The per-layer math is in sparsity.py (pure functions); this module holds
the methods (small typed classes, registered by name, their fields are their options) and the hook plumbing.

Architecture-agnostic walk (pruneflow/blockwalk.py, as collect's and the refit's): the calibration batches run
once up to the first block, and every block's call arguments are kept (masks and rotary embeddings differ per
layer type in Gemma 3); each block is then called directly on the kept hidden states, with input hooks on its Linears
(H = X Xᵀ / T, padding tokens excluded), pruned, and called again to make the next block's inputs. Pruning an
L-block model costs about two full forward passes plus the per-layer solves. All of a block's Linears see the
still-dense block's inputs in that one pass, then all are pruned.
"""

from __future__ import annotations

import re
import time
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable, ClassVar, Iterable, Iterator

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import nn

from pruneflow import sparsity as sp
from pruneflow.adapters import Adapter
from pruneflow.blockwalk import BlockStep, BlockWalk, Residency
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
    needs_calibration: ClassVar[bool] = True  # False: weights only; the walk runs no forward pass at all

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
    needs_calibration: ClassVar[bool] = False

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
    """The multiple-removal problem (Zhao, Sun et al. 2024): a mask, then the exact optimal update of every
    kept weight of each row for that mask (δ* = −w_Q[(H⁻¹)_QQ]⁻¹(H⁻¹)_Q,:; nothing frozen), so on the same mask
    its layer error is at most SparseGPT's, by construction.

    `mask`: `sparsegpt` takes SparseGPT's sweep (saliency w²/[U]_ii² on the OBS-updated weights, the surrogate
    METHODS.md §4.3 names) and starts the refit from its weights; `mrp` chooses the mask block by block by the
    blocked multiple-removal sweep (saliency on the MRP-updated weights; slower, padded k×k solves).
    `solver`: `cg` reaches the exact optimum by batched conjugate gradients (one [rows, in]×[in, in] matmul
    per iteration, warm-started, monotone); `direct` solves each row's k×k system by Cholesky (exact in one
    step, ~k³ per row: about 50× SparseGPT's time on 1536-wide layers)."""
    name: ClassVar[str] = "apt"
    blocksize: int = Field(128, ge=1)
    percdamp: float = Field(0.01, ge=0)
    mask: str = Field("sparsegpt", pattern="^(sparsegpt|mrp)$")
    solver: str = Field("cg", pattern="^(cg|direct)$")
    cg_iters: int = Field(30, ge=1, description="cg: iteration cap (the relative residual usually reaches cg_tol first)")
    cg_tol: float = Field(1e-6, gt=0)

    def prune(self, W, H, pattern):
        if self.mask == "sparsegpt":
            W_start, mask = sp.sparsegpt(W, H, pattern.sparsity, pattern.n, pattern.m, self.blocksize, self.percdamp)
        else:
            W_start, mask = sp.apt(W, H, pattern.sparsity, pattern.n, pattern.m, self.blocksize, self.percdamp)
        if self.solver == "direct":
            return sp.apt_full(W, H, mask, self.percdamp), mask
        W_new, _ = sp.refit_cg(W, H, mask, W_start, self.percdamp, self.cg_iters, self.cg_tol)
        return W_new, mask


def sparsity_method(name: str, options: dict | None = None) -> SparsityMethod:
    if name not in SPARSITY_METHODS:
        raise ValueError(f"sparsity method {name!r} is not registered (registered: {', '.join(sorted(SPARSITY_METHODS))})")
    return SPARSITY_METHODS[name].model_validate(options or {})


# ------------------------------------------------------------------------------------------ the model walk


class _StopForward(Exception):
    """Raised by a hook once what is needed has run: later blocks need not."""


def block_linears(block: nn.Module, prefix: str) -> dict[str, nn.Linear]:
    return {f"{prefix}.{name}": mod for name, mod in block.named_modules() if isinstance(mod, nn.Linear)}


class _Moments:
    """Input hooks that accumulate X Xᵀ (or its diagonal) of each Linear over the real tokens, in float64.

    Consecutive Linears fed the very same tensor (q/k/v, gate/up) share one product. Each batch's product is
    taken in float32 and summed in float64: the float32 sum over one batch's tokens is accurate to ~1e-6
    relative, and float64 products would cost twice the block's forward on CPU."""

    def __init__(self, linears: dict[str, nn.Linear], diagonal_only: bool):
        self.sums: dict[str, torch.Tensor] = {}
        self.tokens = 0
        self.rows: torch.Tensor | None = None
        self._last: tuple[torch.Tensor, torch.Tensor] | None = None  # (input tensor, its product)
        self.diagonal_only = diagonal_only
        self.handles = [lin.register_forward_pre_hook(self._hook(name)) for name, lin in linears.items()]

    def _hook(self, name):
        def on_input(module, args):
            # Identity, not address: a freed activation's memory is reused by later tensors of the same shape.
            if self._last is not None and self._last[0] is args[0]:
                s = self._last[1]
            else:
                x = args[0].reshape(-1, args[0].shape[-1])
                if self.rows is not None and self.rows.numel() == x.shape[0]:
                    x = x[self.rows.to(x.device)]
                x = x.float()
                s = ((x * x).sum(0) if self.diagonal_only else x.T @ x).to(torch.float64).cpu()
                self._last = (args[0], s)
            self.sums[name] = self.sums[name] + s if name in self.sums else s.clone()
        return on_input

    def batch(self, attention_mask: torch.Tensor | None, n_tokens: int) -> None:
        """Call before each batch's forward: which rows are real tokens (padding excluded)."""
        self.rows = attention_mask.reshape(-1).bool() if attention_mask is not None else None
        self.tokens += int(self.rows.sum()) if self.rows is not None else n_tokens
        self._last = None

    def result(self) -> dict[str, torch.Tensor]:
        for h in self.handles:
            h.remove()
        self._last = None
        if not self.tokens:
            raise ValueError("no calibration text: the calibration set is empty")
        return {name: s / self.tokens for name, s in self.sums.items()}


@torch.inference_mode()
def block_moments(model: nn.Module, block: nn.Module, linears: dict[str, nn.Linear], batches: Iterable[dict],
                  diagonal_only: bool = False) -> dict[str, torch.Tensor]:
    """X Xᵀ / T (float64) of every Linear in `linears` over the real tokens of `batches`, running the whole
    model and stopping after `block` (the reference the cached walk of `sparsify_model` must agree with)."""
    acc = _Moments(linears, diagonal_only)

    def stop(module, args, output):
        raise _StopForward

    stop = block.register_forward_hook(stop)
    try:
        for enc in batches:
            acc.batch(enc.get("attention_mask"), enc["input_ids"].numel())
            try:
                model(**enc)
            except _StopForward:
                pass
    finally:
        stop.remove()
    return acc.result()


@dataclass
class SparsifyReport:
    plan: Plan
    seconds: float
    layer_seconds: dict[str, float]  # the per-Linear solves
    errors: dict[str, float]  # relative reconstruction error per Linear: tr(ΔW H ΔWᵀ) / tr(W H Wᵀ)
    forward_seconds: float = 0.0  # the calibration forwards inside the walk (capture + 2 block passes)


def sparsify_model(model: nn.Module, adapter: Adapter, batches: Callable[[], Iterable[dict]],
                   method: SparsityMethod, pattern: Pattern, progress=None, device: str | None = None
                   ) -> SparsifyReport:
    """Prune every Linear of every block of `model` in place (weights zeroed and updated), block by block.

    The calibration batches run once up to the first block and are then walked block by block
    (blockwalk.BlockWalk: each block is called directly, with the arguments the model gives that block, its own
    masks and rotary embeddings where layer types differ): once with input hooks for its moments, and once after
    pruning to produce the next block's inputs, so block i is calibrated on the outputs of the already-pruned
    blocks < i. Cost: about two full forward passes plus the solves, instead of L/2 passes when each block re-runs
    the model's prefix. With `device` set, only the current block is moved there (runtime.offload=cpu: the device
    holds one block's weights plus the calibration hidden states), and the model is back where it was after."""
    t0 = time.perf_counter()
    names = {mod: name for name, mod in model.named_modules()}
    masks, patterns, layer_seconds, errors = {}, {}, {}, {}
    home = next(model.parameters()).device
    residency = Residency(model, adapter, str(home) if device is None else device,
                          "none" if device is None else "cpu")
    try:
        t_fwd = time.perf_counter()
        walk = BlockWalk(model, adapter, batches(), residency) if method.needs_calibration else None
        forward_seconds = time.perf_counter() - t_fwd
        for i in range(adapter.num_layers):
            with _block(walk, residency, i) as (block, step):
                linears = block_linears(block, names[block])
                for name, lin in linears.items():
                    if pattern.n and lin.in_features % pattern.m:
                        raise ValueError(f"{name}: {lin.in_features} inputs is not a multiple of {pattern.m} "
                                         f"({pattern.label})")
                t_fwd = time.perf_counter()
                moments = {} if walk is None else _walk_moments(walk, i, block, linears, not method.needs_hessian)
                forward_seconds += time.perf_counter() - t_fwd
                for name, lin in linears.items():
                    t1 = time.perf_counter()
                    W = lin.weight.data
                    H = moments[name].to(W.device) if name in moments else None
                    W_new, pruned = method.prune(W, H, pattern)
                    layer_seconds[name] = time.perf_counter() - t1
                    if H is not None and H.dim() == 2:
                        base = sp.reconstruction_error(W, torch.zeros_like(W), H)
                        errors[name] = sp.reconstruction_error(W, W_new, H) / max(base, 1e-30)
                    lin.weight.data.copy_(W_new.to(W.dtype).masked_fill(pruned.to(W.device), 0))
                    masks[name] = ~pruned.cpu()
                    patterns[name] = pattern.plan_pattern
                t_fwd = time.perf_counter()
                for b in range(0 if step is None else len(walk.hidden)):  # the pruned block makes the next inputs
                    step.run(b)
                forward_seconds += time.perf_counter() - t_fwd
            if progress is not None:
                progress.update(1)
    finally:
        if device is not None:
            model.to(home)
    return SparsifyReport(Plan(masks=masks, patterns=patterns), time.perf_counter() - t0, layer_seconds, errors,
                          forward_seconds)


@contextmanager
def _block(walk: BlockWalk | None, residency: Residency, i: int) -> Iterator[tuple[nn.Module, BlockStep | None]]:
    """Block i with its weights on the device: the walk's step (run batch by batch), or, for a method that needs
    no calibration (no walk), the layer alone."""
    if walk is None:
        with residency.layer(i) as layer:
            yield layer, None
    else:
        with walk.stepping(i) as step:
            yield step.layer, step


@torch.inference_mode()
def _walk_moments(walk: BlockWalk, i: int, block: nn.Module, linears: dict[str, nn.Linear],
                  diagonal_only: bool) -> dict[str, torch.Tensor]:
    """X Xᵀ / T of block i's Linears over the walk's batches, the block run on its current inputs (not advanced)."""
    acc = _Moments(linears, diagonal_only)
    for b, mask in enumerate(walk.masks):
        acc.batch(None if bool(mask.all()) else mask, mask.numel())
        args, kwargs = walk.call(i, b)
        block(walk.hidden[b], *args, **kwargs)
    moments = acc.result()
    missing = [n for n in linears if n not in moments]
    if missing:
        raise ValueError(f"{missing[0]} received no input in its block's forward (is it called as a module? the "
                         "architecture's adapter must route its input through a hook)")
    return moments


def density(model: nn.Module, plan: Plan) -> float:
    """Fraction of nonzero weights over the masked Linears."""
    mods = dict(model.named_modules())
    kept = sum(int((mods[n].weight != 0).sum()) for n in plan.masks)
    total = sum(mods[n].weight.numel() for n in plan.masks)
    return kept / max(total, 1)


__all__ = ["Pattern", "SparsityMethod", "SPARSITY_METHODS", "register", "sparsity_method", "block_moments",
           "sparsify_model", "SparsifyReport", "density"]


def check_sparsify_params(section) -> None:
    """What params.py cannot check without the registry: every method exists, its options validate, every
    pattern parses (N < M), and option sections name listed methods."""
    from pruneflow.params import ParamsError

    try:
        for name in section.methods:
            sparsity_method(name, section.section(name))
        for spec in section.patterns:
            Pattern.parse(spec)
    except ValueError as err:
        raise ParamsError(f"sparsify: {err}".replace("\n", " ")) from None
    stray = sorted(set(section.model_extra or {}) - set(section.methods))
    if stray:
        raise ParamsError(f"sparsify.{stray[0]}: options for a method not in sparsify.methods ({', '.join(section.methods)})")
