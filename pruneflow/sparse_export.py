"""Weight-sparse models written in formats other tools read: a plain Hugging Face checkpoint (zeros stored
densely) and the `compressed-tensors` sparse format (nonzero values + a bitmask per Linear, what llm-compressor
writes and what vLLM used to load).

Zeros in a dense tensor save nothing on disk and no time in a dense matmul; the compressed format saves disk
(≈ half the values plus 1 bit per weight at 50%). The weights are compressed by compressed-tensors' own
compressors (`sparse-bitmask`, and `sparse-24-bitmask` when every masked Linear is 2:4), and config.json gets
the `quantization_config` / `sparsity_config` block that `ModelCompressor.update_config` writes.

Ecosystem status (checked 2026, see the README): compressed-tensors dropped its sparse compressors after
0.14.x (0.14.x pins transformers<5, so 0.13.0 is the newest that works here), transformers 5 loads
compressed-tensors checkpoints only with compressed-tensors>=0.15, and vLLM no longer serves sparse
compressed-tensors checkpoints. The dense checkpoint is the one every engine loads today.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from pruneflow.artifacts import atomic_path
from pruneflow.plan import Plan

def save_dense_checkpoint(model: nn.Module, tokenizer, out_dir: str | Path) -> None:
    """`save_pretrained` safetensors (pruned weights stored as zeros), plus the tokenizer if given, atomically.
    Only for mask-pruned models: a sliced model's config still describes the dense shapes."""
    with atomic_path(out_dir) as tmp:
        tmp.mkdir(parents=True)
        model.save_pretrained(str(tmp))
        if tokenizer is not None:
            tokenizer.save_pretrained(str(tmp))


def _check_plan(model: nn.Module, plan: Plan) -> dict[str, nn.Linear]:
    """The plan's Linears, after checking that their weights are zero wherever the plan prunes: the 2:4
    compressor re-derives the mask as the 2 largest |w| of every 4, so a stray nonzero would be lost."""
    if plan.slices:
        raise ValueError("save_compressed takes weight-sparse models only: this plan also slices heads/neurons, "
                         "and the compressed format rebuilds the model from its unsliced config")
    if not plan.masks:
        raise ValueError("the plan has no weight masks: nothing to compress")
    mods = dict(model.named_modules())
    linears = {}
    for name, kept in plan.masks.items():
        lin = mods.get(name)
        if not isinstance(lin, nn.Linear) or tuple(lin.weight.shape) != tuple(kept.shape):
            raise ValueError(f"plan mask {name!r} {tuple(kept.shape)} matches no Linear weight of this model")
        if torch.any(lin.weight.detach()[~kept.to(lin.weight.device)] != 0):
            raise ValueError(f"{name}: nonzero weights where the plan prunes (apply the plan first)")
        linears[name] = lin
    return linears


def sparsity_config(model: nn.Module, plan: Plan):
    """The compressed-tensors sparsity config for this plan, filled in as llm-compressor fills it: targets the
    Linear class, ignores every Linear without a mask (e.g. lm_head), global_sparsity = zero fraction of all
    parameters. sparse-24-bitmask when every mask is 2:4, sparse-bitmask otherwise (it stores any pattern)."""
    from compressed_tensors.config import BitmaskConfig, Sparse24BitMaskConfig

    patterns = {plan.patterns.get(name, "unstructured") for name in plan.masks}
    ignore = sorted(n for n, m in model.named_modules() if isinstance(m, nn.Linear) and n not in plan.masks)
    params = [p.detach() for p in model.parameters()]  # tied weights count once, as parameters() yields them
    zeros = sum(int((p == 0).sum()) for p in params)
    common = dict(targets=["Linear"], ignore=ignore, global_sparsity=zeros / max(sum(p.numel() for p in params), 1))
    if patterns == {"2:4"}:
        return Sparse24BitMaskConfig(sparsity_structure="2:4", **common)
    # compressed-tensors' SparsityStructure knows only "2:4", "unstructured" and "0:0"; any other N:M mask
    # is stored exactly by the bitmask and labelled unstructured.
    return BitmaskConfig(sparsity_structure="unstructured", **common)


def save_compressed(model: nn.Module, plan: Plan, out_dir: str | Path, tokenizer=None) -> dict:
    """Write the model in the compressed-tensors sparse format, atomically: every masked Linear's weight is
    replaced by the compressor's tensors (`<layer>.compressed`, `.bitmask`, `.shape`, and `.row_offsets` for
    sparse-bitmask), the rest is stored as usual, and config.json gains `quantization_config`. Returns the
    sparsity config written (as a dict)."""
    from compressed_tensors.compressors import ModelCompressor

    linears = _check_plan(model, plan)
    compressor = ModelCompressor(sparsity_config=sparsity_config(model, plan))
    # The sparsity compressor itself, not ModelCompressor.compress: the latter also monkeypatches
    # transformers.modeling_utils.dtype_byte_size for the rest of the process.
    state = compressor.sparsity_compressor.compress(model.state_dict(), compression_targets=set(linears))
    with atomic_path(out_dir) as tmp:
        tmp.mkdir(parents=True)
        model.save_pretrained(str(tmp), state_dict=state)
        compressor.update_config(str(tmp))
        if tokenizer is not None:
            tokenizer.save_pretrained(str(tmp))
    return compressor.sparsity_config.model_dump()


def decompressed_weights(path: str | Path) -> dict[str, torch.Tensor]:
    """Dense weights of every compressed Linear of a save_compressed directory ("<layer>.weight" -> tensor),
    decompressed by compressed-tensors from the config.json it wrote (the reader's side of the round trip)."""
    from compressed_tensors.compressors import ModelCompressor
    from compressed_tensors.utils import get_nested_weight_mappings

    compressor = ModelCompressor.from_pretrained(str(path))
    if compressor is None or compressor.sparsity_compressor is None:
        raise ValueError(f"{path}: config.json has no compressed-tensors sparsity_config")
    sparse = compressor.sparsity_compressor
    # decompress() also passes every uncompressed tensor through: keep the layers it rebuilt
    layers = get_nested_weight_mappings(str(path), sparse.compression_param_names)
    dense = dict(sparse.decompress(str(path)))
    return {f"{layer}.weight": dense[f"{layer}.weight"] for layer in sorted(layers)}


def directory_bytes(path: str | Path, pattern: str = "*") -> int:
    """Total size of the files directly in `path` that match `pattern`."""
    return sum(f.stat().st_size for f in Path(path).glob(pattern) if f.is_file())


def size_on_disk(dense_dir: str | Path, compressed_dir: str | Path) -> dict:
    """Bytes of a dense and a compressed checkpoint of the same model: whole directories and weights alone
    (*.safetensors; config and tokenizer files are the same in both), and compressed / dense of the weights."""
    dense_w, comp_w = directory_bytes(dense_dir, "*.safetensors"), directory_bytes(compressed_dir, "*.safetensors")
    return {"dense_bytes": directory_bytes(dense_dir), "compressed_bytes": directory_bytes(compressed_dir),
            "dense_weight_bytes": dense_w, "compressed_weight_bytes": comp_w,
            "weight_ratio": comp_w / dense_w if dense_w else float("nan")}


__all__ = ["save_dense_checkpoint", "sparsity_config", "save_compressed",
           "decompressed_weights", "directory_bytes", "size_on_disk"]
