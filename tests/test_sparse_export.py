"""Sparse models out of pruneflow: a tiny random Llama pruned by Wanda (50% unstructured and 2:4) saves as a plain
HF checkpoint that reloads with identical logits, and in the compressed-tensors format that compressed-tensors
itself decompresses to exactly our weights, smaller on disk."""

from __future__ import annotations

import json

import pytest
import torch
import transformers

from pruneflow.adapters import get_adapter
from pruneflow.plan import Plan
from pruneflow.sparse_export import (decompressed_weights, save_compressed, save_dense_checkpoint, size_on_disk,
                                     sparsity_config)
from pruneflow.sparsify import Pattern, sparsify_model, sparsity_method
from tiny import tiny_inputs


pytestmark = pytest.mark.usefixtures("one_thread")


def wide_llama(seed: int = 0):
    """tests/tiny.py's Llama, 4x wider: at width 32 the per-row offsets and the safetensors header (4 entries
    per compressed Linear) are a visible share of each layer; at 128/256 the size comparison is about weights."""
    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(vocab_size=120, hidden_size=128, num_hidden_layers=2, num_attention_heads=4,
                                   num_key_value_heads=2, intermediate_size=256, max_position_embeddings=64,
                                   tie_word_embeddings=True)
    return transformers.LlamaForCausalLM(cfg).eval()


def batches():
    return [tiny_inputs(batch=3, seq=10, seed=s) for s in (1, 2)]


@pytest.fixture(scope="module", params=["0.5", "2:4"])
def sparse(request):
    model = wide_llama()
    report = sparsify_model(model, get_adapter(model), batches, sparsity_method("wanda"), Pattern.parse(request.param))
    return model, report.plan, request.param


def logits(model):
    with torch.inference_mode():
        return model(**tiny_inputs()).logits


def test_compressed_round_trip_is_exact(sparse, tmp_path):
    model, plan, spec = sparse
    written = save_compressed(model, plan, tmp_path / "ct")
    qc = json.loads((tmp_path / "ct/config.json").read_text())["quantization_config"]
    assert qc["quant_method"] == "compressed-tensors"
    sc = qc["sparsity_config"]
    assert sc == json.loads(json.dumps(written))
    assert sc["format"] == ("sparse-24-bitmask" if spec == "2:4" else "sparse-bitmask")
    assert sc["sparsity_structure"] == ("2:4" if spec == "2:4" else "unstructured")
    assert sc["targets"] == ["Linear"] and sc["ignore"] == ["lm_head"]
    assert 0 < sc["global_sparsity"] < 0.5
    got = decompressed_weights(tmp_path / "ct")  # compressed-tensors' own reader
    mods = dict(model.named_modules())
    assert set(got) == {f"{name}.weight" for name in plan.masks}
    for name in plan.masks:
        assert torch.equal(got[f"{name}.weight"], mods[name].weight.detach()), name


def test_model_compressor_decompresses_into_a_model_with_identical_logits(sparse, tmp_path):
    """The library's load path: a model built from the saved config, weights filled by ModelCompressor.decompress."""
    from compressed_tensors.compressors import ModelCompressor

    model, plan, _ = sparse
    save_compressed(model, plan, tmp_path / "ct")
    config = transformers.AutoConfig.from_pretrained(str(tmp_path / "ct"))
    del config.quantization_config  # transformers 5 would route it to its compressed-tensors>=0.15 quantizer
    fresh = transformers.AutoModelForCausalLM.from_config(config).eval()
    ModelCompressor.from_pretrained(str(tmp_path / "ct")).decompress(str(tmp_path / "ct"), fresh)
    fresh.tie_weights()
    assert torch.equal(logits(fresh), logits(model))


def test_dense_checkpoint_reloads_with_identical_logits_and_is_larger(sparse, tmp_path):
    model, plan, _ = sparse
    save_dense_checkpoint(model, None, tmp_path / "dense")
    again = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "dense")).eval()
    assert "quantization_config" not in json.loads((tmp_path / "dense/config.json").read_text())
    assert torch.equal(logits(again), logits(model))
    save_compressed(model, plan, tmp_path / "ct")
    sizes = size_on_disk(tmp_path / "dense", tmp_path / "ct")
    assert sizes["compressed_weight_bytes"] < sizes["dense_weight_bytes"]
    assert sizes["compressed_bytes"] < sizes["dense_bytes"]
    # the blocks' Linears are ~95% of this model's weights; at 50% each shrinks to ~0.55 of its float32 size
    assert sizes["weight_ratio"] < 0.75


def test_tokenizer_is_saved_beside_the_weights(sparse, tmp_path):
    from tiny import tiny_tokenizer

    model, plan, _ = sparse
    tok = tiny_tokenizer(tmp_path / "vocab")
    save_dense_checkpoint(model, tok, tmp_path / "dense")
    save_compressed(model, plan, tmp_path / "ct", tokenizer=tok)
    for d in ("dense", "ct"):
        assert transformers.AutoTokenizer.from_pretrained(str(tmp_path / d))("the film").input_ids


def test_refuses_weights_that_disagree_with_the_plan(tmp_path):
    model = wide_llama()
    q = model.model.layers[0].self_attn.q_proj
    kept = torch.ones_like(q.weight, dtype=torch.bool)
    kept[:, ::2] = False  # the plan says half the weights are pruned, but the model was never pruned
    plan = Plan(masks={"model.layers.0.self_attn.q_proj": kept},
                patterns={"model.layers.0.self_attn.q_proj": "unstructured"})
    with pytest.raises(ValueError, match="nonzero weights where the plan prunes"):
        save_compressed(model, plan, tmp_path / "ct")
    assert not (tmp_path / "ct").exists()
    with pytest.raises(ValueError, match="slices"):
        save_compressed(model, Plan(keep_heads=[[0]], keep_neurons=[[0]], masks=plan.masks), tmp_path / "ct")
    with pytest.raises(ValueError, match="no weight masks"):
        save_compressed(model, Plan(), tmp_path / "ct")


def test_mixed_or_other_nm_patterns_use_the_general_bitmask():
    model = wide_llama()
    names = ["model.layers.0.self_attn.q_proj", "model.layers.0.mlp.down_proj"]
    mods = dict(model.named_modules())
    masks = {n: torch.ones_like(mods[n].weight, dtype=torch.bool) for n in names}
    assert sparsity_config(model, Plan(masks=masks, patterns=dict.fromkeys(names, "2:4"))).format == "sparse-24-bitmask"
    for patterns in ({names[0]: "2:4", names[1]: "unstructured"}, dict.fromkeys(names, "4:8")):
        cfg = sparsity_config(model, Plan(masks=masks, patterns=patterns))
        assert (cfg.format, cfg.sparsity_structure) == ("sparse-bitmask", "unstructured")


def test_sparse_models_export_to_onnx_with_parity(tmp_path):
    """Weight-sparse models are ordinary models with zeros: the decoder exports with its KV cache and generates
    the same 32 greedy tokens in onnxruntime as in PyTorch; the classifier exports with logit parity."""
    import numpy as np

    from pruneflow.adapters import get_adapter
    from pruneflow.onnx_decoder import decoder_session, export_decoder_onnx, greedy_generate_onnx, greedy_generate_torch
    from pruneflow.onnx_io import export_onnx, make_session, max_abs_diff, ort_logits, torch_logits
    from pruneflow.sparsify import Pattern, sparsify_model, sparsity_method
    from tiny import tiny_bert, tiny_inputs, tiny_llama

    def batches():
        return [tiny_inputs(batch=3, seq=10, seed=s) for s in (1, 2)]

    llm = tiny_llama().eval()
    with torch.no_grad():  # untied, larger weights: a default-init tiny LM just repeats its last token
        for p in llm.parameters():
            if p.dim() == 2:
                p.normal_(0, 0.3, generator=torch.Generator().manual_seed(p.numel()))
    sparsify_model(llm, get_adapter(llm), batches, sparsity_method("apt", {"blocksize": 16}), Pattern.parse("2:4"))
    export_decoder_onnx(llm, tmp_path / "lm.onnx")
    session = decoder_session(tmp_path / "lm.onnx", "cpu")
    ids = np.array([[0, 0, 0, 0, 7, 9, 11, 13, 15], [3, 5, 8, 13, 21, 34, 55, 89, 44]], dtype=np.int64)
    mask = (ids != 0).astype(np.int64)
    mask[1] = 1
    got = greedy_generate_onnx(session, ids, mask, 32)
    assert np.array_equal(got, greedy_generate_torch(llm, ids, mask, 32)) and len(set(got.ravel())) > 2

    clf = tiny_bert().eval()
    sparsify_model(clf, get_adapter(clf), batches, sparsity_method("sparsegpt", {"blocksize": 16}), Pattern.parse("0.5"))
    sample = {k: v.numpy() for k, v in tiny_inputs().items()}
    export_onnx(clf, tmp_path / "clf.onnx", sample, 18)
    batch = {k: v.numpy() for k, v in tiny_inputs(batch=4, seq=7, seed=5).items()}
    diff = max_abs_diff(torch_logits(clf, batch), ort_logits(make_session(tmp_path / "clf.onnx"), batch),
                        batch["attention_mask"])
    assert diff < 1e-4
