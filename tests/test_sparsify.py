"""Whole-model weight sparsity on tiny random models: every registered method runs end to end on a tiny BERT and
a tiny Llama, masks are valid, block i is calibrated on the pruned outputs of blocks < i, and the result saves
and reloads exactly through the plan's masks."""

from __future__ import annotations

from typing import ClassVar

import pytest
import torch

from pruneflow.adapters import get_adapter
from pruneflow.plan import load_pruned, read_plan, save_pruned
from pruneflow.sparsify import (SPARSITY_METHODS, Pattern, SparsityMethod, block_linears, block_moments, density,
                                sparsify_model, sparsity_method)
from tiny import tiny_bert, tiny_gemma3, tiny_inputs, tiny_llama


pytestmark = pytest.mark.usefixtures("one_thread")


def batches():
    return [tiny_inputs(batch=3, seq=10, seed=s) for s in (1, 2)]


@pytest.mark.parametrize("factory", [tiny_bert, tiny_llama], ids=["bert", "llama"])
@pytest.mark.parametrize("method", sorted(SPARSITY_METHODS))
@pytest.mark.parametrize("spec", ["0.5", "2:4"])
def test_every_method_end_to_end(factory, method, spec, tmp_path):
    model = factory().eval()
    pattern = Pattern.parse(spec)
    report = sparsify_model(model, get_adapter(model), batches, sparsity_method(method, {"blocksize": 16}
                            if "blocksize" in SPARSITY_METHODS[method].model_fields else {}), pattern)
    linears = {n: m for i, b in enumerate(get_adapter(model).layers()) for n, m in block_linears(b, str(i)).items()}
    assert len(report.plan.masks) == len(linears) > 0
    assert density(model, report.plan) == pytest.approx(0.5, abs=0.02)
    mods = dict(model.named_modules())
    for name, kept in report.plan.masks.items():
        w = mods[name].weight
        assert torch.all(w[~kept] == 0)
        if pattern.n:  # exactly n pruned in every group of m consecutive weights of a row
            groups = (~kept).reshape(kept.shape[0], -1, pattern.m).sum(-1)
            assert torch.all(groups == pattern.n), name
    save_pruned(model, tmp_path / "sparse", report.plan)
    plan, manifest = read_plan(tmp_path / "sparse")
    assert all(torch.equal(plan.masks[n], report.plan.masks[n]) for n in report.plan.masks)
    assert set(d["pattern"] for d in manifest["masks"].values()) == {pattern.plan_pattern}
    again = load_pruned(tmp_path / "sparse")
    enc = tiny_inputs()
    with torch.inference_mode():
        ref, got = model(**enc).logits, again(**enc).logits
    assert torch.equal(ref, got)


class Recorder(SparsityMethod):
    """Wanda that remembers the H it was given for each call (in the driver's order)."""
    name: ClassVar[str] = "recorder"
    seen: ClassVar[list] = []

    def prune(self, W, H, pattern):
        Recorder.seen.append(H.clone())
        return SPARSITY_METHODS["wanda"]().prune(W, H, pattern)


def test_block_i_is_calibrated_on_the_pruned_blocks_before_it():
    model = tiny_llama(layers=3).eval()
    adapter = get_adapter(model)
    Recorder.seen = []
    sparsify_model(model, adapter, batches, Recorder(), Pattern.parse("0.5"))
    names = {m: n for n, m in model.named_modules()}
    per_block = len(block_linears(adapter.layers()[0], ""))
    for i, block in enumerate(adapter.layers()):
        first = next(iter(block_linears(block, names[block])))  # q_proj: its input is the block's (normed) input
        final = block_moments(model, block, {first: dict(model.named_modules())[first]}, batches())[first]
        assert torch.allclose(Recorder.seen[i * per_block], final, rtol=1e-10, atol=1e-12), i
    dense = tiny_llama(layers=3).eval()
    b1 = dense.model.layers[1]
    dense_h = block_moments(dense, b1, {"q": b1.self_attn.q_proj}, batches())["q"]
    assert not torch.allclose(Recorder.seen[per_block], dense_h)  # block 1 did not see dense block-0 outputs


def test_moments_skip_padding_and_stop_after_the_block():
    model = tiny_bert().eval()
    block = get_adapter(model).layers()[0]
    q = block.attention.self.query
    enc = tiny_inputs(batch=3, seq=10)
    seen = []
    handle = q.register_forward_pre_hook(lambda m, a: seen.append(a[0].reshape(-1, a[0].shape[-1])))
    ran_last = []
    h2 = get_adapter(model).layers()[1].register_forward_pre_hook(lambda m, a: ran_last.append(1))
    try:
        H = block_moments(model, block, {"q": q}, [enc])["q"]
    finally:
        handle.remove(), h2.remove()
    x = seen[0][enc["attention_mask"].reshape(-1).bool()].double()
    assert torch.allclose(H, x.T @ x / x.shape[0]) and not ran_last


def test_apt_never_worse_than_sparsegpt_on_a_real_layer_walk():
    """Same tiny model, same pattern: APT's summed relative reconstruction error is below SparseGPT's."""
    errs = {}
    for name in ("sparsegpt", "apt"):
        model = tiny_llama().eval()
        rep = sparsify_model(model, get_adapter(model), batches, sparsity_method(name, {"blocksize": 16}), Pattern.parse("2:4"))
        errs[name] = sum(rep.errors.values())
    assert errs["apt"] < errs["sparsegpt"]


@pytest.mark.parametrize("spec,msg", [("1.5", "in \\(0, 1\\)"), ("0", "in \\(0, 1\\)"), ("4:2", "0 < N < M"),
                                      ("half", "fraction in \\(0, 1\\)")])
def test_bad_patterns(spec, msg):
    with pytest.raises(ValueError, match=msg):
        Pattern.parse(spec)


def test_unknown_method_and_option():
    with pytest.raises(ValueError, match="not registered.*apt"):
        sparsity_method("obs")
    with pytest.raises(Exception, match="blocksiz"):
        sparsity_method("sparsegpt", {"blocksiz": 64})


def test_walk_runs_each_block_twice_per_batch_and_device_mode_agrees():
    """The cached walk calls every block exactly twice per calibration batch (moments, then outputs for the
    next block), never re-running the prefix; moving one block at a time to a device gives the same model."""
    model = tiny_llama(layers=3).eval()
    ref = tiny_llama(layers=3).eval()
    adapter = get_adapter(model)
    calls = [0] * 3
    # counted where the block computes (the capture passes each block's input through without running it)
    handles = [b.self_attn.q_proj.register_forward_hook(lambda m, a, o, i=i: calls.__setitem__(i, calls[i] + 1))
               for i, b in enumerate(adapter.layers())]
    rep = sparsify_model(model, adapter, batches, sparsity_method("sparsegpt", {"blocksize": 16}), Pattern.parse("0.5"))
    for h in handles:
        h.remove()
    assert calls == [2 * len(batches())] * 3
    assert rep.forward_seconds > 0
    sparsify_model(ref, get_adapter(ref), batches, sparsity_method("sparsegpt", {"blocksize": 16}),
                   Pattern.parse("0.5"), device="cpu")
    enc = tiny_inputs()
    with torch.inference_mode():
        assert torch.equal(model(**enc).logits, ref(**enc).logits)


def test_empty_calibration_fails_clearly():
    model = tiny_llama().eval()
    with pytest.raises(ValueError, match="calibration set is empty"):
        sparsify_model(model, get_adapter(model), lambda: [], sparsity_method("wanda"), Pattern.parse("0.5"))


def test_every_linear_gets_its_own_inputs_moments():
    """Shared products (q/k/v, gate/up) must not leak to other Linears (e.g. o_proj, whose input can land in
    the memory a freed activation of the same shape had): each H equals X Xᵀ / T of that Linear's own inputs."""
    model = tiny_llama(layers=2).eval()
    block = model.model.layers[1]
    linears = block_linears(block, "b")
    seen: dict[str, list] = {n: [] for n in linears}
    hooks = [lin.register_forward_pre_hook(lambda m, a, n=n: seen[n].append(a[0].detach().clone()))
             for n, lin in linears.items()]
    encs = batches()
    H = block_moments(model, block, linears, encs)
    for h in hooks:
        h.remove()
    for n in linears:
        x = torch.cat([s.reshape(-1, s.shape[-1])[e["attention_mask"].reshape(-1).bool()]
                       for s, e in zip(seen[n], encs)]).double()
        assert torch.allclose(H[n], x.T @ x / x.shape[0], rtol=1e-5, atol=1e-7), n


class KeepAll(SparsityMethod):
    """Prunes nothing and remembers the H it was given per Linear: the walk's moments of the dense model."""
    name: ClassVar[str] = "keep_all"
    seen: ClassVar[list] = []

    def prune(self, W, H, pattern):
        KeepAll.seen.append(H.clone())
        return W.clone(), torch.zeros_like(W, dtype=torch.bool)


@pytest.mark.parametrize("factory", [tiny_llama, tiny_gemma3, tiny_bert], ids=["llama", "gemma3", "bert"])
def test_every_block_gets_its_own_call_arguments(factory):
    """The walk calls each block with what the model gives that block: Gemma 3's sixth layer attends globally
    with its own mask and rotary embeddings while the five before it use a sliding window, and a walk that gave
    every block the first block's arguments computed that layer's attention output, and so every Linear after it,
    wrongly (o_proj, gate, up and down had other moments). Every Linear's H equals the whole model's, run up to
    its block."""
    model = factory(layers=6).eval()
    adapter = get_adapter(model)
    data = lambda: [tiny_inputs(batch=3, seq=12, seed=s) for s in (1, 2)]  # noqa: E731 (longer than the window)
    KeepAll.seen = []
    sparsify_model(model, adapter, data, KeepAll(), Pattern.parse("0.5"))
    names, modules = {m: n for n, m in model.named_modules()}, dict(model.named_modules())
    seen = iter(KeepAll.seen)
    for block in adapter.layers():
        linears = block_linears(block, names[block])
        whole = block_moments(model, block, {n: modules[n] for n in linears}, data())
        for name in linears:
            assert torch.allclose(next(seen), whole[name], rtol=1e-8, atol=1e-10), name
