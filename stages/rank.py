"""rank: order every prunable unit (attention heads, FFN neurons) of every layer, least important first.

reads   data/dense (weights), data/stats (calibration statistics)
writes  data/rank/ranking.json, metrics/rank.json
params  rank, runtime
Methods (rank.method): obs (default: greedy removal by least least-squares reconstruction error, see
pruneflow/scoring.py), kcm (R2D2, a reconstruction: pruneflow/kcm.py), activation, magnitude, random.
Each layer's order comes with its error curve (the reconstruction error left after removing the first k units
and correcting in closed form), relative to the scale of the LayerNorm that follows; select uses the curves to
spend the FLOP budget where it costs least.
"""

from __future__ import annotations

import logging
import math
import sys
import time

import torch
from tqdm.auto import tqdm

from pruneflow import kcm, scoring
from pruneflow.adapters import Adapter, get_adapter
from pruneflow.artifacts import write_json
from pruneflow.params import Params, RankParams
from pruneflow.runtime import Layout, stage_main
from pruneflow.stats import Statistics, SublayerStats
from pruneflow.task import load_model

log = logging.getLogger("pruneflow.rank")

HEAD_METHODS = {"obs": "obs", "kcm": "activation", "activation": "activation", "magnitude": "magnitude", "random": "random"}


def neuron_order(method: str, adapter: Adapter, i: int, st: SublayerStats, p: RankParams) -> list[int] | None:
    """Removal order of layer i's FFN neurons; None means greedy (obs)."""
    W_out = adapter.ffn_out(i).weight.detach()
    if method == "obs":
        return None
    if method == "activation":
        scores = scoring.activation_neuron_scores(st.second_moment.diagonal(), W_out)
    elif method == "magnitude":
        scores = scoring.magnitude_neuron_scores([m.weight.detach() for m in adapter.ffn_in(i)], W_out)
    elif method == "random":
        scores = scoring.random_scores(W_out.shape[1], p.seed * 1000 + i)
    elif method == "kcm":
        # KCM represents a neuron by its first input projection row (w_in) and/or its output column (w_out).
        scores, _ = kcm.kcm_scores(adapter.ffn_in(i)[0].weight.detach(), W_out, st.votes, st.second_moment, p.kcm)
    else:
        raise ValueError(f"unknown rank.method {method!r}")
    return scoring.order_from_scores(scores)


def head_order(method: str, adapter: Adapter, i: int, st: SublayerStats, p: RankParams) -> list[int] | None:
    W_out, dh = adapter.attn_out(i).weight.detach(), adapter.head_dim
    if method == "obs":
        return None
    if method == "activation":
        scores = scoring.activation_head_scores(st.second_moment.diagonal(), W_out, dh)
    elif method == "magnitude":
        scores = scoring.magnitude_head_scores(adapter.attn_in(i)[0].weight.detach(), W_out, dh)
    elif method == "random":
        scores = scoring.random_scores(W_out.shape[1] // dh, p.seed * 1000 + 500 + i)
    else:
        raise ValueError(f"unknown head ranking {method!r}")
    return scoring.order_from_scores(scores)


def error_space(adapter: Adapter, i: int, name: str, W: torch.Tensor, st: SublayerStats, by_norm: bool
                ) -> tuple[torch.Tensor, float]:
    """The output projection as seen after the LayerNorm that follows it, and that space's error scale.

    Post-LN: out = γ ⊙ (s − mean)/σ + β, so an error Δs on the LayerNorm input reaches the next layer as
    γ ⊙ Δs / σ. Weighting W's rows by γ and dividing errors by E[σ²] makes errors comparable across layers and
    sublayers (the residual stream's outlier dimensions inflate σ but usually carry small γ). Row weights do not
    change the least-squares correction (rows are fitted independently), only which units cost least to remove.
    Without a post-norm (pre-LN decoders) errors are relative to the sublayer's output energy."""
    norm = adapter.norm(i, name)
    if by_norm and norm is not None and st.norm_scale:
        gamma = norm.weight.detach().double()
        return W.double() * gamma[:, None], st.norm_scale / W.shape[0]
    return W.double(), float(torch.einsum("dn,nm,dm->", W.double(), st.cov, W.double()))


def rank_model(adapter: Adapter, stats: Statistics, p: RankParams, progress: bool = True) -> dict:
    """Orders and error curves for every layer; pure given the model and statistics."""
    head_method = HEAD_METHODS[p.method] if p.heads == "auto" else p.heads
    layers = []
    for i in tqdm(range(adapter.num_layers), desc=f"rank ({p.method})", disable=not progress):
        entry = {}
        for name in ("attn", "ffn"):
            st = stats.layers[i][name]
            if st.gram is None:
                raise ValueError(f"layer {i} {name}: no statistics (was the model already pruned?)")
            W = adapter.out_proj(i, name).weight.detach()
            group = adapter.head_dim if name == "attn" else 1
            units = W.shape[1] // group
            order = (head_order(p.method if head_method == p.method else head_method, adapter, i, st, p)
                     if name == "attn" else neuron_order(p.method, adapter, i, st, p))
            chunk = 1 if name == "attn" else max(1, math.ceil(p.chunk * units))
            W_eff, scale = error_space(adapter, i, name, W, st, p.norm_weighting)
            path = scoring.elimination_path(st.cov, W_eff, group, order, chunk, p.ridge)
            entry[name] = {"units": units, "order": path.order, "removed": path.removed,
                           "error": [e / scale for e in path.error], "scale": scale}
        layers.append(entry)
    return {"method": p.method, "head_method": head_method, "layers": layers}


def run(params: Params, layout: Layout) -> dict:
    """Rank heads and neurons of every layer with rank.method."""
    from stages.collect import load_statistics

    t0 = time.perf_counter()
    model = load_model(layout.dense)
    adapter = get_adapter(model)
    stats = load_statistics(layout, adapter.num_layers)
    ranking = rank_model(adapter, stats, params.rank)
    seconds = time.perf_counter() - t0
    write_json(layout.ranking, ranking)
    write_json(layout.metrics / "rank.json", {"method": params.rank.method, "head_method": ranking["head_method"],
                                              "seconds": round(seconds, 2)})
    return {"method": params.rank.method, "seconds": round(seconds, 2)}


if __name__ == "__main__":
    sys.exit(stage_main("rank", run))
