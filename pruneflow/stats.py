"""Streaming calibration statistics, accumulated with hooks; memory does not grow with the sample count.

For every layer and sublayer ("attn", "ffn") we keep the sufficient statistics of the output projection's
input a (per-head contexts for attention, post-activation neurons for the FFN), over non-padding tokens:
    n, Σa and Σaaᵀ (float64, around a shift; per batch in float32, then added into float64), and for the FFN the
    D2 vote counts of KCM (how often a neuron is among a token's top-k of |a_j|·‖w2_j‖).
For post-LN encoders we also keep Σ‖s − mean(s)‖² of the residual sum s entering the LayerNorm after the
sublayer: the LayerNorm divides by that scale, so errors divided by it are comparable across layers.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import torch

from pruneflow.adapters import Adapter

SUBLAYERS = ("attn", "ffn")


def coarse_mean(x: torch.Tensor) -> torch.Tensor:
    """A batch mean on a 1/256 grid (float64): close enough to remove the cancellation a large mean causes,
    coarse enough that subtracting it from float32 data is exact."""
    return torch.round(x.float().mean(0).double() * 256) / 256


@dataclass
class SublayerStats:
    """Sums are taken around a fixed shift (the first batch's mean), so float32 per-batch products do not lose
    the covariance to cancellation when activations have a large mean (head contexts carry the value bias)."""

    n: int = 0
    shift: torch.Tensor | None = None  # (N,) float64
    sum: torch.Tensor | None = None  # (N,) float64, Σ(a − shift)
    gram: torch.Tensor | None = None  # (N, N) float64, Σ(a − shift)(a − shift)ᵀ
    votes: torch.Tensor | None = None  # (N,) float64, ffn only
    norm_energy: float = 0.0  # Σ_t ‖s_t − mean(s_t)‖² at the post-sublayer LayerNorm input
    norm_tokens: int = 0

    @property
    def mean(self) -> torch.Tensor:
        return self.shift + self.sum / max(self.n, 1)

    @property
    def cov(self) -> torch.Tensor:
        """Centered covariance E[(a−μ)(a−μ)ᵀ], float64."""
        m = self.sum / max(self.n, 1)
        return self.gram / max(self.n, 1) - torch.outer(m, m)

    @property
    def second_moment(self) -> torch.Tensor:
        """Uncentered E[aaᵀ]."""
        mu = self.mean
        return self.cov + torch.outer(mu, mu)

    @property
    def norm_scale(self) -> float | None:
        """E‖s − mean(s)‖² per token at the following LayerNorm (None where the arch has no post-norm)."""
        return self.norm_energy / self.norm_tokens if self.norm_tokens else None

    def add(self, a: torch.Tensor, vote_weights: torch.Tensor | None, vote_k: int) -> None:
        a32 = a.float()
        if a32.shape[0] == 0:
            return
        if self.gram is None:
            N = a.shape[1]
            self.shift = coarse_mean(a32)
            self.sum = torch.zeros(N, dtype=torch.float64, device=a.device)
            self.gram = torch.zeros(N, N, dtype=torch.float64, device=a.device)
            if vote_weights is not None:
                self.votes = torch.zeros(N, dtype=torch.float64, device=a.device)
        self.n += a.shape[0]
        c = a32 - self.shift.float()
        self.sum += c.sum(0).double()
        self.gram += (c.T @ c).double()
        if vote_weights is not None and vote_k > 0:
            top = (a32.abs() * vote_weights).topk(vote_k, dim=1).indices
            self.votes += torch.bincount(top.reshape(-1), minlength=a.shape[1]).double()


@dataclass
class Statistics:
    layers: list[dict[str, SublayerStats]] = field(default_factory=list)
    tokens: int = 0
    sequences: int = 0
    mean_length: float = 0.0

    def to_tensors(self) -> dict[str, torch.Tensor]:
        out: dict[str, torch.Tensor] = {}
        for i, subs in enumerate(self.layers):
            for name, s in subs.items():
                if s.gram is None:
                    continue
                p = f"layer{i}.{name}"
                out[f"{p}.shift"], out[f"{p}.sum"], out[f"{p}.gram"] = s.shift.cpu(), s.sum.cpu(), s.gram.cpu()
                out[f"{p}.meta"] = torch.tensor([s.n, s.norm_energy, s.norm_tokens], dtype=torch.float64)
                if s.votes is not None:
                    out[f"{p}.votes"] = s.votes.cpu()
        return out

    @classmethod
    def from_tensors(cls, t: dict[str, torch.Tensor], num_layers: int, info: dict) -> "Statistics":
        layers = []
        for i in range(num_layers):
            subs = {}
            for name in SUBLAYERS:
                p = f"layer{i}.{name}"
                if f"{p}.gram" not in t:
                    subs[name] = SublayerStats()
                    continue
                n, energy, ntok = t[f"{p}.meta"].tolist()
                subs[name] = SublayerStats(int(n), t[f"{p}.shift"], t[f"{p}.sum"], t[f"{p}.gram"], t.get(f"{p}.votes"),
                                           energy, int(ntok))
            layers.append(subs)
        return cls(layers, info["tokens"], info["sequences"], info["mean_length"])


class _Collector:
    """Hooks that feed SublayerStats; the current batch's padding mask is set before each forward."""

    def __init__(self, adapter: Adapter, vote_topk: float):
        self.adapter = adapter
        self.mask: torch.Tensor | None = None  # (B*T,) bool, True for real tokens
        self.stats = Statistics(layers=[{s: SublayerStats() for s in SUBLAYERS} for _ in range(adapter.num_layers)])
        self.vote_topk = vote_topk
        self.handles: list = []

    def _rows(self, x: torch.Tensor) -> torch.Tensor:
        return x.reshape(-1, x.shape[-1])[self.mask]

    def attach(self) -> None:
        ad = self.adapter
        for i in range(ad.num_layers):
            for name in SUBLAYERS:
                if ad.empty(i, name):
                    continue
                out = ad.out_proj(i, name)
                st = self.stats.layers[i][name]
                weights = out.weight.detach().float().norm(dim=0) if name == "ffn" else None
                k = max(1, math.ceil(self.vote_topk * out.in_features)) if weights is not None else 0

                def on_input(module, args, st=st, weights=weights, k=k):
                    st.add(self._rows(args[0]), weights, k)

                self.handles.append(out.register_forward_pre_hook(on_input))
                norm = ad.norm(i, name)
                if norm is not None:
                    def on_norm(module, args, st=st):
                        s = self._rows(args[0]).float()
                        st.norm_energy += float(((s - s.mean(1, keepdim=True)) ** 2).sum())
                        st.norm_tokens += s.shape[0]

                    self.handles.append(norm.register_forward_pre_hook(on_norm))

    def detach(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles.clear()


def tokenized_batches(tokenizer, texts: list[str], batch_size: int, max_length: int, device: str,
                      max_tokens: int | None = None):
    """Length-sorted batches (little padding) of tokenized text with their attention masks. With max_tokens,
    a batch also stops growing once batch × padded length would pass it, so peak activation memory does not
    depend on how long the longest calibration sentences are."""
    lengths = [len(ids) for ids in tokenizer(texts, truncation=True, max_length=max_length)["input_ids"]]
    order = sorted(range(len(texts)), key=lambda i: lengths[i])
    batch: list[int] = []
    for i in order:
        full = len(batch) == batch_size or (max_tokens and batch and (len(batch) + 1) * lengths[i] > max_tokens)
        if full:
            yield _encode(tokenizer, [texts[j] for j in batch], max_length, device)
            batch = []
        batch.append(i)
    if batch:
        yield _encode(tokenizer, [texts[j] for j in batch], max_length, device)


def _encode(tokenizer, texts: list[str], max_length: int, device: str):
    return tokenizer(texts, padding=True, truncation=True, max_length=max_length, return_tensors="pt").to(device)


@torch.inference_mode()
def collect_statistics(model, adapter: Adapter, batches, vote_topk: float = 0.1, progress=None) -> Statistics:
    """Run every batch through `model` once and accumulate the statistics of every layer."""
    col = _Collector(adapter, vote_topk)
    col.attach()
    try:
        lengths = []
        for enc in batches:
            col.mask = enc["attention_mask"].reshape(-1).bool()
            lengths.extend(enc["attention_mask"].sum(1).tolist())
            model(**enc)
            if progress is not None:
                progress.update(enc["attention_mask"].shape[0])
    finally:
        col.detach()
    if not lengths:
        raise ValueError("no calibration text: the calibration set is empty (check prepare.calib_size / the source)")
    col.stats.tokens, col.stats.sequences = int(sum(lengths)), len(lengths)
    col.stats.mean_length = float(np.mean(lengths))
    return col.stats
