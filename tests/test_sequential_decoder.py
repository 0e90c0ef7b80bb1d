"""Issue 9: the sequential refit on pre-norm decoders (Llama, Mistral, Qwen2, Qwen3).

- exactness: when every pruned unit's activation is a copy of a kept one, the refit reproduces the dense logits;
- nothing pruned: the refit (ridge 0) changes nothing;
- the layer outputs the refit propagates (computed from captures) equal a real forward pass of the result;
- at ~50% units removed, sequential lstsq is closer to the dense logits than non-sequential lstsq and than none;
- the correct stage (stages/correct.py, sequential by default) runs on a decoder; Gemma 3 is refused clearly;
- offload (only the current layer on the device) gives the same weights, and so does a dense trace shared by
  several pruned models (the sweep).
"""

from __future__ import annotations

import copy
import json
import random

import pytest
import torch

from pruneflow import sequential
from pruneflow.adapters import get_adapter
from pruneflow.params import CorrectParams
from pruneflow.plan import Plan
from pruneflow.pruning import prune_to_selection
from pruneflow.stats import collect_statistics, tokenized_batches
from tiny import FACTORIES, WORDS, _tiny_decoder, tiny_tokenizer

FAMILIES = ["llama", "mistral", "qwen2", "qwen3", "mistral_window", "qwen2_mixed"]


def factory(family: str):
    """FACTORIES, plus sliding-window variants: every Mistral layer with a 4-token window, and Qwen2 with
    full attention in layer 0 and windowed attention after it (layers get different masks)."""
    if family == "mistral_window":
        return lambda seed=0, layers=2: _tiny_decoder("MistralConfig", "MistralForCausalLM", seed, layers,
                                                      head_dim=8, sliding_window=4)
    if family == "qwen2_mixed":
        return lambda seed=0, layers=2: _tiny_decoder("Qwen2Config", "Qwen2ForCausalLM", seed, layers,
                                                      use_sliding_window=True, sliding_window=4, max_window_layers=1)
    return FACTORIES[family]
MAX_LEN = 32


pytestmark = pytest.mark.usefixtures("one_thread")


def texts(n: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 20))) for _ in range(n)]


CALIB, HELD_OUT = texts(48, 0), texts(32, 1)


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    """tiny_tokenizer's vocabulary, loaded so that words get their ids (transformers 5 reads `vocab=`)."""
    from transformers import BertTokenizerFast

    d = tmp_path_factory.mktemp("vocab")
    tiny_tokenizer(d)
    t = BertTokenizerFast(vocab=str(d / "vocab.txt"), model_input_names=["input_ids", "attention_mask"])
    assert len(set(t(CALIB[0])["input_ids"])) > 3
    return t


def trace(dense, tok, **kw):
    return sequential.DenseTrace(dense, tokenized_batches(tok, CALIB, 16, MAX_LEN, "cpu"), "cpu", **kw)


def logits(model, tok, data=HELD_OUT):
    """Logits of real tokens, batches of mixed lengths (right padding)."""
    enc = tok(data, padding=True, truncation=True, max_length=MAX_LEN, return_tensors="pt")
    with torch.no_grad():
        out = model(**enc).logits
    return out[enc["attention_mask"].bool()] if out.dim() == 3 else out  # a classifier: one row per text


def half_selection(ad, seed: int) -> dict:
    """~50% of heads (one query head per KV group) and of neurons, at random per layer."""
    g = torch.Generator().manual_seed(seed)
    heads, neurons = [], []
    for _ in range(ad.num_layers):
        heads.append(sorted(k * ad.group + int(torch.randint(ad.group, (1,), generator=g))
                            for k in range(ad.dense_kv_heads)))
        neurons.append(sorted(torch.randperm(ad.dense_neurons, generator=g)[: ad.dense_neurons // 2].tolist()))
    return {"keep_heads": heads, "keep_neurons": neurons}


def duplicated_units(dense):
    """(dense, pruned): each odd query head copies the even one before it (same KV group) and each odd neuron the
    even one before it, so the model keeping the even ones can reproduce the dense model exactly."""
    ad = get_adapter(dense)
    assert ad.group == 2
    dh = ad.head_dim
    with torch.no_grad():
        for i in range(ad.num_layers):
            q = ad.attn_in(i)[0]
            for h in range(1, ad.dense_heads, 2):
                q.weight[h * dh:(h + 1) * dh] = q.weight[(h - 1) * dh:h * dh]
                if q.bias is not None:
                    q.bias[h * dh:(h + 1) * dh] = q.bias[(h - 1) * dh:h * dh]
            for lin in ad.ffn_in(i):
                lin.weight[1::2] = lin.weight[0::2]
    keep_heads = [list(range(0, ad.dense_heads, 2))] * ad.num_layers
    keep_neurons = [list(range(0, ad.dense_neurons, 2))] * ad.num_layers
    return dense, Plan(keep_heads, keep_neurons).apply(copy.deepcopy(dense))


@pytest.mark.parametrize("family", FAMILIES)
def test_pruned_copies_of_kept_units_are_refit_exactly(tok, family):
    """Query head 2k+1 copies head 2k (same KV head: identical contexts) and neuron 2j+1 copies neuron 2j; keep
    the even ones. The dense model is then exactly a pruned one with merged output columns."""
    dense, pruned = duplicated_units(factory(family)(layers=3))
    sliced = logits(pruned, tok)
    sequential.correct_sequential(pruned, "lstsq", 0.0, trace(dense, tok), "cpu")
    target = logits(dense, tok)
    assert (sliced - target).abs().max() > 1e-2  # slicing alone is far off
    torch.testing.assert_close(logits(pruned, tok), target, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("family", FAMILIES)
def test_nothing_pruned_changes_nothing(tok, family):
    dense = factory(family)()
    pruned = copy.deepcopy(dense)
    report = sequential.correct_sequential(pruned, "lstsq", 0.0, trace(dense, tok), "cpu")
    assert all(abs(r["rel_error_sliced"]) < 1e-5 and abs(r["rel_error_corrected"]) < 1e-5 for r in report), report
    # The fit is W up to the float32 rounding of the Accumulator's per-batch products, amplified along
    # directions the calibration barely uses (~2e-5 here on logits up to 0.8; 0 with float64 products).
    torch.testing.assert_close(logits(pruned, tok), logits(dense, tok), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("family", FAMILIES)
def test_propagated_outputs_equal_a_forward_pass(tok, family, monkeypatch):
    dense = factory(family)(layers=3)
    pruned = copy.deepcopy(dense)
    # layer 1 loses its whole attention, layer 2 its whole MLP (ConstantSublayer paths)
    get_adapter(pruned).slice_([[0, 2], [], [1, 3]], [list(range(0, 48, 3)), list(range(20)), []])
    propagated = {}
    monkeypatch.setattr(sequential, "_after_layer", lambda i, h: propagated.__setitem__(i, h[0].clone()))
    dt = sequential.DenseTrace(dense, tokenized_batches(tok, CALIB, len(CALIB), MAX_LEN, "cpu"), "cpu")  # one batch
    sequential.correct_sequential(pruned, "lstsq", CorrectParams().ridge, dt, "cpu")
    enc = next(tokenized_batches(tok, CALIB, len(CALIB), MAX_LEN, "cpu"))
    grabbed = []
    hooks = [L.register_forward_hook(lambda m, a, out: grabbed.append(out)) for L in get_adapter(pruned).layers()]
    with torch.no_grad():
        pruned(**enc)
    for h in hooks:
        h.remove()
    mask = enc["attention_mask"].bool()
    for i in range(3):
        torch.testing.assert_close(propagated[i][mask], grabbed[i][mask], rtol=1e-5, atol=1e-5)


def _kl(p_logits, q_logits) -> float:
    return float(torch.nn.functional.kl_div(q_logits.log_softmax(-1), p_logits.log_softmax(-1), log_target=True,
                                            reduction="batchmean"))


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("seed", [0, 1])
def test_sequential_beats_non_sequential_at_half_the_units(tok, family, seed):
    dense = factory(family)(seed=seed, layers=3)
    ad = get_adapter(dense)
    sel = half_selection(ad, seed)
    stats = collect_statistics(dense, ad, tokenized_batches(tok, CALIB, 16, MAX_LEN, "cpu"))
    dt = trace(dense, tok)
    target = logits(dense, tok)
    err = {}
    for name, p in [("none", CorrectParams(method="none")),
                    ("lstsq", CorrectParams(method="lstsq", sequential=False)),
                    ("seq", CorrectParams(method="lstsq", sequential=True))]:
        pruned, _, _ = prune_to_selection(dense, stats, sel, p, "cpu", lambda: dt)
        out = logits(pruned, tok)
        err[name] = (float(((out - target) ** 2).mean()), _kl(target, out))
    assert err["seq"][0] < err["lstsq"][0] < err["none"][0], err  # MSE of the logits
    assert err["seq"][1] < err["lstsq"][1] < err["none"][1], err  # KL(dense || pruned)


def test_correct_stage_runs_sequentially_on_a_decoder(tmp_path, tok):
    """stages/correct.py with the default (sequential lstsq) on a tiny Llama classifier: no refusal, and the
    saved model is closer to the dense one than plain slicing."""
    import transformers

    import stages.correct
    from pruneflow.params import Params
    from pruneflow.runtime import Layout

    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=120, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                   num_key_value_heads=2, intermediate_size=48, max_position_embeddings=64,
                                   num_labels=2, pad_token_id=0)
    dense = transformers.LlamaForSequenceClassification(cfg).eval()
    layout = Layout(tmp_path)
    dense.save_pretrained(str(layout.dense))
    tok.save_pretrained(str(layout.dense))
    layout.prepared.mkdir(parents=True)
    (layout.prepared / "calib.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in CALIB))
    ad = get_adapter(dense)
    sel = half_selection(ad, 0) | {"budget": 0.5, "cost": "flops", "allocation": "uniform", "seq_len": 16,
                                   "ranking": "random", "flops_dense": 1, "flops_pruned": 1, "flops_ratio": 0.5}
    layout.selection.parent.mkdir(parents=True)
    layout.selection.write_text(json.dumps(sel))
    params = Params.model_validate({"collect": {"batch_size": 16, "max_length": MAX_LEN},
                                    "runtime": {"device": "cpu", "threads": 1}})
    assert params.correct.sequential and params.correct.method == "lstsq"
    stages.correct.run(params, layout)
    metrics = json.loads((layout.metrics / "correct.json").read_text())
    assert metrics["sequential"] and len(metrics["layers"]) == 4
    assert metrics["mean_rel_error_corrected"] < metrics["mean_rel_error_sliced"]
    from pruneflow.plan import load_pruned

    pruned = load_pruned(layout.pruned).eval()
    sliced = Plan(sel["keep_heads"], sel["keep_neurons"]).apply(copy.deepcopy(dense))
    target = logits(dense, tok)
    assert ((logits(pruned, tok) - target) ** 2).mean() < ((logits(sliced, tok) - target) ** 2).mean()


def test_gemma3_is_refused_in_one_line(tok):
    with pytest.raises(ValueError, match="correct.sequential does not support gemma3") as e:
        trace(FACTORIES["gemma3"](), tok)
    assert "\n" not in str(e.value) and "correct.sequential=false" in str(e.value)


@pytest.mark.parametrize("family", ["llama", "bert"])
def test_offload_gives_the_same_weights(tok, family):
    dense = factory(family)()
    ad = get_adapter(dense)
    sel = half_selection(ad, 0)
    results = []
    for offload in ("none", "cpu"):
        pruned = Plan(sel["keep_heads"], sel["keep_neurons"]).apply(copy.deepcopy(dense))
        sequential.correct_sequential(pruned, "lstsq", 1e-3, trace(copy.deepcopy(dense), tok, offload=offload), "cpu")
        results.append(pruned.state_dict())
    for k, v in results[0].items():
        assert torch.equal(v, results[1][k]), k


@pytest.mark.parametrize("spill", [False, True], ids=["in_memory", "spilled"])
@pytest.mark.parametrize("family", ["llama", "bert"])
def test_a_kept_trace_serves_several_models_as_fresh_traces_do(tok, family, spill, tmp_path):
    """The sweep shares one dense trace (keep=True) among its pruned models: each gets the weights a trace of
    its own would give (the trace's layer-0 inputs and targets are not consumed by the first model), whether
    the kept targets are held in memory or spilled to disk and read back."""
    dense = factory(family)()
    ad = get_adapter(dense)
    shared = trace(copy.deepcopy(dense), tok, keep=True, spill_dir=tmp_path if spill else None)
    assert shared.kept_bytes == 2 * ad.num_layers * sum(h.numel() * 4 for h in shared.inputs())
    for seed in (0, 1):
        sel = half_selection(ad, seed)
        results = []
        for t in (shared, trace(copy.deepcopy(dense), tok)):
            pruned = Plan(sel["keep_heads"], sel["keep_neurons"]).apply(copy.deepcopy(dense))
            sequential.correct_sequential(pruned, "lstsq", 1e-3, t, "cpu")
            results.append(pruned.state_dict())
        for k, v in results[0].items():
            assert torch.equal(v, results[1][k]), (seed, k)
    assert len(list(tmp_path.glob("dense_targets_*.safetensors"))) == (ad.num_layers if spill else 0)


def test_first_token_weights_mark_each_sequences_first_real_token():
    """The refit's first-token weight lands on each sequence's first real token (left or right padding), in the
    order of the gathered real-token rows; weight 1 is no weighting at all."""
    mask = torch.tensor([[1, 1, 1, 0], [0, 1, 1, 1], [1, 1, 1, 1]], dtype=torch.bool).reshape(-1)
    rows = mask.nonzero().squeeze(1)
    w = sequential.first_token_weights(mask, torch.Size([3, 4]), 8.0, rows)
    assert w.tolist() == [8, 1, 1, 8, 1, 1, 8, 1, 1, 1]
    full = torch.ones(8, dtype=torch.bool)
    assert sequential.first_token_weights(full, torch.Size([2, 4]), 3.0, None).tolist() == [3, 1, 1, 1, 3, 1, 1, 1]
    assert sequential.first_token_weights(mask, torch.Size([3, 4]), 1.0, rows) is None


@pytest.mark.parametrize("weight", [1.0, 16.0])
def test_first_token_weight_reaches_every_fit_and_keeps_exact_refits_exact(tok, weight, monkeypatch):
    """Every fit of the refit gets the weights (16 at each first token), and a refit that can be exact (kept
    units duplicate the pruned ones) stays exact under any weighting."""
    dense, pruned = duplicated_units(factory("llama")(layers=3))
    ad = get_adapter(dense)
    seen = []
    add = sequential.Accumulator.add
    monkeypatch.setattr(sequential.Accumulator, "add", lambda self, x, t=None, weight=None: (
        seen.append((x.shape[0], None if weight is None else weight.clone())), add(self, x, t, weight))[1])
    sequential.correct_sequential(pruned, "lstsq", 0.0, trace(dense, tok), "cpu", first_token_weight=weight)
    assert len(seen) == 2 * ad.num_layers * -(-len(CALIB) // 16)
    for rows, w in seen:
        if weight == 1.0:
            assert w is None
        else:
            firsts = int((w == weight).sum())
            assert w.shape == (rows,) and firsts == 16 and int((w == 1).sum()) == rows - firsts  # 16 texts a batch
    torch.testing.assert_close(logits(pruned, tok), logits(dense, tok), rtol=1e-5, atol=1e-5)


def test_first_token_weight_only_where_heads_are_pruned(tok, monkeypatch):
    """correct.first_token_weight_where: heads_pruned weights the first token in the fits of the layers that lose
    attention heads and in no other (layer 0 keeps its 4 heads, layers 1 and 2 keep 2); so layer 0's refit is
    the unweighted one, bit for bit, and a model that keeps every head is refit as with weight 1."""
    dense = factory("llama")(layers=3)
    ad = get_adapter(dense)
    plan = Plan([[0, 1, 2, 3], [0, 2], [1, 3]], [list(range(0, ad.dense_neurons, 2))] * 3)
    seen = []
    add = sequential.Accumulator.add
    monkeypatch.setattr(sequential.Accumulator, "add", lambda self, x, t=None, weight=None: (
        seen.append(weight is not None), add(self, x, t, weight))[1])

    def refit(plan, weight, where):
        pruned = plan.apply(copy.deepcopy(dense))
        sequential.correct_sequential(pruned, "lstsq", 1e-3, trace(dense, tok), "cpu", first_token_weight=weight,
                                      first_token_where=where)
        return pruned

    seen.clear()
    only = refit(plan, 16.0, "heads_pruned")
    per_layer = len(seen) // 3
    assert seen == [False] * per_layer + [True] * 2 * per_layer
    unweighted, everywhere = refit(plan, 1.0, "all"), refit(plan, 16.0, "all")
    layer0 = lambda m: m.model.layers[0].state_dict()  # noqa: E731
    assert all(torch.equal(v, layer0(unweighted)[k]) for k, v in layer0(only).items())
    assert not all(torch.equal(v, layer0(everywhere)[k]) for k, v in layer0(only).items())
    keep_all = Plan([[0, 1, 2, 3]] * 3, plan.keep_neurons)
    a, b = refit(keep_all, 16.0, "heads_pruned").state_dict(), refit(keep_all, 1.0, "all").state_dict()
    assert all(torch.equal(v, b[k]) for k, v in a.items())
    with pytest.raises(ValueError, match="heads_pruned"):
        refit(plan, 16.0, "somewhere")
