"""A pruning plan: what a pruned model is, relative to its dense model, and the one-call save / reload.

A plan holds
- slices: kept heads and kept neurons per layer (indices into the dense layer); a layer may keep none of one
  kind (that sublayer becomes a constant), and KV heads follow from the kept query heads (adapters.base);
- masks: per-Linear weight masks (True = kept) with their pattern ("unstructured" or "N:M"), by qualified
  module name in the *sliced* model, applied after the slices by zeroing the masked weights.
A pruned model saves as safetensors + its dense config + `manifest.json` (format "pruneflow/plan-2"; the plan,
the sliced shape, free-form info) + `masks.safetensors` (bit-packed masks, only when the plan has masks), and
reloads with `load_pruned(path)`: rebuild the dense architecture from config, slice, load weights strictly.
Manifests of format "pruneflow/1" (slices only) still load.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

from pruneflow.adapters import get_adapter
from pruneflow.artifacts import atomic_path, write_safetensors_streamed

FORMAT = "pruneflow/plan-2"
READABLE = (FORMAT, "pruneflow/1")
MANIFEST = "manifest.json"
WEIGHTS = "model.safetensors"
MASKS = "masks.safetensors"
NM_PATTERN = re.compile(r"^(\d+):(\d+)$")


def check_pattern(pattern: str) -> tuple[int, int] | None:
    """(n, m) for an "n:m" pattern (n zeros in every m consecutive weights of a row), None for unstructured."""
    if pattern == "unstructured":
        return None
    found = NM_PATTERN.match(pattern)
    if not found or not 0 < int(found.group(1)) < int(found.group(2)):
        raise ValueError(f"mask pattern {pattern!r}: expected 'unstructured' or 'N:M' with 0 < N < M, e.g. '2:4'")
    return int(found.group(1)), int(found.group(2))


@dataclass
class Plan:
    keep_heads: list[list[int]] | None = None
    keep_neurons: list[list[int]] | None = None
    masks: dict[str, torch.Tensor] = field(default_factory=dict)  # name -> bool (out, in), True = kept
    patterns: dict[str, str] = field(default_factory=dict)  # name -> "unstructured" | "N:M"

    @property
    def slices(self) -> bool:
        return self.keep_heads is not None

    def apply(self, model: nn.Module) -> nn.Module:
        """Slice, then zero the masked weights, in place. The model must be dense."""
        adapter = get_adapter(model)
        if self.slices:
            adapter.slice_(self.keep_heads, self.keep_neurons)
        if self.masks:
            linears = dict(model.named_modules())
            for name, mask in self.masks.items():
                lin = linears.get(name)
                if not isinstance(lin, nn.Linear) or tuple(lin.weight.shape) != tuple(mask.shape):
                    raise ValueError(f"plan mask {name!r} {tuple(mask.shape)} matches no Linear weight of this model")
            with torch.no_grad():
                for name, mask in self.masks.items():
                    linears[name].weight.mul_(mask.to(linears[name].weight.device, linears[name].weight.dtype))
        return model

    def manifest(self, model: nn.Module, info: dict | None = None) -> dict:
        adapter = get_adapter(model)
        out = {"format": FORMAT, "architecture": type(model).__name__, "family": adapter.family,
               "keep_heads": None if not self.slices else [sorted(int(h) for h in hs) for hs in self.keep_heads],
               "keep_neurons": None if not self.slices else [sorted(int(j) for j in js) for js in self.keep_neurons],
               "shape": [s.__dict__ for s in adapter.shape()] if adapter.structured else None,  # Mamba: no units
               "masks": {name: {"pattern": self.patterns.get(name, "unstructured"), "shape": list(m.shape),
                                "density": float(m.float().mean())} for name, m in sorted(self.masks.items())},
               "info": info or {}}
        return out

    @classmethod
    def from_manifest(cls, manifest: dict, masks: dict[str, torch.Tensor] | None = None) -> "Plan":
        fmt = manifest.get("format")
        if fmt not in READABLE:
            raise ValueError(f"manifest format {fmt!r} is not one this pruneflow reads ({', '.join(READABLE)})")
        declared = manifest.get("masks") or {}
        masks = masks or {}
        if set(declared) != set(masks):
            raise ValueError(f"manifest declares masks for {sorted(declared)} but the mask file holds {sorted(masks)}")
        return cls(manifest.get("keep_heads"), manifest.get("keep_neurons"), dict(masks),
                   {name: d["pattern"] for name, d in declared.items()})


def pack_masks(masks: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Bit-packed uint8 tensors (8 weights a byte) and their shapes as safetensors metadata."""
    packed = {name: torch.from_numpy(np.packbits(m.cpu().numpy().astype(bool).reshape(-1))) for name, m in masks.items()}
    return packed, {name: json.dumps(list(m.shape)) for name, m in masks.items()}


def unpack_masks(packed: dict[str, torch.Tensor], metadata: dict[str, str]) -> dict[str, torch.Tensor]:
    out = {}
    for name, bits in packed.items():
        shape = json.loads(metadata[name])
        flat = np.unpackbits(bits.numpy(), count=int(np.prod(shape)))
        out[name] = torch.from_numpy(flat.astype(bool).reshape(shape))
    return out


def save_pruned(model: nn.Module, out_dir: str | Path, plan: Plan, info: dict | None = None, tokenizer=None) -> None:
    """Write a pruned model as safetensors + its dense config + the plan's manifest (atomically, as a directory).
    A model whose parameters are on the meta device has `disk_weights` (blockwalk.DiskWeights: the checkpoint and
    the spilled layers) they are read from."""
    from safetensors.torch import save_file, save_model

    with atomic_path(out_dir) as tmp:
        tmp.mkdir(parents=True)
        model.config.save_pretrained(str(tmp))  # the *dense* config: the manifest says what was sliced
        disk = getattr(model, "disk_weights", None)
        if disk is None:
            save_model(model, str(tmp / WEIGHTS))
        else:  # weights on disk (the streamed correction): the same file, written one tensor at a time
            entries, tied = disk.state_entries(model, keep_name=lambda names: sorted(names)[0])  # as save_model
            write_safetensors_streamed(tmp / WEIGHTS, entries, tied or None)
        if plan.masks:
            packed, shapes = pack_masks(plan.masks)
            save_file(packed, str(tmp / MASKS), metadata=shapes)
        (tmp / MANIFEST).write_text(json.dumps(plan.manifest(model, info), indent=1) + "\n")
        if tokenizer is not None:
            tokenizer.save_pretrained(str(tmp))


def read_plan(path: str | Path) -> tuple[Plan, dict]:
    """The plan and the manifest of a pruned-model directory."""
    from safetensors import safe_open

    path = Path(path)
    manifest = json.loads((path / MANIFEST).read_text())
    masks = None
    if (path / MASKS).exists():
        with safe_open(str(path / MASKS), framework="pt") as f:
            masks = unpack_masks({k: f.get_tensor(k) for k in f.keys()}, f.metadata())
    return Plan.from_manifest(manifest, masks), manifest


def load_pruned(path: str | Path, attn: str = "sdpa", device: str = "cpu") -> nn.Module:
    """Rebuild a pruned model from its dense config and manifest, then load its weights (strict)."""
    import transformers
    from safetensors.torch import load_model

    path = Path(path)
    plan, manifest = read_plan(path)
    config = transformers.AutoConfig.from_pretrained(str(path))
    cls = getattr(transformers, manifest["architecture"])
    if not getattr(cls, "_supports_sdpa", True):  # attention-free (Mamba): transformers refuses "sdpa"
        attn = "eager"
    model = cls._from_config(config, attn_implementation=attn)
    if plan.slices:
        get_adapter(model).slice_(plan.keep_heads, plan.keep_neurons)
    load_model(model, str(path / WEIGHTS), strict=True, device=device)  # masked weights are stored as zeros
    return model.eval()


def is_pruned_dir(path: str | Path) -> bool:
    return (Path(path) / MANIFEST).exists()
