"""Ranking every prunable unit of every layer: the registered method gives scores (or ranks greedily), and
one shared routine, scoring.elimination_path, walks that order and records the exact reconstruction error
left after closed-form correction, so every method gets per-layer error curves for the allocation."""

from __future__ import annotations

import math
from contextlib import nullcontext
from typing import Callable, ContextManager

import torch
from tqdm.auto import tqdm

from pruneflow import scoring
from pruneflow.adapters import SUBLAYERS, Adapter
from pruneflow.methods import METHODS, RankContext, method_options
from pruneflow.methods.base import weight_of
from pruneflow.params import RankParams
from pruneflow.runtime import trim_freed_memory
from pruneflow.stats import ModuleStats, Statistics


def head_method_name(p: RankParams) -> str:
    """rank.heads, or with 'auto' the rank method itself where it ranks heads, else activation."""
    if p.heads != "auto":
        return p.heads
    return p.method if METHODS[p.method].ranks_heads else "activation"


def error_space(adapter: Adapter, i: int, name: str, W: torch.Tensor, st: ModuleStats, by_norm: bool
                ) -> tuple[torch.Tensor, float]:
    """The output projection as seen after the LayerNorm that follows it, and that space's error scale.

    Post-LN: out = γ ⊙ (s − mean)/σ + β, so an error Δs on the LayerNorm input reaches the next layer as
    γ ⊙ Δs / σ. Weighting W's rows by γ and dividing errors by E[σ²] makes errors comparable across layers and
    sublayers (the residual stream's outlier dimensions inflate σ but usually carry small γ). Row weights do not
    change the least-squares correction (rows are fitted independently), only which units cost least to remove.
    Without a post-norm (pre-LN decoders) errors are relative to the sublayer's output energy."""
    norm = adapter.norm(i, name)
    if by_norm and norm is not None and st.norm_scale:
        gamma = weight_of(norm).double()
        return W.double() * gamma[:, None], st.norm_scale / W.shape[0]
    return W.double(), float(torch.einsum("dn,nm,dm->", W.double(), st.cov, W.double()))


def plans_globally(p: RankParams) -> bool:
    """Whether rank.method (or rank.heads) searches the whole model at once (bonsai) rather than layer by layer."""
    return METHODS[p.method].global_plan or METHODS[head_method_name(p)].global_plan


def rank_model(adapter: Adapter, stats: Statistics, p: RankParams, progress: bool = True,
               calibration=None, task=None, select=None, seq_len: int | None = None,
               layer_weights: Callable[[int], ContextManager] | None = None) -> dict:
    """Orders (least important first) and error curves for every layer and sublayer. A global method (bonsai)
    plans the whole model first (it needs the task, the select params and seq_len) and its kept units are
    recorded in the ranking. layer_weights(i): a context in which layer i's weights are in memory (a model on
    the meta device, runtime.offload=disk: blockwalk.Residency.layer); layer-wise methods read no other layer."""
    methods = {"ffn": method_options(p, p.method), "attn": method_options(p, head_method_name(p))}
    ctx = RankContext(adapter, stats, p.seed, calibration, task, select, seq_len)
    plan = None
    if plans_globally(p):
        if layer_weights is not None:
            raise ValueError(f"rank.method={p.method} searches the whole model at once and needs its weights in "
                             "memory: rank it with runtime.offload none or cpu")
        if type(methods["ffn"]) is not type(methods["attn"]):
            raise ValueError(f"rank.method={p.method} searches heads and neurons together: leave rank.heads=auto")
        plan = methods["ffn"].plan(ctx)
    layers = []
    for i in tqdm(range(adapter.num_layers), desc=f"rank ({p.method})", disable=not progress):
        # what the last layer's N×N temporaries (or a global plan's sub-models) freed goes back to the OS, so this
        # layer's do not come on top of it
        trim_freed_memory()
        with layer_weights(i) if layer_weights is not None else nullcontext():
            layers.append(_rank_layer(ctx, methods, plan, p, i))
    out = {"method": p.method, "head_method": head_method_name(p), "layers": layers}
    if plan is not None:
        out |= {"keep_heads": plan["keep_heads"], "keep_neurons": plan["keep_neurons"], "rounds": plan["rounds"],
                "budget": select.budget, "cost": select.cost}
    return out


def _rank_layer(ctx: RankContext, methods: dict, plan: dict | None, p: RankParams, i: int) -> dict:
    """Layer i's entry of the ranking: per sublayer, the removal order and the error left after each step."""
    adapter, entry = ctx.adapter, {}
    for name in SUBLAYERS:
        st = ctx.sublayer_stats(i, name)
        method = methods[name]
        if plan is not None:
            order = plan["order"][(i, name)]
        else:
            order = None if method.greedy else scoring.order_from_scores(method.scores(ctx, i, name))
        units = adapter.units(name)
        chunk = 1 if name == "attn" else max(1, math.ceil(p.chunk * units))
        W = weight_of(adapter.out_proj(i, name))
        W_eff, scale = error_space(adapter, i, name, W, st, p.norm_weighting)
        cov, st = st.cov, None  # the Gram is not needed while the path runs
        path = scoring.elimination_path(cov, W_eff, adapter.group_size(name), order, chunk, p.ridge)
        entry[name] = {"units": units, "order": path.order, "removed": path.removed,
                       "error": [e / scale for e in path.error], "scale": scale}
    return entry
