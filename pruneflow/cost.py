"""What `select.budget` is a fraction of: a pluggable cost, measured on real models and modelled analytically.

Each cost measures a model (`measure`), and models the part that pruning changes per layer shape
(`layer_cost`, plus `fixed`), from which the allocation gets the price of one head and one neuron. select
spends the budget with the model and verifies it with the measurement on the actually sliced model.

  flops     fvcore FLOPs (one multiply-add = one flop) at a stated sequence length, eager attention,
            cross-checked against the adapter's analytic multiply-add count
  params    parameters of the transformer blocks (embeddings and heads excluded: how Bonsai and LLM-Pruner
            report sparsity)
  nonzeros  nonzero weights of the blocks' Linear layers (what unstructured and N:M masks reduce)
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field

from torch import nn

from pruneflow.adapters import Adapter, LayerShape, get_adapter
from pruneflow.allocation import Costs


@dataclass(frozen=True)
class Measured:
    total: int  # the measured cost
    analytic: int  # the cost model's value for the same model
    details: dict = field(default_factory=dict)


class Cost(ABC):
    name: str
    # Whether `measure` reads weight values. FLOPs and parameter counts read shapes only, so they measure a model
    # whose parameters are on the meta device (fvcore traces it just the same): select then holds no weights.
    reads_weights: bool = False

    @abstractmethod
    def measure(self, model: nn.Module) -> Measured:
        """The model's cost, measured, beside the analytic model's value."""

    @abstractmethod
    def layer_cost(self, adapter: Adapter, s: LayerShape) -> int:
        """The part of one layer's cost that depends on its kept heads, KV heads and neurons."""

    def fixed(self, adapter: Adapter) -> int:
        """Modelled cost no unit removal changes."""
        return 0

    def analytic(self, adapter: Adapter) -> int:
        return sum(self.layer_cost(adapter, s) for s in adapter.shape()) + self.fixed(adapter)

    def unit_costs(self, adapter: Adapter) -> Costs:
        """The price of one more head (MHA: with its own k, v) and of one more neuron, and the fixed part.
        With grouped-query attention a query head shares its KV head with its group, so the k/v projections
        of every KV group are counted as fixed (exact while each group keeps a head; an over-estimate, so
        still within budget, when a whole group goes)."""
        zero = LayerShape(0, 0, 0)
        base = self.layer_cost(adapter, zero)
        head = self.layer_cost(adapter, LayerShape(1, 0, 1 if adapter.group == 1 else 0)) - base
        fixed = self.fixed(adapter)
        if adapter.group > 1:
            fixed += adapter.num_layers * (self.layer_cost(adapter, LayerShape(0, 0, adapter.dense_kv_heads)) - base)
        return Costs(head=head, neuron=self.layer_cost(adapter, LayerShape(0, 1, 0)) - base, fixed=fixed)

    def describe(self) -> str:
        return self.name


class FlopCost(Cost):
    name = "flops"

    def __init__(self, seq_len: int, tolerance: float = 0.01):
        self.seq_len, self.tolerance = seq_len, tolerance

    def measure(self, model):
        from pruneflow.flops import count_flops

        fc = count_flops(model, self.seq_len, tolerance=self.tolerance)
        return Measured(fc.total, fc.analytic, {"matmul": fc.matmul, "fvcore_vs_analytic": fc.rel_diff})

    def layer_cost(self, adapter, s):
        return adapter.layer_macs(s, self.seq_len)

    def fixed(self, adapter):
        return adapter.fixed_macs(self.seq_len)

    def describe(self):
        return f"fvcore FLOPs at length {self.seq_len}"


def _linear_params(lin: nn.Linear) -> tuple[int, int]:
    """(weights per output row, bias per output row)."""
    return lin.in_features, int(lin.bias is not None)


class ParamCost(Cost):
    name = "params"

    def measure(self, model):
        adapter = get_adapter(model)
        total = sum(p.numel() for block in adapter.layers() for p in block.parameters())
        return Measured(total, self.analytic(adapter))

    def _biases(self, adapter) -> tuple[int, int, int]:
        """Whether q, k/v and the FFN input projections carry biases (read off the dense config's modules)."""
        i = next(j for j in range(adapter.num_layers) if not adapter.empty(j, "attn"))
        q, k, _ = adapter.attn_in(i)
        f = next(j for j in range(adapter.num_layers) if not adapter.empty(j, "ffn"))
        return int(q.bias is not None), int(k.bias is not None), sum(int(m.bias is not None) for m in adapter.ffn_in(f))

    def layer_cost(self, adapter, s):
        d, dh = adapter.hidden, adapter.head_dim
        qb, kb, fb = self._biases(adapter)
        attn = s.heads * dh * (2 * d + qb) + s.kv_heads * dh * 2 * (d + kb)
        ffn = s.neurons * ((len(adapter.ffn_in_names) + 1) * d + fb)
        return attn + ffn

    def fixed(self, adapter):
        return 0  # norms and output biases stay; measure() - analytic() carries them


class NonzeroCost(Cost):
    name = "nonzeros"
    reads_weights = True

    def measure(self, model):
        adapter = get_adapter(model)
        total = sum(int(m.weight.count_nonzero()) for m in adapter.block_linears().values())
        return Measured(total, self.analytic(adapter))

    def layer_cost(self, adapter, s):
        d, dh = adapter.hidden, adapter.head_dim
        return s.heads * dh * 2 * d + s.kv_heads * dh * 2 * d + s.neurons * (len(adapter.ffn_in_names) + 1) * d


def make_cost(name: str, seq_len: int, tolerance: float = 0.01) -> Cost:
    if name == "flops":
        return FlopCost(seq_len, tolerance)
    if name == "params":
        return ParamCost()
    if name == "nonzeros":
        return NonzeroCost()
    raise ValueError(f"select.cost={name!r}: choose flops, params or nonzeros")
