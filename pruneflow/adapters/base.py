"""The adapter interface: where one architecture family keeps its prunable units, and how to slice or mask them.

An adapter knows where each layer's attention heads and FFN neurons live (the input projections whose rows
make a unit, the output projection whose columns do), the head size and KV groups, the analytic multiply-add
count, and how to physically slice any set of units per layer. Everything else in pruneflow (statistics,
ranking, selection, correction, export) goes through this interface; only adapter files name modules.

Unit conventions
- head h of layer i: rows h*dh:(h+1)*dh of q (and of k, v for MHA); the same columns of the output projection.
  With grouped-query attention a KV head serves `group` query heads: slicing keeps a KV head iff any of its
  query heads is kept, and every kept KV group must keep the same number of query heads (repeat_kv needs it).
- neuron j of layer i: row j of every FFN input projection (intermediate, or gate and up); column j of the
  FFN output projection.
- A sublayer left with zero units is replaced by `ConstantSublayer` (its output no longer depends on the
  input), because zero-width matmuls export to ONNX but do not load in onnxruntime.
Indices always refer to the dense model the slicing started from.

Two kinds of family, told apart by the class attribute `structured`
- `BlockAdapter` is what weight sparsity needs (sparsify.py): where the blocks are (`layers()`), hence which
  Linears the sparsity methods prune (`block_linears()`). Both kinds below are BlockAdapters.
- `Adapter` (structured = True): heads, neurons, slicing, masking, MACs, for the structured pipeline.
- `SparsityOnlyAdapter` (structured = False): families without attention heads and FFN neurons (Mamba).
  Asking one for any structured member (`shape`, `units`, `slice_`, `attn_in`, `masked`, `macs`, ...)
  raises `StructuredPruningUnsupported`, a one-line ValueError naming the family, so collect/rank/select/
  correct fail at their first use of the adapter rather than deep inside the math.
The registry holds both kinds; `get_adapter` returns whichever serves the model, and a caller that needs
heads and neurons can test `adapter.structured` up front.

Adding a family: subclass `Adapter` (or `DecoderAdapter` for Llama-style decoders, `SparsityOnlyAdapter` for
a family without heads and neurons) in a new file of this package, implement the abstract methods, decorate
it with `@register`, and import the file in `__init__.py`. The conformance suite (tests/test_adapters.py)
then runs against every structured family; a sparsity-only family gets its own end-to-end test (as
tests/test_mamba.py).
"""

from __future__ import annotations

import contextlib
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import ClassVar, Iterator

import torch
from torch import nn

SUBLAYERS = ("attn", "ffn")


class UnsupportedArchitecture(ValueError):
    pass


class ConstantSublayer(nn.Module):
    """Stands in for a sublayer that lost all its units: outputs its bias (or zeros), optionally followed by
    the post-sublayer residual + LayerNorm of post-LN encoders. Same call signature as what it replaces."""

    def __init__(self, hidden: int, bias: torch.Tensor | None, norm: nn.Module | None = None,
                 returns_tuple: bool = False):
        super().__init__()
        self.bias = nn.Parameter(bias.detach().clone() if bias is not None else torch.zeros(hidden),
                                 requires_grad=False)
        self.norm = norm
        self.returns_tuple = returns_tuple

    def forward(self, *args, **kwargs):
        h = args[0] if args else kwargs["hidden_states"]
        out = self.bias.to(h.dtype).expand_as(h)
        if self.norm is not None:
            out = self.norm(out + h)
        return (out, None) if self.returns_tuple else out


def head_columns(heads: list[int] | torch.Tensor, head_dim: int) -> torch.Tensor:
    """Columns (of an output projection) or rows (of q/k/v) owned by `heads`, in head order."""
    heads = torch.as_tensor(heads, dtype=torch.long).reshape(-1, 1)
    return (heads * head_dim + torch.arange(head_dim)).reshape(-1)


def slice_linear(linear: nn.Linear, index: torch.Tensor, dim: int) -> nn.Linear:
    """A new Linear keeping output rows (dim=0) or input columns (dim=1) `index` of `linear`."""
    index = index.to(linear.weight.device)
    has_bias = linear.bias is not None
    # built on the meta device and handed the gathered copies: no random init, no second copy
    new = nn.Linear(len(index) if dim == 1 else linear.in_features, len(index) if dim == 0 else linear.out_features,
                    bias=has_bias, device="meta", dtype=linear.weight.dtype)
    new.weight = nn.Parameter(linear.weight.detach().index_select(dim, index))
    if has_bias:
        new.bias = nn.Parameter(linear.bias.detach().clone() if dim == 1 else linear.bias.detach().index_select(0, index))
    return new


@dataclass
class LayerShape:
    heads: int
    neurons: int
    kv_heads: int


class StructuredPruningUnsupported(UnsupportedArchitecture, AttributeError):
    """A sparsity-only family was asked for heads, neurons, shapes or slicing. Also an AttributeError, so
    hasattr() and getattr(..., default) see the member as absent instead of raising."""


class BlockAdapter(ABC):
    """One architecture family, as far as weight sparsity needs it: the blocks and the Linears inside them."""

    family: ClassVar[str]  # name used in manifests and messages
    model_types: ClassVar[tuple[str, ...]]  # config.model_type values this adapter serves
    structured: ClassVar[bool] = False  # True: also knows heads and neurons (an `Adapter`)
    ort_optimizer_type: ClassVar[str | None] = None  # onnxruntime transformer-optimizer model_type, if it has one

    def __init__(self, model: nn.Module):
        self.model = model
        self.config = model.config

    @abstractmethod
    def layers(self) -> nn.ModuleList:
        """The blocks, in order."""

    def module_names(self) -> dict[nn.Module, str]:
        return {m: n for n, m in self.model.named_modules()}

    def block_linears(self) -> dict[str, nn.Linear]:
        """Every Linear inside the blocks, by qualified name (what sparsity plans prune)."""
        names = self.module_names()
        return {names[m]: m for block in self.layers() for m in block.modules() if isinstance(m, nn.Linear)}

    @property
    def num_layers(self) -> int:
        return len(self.layers())


class Adapter(BlockAdapter):
    """One transformer family. Subclasses say where modules live; slicing, masking, shapes and costs are shared."""

    structured: ClassVar[bool] = True
    ffn_in_names: ClassVar[tuple[str, ...]]  # the FFN input projections (their count enters the MAC formula)
    post_norm: ClassVar[bool]  # post-LN residual (BERT): a sublayer's output is normalised with the residual
    # Pre-norm families whose sublayer output passes through its own norm before the residual add (Gemma 3's
    # post_attention_layernorm / post_feedforward_layernorm): the residual stream is not linear in the output
    # projection there, which the sequential refit needs.
    sublayer_out_norm: ClassVar[bool] = False

    # --- where things are: every family implements these (and `layers`) --------------------------------
    @abstractmethod
    def attn_in(self, i: int) -> list[nn.Linear]:
        """Layer i's [q, k, v] projections (rows = heads)."""

    @abstractmethod
    def attn_out(self, i: int) -> nn.Linear:
        """Layer i's attention output projection (columns = heads)."""

    @abstractmethod
    def attention_core(self, i: int) -> tuple[nn.Module, bool]:
        """Layer i's module that computes attention from the block's input and returns (output, weights), and
        whether that output has passed the output projection already (decoders, DistilBERT: it lives inside) or is
        what the projection reads (BERT: attention.self gives the context). The sequential correction answers for
        it with a result it already has, instead of recomputing attention (pruneflow/sequential.py)."""

    @abstractmethod
    def ffn_in(self, i: int) -> list[nn.Linear]:
        """Layer i's FFN input projections, in `ffn_in_names` order (rows = neurons)."""

    @abstractmethod
    def ffn_out(self, i: int) -> nn.Linear:
        """Layer i's FFN output projection (columns = neurons)."""

    @abstractmethod
    def set_attn(self, i: int, q: nn.Linear, k: nn.Linear, v: nn.Linear, o: nn.Linear, heads: int, kv: int) -> None:
        """Install sliced attention projections (and whatever head counts the module caches)."""

    @abstractmethod
    def set_ffn(self, i: int, ins: list[nn.Linear], out: nn.Linear) -> None:
        """Install sliced FFN projections."""

    @abstractmethod
    def empty_sublayer(self, i: int, name: str) -> None:
        """Replace sublayer `name` ("attn" | "ffn") of layer i by a ConstantSublayer where the layer calls it."""

    @abstractmethod
    def constant(self, i: int, name: str) -> ConstantSublayer | None:
        """The ConstantSublayer standing in for an emptied sublayer, or None while it has units."""

    @abstractmethod
    def fixed_macs(self, seq_len: int) -> int:
        """Multiply-adds per sequence that no unit removal changes (classifier, pooler, LM head)."""

    def norm(self, i: int, name: str) -> nn.Module | None:
        """Post-LN families: the LayerNorm whose input is residual + this sublayer's output (None: pre-LN)."""
        return None

    def residual_norm(self, i: int, name: str) -> nn.Module | None:
        """Pre-norm families: the norm that reads the residual stream entering this sublayer, so its input *is*
        that stream (None: post-LN)."""
        return None

    # --- by sublayer name ("attn" | "ffn") --------------------------------------------------------------
    def empty(self, i: int, name: str) -> bool:
        return self.constant(i, name) is not None

    def out_proj(self, i: int, name: str) -> nn.Linear:
        return self.attn_out(i) if name == "attn" else self.ffn_out(i)

    def in_projs(self, i: int, name: str) -> list[nn.Linear]:
        return self.attn_in(i) if name == "attn" else self.ffn_in(i)

    def group_size(self, name: str) -> int:
        """Columns of the output projection per unit: head_dim for heads, 1 for neurons."""
        return self.head_dim if name == "attn" else 1

    def unit_columns(self, name: str, units: list[int]) -> torch.Tensor:
        """Output-projection columns the given units own, in the order slicing leaves them."""
        units = sorted(int(u) for u in units)
        return head_columns(units, self.head_dim) if name == "attn" else torch.tensor(units, dtype=torch.long)

    # --- sizes --------------------------------------------------------------------------------------------
    @property
    def hidden(self) -> int:
        return self.config.hidden_size if hasattr(self.config, "hidden_size") else self.config.dim

    @property
    def head_dim(self) -> int:
        return getattr(self.config, "head_dim", None) or self.hidden // self.dense_heads

    @property
    def dense_heads(self) -> int:
        return getattr(self.config, "num_attention_heads", None) or self.config.n_heads

    @property
    def dense_kv_heads(self) -> int:
        return getattr(self.config, "num_key_value_heads", None) or self.dense_heads

    @property
    def dense_neurons(self) -> int:
        return getattr(self.config, "intermediate_size", None) or self.config.hidden_dim

    @property
    def group(self) -> int:
        """Query heads per KV head in the dense model (1 for multi-head attention)."""
        return self.dense_heads // self.dense_kv_heads

    def units(self, name: str) -> int:
        return self.dense_heads if name == "attn" else self.dense_neurons

    def shape(self) -> list[LayerShape]:
        out = []
        for i in range(self.num_layers):
            attn_empty = self.empty(i, "attn")
            heads = 0 if attn_empty else self.attn_out(i).in_features // self.head_dim
            kv = 0 if attn_empty else self.attn_in(i)[1].out_features // self.head_dim
            neurons = 0 if self.empty(i, "ffn") else self.ffn_out(i).in_features
            out.append(LayerShape(heads, neurons, kv))
        return out

    # --- analytic multiply-adds (as fvcore counts them: one multiply-add = one flop) ----------------------
    def layer_macs(self, s: LayerShape, seq_len: int) -> int:
        """Multiply-adds of one layer's prunable matmuls for one sequence of `seq_len` tokens."""
        n, d, dh = seq_len, self.hidden, self.head_dim
        attn = n * d * dh * (s.heads + 2 * s.kv_heads) + 2 * n * n * dh * s.heads + n * s.heads * dh * d
        ffn = (len(self.ffn_in_names) + 1) * n * d * s.neurons
        return attn + ffn

    def macs(self, seq_len: int, shape: list[LayerShape] | None = None) -> int:
        shape = shape if shape is not None else self.shape()
        return sum(self.layer_macs(s, seq_len) for s in shape) + self.fixed_macs(seq_len)

    def unit_macs(self, seq_len: int) -> tuple[int, int]:
        """MACs of one more head (MHA: with its own k, v) and of one more neuron, at `seq_len`."""
        zero = LayerShape(0, 0, 0)
        head = self.layer_macs(LayerShape(1, 0, 1 if self.group == 1 else 0), seq_len) - self.layer_macs(zero, seq_len)
        neuron = self.layer_macs(LayerShape(0, 1, 0), seq_len)
        return head, neuron

    # --- slicing --------------------------------------------------------------------------------------------
    def kv_heads_for(self, heads: list[int]) -> list[int]:
        """The KV heads that a kept set of query heads needs; checks equal kept counts per group."""
        g = self.group
        groups = sorted({h // g for h in heads})
        counts = {k: sum(1 for h in heads if h // g == k) for k in groups}
        if len(set(counts.values())) > 1:
            raise ValueError(f"grouped-query attention: every kept KV group must keep the same number of "
                             f"query heads, got {counts} (group -> kept query heads)")
        return groups

    def is_dense(self, i: int) -> bool:
        return (not self.empty(i, "attn") and not self.empty(i, "ffn")
                and self.shape()[i] == LayerShape(self.dense_heads, self.dense_neurons, self.dense_kv_heads))

    def slice_(self, keep_heads: list[list[int]], keep_neurons: list[list[int]]) -> None:
        """Physically keep only these heads and neurons per layer (indices into the *dense* layer).
        Must be called on a dense model; a layer may keep nothing (its sublayer becomes constant)."""
        self.check_layer_count(keep_heads, keep_neurons)
        # every layer is validated before any is touched (no half-sliced model)
        plan = [self._checked_keep(i, keep_heads[i], keep_neurons[i]) for i in range(self.num_layers)]
        for i, keep in enumerate(plan):
            self._slice_layer(i, *keep)

    def check_layer_count(self, keep_heads: list[list[int]], keep_neurons: list[list[int]]) -> None:
        if len(keep_heads) != self.num_layers or len(keep_neurons) != self.num_layers:
            raise ValueError(f"expected keep lists for {self.num_layers} layers, "
                             f"got {len(keep_heads)} (heads) and {len(keep_neurons)} (neurons)")

    def slice_layer(self, i: int, keep_heads: list[int], keep_neurons: list[int]) -> None:
        """slice_ for layer i alone (the streamed sequential correction slices each layer as it reads it in)."""
        self._slice_layer(i, *self._checked_keep(i, keep_heads, keep_neurons))

    def _checked_keep(self, i: int, keep_heads: list[int], keep_neurons: list[int]
                      ) -> tuple[list[int], list[int], list[int]]:
        """Sorted kept heads, neurons and the KV heads they need; ValueError if out of range or layer i is sliced."""
        heads = sorted(set(int(h) for h in keep_heads))
        neurons = sorted(set(int(j) for j in keep_neurons))
        if heads and (heads[0] < 0 or heads[-1] >= self.dense_heads):
            raise ValueError(f"layer {i}: head index out of range 0..{self.dense_heads - 1}")
        if neurons and (neurons[0] < 0 or neurons[-1] >= self.dense_neurons):
            raise ValueError(f"layer {i}: neuron index out of range 0..{self.dense_neurons - 1}")
        if not self.is_dense(i):
            raise ValueError(f"layer {i} is already sliced; slice a dense model (indices are dense indices)")
        return heads, neurons, self.kv_heads_for(heads) if heads else []

    def _slice_layer(self, i: int, heads: list[int], neurons: list[int], kv: list[int]) -> None:
        if not heads:
            self.empty_sublayer(i, "attn")
        elif len(heads) < self.dense_heads:
            q_idx, kv_idx = head_columns(heads, self.head_dim), head_columns(kv, self.head_dim)
            q, k, v = self.attn_in(i)
            self.set_attn(i, slice_linear(q, q_idx, 0), slice_linear(k, kv_idx, 0), slice_linear(v, kv_idx, 0),
                          slice_linear(self.attn_out(i), q_idx, 1), len(heads), len(kv))
        if not neurons:
            self.empty_sublayer(i, "ffn")
        elif len(neurons) < self.dense_neurons:
            idx = torch.tensor(neurons)
            self.set_ffn(i, [slice_linear(m, idx, 0) for m in self.ffn_in(i)], slice_linear(self.ffn_out(i), idx, 1))

    # --- masking: virtual sub-models by hooks, no copies ------------------------------------------------------
    @contextlib.contextmanager
    def masked(self, unit_masks: dict[tuple[int, str], torch.Tensor]) -> Iterator[None]:
        """While inside, multiply the units of the given sublayers by mask values ({(layer, "attn"|"ffn"):
        (units,) tensor}: 0 removes a unit, 1 keeps it). The mask scales the output projection's input columns,
        so a 0/1 mask computes exactly what slicing those units away computes (up to float rounding)."""
        handles = []
        try:
            for (i, name), mask in unit_masks.items():
                cols = mask.reshape(-1).repeat_interleave(self.group_size(name))

                def scale(module, args, cols=cols):
                    return (args[0] * cols.to(args[0].dtype).to(args[0].device),) + args[1:]

                handles.append(self.out_proj(i, name).register_forward_pre_hook(scale))
            yield
        finally:
            for h in handles:
                h.remove()


# What only structured adapters have: the members a SparsityOnlyAdapter refuses.
_ADAPTER_MEMBERS = {n for n in dir(Adapter) if not n.startswith("__")} | set(Adapter.__annotations__)
STRUCTURED_MEMBERS = frozenset(_ADAPTER_MEMBERS - set(dir(BlockAdapter)))


class SparsityOnlyAdapter(BlockAdapter):
    """A family with no attention heads or FFN neurons (Mamba): weight sparsity only. Any structured member
    raises StructuredPruningUnsupported, a one-line error saying so. (The refusal lives here, not in
    BlockAdapter, because a __getattr__ there would also swallow AttributeErrors raised inside Adapter's
    properties and replace their messages.)"""

    def __getattr__(self, name: str):
        # Reached only when normal lookup fails, i.e. for members this class does not have.
        if name in STRUCTURED_MEMBERS:
            raise StructuredPruningUnsupported(
                f"{self.family} supports weight sparsity (sparsify) only; structured pruning needs attention "
                f"heads and FFN neurons (asked for adapter.{name})")
        raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")
