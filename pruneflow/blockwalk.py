"""Walking a model block by block: what its first block is called with is captured once per calibration batch,
then each block is called directly on the previous block's outputs (llm-compressor's sequential pipeline,
SparseGPT's layer loop). collect and the sequential correction walk this way; select's sensitivity probe calls
the whole model, each block's weights brought in as it runs (Residency.whole_model).

Where the weights are while a block runs is `runtime.offload`:
- none: the whole model on the device;
- cpu:  the model in CPU memory, each block moved to the device while it runs (a GPU holds one block);
- disk: the parameters stay on PyTorch's meta device (shapes, no memory); a block's weights are read from the
        checkpoint's safetensors when it runs and dropped after it, so the process holds one block's weights,
        plus the embeddings during the capture. For models that barely fit, or do not fit, for inference.
The calibration hidden states (one copy) stay on the device throughout.
"""

from __future__ import annotations

import json
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator, Literal

import torch
from torch import nn

from pruneflow.adapters import Adapter

Offload = Literal["none", "cpu", "disk"]


class _Stop(Exception):
    pass


def token_rows(mask: torch.Tensor) -> torch.Tensor | None:
    """The row indices of the real tokens in a (B*T,) bool mask, to gather once per batch instead of resolving a
    boolean mask at every use; None when every token is real (LM windows), so nothing is gathered or copied."""
    return None if bool(mask.all()) else mask.nonzero().squeeze(1)


def gather_rows(x: torch.Tensor, rows: torch.Tensor | None) -> torch.Tensor:
    """x (..., d) as (tokens, d), only the real tokens' rows (token_rows)."""
    flat = x.flatten(0, -2)
    return flat if rows is None else flat.index_select(0, rows)


def token_mask(enc: dict) -> torch.Tensor:
    """A batch's (B*T,) bool mask of real tokens: its attention mask, or every token where it has none (LM
    windows)."""
    mask = enc.get("attention_mask")
    return (torch.ones_like(enc["input_ids"]) if mask is None else mask).reshape(-1).bool()


def _stored(h: torch.Tensor, store, b: int) -> torch.Tensor | None:
    """Batch b's captured hidden states: as they are, or (with a store, e.g. sequential.BatchesOnDisk) written
    to it at once and None in their place, so no batch's capture waits in memory for the others."""
    if store is None:
        return h
    store[b] = h
    return None


def layer_inputs(model, adapter: Adapter, batches,
                 store=None) -> list[tuple[torch.Tensor | None, tuple, dict, torch.Tensor]]:
    """(hidden, other args, kwargs, token mask) entering layer 0, per batch (post-LN encoders: every layer gets
    layer 0's arguments). store: where the hidden states go instead (_stored)."""
    captured = []

    def grab(module, args, kwargs):
        captured.append((args[0], args[1:], kwargs))
        raise _Stop

    handle = adapter.layers()[0].register_forward_pre_hook(grab, with_kwargs=True)
    out = []
    try:
        for enc in batches:
            try:
                model(**enc)
            except _Stop:
                pass
            h, args, kwargs = captured.pop()
            out.append((_stored(h, store, len(out)), args, kwargs, token_mask(enc)))
    finally:
        handle.remove()
    return out


def decoder_inputs(model, adapter: Adapter, batches, store=None) -> tuple[list, list[list[tuple[tuple, dict]]]]:
    """Per batch: (hidden, args, kwargs, token mask) entering layer 0, and every layer's own (args, kwargs): masks
    and rotary embeddings can differ per layer type. Each layer's forward is swapped for a recorder that passes
    the hidden states through, so no layer runs (and, with offload=disk, no layer weight is needed).
    store: where the hidden states go instead (_stored)."""
    layers, calls = adapter.layers(), []

    def recorder(i):
        def forward(*args, **kwargs):
            h = args[0] if args else kwargs.pop("hidden_states")
            if kwargs.get("past_key_values") is not None:
                raise RuntimeError("block walk: the model passed a KV cache to its layers although use_cache=False; "
                                   "it would be reused across passes")
            calls.append((h, args[1:], kwargs))
            if i == len(layers) - 1:
                raise _Stop
            return h
        return forward

    streams, per_layer = [], []
    with forwards_replaced([(L, recorder(i)) for i, L in enumerate(layers)]):
        for enc in batches:
            calls.clear()
            try:
                model(**enc, use_cache=False)
            except _Stop:
                pass
            if len(calls) != len(layers):
                raise RuntimeError(f"block walk: captured {len(calls)} layer calls, expected {len(layers)}")
            h, args, kwargs = calls[0]
            streams.append((_stored(h, store, len(streams)), args, kwargs, token_mask(enc)))
            per_layer.append([(a, k) for _, a, k in calls])
            calls.clear()  # the last reference to this batch's hidden states (with a store)
    return streams, per_layer


@contextmanager
def forwards_replaced(replacements: list[tuple[nn.Module, Callable]]) -> Iterator[None]:
    """Each module's forward replaced by the given function for the duration (an instance attribute, which
    nn.Module.__call__ finds first); an instance-level forward the module had (accelerate's hooks) comes back
    after, as does the class's."""
    saved = [(m, m.__dict__.get("forward")) for m, _ in replacements]
    for m, forward in replacements:
        m.forward = forward
    try:
        yield
    finally:
        for m, forward in saved:
            del m.forward
            if forward is not None:
                m.forward = forward


def lazy_model(auto_class, path: str | Path, attn: str = "sdpa", dtype: torch.dtype = torch.float32,
               weights: bool = True) -> nn.Module:
    """The model of the Hugging Face directory `path` with its parameters on the meta device (buffers such as
    rotary frequencies are real): what offload=disk walks, reading weights from `path` as blocks run.
    weights=False: shapes only (what FLOP and parameter counts read); `path` then needs no safetensors."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig

    path = Path(path)
    if weights and not any(path.glob("*.safetensors")):
        raise FileNotFoundError(f"runtime.offload=disk reads weights from safetensors, and {path} has none "
                                "(set runtime.offload to none or cpu)")
    config = AutoConfig.from_pretrained(str(path))
    with init_empty_weights(include_buffers=False):
        model = auto_class.from_config(config, attn_implementation=attn, dtype=dtype)
    model.tie_weights()  # tied weights (an LM head and its embeddings) are one Parameter, as from_pretrained makes
    model.eval()
    model.checkpoint_dir = path  # where DiskWeights reads from
    if model.can_generate() and (path / "generation_config.json").exists():  # as from_pretrained would
        from transformers import GenerationConfig

        model.generation_config = GenerationConfig.from_pretrained(str(path))
    return model


class DiskWeights:
    """Reads parameters of a module from a Hugging Face safetensors checkpoint (one file, or shards with an index)
    onto a device, and drops them back to the meta device. Files are opened per load (memory-mapped, then closed),
    so only the tensors copied out stay resident."""

    def __init__(self, directory: str | Path):
        from safetensors import safe_open

        directory = Path(directory)
        index = directory / "model.safetensors.index.json"
        if index.exists():
            self.where = {k: directory / f for k, f in json.loads(index.read_text())["weight_map"].items()}
        else:
            file = directory / "model.safetensors"
            if not file.exists():
                raise FileNotFoundError(f"{file} not found (runtime.offload=disk needs a safetensors checkpoint)")
            with safe_open(str(file), "pt") as f:
                self.where = {k: file for k in f.keys()}
        self.checkpoint_keys = frozenset(self.where)  # the checkpoint's own names (spills add more to `where`)

    def load(self, model: nn.Module, module: nn.Module, device: str | torch.device, recurse: bool = True,
             strict: bool = True) -> None:
        """Materialise `module`'s parameters (a submodule of `model`; with recurse=False its own, not its
        children's) on `device`, in each parameter's dtype. strict=False leaves the ones the checkpoint lacks
        (a tied LM head) on the meta device."""
        from safetensors import safe_open

        prefix = _prefix(model, module)
        wanted: dict[Path, list[tuple[str, nn.Module, str, torch.dtype]]] = {}
        for name, p in module.named_parameters(recurse=recurse):
            key = f"{prefix}{name}"
            owner_name, _, leaf = name.rpartition(".")
            owner = module.get_submodule(owner_name) if owner_name else module
            if key not in self.where:
                if strict:
                    raise KeyError(f"{key} is not in the checkpoint: runtime.offload=disk needs a checkpoint whose "
                                   f"tensor names are the model's (set runtime.offload to none or cpu)")
                continue
            wanted.setdefault(self.where[key], []).append((key, owner, leaf, p.dtype))
        for file, items in wanted.items():
            with safe_open(str(file), "pt", device="cpu") as f:
                for key, owner, leaf, dtype in items:
                    t = f.get_tensor(key).to(device=device, dtype=dtype)
                    owner._parameters[leaf] = nn.Parameter(t, requires_grad=False)

    def spill(self, model: nn.Module, module: nn.Module, path: str | Path) -> None:
        """Write `module`'s parameters (real: a finished layer) to the safetensors file `path`, read them from
        there from now on, and drop them: how a model built one layer at a time keeps one layer in memory."""
        from pruneflow.artifacts import save_tensors

        prefix = _prefix(model, module)
        tensors = {f"{prefix}{name}": p.detach().cpu() for name, p in module.named_parameters()}
        save_tensors(path, tensors)
        self.where |= dict.fromkeys(tensors, Path(path))
        DiskWeights.drop(module)

    def tensor(self, key: str) -> torch.Tensor:
        from safetensors import safe_open

        with safe_open(str(self.where[key]), "pt", device="cpu") as f:
            return f.get_tensor(key)

    def state_entries(self, model: nn.Module, keep_name) -> tuple[dict[str, tuple], dict[str, str]]:
        """`model`'s state dict for artifacts.write_safetensors_streamed: each tensor's (dtype, shape, load), real
        ones from the model, meta ones read from the checkpoint (or a spill) when written. Tied tensors (one
        Parameter under several names) are written once, under keep_name(names); also returns {dropped: kept}."""
        groups: dict[int, list[str]] = {}
        tensors = model.state_dict(keep_vars=True)
        for name, t in tensors.items():
            groups.setdefault(id(t), []).append(name)
        entries, tied = {}, {}
        for names in groups.values():
            kept = keep_name(names)
            tied |= {n: kept for n in names if n != kept}
            t = tensors[kept]
            if t.is_meta:
                source = next((n for n in [kept, *names] if n in self.where), None)
                if source is None:
                    raise KeyError(f"{kept}: not in memory, nor in the checkpoint or a spilled layer")
                load = lambda source=source: self.tensor(source)  # noqa: E731
            else:
                load = lambda t=t: t  # noqa: E731
            entries[kept] = (t.dtype, tuple(t.shape), load)
        return entries, tied

    @staticmethod
    def drop(module: nn.Module, recurse: bool = True) -> None:
        """Back to the meta device: the memory is freed, the shapes stay."""
        for sub in module.modules() if recurse else [module]:
            for leaf, p in list(sub._parameters.items()):
                if p is not None and not p.is_meta:
                    sub._parameters[leaf] = nn.Parameter(torch.empty_like(p, device="meta"), requires_grad=False)


def _holders(modules: list[nn.Module]) -> list[list[tuple[nn.Module, str]]]:
    """The (module, name) pairs among `modules`' own parameters that hold one Parameter between them (tied weights:
    an LM head and its embeddings), grouped."""
    groups: dict[int, list[tuple[nn.Module, str]]] = {}
    for m in modules:
        for leaf, p in m._parameters.items():
            if p is not None:
                groups.setdefault(id(p), []).append((m, leaf))
    return [g for g in groups.values() if len(g) > 1]


def _tie(groups: list[list[tuple[nn.Module, str]]]) -> None:
    """Every holder of a group gets one Parameter again, a real one where any is: loading and dropping replace a
    Parameter under one name (the checkpoint holds a tied weight once), which would untie the others."""
    for group in groups:
        params = [m._parameters[leaf] for m, leaf in group]
        shared = next((p for p in params if not p.is_meta), params[0])
        for m, leaf in group:
            m._parameters[leaf] = shared


def _prefix(model: nn.Module, module: nn.Module) -> str:
    if module is model:
        return ""
    for name, m in model.named_modules():
        if m is module:
            return name + "."
    raise ValueError("module is not part of the model")


class Residency:
    """Where a walked model's weights are (runtime.offload) and how one block gets onto the device to run."""

    def __init__(self, model: nn.Module, adapter: Adapter, device: str, offload: Offload):
        if offload not in ("none", "cpu", "disk"):
            raise ValueError(f"runtime.offload={offload!r}: expected none, cpu or disk")
        if offload == "disk" and not hasattr(model, "checkpoint_dir"):
            raise ValueError("runtime.offload=disk needs a model made by blockwalk.lazy_model")
        self.model, self.adapter, self.device, self.offload = model, adapter, device, offload
        self.disk = DiskWeights(model.checkpoint_dir) if offload == "disk" else None
        if offload == "none":
            model.to(device)
        elif offload == "cpu":  # everything but the layers on the device; each layer moves when it runs
            adapter.layers().to("cpu")
            in_layers = set(adapter.layers().modules())
            for m in model.modules():
                if m not in in_layers:
                    m._apply(lambda t: t.to(device), recurse=False)

    @contextmanager
    def outside_layers(self) -> Iterator[None]:
        """For the capture: what runs before the first block (embeddings) on the device."""
        if self.disk is None:
            yield
            return
        in_layers = set(self.adapter.layers().modules())
        outside = [m for m in self.model.modules() if m not in in_layers and m._parameters]
        tied = _holders(outside)
        for m in outside:
            self.disk.load(self.model, m, self.device, recurse=False, strict=False)
        _tie(tied)
        try:
            yield
        finally:
            for m in outside:
                DiskWeights.drop(m, recurse=False)
            _tie(tied)

    @contextmanager
    def whole_model(self) -> Iterator[nn.Module]:
        """The model callable as a whole for the duration (the sensitivity probe's forward passes, head included):
        what is outside the layers on the device, and each layer's weights brought to the device when it is
        called and let go when it returns (disk: read from the checkpoint; cpu: moved). A layer already resident
        (inside `layer(i)`) runs as it is; a layer whose forward is replaced meanwhile (passed through) loads
        nothing. offload=none: the model as it is."""
        if self.offload == "none":
            yield self.model
            return
        layers = self.adapter.layers()
        with self.outside_layers(), forwards_replaced([(layers[i], self._loading(i)) for i in range(len(layers))]):
            yield self.model

    def _resident(self, layer: nn.Module) -> bool:
        p = next(layer.parameters(), None)
        if p is None:
            return True
        return not p.is_meta if self.offload == "disk" else p.device.type == torch.device(self.device).type

    def _loading(self, i: int) -> Callable:
        """Layer i's forward, run with its weights on the device for the call (see whole_model)."""
        layer = self.adapter.layers()[i]
        forward = layer.forward  # the class's, or an instance-level one (accelerate's hooks)

        def run(*args, **kwargs):
            if self._resident(layer):
                return forward(*args, **kwargs)
            with self.layer(i):
                return forward(*args, **kwargs)
        return run

    @contextmanager
    def layer(self, i: int) -> Iterator[nn.Module]:
        """Layer i, its weights on the device for the duration."""
        layer = self.adapter.layers()[i]
        if self.offload != "disk":
            with moved_to(layer, self.device, self.offload == "cpu"):
                yield layer
            return
        self.disk.load(self.model, layer, self.device)
        try:
            yield layer
        finally:
            DiskWeights.drop(layer)


@contextmanager
def moved_to(module: nn.Module, device: str, move: bool = True) -> Iterator[nn.Module]:
    """With move, `module` on `device` for the duration and back on the CPU after (offload=cpu's block move)."""
    if move:
        module.to(device)
    try:
        yield module
    finally:
        if move:
            module.to("cpu")


class Capture:
    """Pre-hooks recording the input of given modules during one call."""

    def __init__(self, modules: dict[str, torch.nn.Module | None]):
        self.values: dict[str, torch.Tensor] = {}
        self.handles = [m.register_forward_pre_hook(self._hook(k)) for k, m in modules.items() if m is not None]

    def _hook(self, key):
        def hook(module, args):
            self.values[key] = args[0]
        return hook

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        for h in self.handles:
            h.remove()


def hidden_of(output) -> torch.Tensor:
    return output[0] if isinstance(output, (tuple, list)) else output


class BlockWalk:
    """The calibration batches as they enter each block, advanced one block at a time: `step(i)` runs block i on
    every batch (with the given pre-hook captures and a per-batch callback) and replaces the hidden states by its
    outputs. Post-LN encoders call every block with layer 0's arguments; decoders with each layer's own.
    store: where the per-batch hidden states live instead of a list in memory (sequential.BatchesOnDisk: one
    file per batch, written as each batch is captured); `hidden` is then the store."""

    def __init__(self, model: nn.Module, adapter: Adapter, batches, residency: Residency, store=None):
        self.adapter, self.residency = adapter, residency
        with residency.outside_layers(), torch.inference_mode():
            if adapter.structured and adapter.post_norm:  # (a sparsity-only family, Mamba, has no post-LN)
                self.streams, self._calls = layer_inputs(model, adapter, batches, store), None
            else:
                self.streams, self._calls = decoder_inputs(model, adapter, batches, store)
        if not self.streams:
            raise ValueError("no calibration text: the calibration set is empty (check the calibration data)")
        self.hidden = [s[0] for s in self.streams] if store is None else store
        self.next = 0

    @property
    def masks(self) -> list[torch.Tensor]:
        """Per batch, (B*T,) bool: True for real tokens."""
        return [s[3] for s in self.streams]

    def call(self, i: int, b: int) -> tuple[tuple, dict]:
        """The (args, kwargs) layer i gets on batch b, besides the hidden states."""
        if self._calls is None:
            return self.streams[b][1], self.streams[b][2]
        return self._calls[b][i]

    @contextmanager
    def stepping(self, i: int, on_layer=None) -> Iterator["BlockStep"]:
        """Layer i with its weights on the device for the duration, run batch by batch (in order) by the
        BlockStep yielded; on exit every batch must have run, and the walk is at layer i + 1. on_layer(layer)
        runs once before the first batch (attach hooks there: the weights are real then). What `step` does in
        one call, for a caller that interleaves its own work with each batch (the sequential refit)."""
        if i != self.next:
            raise RuntimeError(f"blocks are walked in order (asked {i}, next {self.next})")
        with self.residency.layer(i) as layer:
            if on_layer is not None:
                on_layer(layer)
            step = BlockStep(self, i, layer)
            yield step
        if step.done != len(self.streams):
            raise RuntimeError(f"block walk: layer {i} ran on {step.done} of {len(self.streams)} batches")
        self.next += 1

    @torch.inference_mode()
    def step(self, i: int, watch: dict[str, nn.Module | None] | None = None, before_batch=None,
             on_layer=None) -> dict[str, list[torch.Tensor]]:
        """Run layer i on every batch, in order; per batch, the inputs of the `watch` modules (pre-hooks).
        before_batch(b) runs before batch b; on_layer(layer) once, with the layer's weights on the device,
        before the first batch (attach hooks there: their weights are real then)."""
        seen: dict[str, list[torch.Tensor]] = {k: [] for k in (watch or {})}
        with self.stepping(i, on_layer) as step:
            for b in range(len(self.streams)):
                if before_batch is not None:
                    before_batch(b)
                values = step.run(b, watch)
                for k in seen:
                    seen[k].append(values.get(k))
        return seen


class BlockStep:
    """One layer of a BlockWalk, on its batches one at a time (BlockWalk.stepping)."""

    def __init__(self, walk: BlockWalk, i: int, layer: nn.Module):
        self.walk, self.i, self.layer, self.done = walk, i, layer, 0

    @torch.inference_mode()
    def run(self, b: int, watch: dict[str, nn.Module | None] | None = None) -> dict[str, torch.Tensor]:
        """Run the layer on batch b (the next one), replacing its hidden states by the layer's output; returns
        the inputs of the `watch` modules during that call."""
        if b != self.done:
            raise RuntimeError(f"block walk: batches run in order (asked {b}, next {self.done})")
        args, kwargs = self.walk.call(self.i, b)
        with Capture(watch or {}) as cap:
            self.walk.hidden[b] = hidden_of(self.layer(self.walk.hidden[b], *args, **kwargs))
        self.done += 1
        return cap.values
