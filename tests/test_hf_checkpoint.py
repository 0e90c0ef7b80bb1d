"""A uniformly pruned decoder saves as a plain Hugging Face checkpoint that loads with transformers alone (no
pruneflow import) and gives the pruned model's logits; other shapes are refused with what to do instead."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from pruneflow.adapters import get_adapter
from pruneflow.hf_checkpoint import save_plain_checkpoint
from tiny import tiny_bert, tiny_inputs, tiny_llama, tiny_qwen2, tiny_qwen3

LOAD_WITHOUT_PRUNEFLOW = """
import sys, torch
from transformers import AutoModelForCausalLM
assert not any(m.startswith("pruneflow") for m in sys.modules)
model = AutoModelForCausalLM.from_pretrained(sys.argv[1]).eval()
ids = torch.load(sys.argv[2])
with torch.inference_mode():
    torch.save(model(**ids).logits, sys.argv[3])
c = model.config
print(c.num_attention_heads, c.num_key_value_heads, c.intermediate_size)
"""


@pytest.mark.parametrize("factory", [tiny_llama, tiny_qwen2, tiny_qwen3], ids=["llama", "qwen2", "qwen3"])
def test_uniform_decoder_loads_as_plain_checkpoint(factory, tmp_path):
    model = factory().eval()
    adapter = get_adapter(model)
    group = adapter.group
    keep_heads = [list(range(group, 2 * group))] * adapter.num_layers  # one whole KV group per layer
    keep_neurons = [list(range(0, adapter.dense_neurons, 2))] * adapter.num_layers
    adapter.slice_(keep_heads, keep_neurons)
    save_plain_checkpoint(model, tmp_path / "plain")
    enc = tiny_inputs()
    torch.save(enc, tmp_path / "ids.pt")
    r = subprocess.run([sys.executable, "-c", LOAD_WITHOUT_PRUNEFLOW, str(tmp_path / "plain"), str(tmp_path / "ids.pt"),
                        str(tmp_path / "out.pt")], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.split()[-3:] == [str(group), "1", str(len(keep_neurons[0]))]
    with torch.inference_mode():
        ref = model(**enc).logits
    mask = enc["attention_mask"].bool()
    assert torch.allclose(torch.load(tmp_path / "out.pt")[mask], ref[mask], atol=1e-5)
    assert model.config.num_attention_heads == adapter.dense_heads  # the live model's config is untouched


def test_non_uniform_and_encoder_shapes_are_refused(tmp_path):
    model = tiny_llama().eval()
    adapter = get_adapter(model)
    n = adapter.dense_neurons
    adapter.slice_([list(range(adapter.dense_heads))] * adapter.num_layers,
                   [list(range(n // 2)), list(range(n // 4))] + [list(range(n))] * (adapter.num_layers - 2))
    with pytest.raises(ValueError, match="layers differ in shape.*allocation=uniform"):
        save_plain_checkpoint(model, tmp_path / "x")
    with pytest.raises(ValueError, match="Llama-family decoders only"):
        save_plain_checkpoint(tiny_bert(), tmp_path / "y")
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()
