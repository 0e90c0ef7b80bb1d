"""The sensitivity allocation (select.allocation: sensitivity): the pure tilt (pruneflow.allocation.tilted) and
the probe (pruneflow.sensitivity.LayerProbe) on tiny random decoders.

It proves: the tilt keeps the total (so the cost), the floors, the dense count and multiple_of, gives more to the
layers whose loss rises more, and is the identity at tilt 0; the probe's rise for a layer is exactly the loss of
the model with that layer's FFN physically sliced and refit in closed form (the masked, replayed probe equals
slicing), and zero when nothing is pruned and nothing refit; select_units spends the same cost as uniform and
refuses the allocation without a probe.
"""

from __future__ import annotations

import copy

import pytest
import torch

from pruneflow.adapters import get_adapter
from pruneflow.allocation import tilted
from tests.tiny import tiny_bert, tiny_distilbert, tiny_inputs, tiny_llama, tiny_qwen2, tiny_gemma3


def test_tilt_keeps_the_total_and_the_bounds_and_favours_the_sensitive_layers():
    rise = [0.30, 0.01, 0.02, 0.0, 0.05, 0.12]
    uniform = [40] * 6
    for tilt in (0.1, 0.25, 0.5, 1.0):
        n = tilted(rise, uniform, tilt, dense=64, floor=16)
        assert sum(n) == sum(uniform) and all(16 <= v <= 64 for v in n), n
        assert n[0] == max(n) and n[3] == min(n)  # the most and least sensitive layers
    assert tilted(rise, uniform, 0.0, 64, 16) == uniform
    n = tilted(rise, [48] * 6, 0.5, dense=64, floor=16, multiple_of=8)
    assert sum(n) == 6 * 48 and all(v % 8 == 0 and 16 <= v <= 64 for v in n), n
    # a strong tilt runs into the dense count and the floor, and still keeps the total
    n = tilted([1.0, 0, 0, 0], [60, 60, 60, 60], 1.0, dense=64, floor=50)
    assert sum(n) == 240 and max(n) <= 64 and min(n) >= 50, n


@pytest.mark.parametrize("lam", [0.0, 0.25, 0.5, 1.0, 3.0])
def test_sensitivity_allocation_keeps_the_total_and_the_bounds(lam):
    """The tilted allocation spends exactly the uniform allocation's neurons (so the
    same FLOPs), stays within [floor, dense], gives more to more sensitive layers, and is uniform at λ = 0."""
    sens = [0.03, 0.01, -0.002, 0.0, 0.005, 0.012, 0.001, -0.001]
    uniform = [100] * len(sens)
    n = tilted(sens, uniform, lam, dense=160, floor=16)
    assert sum(n) == sum(uniform) and all(16 <= v <= 160 for v in n)
    order = sorted(range(len(sens)), key=sens.__getitem__)
    assert all(n[a] <= n[b] for a, b in zip(order, order[1:]))  # monotone in the sensitivity
    if lam == 0:
        assert n == uniform


def _probe(model, method="lstsq", ridge=1e-4, kind="causal_lm"):
    from pruneflow.params import RankParams
    from pruneflow.ranking import rank_model
    from pruneflow.sensitivity import LayerProbe
    from pruneflow.stats import collect_statistics
    from pruneflow.tasks import get_task

    ad = get_adapter(model)
    batches = [tiny_inputs(seed=s) for s in (1, 2)]  # the classifier's sentences are padded
    for b in batches if kind == "causal_lm" else []:  # full windows, as the LM task's
        b["attention_mask"] = torch.ones_like(b["attention_mask"])
    stats = collect_statistics(model, ad, batches, vote_topk=None)
    ranking = rank_model(ad, stats, RankParams(method="activation", chunk=0.1), progress=False)
    task = get_task(kind)
    return LayerProbe(model, ad, stats, ranking, batches, task, method, ridge), stats, ranking, batches, task


@pytest.mark.parametrize("factory,kind", [(tiny_llama, "causal_lm"), (tiny_qwen2, "causal_lm"),
                                          (tiny_gemma3, "causal_lm"), (tiny_bert, "classification"),
                                          (tiny_distilbert, "classification")])
def test_probe_rise_is_the_loss_of_the_sliced_and_refit_layer(factory, kind):
    from pruneflow.correction import fit, moments_from_dense, write_fit

    model = factory(layers=3)
    # float32 losses: NLL rises of 1e-4 and more; a random classifier's KL rises are 1e-6 to 1e-3 (its logits
    # scaled up: near zero they would be 1e-8), equal to the sliced model's to 2e-8
    tol, floor = (1e-6, 1e-4) if kind == "causal_lm" else (1e-7, 1e-6)
    if kind == "classification":
        with torch.no_grad():
            model.classifier.weight.mul_(300)
    probe, stats, ranking, batches, task = _probe(model, kind=kind)
    ad = get_adapter(model)
    N, H = ad.dense_neurons, ad.dense_heads
    neurons = [4, 8, 2]
    rises = probe(neurons)
    for i, n in enumerate(neurons):
        f = ranking["layers"][i]["ffn"]
        keep = sorted(f["order"][f["units"] - n:])
        sliced = copy.deepcopy(model)
        sad = get_adapter(sliced)
        sad.slice_layer(i, list(range(H)), keep)
        st, lin = stats.sublayer(ad, i, "ffn"), ad.out_proj(i, "ffn")
        cols = ad.unit_columns("ffn", keep)
        W, b = lin.weight.detach(), (None if lin.bias is None else lin.bias.detach())
        W_new, b_new = fit("lstsq", moments_from_dense(st.cov, st.mean, W, b, cols, st.n), W[:, cols], b, 1e-4,
                           intercept=b is not None)
        write_fit(sad, i, "ffn", W_new, b_new)
        reference = task.calibration_reference(model, batches)
        expected = (task.calibration_loss(sliced, batches, reference)
                    - task.calibration_loss(model, batches, reference))
        assert rises[i] == pytest.approx(expected, abs=tol), (i, rises[i], expected)
    assert min(abs(r) for r in rises) > floor, rises  # far above the tolerance: the equality says something
    assert probe(neurons) is rises  # memoised per neuron counts
    # the probe put every weight back
    fresh = factory(layers=3)
    if kind == "classification":
        with torch.no_grad():
            fresh.classifier.weight.mul_(300)
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), fresh.state_dict().values()))
    # nothing pruned, nothing refit: no rise, through the replay of the kept hidden states
    none, *_ = _probe(model, method="none", kind=kind)
    assert none([N] * 3) == pytest.approx([0.0] * 3, abs=1e-6)


def test_select_units_tilts_neurons_at_the_uniform_cost():
    from pruneflow.cost import make_cost
    from pruneflow.params import SelectParams
    from pruneflow.selection import select_units

    model = tiny_llama(layers=3)
    probe, stats, ranking, *_ = _probe(model)
    ad = get_adapter(model)
    cost = make_cost("flops", 10)
    uniform = select_units(model, ad, ranking, SelectParams(budget=0.7, min_neurons=4), cost, 10)
    sel = select_units(model, ad, ranking, SelectParams(budget=0.7, min_neurons=4, allocation="sensitivity", tilt=0.5),
                       cost, 10, probe)
    assert sel["heads_per_layer"] == uniform["heads_per_layer"]
    assert sum(sel["neurons_per_layer"]) == sum(uniform["neurons_per_layer"])
    assert sel["neurons_per_layer"] != uniform["neurons_per_layer"]
    assert sel["cost_pruned"] == uniform["cost_pruned"] and sel["cost_ratio"] <= 0.7
    rise = probe(uniform["neurons_per_layer"])
    assert sel["neurons_per_layer"][rise.index(max(rise))] == max(sel["neurons_per_layer"])
    with pytest.raises(ValueError, match="sensitivity needs its probe"):
        select_units(model, ad, ranking, SelectParams(budget=0.7, allocation="sensitivity"), cost, 10)


def test_lm_calibration_subsets_are_evenly_spaced(tmp_path):
    from safetensors.torch import save_file

    from pruneflow.params import CollectParams
    from pruneflow.runtime import WINDOWS_FILE
    from pruneflow.tasks import get_task

    windows = torch.arange(20).unsqueeze(1).repeat(1, 4)  # window k holds token k
    save_file({"calib": windows, "eval": windows[:2].clone()}, str(tmp_path / WINDOWS_FILE))
    task = get_task("causal_lm")
    first = lambda cal: [int(b["input_ids"][j, 0]) for b in cal for j in range(len(b["input_ids"]))]  # noqa: E731
    assert first(task.calibration_batches(tmp_path, None, CollectParams(batch_size=3, max_samples=5), "cpu")) == \
        [0, 5, 10, 14, 19]
    assert first(task.calibration_batches(tmp_path, None, CollectParams(batch_size=3), "cpu", 3)) == [0, 10, 19]
    assert len(task.calibration_batches(tmp_path, None, CollectParams(batch_size=3), "cpu")) == 20


@pytest.mark.parametrize("factory", [tiny_bert, tiny_distilbert])
def test_classifier_reference_loss_is_the_dense_forward_s_exactly(factory):
    """The probe takes the classifier's dense loss from the task (KL to itself: 0) instead of a forward pass; a
    forward gives exactly that, so the rises are the same numbers either way."""
    from pruneflow.tasks import get_task

    model = factory(layers=2)
    with torch.no_grad():
        model.classifier.weight.mul_(300)
    task = get_task("classification")
    batches = [tiny_inputs(seed=s) for s in (1, 2)]
    reference = task.calibration_reference(model, batches)
    assert task.reference_loss(reference) == task.calibration_loss(model, batches, reference) == 0.0
    assert get_task("causal_lm").reference_loss(None) is None  # an NLL needs its forward


@pytest.mark.parametrize("factory,kind,offload", [(tiny_llama, "causal_lm", "disk"), (tiny_llama, "causal_lm", "cpu"),
                                                   (tiny_bert, "classification", "disk")])
def test_probe_with_offload_gives_the_same_rises_and_holds_one_layer(factory, kind, offload, tmp_path):
    """runtime.offload for the probe (select with a model that barely fits): the rises are the in-memory probe's
    to the bit; with disk, at most one layer's weights are real whenever a layer runs, nothing is after, and the
    tied LM head (tiny_llama ties it to the embeddings) still runs as the embeddings' weight."""
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    from pruneflow.blockwalk import Residency, lazy_model
    from pruneflow.sensitivity import LayerProbe

    model = factory(layers=3)
    if kind == "classification":
        with torch.no_grad():
            model.classifier.weight.mul_(300)
    model.save_pretrained(tmp_path / "dense")
    probe, stats, ranking, batches, task = _probe(model, kind=kind)
    neurons = [4, 8, 2]
    expected = probe(neurons)

    auto = AutoModelForCausalLM if kind == "causal_lm" else AutoModelForSequenceClassification
    lazy = lazy_model(auto, tmp_path / "dense", attn=model.config._attn_implementation)
    if offload == "cpu":  # the whole model in CPU memory (on a GPU, each layer would move to it when it runs)
        lazy = factory(layers=3)
        lazy.load_state_dict(model.state_dict())
    ad = get_adapter(lazy)
    real_layers = []  # how many layers hold real weights, whenever one runs
    for layer in ad.layers():
        layer.register_forward_pre_hook(lambda m, a, k: real_layers.append(
            sum(not next(blk.parameters()).is_meta for blk in ad.layers())), with_kwargs=True)
    streamed = LayerProbe(lazy, ad, stats, ranking, batches, task, "lstsq", 1e-4, Residency(lazy, ad, "cpu", offload))
    assert streamed(neurons) == expected
    if offload == "disk":
        assert real_layers and max(real_layers) == 1
        assert all(p.is_meta for p in lazy.parameters())
        if kind == "causal_lm":
            assert lazy.lm_head.weight is lazy.model.embed_tokens.weight  # still tied, on the meta device
