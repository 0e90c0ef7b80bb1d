"""Bonsai (Dery et al. 2024, arXiv 2402.05406): forward-only perturbative structured pruning, as the authors'
code runs it (METHODS.md §5), on our adapters.

Rounds, each removing `prune_frac` of the original prunable cost (the last one what is left to reach the budget):
1. prior per unit under the current model: mean |output-projection column| × RMS of its activation (Wanda-style);
2. per module, the top ⌊(1 − 2·prune_frac)·N⌋ units by prior are fixed; the rest are candidates, sampled with
   probability ∝ (max prior − prior);
3. antithetic pairs of sub-models: a mask zeroing ⌊prune_frac·alive⌋ + 1 candidates per module, then its
   complement (candidates flipped, fixed units kept); every sub-model scored on the same calibration batches by
   the task's label-free loss (LM: mean token NLL; classifier: KL to the dense predictions), masks applied by
   hooks on the live model (no copies);
4. one global L1-regularised linear model of the loss over all candidates' mask bits, its penalty chosen by
   5-fold (contiguous) cross-validation on Kendall τ;
5. the candidates whose presence helps least (lowest coefficient of −loss) are removed up to the round's quota;
   the model is then physically re-sliced from the dense one.
Grouped-query attention: a head unit is a whole KV group (its query heads, k and v), so every kept group keeps
all its query heads. The pure parts (prior, candidates, sampling, regression, quota) are functions tested on
synthetic data; `bonsai_search` is the loop.
"""

from __future__ import annotations

import copy
import logging
import math
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch
from scipy.stats import kendalltau
from tqdm.auto import tqdm

from pruneflow.adapters import SUBLAYERS, Adapter, LayerShape, get_adapter
from pruneflow.adapters.base import head_columns

log = logging.getLogger("pruneflow.bonsai")
Module = tuple[int, str]  # (layer, "attn" | "ffn")


# --- pure parts -------------------------------------------------------------------------------------------------

def unit_prior(W_out: torch.Tensor, sq_mean: torch.Tensor, group: int) -> torch.Tensor:
    """Per unit (a block of `group` output-projection columns): mean over output dims of |W_out column| × RMS
    of that column's input activation, averaged over the unit's columns."""
    col = W_out.detach().cpu().abs().double().mean(0) * sq_mean.cpu().double().clamp(min=0).sqrt()
    return col.view(-1, group).mean(1)


def split_candidates(prior: torch.Tensor, frac: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(fixed, candidates, sampling probabilities over the candidates): the top ⌊(1 − 2·frac)·N⌋ units by prior
    are fixed; the rest are candidates, the weaker the likelier to be dropped (∝ max prior − prior)."""
    p = prior.double().numpy()
    order = np.argsort(-p, kind="stable")
    n_fixed = int(math.floor((1 - 2 * frac) * len(p)))
    fixed, cand = order[:n_fixed], order[n_fixed:]
    w = p.max() - p[cand] if len(cand) else np.zeros(0)
    w = w if w.sum() > 0 else np.ones(len(cand))
    return fixed, cand, w / w.sum()


def sample_antithetic(rng: np.random.Generator, modules: list[tuple[np.ndarray, int]]) -> tuple[np.ndarray, np.ndarray]:
    """One antithetic pair of 0/1 masks over the concatenated candidates of every module: each module drops
    `n_drop` candidates drawn without replacement with its probabilities; the complement flips them."""
    parts = []
    for probs, n_drop in modules:
        m = np.ones(len(probs))
        k = min(n_drop, len(probs), int((probs > 0).sum()))
        if k >= len(probs):
            # Every candidate would go in every mask (e.g. 3 KV groups, 1 candidate, 1 to drop): its bit would
            # just say "mask or complement", the same column for every such module, and the regression could not
            # tell them apart. Drop each with probability 1/2 instead, so its bit varies across pairs.
            m[rng.random(len(probs)) < 0.5] = 0
        elif k:
            m[rng.choice(len(probs), size=k, replace=False, p=probs)] = 0
        parts.append(m)
    mask = np.concatenate(parts) if parts else np.zeros(0)
    return mask, 1 - mask


def kendall_tau(a: np.ndarray, b: np.ndarray) -> float:
    tau = kendalltau(a, b).statistic
    return 0.0 if tau is None or not np.isfinite(tau) else float(tau)


def lasso(X: np.ndarray, y: np.ndarray, lam: float, iters: int = 2000, tol: float = 1e-10) -> tuple[np.ndarray, float]:
    """min_b 1/(2n)‖y − b0 − Xb‖² + lam‖b‖₁ on centred data, by FISTA (accelerated proximal gradient): matrix
    products only, so thousands of candidate units cost milliseconds per fit. Returns (b, b0)."""
    n, p = X.shape
    xm, ym = X.mean(0), y.mean()
    Xc, yc = X - xm, y - ym
    step = 1.0 / max(np.linalg.norm(Xc, 2) ** 2 / n, 1e-12)  # 1 / Lipschitz constant of the gradient
    b = z = np.zeros(p)
    t = 1.0
    for _ in range(iters):
        g = z - step * (Xc.T @ (Xc @ z - yc)) / n
        b_new = np.sign(g) * np.maximum(np.abs(g) - step * lam, 0.0)
        t_new = (1 + math.sqrt(1 + 4 * t * t)) / 2
        z = b_new + (t - 1) / t_new * (b_new - b)
        done = np.abs(b_new - b).max() <= tol * max(1.0, np.abs(b_new).max())
        b, t = b_new, t_new
        if done:
            break
    return b, float(ym - xm @ b)


def fit_global(X: np.ndarray, y: np.ndarray, lambdas: list[float], folds: int = 5) -> tuple[np.ndarray, dict]:
    """The global linear model of y over mask bits X: the L1 penalty (relative to the smallest that zeroes
    every coefficient) chosen by `folds`-fold cross-validation on mean held-out Kendall τ (contiguous folds, as
    the authors' code), then refit on all rows. Returns (coefficients, {"lambda", "cv_tau"})."""
    n = len(y)
    Xc, yc = X - X.mean(0), y - y.mean()
    lam_max = float(np.abs(Xc.T @ yc).max() / n) if n else 0.0
    bounds = np.linspace(0, n, min(folds, n) + 1).astype(int)
    best = (-np.inf, lambdas[0])
    for rel in lambdas:
        taus = []
        for lo, hi in zip(bounds[:-1], bounds[1:]):
            if hi - lo < 2:
                continue
            train = np.r_[0:lo, hi:n]
            b, b0 = lasso(X[train], y[train], rel * lam_max)
            taus.append(kendall_tau(X[lo:hi] @ b + b0, y[lo:hi]))
        tau = float(np.mean(taus)) if taus else 0.0
        if tau > best[0] + 1e-12:
            best = (tau, rel)
    beta, _ = lasso(X, y, best[1] * lam_max)
    return beta, {"lambda": best[1], "cv_tau": best[0]}


def choose_removals(beta: np.ndarray, cost: np.ndarray, quota: float) -> np.ndarray:
    """Indices of the units to remove: lowest coefficient first, until their summed cost reaches the quota
    (the unit that crosses it included, so the quota is always met when the candidates allow)."""
    order = np.argsort(beta, kind="stable")
    before = np.concatenate([[0.0], np.cumsum(cost[order])[:-1]])
    return order[before < quota]


# --- the search on a live model ------------------------------------------------------------------------------------

@dataclass
class Units:
    """The prunable units of one module, in dense ids: neurons, heads (MHA) or KV groups (GQA)."""

    heads_per_unit: int  # query heads per unit (attention), 1 for neurons
    alive: list[int]  # dense unit ids still in the model, in slicing order
    removed: list[int] = field(default_factory=list)  # dense unit ids, in removal order (round, then coefficient)


def unit_costs(adapter: Adapter, layer_cost: Callable[[Adapter, LayerShape], float]) -> dict[str, float]:
    """Cost of one unit of each sublayer, from the cost model's per-layer cost."""
    base = layer_cost(adapter, LayerShape(0, 0, 0))
    head = layer_cost(adapter, LayerShape(adapter.group, 0, 1)) - base  # a KV group: its query heads, one k, one v
    return {"attn": head, "ffn": layer_cost(adapter, LayerShape(0, 1, 0)) - base}


def keep_lists(units: dict[Module, Units], L: int) -> tuple[list[list[int]], list[list[int]]]:
    """Dense head and neuron indices kept per layer."""
    heads = [head_columns(units[(i, "attn")].alive, units[(i, "attn")].heads_per_unit).tolist() for i in range(L)]
    return heads, [sorted(units[(i, "ffn")].alive) for i in range(L)]


def sliced(dense_model, units: dict[Module, Units]):
    """The dense model sliced to the alive units, the dense model untouched. The copy shares every tensor with
    the dense model (slice_ builds new Linears for what it cuts), so it costs only the sliced weights, not a
    second dense model (embeddings, norms and the LM head stay shared)."""
    shared = {id(t): t for t in (*dense_model.parameters(), *dense_model.buffers())}
    model = copy.deepcopy(dense_model, memo=shared)
    adapter = get_adapter(model)
    adapter.slice_(*keep_lists(units, adapter.num_layers))
    return model, adapter


@torch.inference_mode()
def activation_rms(model, adapter: Adapter, batches) -> dict[Module, torch.Tensor]:
    """Mean square of every output projection's input columns over the batches' real tokens."""
    sums: dict[Module, list] = {}
    handles = []
    mask_ref = {}
    for i in range(adapter.num_layers):
        for name in SUBLAYERS:
            if adapter.empty(i, name):
                continue

            def hook(module, args, key=(i, name)):
                x = args[0].reshape(-1, args[0].shape[-1]).double()
                keep = mask_ref["m"]
                x = x[keep] if keep is not None and keep.numel() == x.shape[0] else x
                s = sums.setdefault(key, [torch.zeros(x.shape[1], dtype=torch.float64), 0])
                s[0] += (x ** 2).sum(0).cpu()
                s[1] += x.shape[0]

            handles.append(adapter.out_proj(i, name).register_forward_pre_hook(hook))
    try:
        for enc in batches:
            mask_ref["m"] = enc["attention_mask"].reshape(-1).bool() if "attention_mask" in enc else None
            model(**enc)
    finally:
        for h in handles:
            h.remove()
    return {k: s / max(n, 1) for k, (s, n) in sums.items()}


def bonsai_search(dense_model, batches: list[dict], loss: Callable[[object, list[dict]], float],
                  cost_of: Callable[[Adapter], float], allowed: float,
                  layer_cost: Callable[[Adapter, LayerShape], float], prune_frac: float = 0.05,
                  masks_per_round: int = 40, lambdas: tuple[float, ...] = (0.0, 0.01, 0.05, 0.2),
                  folds: int = 5, perturb: bool = True, seed: int = 0, max_rounds: int = 100,
                  progress: bool = True) -> dict:
    """Prune `dense_model` (not modified) by Bonsai rounds until cost_of(adapter) <= allowed.

    batches: the round's calibration batches (the same for every sub-model); loss(model, batches): the task's
    label-free loss, lower is better; cost_of: the budget's cost of a (sliced) model (allowed: the budget in the
    same units);
    layer_cost: the cost model per layer shape (unit prices). perturb=False is the prior-only ablation (same
    rounds, the lowest-prior candidates removed, no sub-models). Returns keep lists, per-module removal records
    and per-round logs."""
    dense_adapter = get_adapter(dense_model)
    L = dense_adapter.num_layers
    g = dense_adapter.group
    n_heads_units = dense_adapter.dense_kv_heads if g > 1 else dense_adapter.dense_heads
    units = {(i, "attn"): Units(g, list(range(n_heads_units))) for i in range(L)}
    units |= {(i, "ffn"): Units(1, list(range(dense_adapter.dense_neurons))) for i in range(L)}
    price = unit_costs(dense_adapter, layer_cost)
    prunable = sum(price[n] * len(u.alive) for (i, n), u in units.items())
    model, adapter = dense_model, dense_adapter
    rounds = []
    rng_round = np.random.default_rng(seed)
    r = 0
    while cost_of(adapter) > allowed and r < max_rounds:
        r += 1
        quota = min(prune_frac * prunable, cost_of(adapter) - allowed)  # the last round: just what is left
        rms = activation_rms(model, adapter, batches)
        base_loss = loss(model, batches)
        cands = candidates(adapter, units, rms, prune_frac, price)
        if perturb:
            rng = np.random.default_rng(rng_round.integers(2**31))
            X, y = [], []
            bar = tqdm(total=2 * (masks_per_round // 2), desc=f"bonsai round {r}", leave=False, disable=not progress)
            for _ in range(max(1, masks_per_round // 2)):
                for m in sample_antithetic(rng, [(c.probs, c.n_drop) for c in cands]):
                    X.append(m)
                    y.append(-min(loss_with_mask(model, adapter, batches, loss, cands, units, m), 1e8))
                    bar.update(1)
            bar.close()
            X, y = np.asarray(X), np.asarray(y)
            beta, fit = fit_global(X, y, list(lambdas), folds)
        else:
            beta = np.concatenate([c.prior for c in cands])  # prior only: lowest prior goes first
            fit = {"lambda": None, "cv_tau": None}
        drop = choose_removals(beta, np.concatenate([np.full(len(c.ids), c.price) for c in cands]), quota)
        flat_ids = [(c.key, uid) for c in cands for uid in c.ids]
        for k in drop:
            key, uid = flat_ids[k]
            units[key].alive.remove(uid)
            units[key].removed.append(uid)
        model, adapter = sliced(dense_model, units)
        rounds.append({"round": r, "removed": int(len(drop)), "cost": cost_of(adapter),
                       "loss_before": base_loss, "sub_models": int(len(X)) if perturb else 0, **fit})
        log.info("bonsai round %d: removed %d units, cost %.4g (allowed %.4g), loss before %.4f, CV Kendall τ %s",
                 r, len(drop), rounds[-1]["cost"], allowed, base_loss,
                 "n/a" if fit["cv_tau"] is None else f"{fit['cv_tau']:.3f}")
    final = activation_rms(model, adapter, batches) if rounds else None
    heads, neurons = keep_lists(units, L)
    return {"keep_heads": heads, "keep_neurons": neurons, "units": units, "rounds": rounds,
            "final_rms": final, "model": model}


@dataclass
class Candidates:
    """One module's candidates in a round: their positions in the current (sliced) module, dense ids, prior
    values, sampling probabilities, how many a mask drops, and the price of one."""

    key: Module
    positions: np.ndarray
    ids: list[int]
    prior: np.ndarray
    probs: np.ndarray
    n_drop: int
    price: float


def candidates(adapter: Adapter, units: dict[Module, Units], rms: dict[Module, torch.Tensor], prune_frac: float,
               price: dict[str, float]) -> list[Candidates]:
    """Every module's candidates under the current model's prior (modules with none are left out)."""
    out = []
    for (i, name), u in units.items():
        if not u.alive:
            continue
        col_group = adapter.head_dim * u.heads_per_unit if name == "attn" else 1
        prior = unit_prior(adapter.out_proj(i, name).weight, rms[(i, name)], col_group)
        _, cand, probs = split_candidates(prior, prune_frac)
        if len(cand):
            out.append(Candidates((i, name), cand, [u.alive[k] for k in cand], prior[cand].numpy(), probs,
                                  int(math.floor(prune_frac * len(u.alive))) + 1, price[name]))
    return out


def loss_with_mask(model, adapter: Adapter, batches, loss, cands: list[Candidates], units: dict[Module, Units],
                   m: np.ndarray) -> float:
    """The loss of the sub-model where the candidates with mask bit 0 are removed (hooks on the live model)."""
    masks, start = {}, 0
    for c in cands:
        u = units[c.key]
        mask = torch.ones(len(u.alive), u.heads_per_unit, dtype=torch.float32)
        mask[torch.as_tensor(c.positions)] = torch.as_tensor(m[start:start + len(c.positions)], dtype=torch.float32)[:, None]
        masks[c.key] = mask.reshape(-1)
        start += len(c.positions)
    with adapter.masked(masks):
        return loss(model, batches)
