"""The GPU path, run where CUDA exists (a lent GPU machine), skipped elsewhere: the sparsity walk with only the
current block on the device, and the sequential refit with offload, match the CPU results; at most one block's
weights sit on the device at any time."""

from __future__ import annotations

import copy

import pytest
import torch

from pruneflow.adapters import get_adapter
from pruneflow.sparsify import Pattern, sparsify_model, sparsity_method
from pruneflow.stats import tokenized_batches
from tiny import tiny_inputs, tiny_llama

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


def batches():
    return [tiny_inputs(batch=3, seq=10, seed=s) for s in (1, 2)]


@pytest.mark.parametrize("method", ["wanda", "sparsegpt", "apt"])
def test_sparsify_one_block_on_the_device_matches_cpu(method):
    torch.backends.cuda.matmul.allow_tf32 = False
    cpu_model, gpu_model = tiny_llama(layers=3), tiny_llama(layers=3)
    adapter = get_adapter(gpu_model)
    resident = []
    hooks = [b.register_forward_pre_hook(lambda m, a: resident.append(
        sum(any(p.is_cuda for p in blk.parameters()) for blk in adapter.layers()))) for b in adapter.layers()]
    opts = {"blocksize": 16} if method != "wanda" else {}
    ref = sparsify_model(cpu_model, get_adapter(cpu_model), batches, sparsity_method(method, opts), Pattern.parse("2:4"))
    got = sparsify_model(gpu_model, adapter, batches, sparsity_method(method, opts), Pattern.parse("2:4"), device="cuda")
    for h in hooks:
        h.remove()
    assert resident and max(resident) == 1  # only the block being pruned is on the device
    assert all(not p.is_cuda for p in gpu_model.parameters())  # everything back where it was
    same = sum(int((ref.plan.masks[n] == got.plan.masks[n]).sum()) for n in ref.plan.masks)
    total = sum(m.numel() for m in ref.plan.masks.values())
    assert same / total > 0.99  # float rounding may flip a near-tie
    enc = tiny_inputs()
    with torch.inference_mode():
        a, b = cpu_model(**enc).logits, gpu_model(**enc).logits
    assert torch.allclose(a, b, atol=2e-3, rtol=1e-2)


def test_sequential_refit_with_offload_on_cuda_matches_cpu():
    torch.backends.cuda.matmul.allow_tf32 = False
    from pruneflow.plan import Plan
    from pruneflow.sequential import DenseTrace, correct_sequential
    from tiny import tiny_tokenizer

    tok = tiny_tokenizer_for_tests(tiny_tokenizer)
    dense = tiny_llama(layers=3)
    ad = get_adapter(dense)
    keep_heads = [list(range(ad.group, 2 * ad.group))] * ad.num_layers
    keep_neurons = [list(range(0, ad.dense_neurons, 2))] * ad.num_layers
    texts = ["the film was good and the story was fun"] * 6 + ["a dull slow plot"] * 6
    results = []
    for device, offload in (("cpu", "none"), ("cuda", "cpu")):
        pruned = Plan(keep_heads, keep_neurons).apply(copy.deepcopy(dense))
        trace = DenseTrace(copy.deepcopy(dense), tokenized_batches(tok, texts, 4, 16, device), device, offload=offload)
        correct_sequential(pruned, "lstsq", 1e-3, trace, device)
        results.append({k: v.detach().cpu() for k, v in pruned.state_dict().items()})
    for k, v in results[0].items():
        assert torch.allclose(v, results[1][k], atol=1e-3, rtol=1e-3), k



def test_streamed_refit_on_cuda_matches_cpu(tmp_path):
    """offload=disk on the GPU: the pruned layers are read, sliced and refit on the device one at a time and
    spilled; the weights match the CPU's in-memory refit and nothing stays on the device."""
    torch.backends.cuda.matmul.allow_tf32 = False
    from transformers import AutoModelForCausalLM

    from pruneflow.blockwalk import lazy_model
    from pruneflow.plan import Plan
    from pruneflow.sequential import DenseTrace, StreamedLayers, correct_sequential
    from tiny import tiny_tokenizer

    tok = tiny_tokenizer_for_tests(tiny_tokenizer)
    dense = tiny_llama(layers=3)
    dense.save_pretrained(tmp_path / "m")
    ad = get_adapter(dense)
    keep_heads = [list(range(ad.group, 2 * ad.group))] * ad.num_layers
    keep_neurons = [list(range(0, ad.dense_neurons, 2))] * ad.num_layers
    texts = ["the film was good and the story was fun"] * 6 + ["a dull slow plot"] * 6
    cpu = Plan(keep_heads, keep_neurons).apply(copy.deepcopy(dense))
    correct_sequential(cpu, "lstsq", 1e-3, DenseTrace(copy.deepcopy(dense), tokenized_batches(tok, texts, 4, 16, "cpu"),
                                                      "cpu"), "cpu")
    gpu = lazy_model(AutoModelForCausalLM, tmp_path / "m")
    (tmp_path / "spill").mkdir()
    trace = DenseTrace(lazy_model(AutoModelForCausalLM, tmp_path / "m"), tokenized_batches(tok, texts, 4, 16, "cuda"),
                       "cuda", offload="disk")
    correct_sequential(gpu, "lstsq", 1e-3, trace, "cuda",
                       StreamedLayers(gpu, keep_heads, keep_neurons, tmp_path / "spill", "cuda"))
    assert all(p.is_meta for p in gpu.model.layers.parameters())
    for k, v in cpu.model.layers.state_dict().items():
        got = gpu.disk_weights.tensor(f"model.layers.{k}")
        assert torch.allclose(v, got, atol=1e-3, rtol=1e-3), k

def blocks_on_gpu(adapter) -> list[int]:
    """Filled as the blocks run: per block call, how many blocks hold weights on the GPU."""
    resident: list[int] = []
    for b in adapter.layers():
        b.register_forward_pre_hook(lambda m, a: resident.append(
            sum(any(p.is_cuda for p in blk.parameters()) for blk in adapter.layers())))
    return resident


def tiny_tokenizer_for_tests(factory):
    import tempfile
    from pathlib import Path

    return factory(Path(tempfile.mkdtemp()) / "vocab")


@pytest.mark.parametrize("offload", ["none", "cpu", "disk"])
def test_blockwise_collect_on_cuda_matches_cpu(offload, tmp_path):
    """collect's block walk on the GPU (weights on the device, moved per block, or read per block from disk)
    gives the CPU's statistics; with cpu/disk offload at most one block's weights are on the device."""
    torch.backends.cuda.matmul.allow_tf32 = False
    from transformers import AutoModelForCausalLM

    from pruneflow.blockwalk import BlockWalk, Residency, lazy_model
    from pruneflow.stats import collect_blockwise

    model = tiny_llama(layers=3)
    model.save_pretrained(tmp_path / "m")
    ad = get_adapter(model)
    ref = collect_blockwise(BlockWalk(model, ad, batches(), Residency(model, ad, "cpu", "none")))
    gpu_model = lazy_model(AutoModelForCausalLM, tmp_path / "m") if offload == "disk" else copy.deepcopy(model)
    gad = get_adapter(gpu_model)
    resident = blocks_on_gpu(gad)
    cuda_batches = [{k: v.cuda() for k, v in enc.items()} for enc in batches()]
    got = collect_blockwise(BlockWalk(gpu_model, gad, cuda_batches, Residency(gpu_model, gad, "cuda", offload)))
    assert max(resident) == (ad.num_layers if offload == "none" else 1)
    for name, st in ref.modules.items():
        g = got.modules[name]
        assert g.n == st.n
        torch.testing.assert_close(g.sxx.cpu(), st.sxx, rtol=1e-4, atol=1e-5)
        if st.votes is not None:
            assert float(g.votes.sum()) == float(st.votes.sum())


@pytest.mark.parametrize("offload", ["none", "cpu", "disk"])
def test_sensitivity_probe_on_cuda_matches_cpu(offload, tmp_path):
    """select's probe on the GPU (the whole model there, or each layer brought in as it runs) gives the CPU's
    loss rises; with cpu/disk offload at most one block's weights are on the device when a block runs, and the
    model is back on the CPU (cpu) or the meta device (disk) after."""
    torch.backends.cuda.matmul.allow_tf32 = False
    from transformers import AutoModelForCausalLM

    from pruneflow.blockwalk import Residency, lazy_model
    from pruneflow.params import RankParams
    from pruneflow.ranking import rank_model
    from pruneflow.sensitivity import LayerProbe
    from pruneflow.stats import collect_statistics
    from pruneflow.tasks import get_task

    model = tiny_llama(layers=3)
    model.save_pretrained(tmp_path / "m")
    ad = get_adapter(model)
    data = batches()
    for enc in data:  # full windows, as the LM task's
        enc["attention_mask"] = torch.ones_like(enc["attention_mask"])
    stats = collect_statistics(model, ad, data, vote_topk=None)
    ranking = rank_model(ad, stats, RankParams(method="activation", chunk=0.1), progress=False)
    task = get_task("causal_lm")
    ref = LayerProbe(model, ad, stats, ranking, data, task, "lstsq", 1e-4)([4, 8, 2])
    gpu_model = lazy_model(AutoModelForCausalLM, tmp_path / "m") if offload == "disk" else copy.deepcopy(model)
    gad = get_adapter(gpu_model)
    resident = blocks_on_gpu(gad)
    cuda_data = [{k: v.cuda() for k, v in enc.items()} for enc in data]
    probe = LayerProbe(gpu_model, gad, stats, ranking, cuda_data, task, "lstsq", 1e-4,
                       Residency(gpu_model, gad, "cuda", offload))
    got = probe([4, 8, 2])
    assert got == pytest.approx(ref, rel=1e-3, abs=1e-5)
    if offload != "none":
        assert resident and max(resident) == 1
        assert not any(p.is_cuda for blk in gad.layers() for p in blk.parameters())
