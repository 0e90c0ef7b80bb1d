"""A structurally pruned decoder as an ordinary Hugging Face checkpoint, when its shape allows.

With the same number of query heads, KV heads and FFN neurons in every layer (uniform allocation), a pruned
Llama-family decoder *is* a smaller model of its architecture: its config with the new `num_attention_heads`,
`num_key_value_heads` and `intermediate_size` (and `head_dim` pinned, since hidden_size / heads no longer gives
it) describes it exactly, and `AutoModelForCausalLM.from_pretrained` loads it with no pruneflow import. Shapes
that differ per layer, a removed sublayer, or a weight-sparsity mask keep pruneflow's manifest format
(plan.save_pruned / load_pruned).
"""

from __future__ import annotations

import copy
from pathlib import Path

from torch import nn

from pruneflow.adapters import get_adapter
from pruneflow.artifacts import atomic_path, write_safetensors_streamed


def plain_config(model: nn.Module):
    """The config of an equivalent unpruned model of the pruned model's shape; ValueError when there is none."""
    adapter = get_adapter(model)
    if adapter.post_norm or not hasattr(model.config, "num_key_value_heads"):
        raise ValueError(f"{adapter.family}: plain checkpoints are written for Llama-family decoders only; use "
                         "save_pruned (manifest format)")
    shapes = adapter.shape()
    if any(adapter.empty(i, name) for i in range(adapter.num_layers) for name in ("attn", "ffn")):
        raise ValueError("a layer lost its whole attention or FFN: no plain config describes that; use save_pruned")
    distinct = {(s.heads, s.kv_heads, s.neurons) for s in shapes}
    if len(distinct) != 1:
        raise ValueError(f"layers differ in shape ({len(distinct)} distinct (heads, kv heads, neurons) triples): a "
                         "plain config holds one shape for every layer; prune with select.allocation=uniform, or "
                         "use save_pruned")
    heads, kv_heads, neurons = distinct.pop()
    config = copy.deepcopy(model.config)
    config.head_dim = adapter.head_dim  # no longer hidden_size // num_attention_heads
    config.num_attention_heads = heads
    config.num_key_value_heads = kv_heads
    config.intermediate_size = neurons
    return config


def save_plain_checkpoint(model: nn.Module, out_dir: str | Path, tokenizer=None) -> Path:
    """save_pretrained with the pruned shape's config (atomically); raises ValueError when the shape is not
    uniform (see plain_config). A model whose weights are on disk (`disk_weights`, the streamed correction) is
    written the way save_pretrained writes it, one tensor in memory at a time."""
    config = plain_config(model)
    disk = getattr(model, "disk_weights", None)
    original = model.config
    model.config = config
    try:
        with atomic_path(out_dir) as tmp:
            if disk is None:
                model.save_pretrained(str(tmp))
            else:
                tmp.mkdir(parents=True)
                config.save_pretrained(str(tmp))
                if model.can_generate() and model.generation_config is not None:
                    model.generation_config.save_pretrained(str(tmp))
                # tied tensors under the name the dense checkpoint uses (save_pretrained's choice too)
                entries, _ = disk.state_entries(model, keep_name=lambda names: next(
                    (n for n in names if n in disk.checkpoint_keys), sorted(names)[0]))
                write_safetensors_streamed(Path(tmp) / "model.safetensors", entries, {"format": "pt"})
            if tokenizer is not None:
                tokenizer.save_pretrained(str(tmp))
    finally:
        model.config = original
    return Path(out_dir)
