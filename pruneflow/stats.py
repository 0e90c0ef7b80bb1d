"""Streaming calibration statistics, accumulated with hooks and keyed by module name; memory does not grow with
the sample count.

For the output projection of every sublayer (attention: per-head contexts; FFN: post-activation neurons) we
keep, over non-padding tokens, the input moments n, Σa, Σaaᵀ (pruneflow.moments.Accumulator), and for the FFN
the D2 vote counts of KCM (how often a neuron is among a token's top-k of |a_j|·‖w2_j‖). For post-LN encoders
we also keep Σ‖s − mean(s)‖² of the residual sum s entering the LayerNorm after the sublayer: the LayerNorm
divides by that scale, so errors divided by it are comparable across layers. Any other Linear named in
`extra_linears` gets its input moments too (E[xxᵀ] = half the Hessian of its reconstruction error).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from collections.abc import Mapping
from pathlib import Path
from typing import Callable, Iterable, Iterator

import numpy as np
import torch

from pruneflow.adapters import SUBLAYERS, Adapter
from pruneflow.blockwalk import gather_rows, token_rows
from pruneflow.moments import Accumulator


class ModuleStats(Accumulator):
    """Input moments of one module, plus the output-projection extras (D2 votes, post-LN scale)."""

    def __init__(self) -> None:
        super().__init__()
        self.votes: torch.Tensor | None = None  # (N,) float64, FFN output projections only
        self.norm_energy = 0.0  # Σ_t ‖s_t − mean(s_t)‖² at the post-sublayer LayerNorm input
        self.norm_tokens = 0

    @property
    def norm_scale(self) -> float | None:
        """E‖s − mean(s)‖² per token at the following LayerNorm (None where the arch has no post-norm)."""
        return self.norm_energy / self.norm_tokens if self.norm_tokens else None

    def add_votes(self, a: torch.Tensor, weights: torch.Tensor, k: int) -> None:
        if a.shape[0] == 0:
            return
        if self.votes is None:
            self.votes = torch.zeros(a.shape[1], dtype=torch.float64, device=a.device)
        top = (a.float().abs() * weights).topk(k, dim=1, sorted=False).indices  # a count: order is moot
        self.votes += torch.bincount(top.reshape(-1), minlength=a.shape[1]).double()


@dataclass
class Statistics:
    modules: dict[str, ModuleStats] | Mapping[str, ModuleStats] = field(default_factory=dict)  # loaded: ShardedModules
    tokens: int = 0
    sequences: int = 0
    mean_length: float = 0.0

    def of(self, module_name: str) -> ModuleStats:
        found = self.modules.get(module_name)
        if found is None or found.empty:
            raise ValueError(f"no calibration statistics for {module_name} (was the model already pruned, or "
                             f"collected with another model?)")
        return found

    def sublayer(self, adapter: Adapter, i: int, name: str) -> ModuleStats:
        """Statistics of the input of layer i's `name` output projection."""
        return self.of(adapter.module_names()[adapter.out_proj(i, name)])

    def to_tensors(self) -> dict[str, torch.Tensor]:
        out: dict[str, torch.Tensor] = {}
        for name, s in self.modules.items():
            if s.empty:
                continue
            out |= {f"{name}.{k}": v for k, v in s.state().items()}
            out[f"{name}.meta"] = torch.tensor([s.n, s.norm_energy, s.norm_tokens], dtype=torch.float64)
            if s.votes is not None:
                out[f"{name}.votes"] = s.votes.cpu()
        return out

    def info(self) -> dict:
        return {"tokens": self.tokens, "sequences": self.sequences, "mean_length": self.mean_length}

    @classmethod
    def from_tensors(cls, t: dict[str, torch.Tensor], info: dict) -> "Statistics":
        modules = {key[: -len(".meta")]: _module_from(key[: -len(".meta")], t.get) for key in t if key.endswith(".meta")}
        return cls(modules, info["tokens"], info["sequences"], info["mean_length"])


def _module_from(name: str, get: Callable[[str], torch.Tensor | None]) -> ModuleStats:
    """One module's ModuleStats from its saved tensors (`get(key)`: the tensor, or None where absent)."""
    n, energy, ntok = get(f"{name}.meta").tolist()
    s = ModuleStats()
    acc = Accumulator.from_state(int(n), {k: get(f"{name}.{k}") for k in ("shift", "sum", "gram")})
    s.n, s.shift_x, s.sx, s.sxx = acc.n, acc.shift_x, acc.sx, acc.sxx
    s.votes, s.norm_energy, s.norm_tokens = get(f"{name}.votes"), energy, int(ntok)
    return s


class ShardedModules(Mapping):
    """The per-module statistics of a collect, read from its block shards when asked for, one module at a time
    (nothing is cached): a stage working layer by layer holds that layer's Gram matrices, not every layer's
    (SmolLM2's are 650 MB in all)."""

    def __init__(self, shards: list[Path]):
        from safetensors import safe_open

        self.shard_of: dict[str, Path] = {}
        for path in shards:
            with safe_open(str(path), framework="pt") as f:  # reads the header only
                self.shard_of |= {k[: -len(".meta")]: path for k in f.keys() if k.endswith(".meta")}

    def __getitem__(self, name: str) -> ModuleStats:
        from safetensors import safe_open

        with safe_open(str(self.shard_of[name]), framework="pt") as f:
            keys = set(f.keys())
            return _module_from(name, lambda k: f.get_tensor(k) if k in keys else None)

    def __iter__(self) -> Iterator[str]:
        return iter(self.shard_of)

    def __len__(self) -> int:
        return len(self.shard_of)


class ShardWriter:
    """Writes each block's statistics as it is finished (block-000.safetensors, ...) so a collect holds one
    block's Gram matrices at a time; stats.json, written last, lists the shards (a collect that stops half way
    leaves no stats.json, so nothing downstream reads a partial set)."""

    def __init__(self, directory):
        from pathlib import Path

        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        # stats.safetensors: the one-file format of older collects
        for old in [self.directory / "stats.json", self.directory / "stats.safetensors",
                    *self.directory.glob("block-*.safetensors")]:
            old.unlink(missing_ok=True)
        self.shards: list[str] = []

    def __call__(self, i: int, block: Statistics) -> None:
        from pruneflow.artifacts import save_tensors

        name = f"block-{i:03d}.safetensors"
        save_tensors(self.directory / name, block.to_tensors())
        self.shards.append(name)

    def finish(self, stats: Statistics, extra_info: dict | None = None) -> None:
        from pruneflow.artifacts import write_json

        write_json(self.directory / "stats.json", stats.info() | (extra_info or {}) | {"shards": self.shards})


def statistics_info(directory: Path) -> dict:
    """What a collect's stats.json says: totals, collect params, the shards."""
    from pruneflow.artifacts import read_json

    if not (directory / "stats.json").exists():
        raise FileNotFoundError(f"{directory / 'stats.json'} not found: run the collect stage first")
    info = read_json(directory / "stats.json")
    if "shards" not in info:
        raise ValueError(f"{directory} was written by an older collect (one file, no shards): run collect again")
    return info


def load_statistics(directory: Path) -> Statistics:
    """The statistics of a collect: its stats.json and the block shards it lists, each module's tensors read
    when that module is asked for (ShardedModules)."""
    info = statistics_info(directory)
    missing = [name for name in info["shards"] if not (directory / name).exists()]
    if missing:
        raise FileNotFoundError(f"{directory / missing[0]} not found: run the collect stage again")
    modules = ShardedModules([directory / name for name in info["shards"]])
    return Statistics(modules, info["tokens"], info["sequences"], info["mean_length"])


class _Collector:
    """Hooks that feed ModuleStats; the current batch's padding mask is set before each forward."""

    def __init__(self, adapter: Adapter, vote_topk: float | None, extra_linears: Iterable[str] = (),
                 layers: Iterable[int] | None = None):
        self.adapter = adapter
        self.layers = range(adapter.num_layers) if layers is None else list(layers)
        self.real: torch.Tensor | None = None  # the current batch's real (non-padding) token rows; None: all are
        self.stats = Statistics()
        self.vote_topk = vote_topk
        self.extra_linears = list(extra_linears)
        self.handles: list = []

    def set_mask(self, mask: torch.Tensor) -> None:
        """The next batch's token mask ((B*T,) bool, True for real tokens), as row indices (blockwalk.token_rows)."""
        self.real = token_rows(mask)

    def _rows(self, x: torch.Tensor) -> torch.Tensor:
        return gather_rows(x, self.real)

    def attach(self) -> None:
        ad = self.adapter
        names = ad.module_names()
        for i in self.layers:
            for name in SUBLAYERS:
                if ad.empty(i, name):
                    continue
                out = ad.out_proj(i, name)
                st = self.stats.modules.setdefault(names[out], ModuleStats())
                votes = name == "ffn" and self.vote_topk is not None
                weights = out.weight.detach().float().norm(dim=0) if votes else None
                k = max(1, math.ceil(self.vote_topk * out.in_features)) if weights is not None else 0

                def on_input(module, args, st=st, weights=weights, k=k):
                    rows = self._rows(args[0])
                    st.add(rows)
                    if weights is not None and k > 0:
                        st.add_votes(rows, weights, k)

                self.handles.append(out.register_forward_pre_hook(on_input))
                norm = ad.norm(i, name)
                if norm is not None:
                    def on_norm(module, args, st=st):
                        s = self._rows(args[0]).float()
                        st.norm_energy += float(((s - s.mean(1, keepdim=True)) ** 2).sum())
                        st.norm_tokens += s.shape[0]

                    self.handles.append(norm.register_forward_pre_hook(on_norm))
        modules = dict(ad.model.named_modules())
        for lname in self.extra_linears:
            if lname in self.stats.modules:
                continue
            if lname not in modules:
                raise ValueError(f"no module named {lname!r} in this model")
            st = self.stats.modules.setdefault(lname, ModuleStats())
            self.handles.append(modules[lname].register_forward_pre_hook(
                lambda module, args, st=st: st.add(self._rows(args[0]))))

    def detach(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles.clear()


def length_sorted_batches(tokenizer, texts: list[str], batch_size: int, max_length: int, device: str = "cpu",
                          max_tokens: int | None = None, return_tensors: str = "pt") -> Iterator[tuple[list[int], dict]]:
    """(indices, encoding) of token-length-sorted batches (little padding) of `texts`. With max_tokens, a batch
    also stops growing once batch × padded length would pass it, so peak activation memory does not depend on
    how long the longest sentences are. The one batching rule of collect, correction and prediction."""
    lengths = [len(ids) for ids in tokenizer(texts, truncation=True, max_length=max_length)["input_ids"]]
    order = sorted(range(len(texts)), key=lambda i: lengths[i])
    batch: list[int] = []

    def encode(idx: list[int]):
        enc = tokenizer([texts[j] for j in idx], padding=True, truncation=True, max_length=max_length,
                        return_tensors=return_tensors)
        return idx, (enc.to(device) if return_tensors == "pt" else enc)

    for i in order:
        full = len(batch) == batch_size or (max_tokens and batch and (len(batch) + 1) * lengths[i] > max_tokens)
        if full:
            yield encode(batch)
            batch = []
        batch.append(i)
    if batch:
        yield encode(batch)


def tokenized_batches(tokenizer, texts: list[str], batch_size: int, max_length: int, device: str,
                      max_tokens: int | None = None):
    """The encodings of length_sorted_batches (what a forward pass needs)."""
    for _, enc in length_sorted_batches(tokenizer, texts, batch_size, max_length, device, max_tokens):
        yield enc


@torch.inference_mode()
def collect_statistics(model, adapter: Adapter, batches, vote_topk: float | None = 0.1, progress=None,
                       extra_linears: Iterable[str] = ()) -> Statistics:
    """Run every batch through `model` once and accumulate the statistics of every layer."""
    col = _Collector(adapter, vote_topk, extra_linears)
    col.attach()
    try:
        lengths = []
        for enc in batches:
            col.set_mask(enc["attention_mask"].reshape(-1).bool())
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


def write_statistics(walk, directory, c, progress=None) -> tuple[Statistics, dict]:
    """collect_blockwise into `directory`: one shard per block as it is finished, stats.json last (with `c`, the
    collect params, and the family). Returns the statistics' totals and that info."""
    info = {"vote_topk": c.vote_topk, "max_length": c.max_length, "family": walk.adapter.family}
    writer = ShardWriter(directory)
    stats = collect_blockwise(walk, c.vote_topk, progress, sink=writer)
    writer.finish(stats, info)
    return stats, info


@torch.inference_mode()
def collect_blockwise(walk, vote_topk: float | None = 0.1, progress=None, sink=None) -> Statistics:
    """What collect_statistics gathers, block by block on a blockwalk.BlockWalk: each block's hooks are attached
    while its weights are on the device, and every calibration batch runs through it before the next block.
    Each module sees the same batches in the same order, so the sums are the same. With `sink(i, block_stats)`,
    a finished block's statistics are handed over (written) and dropped: memory holds one block's."""
    adapter = walk.adapter
    stats = Statistics()
    for i in range(adapter.num_layers):
        col = _Collector(adapter, vote_topk, layers=[i])
        masks = walk.masks

        def before(b, col=col):
            col.set_mask(masks[b])

        try:
            walk.step(i, before_batch=before, on_layer=lambda layer, col=col: col.attach())
        finally:
            col.detach()
        if sink is not None:
            sink(i, col.stats)
        else:
            stats.modules |= col.stats.modules
        if progress is not None:
            progress.update(1)
    lengths = [int(n) for h, m in zip(walk.streams, walk.masks) for n in m.reshape(h[0].shape[:2]).sum(1).tolist()]
    stats.tokens, stats.sequences = int(sum(lengths)), len(lengths)
    stats.mean_length = float(np.mean(lengths))
    return stats
