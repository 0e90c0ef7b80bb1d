"""Architecture adapters: one per family, one interface (SliceGPT-style).

An adapter knows where each layer's attention heads and FFN neurons live (the input projections whose rows
make a unit, the output projection whose columns do), the head size and KV groups, the analytic multiply-add
count, and how to physically slice any set of units per layer. Everything else in pruneflow (statistics,
ranking, selection, correction, export) goes through this interface and never names a module itself.

Unit conventions
- head h of layer i: rows h*dh:(h+1)*dh of q (and of k, v for MHA); the same columns of the output projection.
  With grouped-query attention a KV head serves `group` query heads: slicing keeps a KV head iff any of its
  query heads is kept, and every kept KV group must keep the same number of query heads (repeat_kv needs it).
- neuron j of layer i: row j of every FFN input projection (intermediate, or gate and up); column j of the
  FFN output projection.
- A sublayer left with zero units is replaced by `ConstantSublayer` (its output no longer depends on the
  input), because zero-width matmuls export to ONNX but do not load in onnxruntime.
Indices in manifests always refer to the dense model the slicing started from.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import torch
from torch import nn

MANIFEST = "manifest.json"
WEIGHTS = "model.safetensors"


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


def slice_linear(linear: nn.Linear, index: torch.Tensor, dim: int) -> nn.Linear:
    """A new Linear keeping output rows (dim=0) or input columns (dim=1) `index` of `linear`."""
    index = index.to(linear.weight.device)
    w = linear.weight.index_select(dim, index).detach().clone()
    has_bias = linear.bias is not None
    new = nn.Linear(w.shape[1], w.shape[0], bias=has_bias, device=w.device, dtype=w.dtype)
    new.weight.data.copy_(w)
    if has_bias:
        b = linear.bias.detach().clone() if dim == 1 else linear.bias.index_select(0, index).detach().clone()
        new.bias.data.copy_(b)
    return new


@dataclass
class LayerShape:
    heads: int
    neurons: int
    kv_heads: int


class Adapter:
    """Base: subclasses say where modules live; slicing, shapes and MACs are shared."""

    family: ClassVar[str]
    model_types: ClassVar[tuple[str, ...]]
    ffn_in_names: ClassVar[tuple[str, ...]]  # attributes of the FFN module holding its input projections
    post_norm: ClassVar[bool]  # post-LN residual (BERT): sublayer output is normalised with the residual

    def __init__(self, model: nn.Module):
        self.model = model
        self.config = model.config

    # --- where things are (per subclass) -----------------------------------------------------------
    def layers(self) -> nn.ModuleList: raise NotImplementedError
    def attn_module(self, i: int) -> nn.Module: raise NotImplementedError
    def attn_in(self, i: int) -> list[nn.Linear]: raise NotImplementedError  # [q, k, v]
    def attn_out(self, i: int) -> nn.Linear: raise NotImplementedError
    def ffn_in(self, i: int) -> list[nn.Linear]: raise NotImplementedError
    def ffn_out(self, i: int) -> nn.Linear: raise NotImplementedError
    def attn_norm(self, i: int) -> nn.Module | None: return None  # its input = residual + attention output
    def ffn_norm(self, i: int) -> nn.Module | None: return None
    def _set_attn(self, i: int, q: nn.Linear, k: nn.Linear, v: nn.Linear, o: nn.Linear, heads: int, kv: int): raise NotImplementedError
    def _set_ffn(self, i: int, ins: list[nn.Linear], out: nn.Linear): raise NotImplementedError
    def _empty_attn(self, i: int): raise NotImplementedError
    def _empty_ffn(self, i: int): raise NotImplementedError
    def attn_empty(self, i: int) -> bool: raise NotImplementedError
    def ffn_empty(self, i: int) -> bool: raise NotImplementedError
    def fixed_macs(self, seq_len: int) -> int: raise NotImplementedError  # classifier / lm head, per sequence

    def _constant(self, i: int, name: str) -> "ConstantSublayer": raise NotImplementedError

    # --- by sublayer name ("attn" | "ffn"): what statistics, ranking and correction iterate over ---------
    def out_proj(self, i: int, name: str) -> nn.Linear:
        return self.attn_out(i) if name == "attn" else self.ffn_out(i)

    def norm(self, i: int, name: str) -> nn.Module | None:
        return self.attn_norm(i) if name == "attn" else self.ffn_norm(i)

    def empty(self, i: int, name: str) -> bool:
        return self.attn_empty(i) if name == "attn" else self.ffn_empty(i)

    def constant(self, i: int, name: str) -> "ConstantSublayer":
        """The stand-in of an emptied sublayer (where slicing put it)."""
        if not self.empty(i, name):
            raise ValueError(f"layer {i} {name} is not empty")
        return self._constant(i, name)

    # --- shared -------------------------------------------------------------------------------------
    @property
    def num_layers(self) -> int:
        return len(self.layers())

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

    def shape(self) -> list[LayerShape]:
        out = []
        for i in range(self.num_layers):
            heads = 0 if self.attn_empty(i) else self.attn_out(i).in_features // self.head_dim
            kv = 0 if self.attn_empty(i) else self.attn_in(i)[1].out_features // self.head_dim
            neurons = 0 if self.ffn_empty(i) else self.ffn_out(i).in_features
            out.append(LayerShape(heads, neurons, kv))
        return out

    def layer_macs(self, s: LayerShape, seq_len: int) -> int:
        """Multiply-adds of one layer's prunable matmuls for one sequence of `seq_len` tokens
        (as fvcore counts: one multiply-add = one flop)."""
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

    def kv_heads_for(self, heads: list[int]) -> list[int]:
        """The KV heads that a kept set of query heads needs; checks equal kept counts per group."""
        g = self.group
        groups = sorted({h // g for h in heads})
        counts = {k: sum(1 for h in heads if h // g == k) for k in groups}
        if len(set(counts.values())) > 1:
            raise ValueError(f"grouped-query attention: every kept KV group must keep the same number of "
                             f"query heads, got {counts} (group -> kept query heads)")
        return groups

    def slice_(self, keep_heads: list[list[int]], keep_neurons: list[list[int]]) -> None:
        """Physically keep only these heads and neurons per layer (indices into the *dense* layer).
        Must be called on a dense model; a layer may keep nothing (its sublayer becomes constant)."""
        if len(keep_heads) != self.num_layers or len(keep_neurons) != self.num_layers:
            raise ValueError(f"expected keep lists for {self.num_layers} layers, "
                             f"got {len(keep_heads)} (heads) and {len(keep_neurons)} (neurons)")
        dh = self.head_dim
        plan = []
        for i in range(self.num_layers):  # validate every layer before touching any (no half-sliced model)
            heads = sorted(set(int(h) for h in keep_heads[i]))
            neurons = sorted(set(int(j) for j in keep_neurons[i]))
            if heads and (heads[0] < 0 or heads[-1] >= self.dense_heads):
                raise ValueError(f"layer {i}: head index out of range 0..{self.dense_heads - 1}")
            if neurons and (neurons[0] < 0 or neurons[-1] >= self.dense_neurons):
                raise ValueError(f"layer {i}: neuron index out of range 0..{self.dense_neurons - 1}")
            if self.attn_empty(i) or self.ffn_empty(i) or self.shape()[i] != LayerShape(
                    self.dense_heads, self.dense_neurons, self.dense_kv_heads):
                raise ValueError(f"layer {i} is already sliced; slice a dense model (indices are dense indices)")
            plan.append((heads, neurons, self.kv_heads_for(heads) if heads else []))
        for i, (heads, neurons, kv) in enumerate(plan):
            if not heads:
                self._empty_attn(i)
            elif len(heads) < self.dense_heads:
                q_idx = torch.tensor([h * dh + t for h in heads for t in range(dh)])
                kv_idx = torch.tensor([k * dh + t for k in kv for t in range(dh)])
                q, k, v = self.attn_in(i)
                self._set_attn(i, slice_linear(q, q_idx, 0), slice_linear(k, kv_idx, 0), slice_linear(v, kv_idx, 0),
                               slice_linear(self.attn_out(i), q_idx, 1), len(heads), len(kv))
            if not neurons:
                self._empty_ffn(i)
            elif len(neurons) < self.dense_neurons:
                idx = torch.tensor(neurons)
                self._set_ffn(i, [slice_linear(m, idx, 0) for m in self.ffn_in(i)], slice_linear(self.ffn_out(i), idx, 1))


class BertAdapter(Adapter):
    family = "bert"
    model_types = ("bert",)
    ffn_in_names = ("intermediate",)
    post_norm = True

    def layers(self): return self.model.base_model.encoder.layer
    def attn_module(self, i): return self.layers()[i].attention
    def attn_empty(self, i): return isinstance(self.layers()[i].attention, ConstantSublayer)
    def ffn_empty(self, i): return isinstance(self.layers()[i].output.dense, ConstantSublayer)

    def attn_in(self, i):
        s = self.layers()[i].attention.self
        return [s.query, s.key, s.value]

    def attn_out(self, i): return self.layers()[i].attention.output.dense
    def ffn_in(self, i): return [self.layers()[i].intermediate.dense]
    def ffn_out(self, i): return self.layers()[i].output.dense
    def attn_norm(self, i):
        a = self.layers()[i].attention
        return a.norm if isinstance(a, ConstantSublayer) else a.output.LayerNorm
    def ffn_norm(self, i): return self.layers()[i].output.LayerNorm

    def _set_attn(self, i, q, k, v, o, heads, kv):
        s = self.layers()[i].attention.self
        s.query, s.key, s.value = q, k, v
        s.num_attention_heads, s.all_head_size = heads, heads * self.head_dim
        self.layers()[i].attention.output.dense = o

    def _set_ffn(self, i, ins, out):
        self.layers()[i].intermediate.dense = ins[0]
        self.layers()[i].output.dense = out

    def _empty_attn(self, i):
        a = self.layers()[i].attention
        self.layers()[i].attention = ConstantSublayer(self.hidden, a.output.dense.bias, a.output.LayerNorm, True)

    def _empty_ffn(self, i):
        L = self.layers()[i]
        L.intermediate = nn.Identity()
        L.output.dense = ConstantSublayer(self.hidden, L.output.dense.bias)

    def _constant(self, i, name):
        L = self.layers()[i]
        return L.attention if name == "attn" else L.output.dense

    def fixed_macs(self, seq_len):
        d, c = self.hidden, self.config.num_labels
        has_pooler = getattr(self.model.base_model, "pooler", None) is not None
        return (d * d if has_pooler else 0) + (d * c if hasattr(self.model, "classifier") else 0)


class DistilBertAdapter(Adapter):
    family = "distilbert"
    model_types = ("distilbert",)
    ffn_in_names = ("lin1",)
    post_norm = True

    def layers(self): return self.model.base_model.transformer.layer
    def attn_module(self, i): return self.layers()[i].attention
    def attn_empty(self, i): return isinstance(self.layers()[i].attention, ConstantSublayer)
    def ffn_empty(self, i): return isinstance(self.layers()[i].ffn, ConstantSublayer)

    def attn_in(self, i):
        a = self.layers()[i].attention
        return [a.q_lin, a.k_lin, a.v_lin]

    def attn_out(self, i): return self.layers()[i].attention.out_lin
    def ffn_in(self, i): return [self.layers()[i].ffn.lin1]
    def ffn_out(self, i): return self.layers()[i].ffn.lin2
    def attn_norm(self, i): return self.layers()[i].sa_layer_norm
    def ffn_norm(self, i): return self.layers()[i].output_layer_norm

    def _set_attn(self, i, q, k, v, o, heads, kv):
        a = self.layers()[i].attention
        a.q_lin, a.k_lin, a.v_lin, a.out_lin = q, k, v, o
        a.n_heads = heads

    def _set_ffn(self, i, ins, out):
        f = self.layers()[i].ffn
        f.lin1, f.lin2 = ins[0], out

    def _empty_attn(self, i):
        self.layers()[i].attention = ConstantSublayer(self.hidden, self.attn_out(i).bias, None, True)

    def _empty_ffn(self, i):
        self.layers()[i].ffn = ConstantSublayer(self.hidden, self.ffn_out(i).bias)

    def _constant(self, i, name):
        return self.layers()[i].attention if name == "attn" else self.layers()[i].ffn

    def fixed_macs(self, seq_len):
        d, c = self.hidden, self.config.num_labels
        return (d * d + d * c) if hasattr(self.model, "classifier") else 0


class LlamaAdapter(Adapter):
    family = "llama"
    model_types = ("llama",)
    ffn_in_names = ("gate_proj", "up_proj")
    post_norm = False

    def layers(self): return self.model.model.layers
    def attn_module(self, i): return self.layers()[i].self_attn
    def attn_empty(self, i): return isinstance(self.layers()[i].self_attn, ConstantSublayer)
    def ffn_empty(self, i): return isinstance(self.layers()[i].mlp, ConstantSublayer)

    def attn_in(self, i):
        a = self.layers()[i].self_attn
        return [a.q_proj, a.k_proj, a.v_proj]

    def attn_out(self, i): return self.layers()[i].self_attn.o_proj
    def ffn_in(self, i):
        m = self.layers()[i].mlp
        return [m.gate_proj, m.up_proj]
    def ffn_out(self, i): return self.layers()[i].mlp.down_proj

    def _set_attn(self, i, q, k, v, o, heads, kv):
        a = self.layers()[i].self_attn
        a.q_proj, a.k_proj, a.v_proj, a.o_proj = q, k, v, o
        a.num_key_value_groups = heads // kv  # read by repeat_kv in every attention implementation

    def _set_ffn(self, i, ins, out):
        m = self.layers()[i].mlp
        m.gate_proj, m.up_proj, m.down_proj = ins[0], ins[1], out
        m.intermediate_size = out.in_features

    def _empty_attn(self, i):
        self.layers()[i].self_attn = ConstantSublayer(self.hidden, self.attn_out(i).bias, None, True)

    def _empty_ffn(self, i):
        self.layers()[i].mlp = ConstantSublayer(self.hidden, self.ffn_out(i).bias)

    def _constant(self, i, name):
        return self.layers()[i].self_attn if name == "attn" else self.layers()[i].mlp

    def fixed_macs(self, seq_len):
        head = getattr(self.model, "lm_head", None)
        return seq_len * head.in_features * head.out_features if head is not None else 0


ADAPTERS: tuple[type[Adapter], ...] = (BertAdapter, DistilBertAdapter, LlamaAdapter)
SUPPORTED = ", ".join(t for a in ADAPTERS for t in a.model_types)


def get_adapter(model: nn.Module) -> Adapter:
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    for cls in ADAPTERS:
        if model_type in cls.model_types:
            return cls(model)
    raise UnsupportedArchitecture(
        f"unsupported architecture {model_type!r} ({type(model).__name__}); supported model types: {SUPPORTED}")


# --- one-call save / reload of a sliced model ---------------------------------------------------------

def save_pruned(model: nn.Module, out_dir: str | Path, keep_heads: list[list[int]], keep_neurons: list[list[int]],
                info: dict | None = None, tokenizer=None) -> None:
    """Write a sliced model as safetensors + its dense config + a manifest of kept indices (atomically)."""
    from safetensors.torch import save_model

    from pruneflow.artifacts import atomic_path

    adapter = get_adapter(model)
    manifest = {
        "format": "pruneflow/1",
        "architecture": type(model).__name__,
        "family": adapter.family,
        "keep_heads": [sorted(int(h) for h in hs) for hs in keep_heads],
        "keep_neurons": [sorted(int(j) for j in js) for js in keep_neurons],
        "shape": [s.__dict__ for s in adapter.shape()],
        "info": info or {},
    }
    with atomic_path(out_dir) as tmp:
        tmp.mkdir(parents=True)
        model.config.save_pretrained(str(tmp))  # the *dense* config: the manifest says what was sliced
        save_model(model, str(tmp / WEIGHTS))
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1) + "\n")
        if tokenizer is not None:
            tokenizer.save_pretrained(str(tmp))


def load_pruned(path: str | Path, attn: str = "sdpa", device: str = "cpu") -> nn.Module:
    """Rebuild a sliced model from its dense config and manifest, then load its weights (strict)."""
    import transformers
    from safetensors.torch import load_model

    path = Path(path)
    manifest = json.loads((path / MANIFEST).read_text())
    config = transformers.AutoConfig.from_pretrained(str(path))
    cls = getattr(transformers, manifest["architecture"])
    model = cls._from_config(config, attn_implementation=attn)
    get_adapter(model).slice_(manifest["keep_heads"], manifest["keep_neurons"])
    load_model(model, str(path / WEIGHTS), strict=True, device=device)
    return model.eval()
