"""How much the model's calibration loss rises when one layer's FFN alone is pruned: the probe behind
`select.allocation: sensitivity` (the tilt itself is a pure function, pruneflow/allocation.py: tilted).

For layer i the probe keeps the neurons the ranking keeps at the uniform allocation's count, refits that FFN's
output projection in closed form from the collected statistics (lstsq, `select.probe_ridge`, not sequential), leaves every other layer dense, and measures the task's calibration loss (the causal LM's next-token
NLL; the classifier's KL to the dense predictions) on a few calibration sequences. The dense model's hidden states
entering each block are kept from one dense pass, so the probe of layer i runs blocks i..L-1 and the head only
(the blocks before it pass their input through and the kept states are fed in at block i): about half a forward
pass per layer, with the same values as a whole forward (blocks before i are dense either way).

The pruned FFN is probed without slicing: its output projection gets the refit columns for the kept neurons and
zeros for the others, which is the sliced layer's output up to the order of a sum (tested against slicing).

With a blockwalk.Residency (runtime.offload cpu or disk) the probe holds one layer's weights at a time, as collect
and the refit do: each layer is brought to the device when it runs and let go after, the probed layer for its
whole probe (its projection is swapped meanwhile); what is outside the layers (embeddings, head) stays while the
probe runs. The losses are the same as with the whole model resident (tested).
"""

from __future__ import annotations

from contextlib import contextmanager, nullcontext
from typing import Iterator

import torch

from pruneflow.adapters import Adapter
from pruneflow.blockwalk import Residency, forwards_replaced
from pruneflow.correction import fit, moments_from_dense


class LayerProbe:
    """probe(neurons) -> per layer, the rise of the calibration loss when that layer keeps neurons[i] FFN neurons
    (its most important by the ranking) and every other layer is dense."""

    def __init__(self, model, adapter: Adapter, stats, ranking: dict, batches, task, method: str, ridge: float,
                 residency: Residency | None = None):
        """residency: where the weights are while the probe runs (None: the model as it is, on its device)."""
        self.model, self.adapter, self.stats, self.ranking = model, adapter, stats, ranking
        self.task, self.method, self.ridge, self.residency = task, method, ridge, residency
        self.batches = list(batches)
        if not self.batches:
            raise ValueError("select.allocation=sensitivity: no calibration text to probe with")
        self._batch = 0
        self.seen: dict[tuple[int, ...], list[float]] = {}  # memo: the sweep's methods share a budget's probe
        with torch.inference_mode(), self._running():
            # A task whose reference is a dense forward (the classifier's predictions) hands over the block
            # inputs on the way; otherwise (the LM's has none) they take a forward of their own.
            with self._grabbing_inputs() as seen:
                self.reference = task.calibration_reference(model, self.batches)
            L = adapter.num_layers
            self.inputs = ([seen[b * L:(b + 1) * L] for b in range(len(self.batches))]
                           if len(seen) == L * len(self.batches) else self._layer_inputs())
            known = task.reference_loss(self.reference)
            self.dense_loss = self._loss() if known is None else known

    def __call__(self, neurons: list[int]) -> list[float]:
        key = tuple(neurons)
        if key not in self.seen:
            self.seen[key] = self._rises(neurons)
        return self.seen[key]

    def _rises(self, neurons: list[int]) -> list[float]:
        rises = []
        with self._running():
            for i, n in enumerate(neurons):
                f = self.ranking["layers"][i]["ffn"]
                keep = sorted(f["order"][f["units"] - n:]) if n else []
                held = nullcontext() if self.residency is None else self.residency.layer(i)
                with torch.inference_mode(), held, self._ffn_keeping(i, keep), self._starting_at(i):
                    rises.append(self._loss() - self.dense_loss)
        return rises

    def _running(self):
        return nullcontext() if self.residency is None else self.residency.whole_model()

    def _indexed(self) -> Iterator[dict]:
        for b, enc in enumerate(self.batches):
            self._batch = b
            yield enc

    def _loss(self) -> float:
        return self.task.calibration_loss(self.model, self._indexed(), self.reference)

    @contextmanager
    def _grabbing_inputs(self) -> Iterator[list[torch.Tensor]]:
        """The hidden states entering every block, in call order, while the context is open."""
        seen: list[torch.Tensor] = []

        def grab(module, args, kwargs):
            seen.append(args[0] if args else kwargs["hidden_states"])

        handles = [layer.register_forward_pre_hook(grab, with_kwargs=True) for layer in self.adapter.layers()]
        try:
            yield seen
        finally:
            for h in handles:
                h.remove()

    def _layer_inputs(self) -> list[list[torch.Tensor]]:
        """Per batch, the hidden states entering every block of the dense model."""
        out = []
        for enc in self.batches:
            with self._grabbing_inputs() as seen:
                self.model(**enc, use_cache=False)
            out.append(seen)
        return out

    @contextmanager
    def _starting_at(self, i: int) -> Iterator[None]:
        """Blocks before i pass their input through; block i gets the dense model's hidden states of this batch."""
        if i == 0:
            yield
            return
        layers = self.adapter.layers()

        def passthrough(*args, **kwargs):
            return args[0] if args else kwargs["hidden_states"]

        def feed(module, args, kwargs):
            h = self.inputs[self._batch][i]
            return ((h, *args[1:]), kwargs) if args else (args, kwargs | {"hidden_states": h})

        handle = layers[i].register_forward_pre_hook(feed, with_kwargs=True)
        try:
            with forwards_replaced([(layers[j], passthrough) for j in range(i)]):
                yield
        finally:
            handle.remove()

    @contextmanager
    def _ffn_keeping(self, i: int, keep: list[int]) -> Iterator[None]:
        """Layer i's FFN output projection refit on the kept neurons, zero on the others; restored after."""
        lin = self.adapter.out_proj(i, "ffn")
        W, b = lin.weight.detach().clone(), (None if lin.bias is None else lin.bias.detach().clone())
        st = self.stats.sublayer(self.adapter, i, "ffn")
        cols = self.adapter.unit_columns("ffn", keep)
        # the fit runs where the statistics are (the CPU), whichever device the layer runs on
        W_s, b_s = W.to(st.cov.device), (None if b is None else b.to(st.cov.device))
        m = moments_from_dense(st.cov, st.mean, W_s, b_s, cols, st.n)
        W_new, b_new = fit(self.method, m, W_s[:, cols], b_s, self.ridge, intercept=b is not None)
        probe_W = torch.zeros_like(W)
        probe_W[:, cols] = W_new.to(device=W.device, dtype=W.dtype)
        with torch.no_grad():
            lin.weight.copy_(probe_W)
            if b is not None and b_new is not None:
                lin.bias.copy_(b_new.to(b.dtype))
        try:
            yield
        finally:
            with torch.no_grad():
                lin.weight.copy_(W)
                if b is not None:
                    lin.bias.copy_(b)
