"""FLOPs as fvcore measures them, cross-checked against the adapters' analytic count.

fvcore counts one multiply-add as one flop. It silently skips ops it has no handle for, and
`aten::scaled_dot_product_attention` is one of them (about 5% of MiniLM at length 128): we count with eager
attention (plain matmuls) and refuse to report a number if any matmul-class op went uncounted.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from pruneflow.adapters import get_adapter
from pruneflow.modeling import LogitsOnly, dummy_inputs, eager_attention

MATMUL_OPS = ("addmm", "matmul", "mm", "bmm", "linear", "einsum", "baddbmm")  # fvcore's names for them
MATMUL_HINTS = ("mm", "matmul", "linear", "einsum", "attention", "conv", "dot", "mv")  # unsupported-op screen


class FlopCountError(RuntimeError):
    pass


@dataclass(frozen=True)
class FlopCount:
    total: int  # every op fvcore counts (matmuls, layer norms, ...)
    matmul: int  # matmul-class ops only: what the analytic count models
    analytic: int
    seq_len: int
    batch: int

    @property
    def rel_diff(self) -> float:
        return abs(self.matmul - self.analytic) / max(1, self.analytic)


def count_flops(model, seq_len: int, batch: int = 1, tolerance: float = 0.01) -> FlopCount:
    """fvcore FLOPs of `model` on a (batch, seq_len) input, with eager attention; fails when a matmul-class
    op is unsupported or when fvcore and the analytic count disagree by more than `tolerance`."""
    from fvcore.nn import FlopCountAnalysis

    adapter = get_adapter(model)
    with eager_attention(model), torch.no_grad():
        analysis = FlopCountAnalysis(LogitsOnly(model).eval(), dummy_inputs(model, batch, seq_len))
        analysis.unsupported_ops_warnings(False).uncalled_modules_warnings(False).tracer_warnings("none")
        by_op = analysis.by_operator()
        total = int(analysis.total())
        unsupported = analysis.unsupported_ops()
    missed = sorted(op for op in unsupported if any(h in op.lower() for h in MATMUL_HINTS))
    if missed:
        raise FlopCountError(f"fvcore has no handle for matmul-class ops {missed}: their FLOPs would be dropped")
    matmul = int(sum(v for k, v in by_op.items() if k in MATMUL_OPS))
    analytic = adapter.macs(seq_len) * batch
    fc = FlopCount(total=total, matmul=matmul, analytic=analytic, seq_len=seq_len, batch=batch)
    if fc.rel_diff > tolerance:
        raise FlopCountError(
            f"fvcore matmul FLOPs {matmul:,} and the analytic count {analytic:,} differ by {fc.rel_diff:.2%} "
            f"(> {tolerance:.0%}) at batch {batch}, length {seq_len}: the adapter's cost model is wrong for this model")
    return fc
