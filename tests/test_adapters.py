"""Conformance suite for every architecture adapter in `pruneflow.adapters.ADAPTERS` (tiny random models).

It proves, for each registered adapter family (bert, distilbert, llama, mistral, qwen2, qwen3, gemma3):
- slicing is exact: removing units whose outgoing weights were zeroed first changes no output, with
  non-uniform kept sets per layer, a layer with zero heads and a layer with zero neurons, on padded inputs
  (Llama: all-ones mask; GQA kept sets with equal counts per kept KV group, whole groups dropping their k/v head);
- masking units by hooks (`adapter.masked`) computes what slicing them computes;
- `attention_core` is where attention is: standing in for it with its own result changes no output, bit for bit;
- `save_pruned` / `load_pruned` round-trip exactly (same state_dict keys, shapes, values and logits);
- the analytic multiply-add count (`adapter.macs`) equals fvcore's matmul count on sliced models;
- `adapter.shape()` reports the kept counts; `unit_macs` is the MAC cost of one more head / neuron;
- invalid slicing (already sliced, out-of-range, unequal GQA groups) and unsupported models raise clearly.
"""

from __future__ import annotations

import copy

import pytest
import torch
import transformers

from pruneflow.adapters import ADAPTERS, ConstantSublayer, LayerShape, UnsupportedArchitecture, get_adapter
from pruneflow.flops import count_flops
from pruneflow.plan import Plan, load_pruned, save_pruned
from tiny import DECODERS, FACTORIES, SPARSITY_ONLY_FACTORIES, TINY, tiny_inputs

FAMILIES = [a.family for a in ADAPTERS if a.structured]  # sparsity-only families (mamba): tests/test_mamba.py
H, N = TINY["heads"], TINY["ffn"]
ALL_H, ALL_N = list(range(H)), list(range(N))

# Non-uniform kept sets per layer (3 layers): a layer with zero heads, a layer with zero neurons, a dense sublayer.
# Llama (4 query heads, 2 KV heads, group 2): kept query heads must be equal in number per kept KV group.
CASES = {
    "mha": [
        ([[0, 2], [], ALL_H], [list(range(0, N, 3)), ALL_N, []]),
        ([[3], [0, 1, 3], []], [[], [5, 7, 11, 40, 47], list(range(20))]),
    ],
    "gqa": [
        ([[2, 3], [], ALL_H], [list(range(0, N, 3)), ALL_N, []]),  # group 0 dropped whole: its k/v head goes
        ([[1, 2], [0, 1], []], [[], [5, 7, 11, 40, 47], list(range(20))]),  # one per group; group 1 dropped
    ],
}


def make(family: str, layers: int = 3):
    return FACTORIES[family](layers=layers)


def inputs_for(family: str, batch: int = 3, seq: int = 10):
    inp = tiny_inputs(batch=batch, seq=seq)
    if family in DECODERS:
        inp["attention_mask"] = torch.ones_like(inp["attention_mask"])
    return inp


def cases_for(family: str):
    return CASES["gqa" if family in DECODERS else "mha"]


def expected_kv(adapter, heads: list[int]) -> int:
    return len({h // adapter.group for h in heads})


@torch.no_grad()
def outputs(model, inp) -> list[torch.Tensor]:
    out = model(**inp, output_hidden_states=True)
    return [out.logits, *out.hidden_states]


@torch.no_grad()
def zero_removed_units(adapter, keep_heads, keep_neurons) -> None:
    """Zero the outgoing weights of every unit that slicing will remove (o-proj / FFN-out columns)."""
    dh = adapter.head_dim
    for i in range(adapter.num_layers):
        o = adapter.attn_out(i)
        for h in set(range(adapter.dense_heads)) - set(keep_heads[i]):
            o.weight[:, h * dh:(h + 1) * dh] = 0
        gone = sorted(set(range(adapter.dense_neurons)) - set(keep_neurons[i]))
        if gone:
            adapter.ffn_out(i).weight[:, gone] = 0


def sliced(family: str, case: int):
    model = make(family)
    kh, kn = cases_for(family)[case]
    get_adapter(model).slice_(kh, kn)
    return model, kh, kn


def test_every_adapter_has_a_tiny_factory():
    assert FAMILIES, "no adapters registered"
    factories = FACTORIES | SPARSITY_ONLY_FACTORIES
    missing = [a.family for a in ADAPTERS if a.family not in factories]
    assert not missing, f"adapters without a tiny model factory in tests/tiny.py: {missing}"
    for cls in ADAPTERS:
        adapter = get_adapter(factories[cls.family](layers=1))
        assert type(adapter).family == cls.family
        assert adapter.structured == (cls.family in FACTORIES)


# --- (a) slicing zeroed-out units is exact -----------------------------------------------------------------

@pytest.mark.parametrize("case", [0, 1])
@pytest.mark.parametrize("family", FAMILIES)
def test_slicing_zeroed_units_changes_no_output(family, case):
    model = make(family)
    adapter = get_adapter(model)
    kh, kn = cases_for(family)[case]
    inp = inputs_for(family)
    dense = outputs(model, inp)
    zero_removed_units(adapter, kh, kn)
    zeroed = outputs(model, inp)
    assert not torch.allclose(dense[-1], zeroed[-1], atol=1e-3), "zeroing should matter (test has no teeth)"
    adapter.slice_(kh, kn)
    after = outputs(model, inp)
    assert len(after) == len(zeroed)
    for k, (a, z) in enumerate(zip(after, zeroed)):
        torch.testing.assert_close(a, z, atol=1e-5, rtol=0, msg=lambda m: f"output {k}: {m}")
    # the empty sublayers really are gone, and the kept weights were sliced
    for i in range(adapter.num_layers):
        assert adapter.empty(i, "attn") == (not kh[i])
        assert adapter.empty(i, "ffn") == (not kn[i])
    assert any(isinstance(m, ConstantSublayer) for m in model.modules())


@pytest.mark.parametrize("family", FAMILIES)
def test_slicing_keeps_the_selected_weights(family):
    model = make(family)
    ref = copy.deepcopy(model)
    kh, kn = cases_for(family)[0]
    ad, ad_ref = get_adapter(model), get_adapter(ref)
    ad.slice_(kh, kn)
    dh = ad.head_dim
    i = 0  # layer 0 keeps heads and neurons (non-empty, non-dense)
    cols = torch.tensor([h * dh + t for h in kh[i] for t in range(dh)])
    torch.testing.assert_close(ad.attn_out(i).weight, ad_ref.attn_out(i).weight[:, cols], rtol=0, atol=0)
    torch.testing.assert_close(ad.attn_in(i)[0].weight, ad_ref.attn_in(i)[0].weight[cols], rtol=0, atol=0)
    kv = sorted({h // ad.group for h in kh[i]})
    kv_rows = torch.tensor([k * dh + t for k in kv for t in range(dh)])
    for j in (1, 2):
        torch.testing.assert_close(ad.attn_in(i)[j].weight, ad_ref.attn_in(i)[j].weight[kv_rows], rtol=0, atol=0)
    idx = torch.tensor(kn[i])
    torch.testing.assert_close(ad.ffn_out(i).weight, ad_ref.ffn_out(i).weight[:, idx], rtol=0, atol=0)
    for new, old in zip(ad.ffn_in(i), ad_ref.ffn_in(i)):
        torch.testing.assert_close(new.weight, old.weight[idx], rtol=0, atol=0)


# --- (b) save / load round trip --------------------------------------------------------------------------------

@pytest.mark.parametrize("family", FAMILIES)
def test_save_and_load_pruned_round_trip(family, tmp_path):
    model, kh, kn = sliced(family, 0)
    save_pruned(model, tmp_path / "pruned", Plan(kh, kn), info={"budget": 0.5})
    loaded = load_pruned(tmp_path / "pruned")
    eager = load_pruned(tmp_path / "pruned", attn="eager")
    assert eager.config._attn_implementation == "eager"
    sd, sd2 = model.state_dict(), loaded.state_dict()
    assert sorted(sd) == sorted(sd2)
    for k in sd:
        assert sd[k].shape == sd2[k].shape, k
        assert torch.equal(sd[k], sd2[k]), k
    assert get_adapter(loaded).shape() == get_adapter(model).shape()
    inp = inputs_for(family)
    with torch.no_grad():
        for reloaded in (loaded, eager):  # compare like with like: the same attention implementation
            model.set_attn_implementation(reloaded.config._attn_implementation)
            assert torch.equal(model(**inp).logits, reloaded(**inp).logits)
    # the sliced model refuses to be sliced again after reload, too
    with pytest.raises(ValueError, match="already sliced"):
        get_adapter(loaded).slice_(kh, kn)


# --- (c) analytic MACs match fvcore ---------------------------------------------------------------------------

@pytest.mark.parametrize("seq", [7, 12])
@pytest.mark.parametrize("family", FAMILIES)
def test_analytic_macs_match_fvcore(family, seq):
    for case in (0, 1):
        model, _, _ = sliced(family, case)
        adapter = get_adapter(model)
        prev = model.config._attn_implementation
        fc = count_flops(model, seq, batch=2, tolerance=1.0)  # compare ourselves, below
        assert model.config._attn_implementation == prev  # restored after counting with eager attention
        analytic = adapter.macs(seq) * 2
        assert fc.analytic == analytic
        assert abs(fc.matmul - analytic) <= 0.01 * analytic, (family, case, seq, fc.matmul, analytic)
        assert fc.matmul == analytic  # the tiny models have no matmul the cost model misses
    dense = make(family)
    fc = count_flops(dense, seq, batch=2, tolerance=1.0)
    assert fc.matmul == get_adapter(dense).macs(seq) * 2


# --- (d) shape ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("family", FAMILIES)
def test_shape_reports_kept_counts(family):
    dense = get_adapter(make(family))
    assert dense.shape() == [LayerShape(H, N, dense.dense_kv_heads)] * 3
    for case in (0, 1):
        model, kh, kn = sliced(family, case)
        adapter = get_adapter(model)
        assert adapter.shape() == [LayerShape(len(h), len(n), expected_kv(adapter, h)) for h, n in zip(kh, kn)]


def test_gqa_shape_drops_kv_heads_of_dropped_groups():
    model, kh, kn = sliced("llama", 0)
    shape = get_adapter(model).shape()
    assert [s.kv_heads for s in shape] == [1, 0, 2]
    attn0 = get_adapter(model).layers()[0].self_attn
    assert attn0.num_key_value_groups == 2


# --- (e) invalid slicing raises -------------------------------------------------------------------------------

@pytest.mark.parametrize("family", FAMILIES)
def test_slicing_a_sliced_model_raises(family):
    model, kh, kn = sliced(family, 0)
    with pytest.raises(ValueError, match="already sliced"):
        get_adapter(model).slice_([ALL_H] * 3, [ALL_N] * 3)
    model, kh, kn = sliced(family, 1)  # layer 0 has no FFN at all: also "already sliced"
    with pytest.raises(ValueError, match="already sliced"):
        get_adapter(model).slice_(kh, kn)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("bad", [
    ([[H]] * 3, [ALL_N] * 3),
    ([[-1, 0]] * 3, [ALL_N] * 3),
    ([ALL_H] * 3, [[N]] * 3),
    ([ALL_H] * 3, [[-1, 3]] * 3),
], ids=["head-too-big", "head-negative", "neuron-too-big", "neuron-negative"])
def test_out_of_range_indices_raise(family, bad):
    model = make(family)
    with pytest.raises(ValueError, match="out of range"):
        get_adapter(model).slice_(*bad)


@pytest.mark.parametrize("family", FAMILIES)
def test_wrong_number_of_layers_raises(family):
    with pytest.raises(ValueError, match="3 layers"):
        get_adapter(make(family)).slice_([ALL_H] * 2, [ALL_N] * 2)


@pytest.mark.parametrize("heads", [[0, 1, 2], [0, 2, 3], [1, 2, 3]])
def test_gqa_unequal_kept_counts_per_group_raise(heads):
    model = make("llama")
    with pytest.raises(ValueError, match="same number"):
        get_adapter(model).slice_([heads, ALL_H, ALL_H], [ALL_N] * 3)


@pytest.mark.parametrize("family", FAMILIES)
def test_rejected_slice_leaves_model_untouched(family):
    model = make(family)
    before = {k: v.shape for k, v in model.state_dict().items()}
    with pytest.raises(ValueError):  # layer 0 valid, layer 2 out of range
        get_adapter(model).slice_([[0, 1], ALL_H, [H]], [[1, 2], ALL_N, ALL_N])
    assert {k: v.shape for k, v in model.state_dict().items()} == before


# --- (f) unsupported architectures -----------------------------------------------------------------------------

def test_unsupported_architecture_lists_supported_types():
    cfg = transformers.GPT2Config(vocab_size=50, n_positions=16, n_embd=8, n_layer=1, n_head=2)
    model = transformers.GPT2LMHeadModel(cfg)
    with pytest.raises(UnsupportedArchitecture) as info:
        get_adapter(model)
    msg = str(info.value)
    assert "gpt2" in msg
    for cls in ADAPTERS:
        for t in cls.model_types:
            assert t in msg
    assert isinstance(info.value, ValueError)  # stage_main turns it into a one-line error


# --- (g) unit costs ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("family", FAMILIES)
def test_unit_macs_is_the_cost_of_one_more_head_and_neuron(family):
    seq = 9
    base_h, more_h = [0], [0, 1]  # llama: 1 -> 2 query heads of KV group 0 (same KV head, as unit_macs assumes)
    base_n, more_n = list(range(10)), list(range(11))

    def sliced_macs(heads, neurons):
        model = make(family, layers=1)
        ad = get_adapter(model)
        ad.slice_([heads], [neurons])
        fc = count_flops(model, seq, batch=1, tolerance=1.0)
        assert fc.matmul == ad.macs(seq)
        return ad.macs(seq)

    head, neuron = get_adapter(make(family, layers=1)).unit_macs(seq)
    base = sliced_macs(base_h, base_n)
    assert sliced_macs(more_h, base_n) - base == head
    assert sliced_macs(base_h, more_n) - base == neuron
    assert head > 0 and neuron > 0
    if family not in DECODERS:  # MHA: one more head brings its own k and v rows
        dh, d = get_adapter(make(family, 1)).head_dim, TINY["hidden"]
        assert head == 4 * seq * d * dh + 2 * seq * seq * dh


# --- masking by hooks equals slicing ------------------------------------------------------------------------

@pytest.mark.parametrize("family", FAMILIES)
def test_masking_units_equals_slicing_them(family):
    model = make(family)
    adapter = get_adapter(model)
    kh, kn = cases_for(family)[0]
    inp = inputs_for(family)
    masks = {}
    for i in range(adapter.num_layers):
        masks[(i, "attn")] = torch.tensor([float(h in kh[i]) for h in range(adapter.dense_heads)])
        masks[(i, "ffn")] = torch.tensor([float(j in kn[i]) for j in range(adapter.dense_neurons)])
    dense = outputs(model, inp)
    with adapter.masked(masks):
        masked = outputs(model, inp)
    after_exit = outputs(model, inp)
    for a, b in zip(dense, after_exit):  # hooks are gone: the live model is unchanged
        torch.testing.assert_close(a, b, atol=0, rtol=0)
    assert not torch.allclose(dense[-1], masked[-1], atol=1e-3), "masking should matter (test has no teeth)"
    adapter.slice_(kh, kn)
    for k, (a, m) in enumerate(zip(outputs(model, inp), masked)):
        torch.testing.assert_close(a, m, atol=1e-5, rtol=0, msg=lambda msg: f"output {k}: {msg}")


# --- attention_core: the sequential correction's FFN pass takes attention's result instead of recomputing it ------

@pytest.mark.parametrize("family", FAMILIES)
def test_attention_answering_with_its_own_result_changes_no_output(family):
    from pruneflow.sequential import _attention_answers

    model = make(family)
    adapter = get_adapter(model)
    inp, i, seen = inputs_for(family), 1, {}
    hook = adapter.attn_out(i).register_forward_pre_hook(lambda m, args: seen.setdefault("x", args[0]))
    dense = outputs(model, inp)
    hook.remove()
    calls = []
    hook = adapter.attn_in(i)[0].register_forward_hook(lambda *a: calls.append(1))
    with _attention_answers(adapter, i, seen["x"]):
        answered = outputs(model, inp)
    hook.remove()
    assert not calls, "layer i's attention ran anyway"
    for a, b in zip(dense, answered):  # bit for bit: the stand-in returns what attention computes
        torch.testing.assert_close(a, b, atol=0, rtol=0)
    assert "forward" not in vars(adapter.attention_core(i)[0])  # the class's forward is back


# --- plans: slices and weight masks, manifest round trip -------------------------------------------------------

@pytest.mark.parametrize("family", ["bert", "llama"])
def test_plan_with_slices_and_masks_round_trips(family, tmp_path):
    model = make(family)
    kh, kn = cases_for(family)[1]
    plan = Plan(kh, kn)
    plan.apply(model)
    adapter = get_adapter(model)
    g = torch.Generator().manual_seed(0)
    i = next(k for k in range(adapter.num_layers) if not adapter.empty(k, "ffn") and adapter.ffn_out(k).in_features % 4 == 0)
    names = adapter.module_names()
    up, down = adapter.ffn_in(i)[0], adapter.ffn_out(i)
    unstructured = torch.rand(up.weight.shape, generator=g) > 0.5
    two_four = torch.ones(down.weight.shape, dtype=torch.bool).view(down.weight.shape[0], -1, 4)
    two_four[:, :, :2] = False
    plan.masks = {names[up]: unstructured, names[down]: two_four.view(down.weight.shape)}
    plan.patterns = {names[up]: "unstructured", names[down]: "2:4"}
    Plan(masks=plan.masks).apply(model)  # masks apply after slicing, to the sliced weights
    assert int(up.weight.count_nonzero()) == int((up.weight != 0).sum()) <= int(unstructured.sum())
    save_pruned(model, tmp_path / "p", plan, info={"x": 1})
    loaded = load_pruned(tmp_path / "p")
    from pruneflow.plan import read_plan

    back, manifest = read_plan(tmp_path / "p")
    assert back.keep_heads == [sorted(h) for h in kh] and back.keep_neurons == [sorted(n) for n in kn]
    assert back.patterns == plan.patterns and manifest["masks"][names[down]]["pattern"] == "2:4"
    for name, mask in plan.masks.items():
        assert torch.equal(back.masks[name], mask)
    inp = inputs_for(family)
    for a, b in zip(outputs(model, inp), outputs(loaded, inp)):
        torch.testing.assert_close(a, b, atol=0, rtol=0)


def test_old_manifest_format_loads_and_unknown_format_is_refused(tmp_path):
    import json

    model = make("bert")
    kh, kn = cases_for("bert")[0]
    Plan(kh, kn).apply(model)
    save_pruned(model, tmp_path / "p", Plan(kh, kn))
    manifest = json.loads((tmp_path / "p/manifest.json").read_text())
    for key in ("masks",):
        manifest.pop(key)
    (tmp_path / "p/manifest.json").write_text(json.dumps(manifest | {"format": "pruneflow/1"}))
    load_pruned(tmp_path / "p")
    (tmp_path / "p/manifest.json").write_text(json.dumps(manifest | {"format": "pruneflow/99"}))
    with pytest.raises(ValueError, match="pruneflow/99"):
        load_pruned(tmp_path / "p")


@pytest.mark.parametrize("pattern", ["2:4", "4:8", "unstructured"])
def test_mask_patterns_parse(pattern):
    from pruneflow.plan import check_pattern

    assert check_pattern(pattern) in ((2, 4), (4, 8), None)


@pytest.mark.parametrize("pattern", ["4:2", "0:4", "two:four", "2-4"])
def test_bad_mask_patterns_are_refused(pattern):
    from pruneflow.plan import check_pattern

    with pytest.raises(ValueError, match="N:M"):
        check_pattern(pattern)


@pytest.mark.parametrize("family", FAMILIES)
def test_select_on_a_model_without_weights_selects_the_same(family, tmp_path):
    """The select stage measures FLOPs and parameters on the model with its parameters on the meta device
    (Task.load_shapes: no weights in memory): fvcore's trace of the sliced shapes gives the same counts, so the
    same selection, as the real model, for every cost that reads shapes, under both allocations."""
    from pruneflow.cost import make_cost
    from pruneflow.modeling import is_token_level
    from pruneflow.params import RankParams, SelectParams
    from pruneflow.ranking import rank_model
    from pruneflow.selection import select_units
    from pruneflow.stats import collect_statistics
    from pruneflow.tasks import get_task

    model = FACTORIES[family]()
    model.save_pretrained(tmp_path)
    task = get_task("causal_lm" if is_token_level(model) else "classification")
    shapes = task.load_shapes(tmp_path)
    assert all(p.is_meta for p in shapes.parameters())
    ad = get_adapter(model)
    batches = [tiny_inputs(seed=s) for s in (1, 2)]
    ranking = rank_model(ad, collect_statistics(model, ad, batches), RankParams(method="activation", chunk=0.1),
                         progress=False)
    for cost, allocation in (("flops", "uniform"), ("params", "uniform"), ("flops", "error")):
        p = SelectParams(budget=0.7, cost=cost, allocation=allocation, min_neurons=1)
        real = select_units(model, ad, ranking, p, make_cost(cost, 10), 10)
        assert select_units(shapes, get_adapter(shapes), ranking, p, make_cost(cost, 10), 10) == real
    assert not make_cost("flops", 10).reads_weights and make_cost("nonzeros", 10).reads_weights


@pytest.mark.parametrize("family", FAMILIES)
def test_rank_one_layer_at_a_time_from_disk_ranks_the_same(family, tmp_path):
    """rank with runtime.offload=disk: the model on the meta device, each layer's weights read from the
    checkpoint while that layer is ranked (blockwalk.Residency.layer) and dropped after: the same ranking as the
    model in memory, for every layer-wise method, and no weight left in memory. A global search refuses."""
    from pruneflow.blockwalk import Residency
    from pruneflow.modeling import is_token_level
    from pruneflow.params import RankParams
    from pruneflow.ranking import rank_model
    from pruneflow.stats import collect_statistics
    from pruneflow.tasks import get_task

    model = FACTORIES[family]()
    model.save_pretrained(tmp_path)
    lazy = get_task("causal_lm" if is_token_level(model) else "classification").load_lazy(tmp_path)
    ad, lazy_ad = get_adapter(model), get_adapter(lazy)
    stats = collect_statistics(model, ad, [tiny_inputs(seed=s) for s in (1, 2)])
    layer_weights = Residency(lazy, lazy_ad, "cpu", "disk").layer
    for method in ("obs", "activation", "magnitude", "kcm"):
        p = RankParams(method=method, chunk=0.1)
        expected = rank_model(ad, stats, p, progress=False)
        assert rank_model(lazy_ad, stats, p, progress=False, layer_weights=layer_weights) == expected, method
    assert all(t.is_meta for t in lazy_ad.layers().parameters())
    with pytest.raises(ValueError, match="whole model"):
        rank_model(lazy_ad, stats, RankParams(method="bonsai"), progress=False, layer_weights=layer_weights)
