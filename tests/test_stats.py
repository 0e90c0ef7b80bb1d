"""Streaming calibration statistics (pruneflow.stats.collect_statistics) on tiny random models.

It proves: the collected n, Σa, Σaaᵀ of every output projection's input equal statistics computed directly from
hooked activations over non-padding tokens only (BERT with padded batches; DistilBERT; Llama with all-ones
masks), and so do the post-LN normaliser energies and the D2 vote totals; extra padding changes nothing; the
accumulated state has the same tensor shapes whatever the number of batches (memory does not grow with
samples); to_tensors/from_tensors round-trips (also for a sliced model with empty sublayers); an empty batch
list raises ValueError mentioning "empty".
"""

from __future__ import annotations

import math

import pytest
import torch

from pruneflow.adapters import get_adapter
from pruneflow.adapters import SUBLAYERS
from pruneflow.stats import ModuleStats, Statistics, collect_statistics
from tiny import DECODERS, FACTORIES, tiny_inputs

VOTE_TOPK = 0.1


def by_layer(stats: Statistics, adapter) -> list[dict[str, ModuleStats]]:
    """Per layer and sublayer, the statistics of the output projection's input (an empty one where none)."""
    names = adapter.module_names()
    return [{s: (ModuleStats() if adapter.empty(i, s) else stats.modules.get(names[adapter.out_proj(i, s)], ModuleStats()))
             for s in SUBLAYERS} for i in range(adapter.num_layers)]


def batches_for(family: str, seeds=(1, 2), batch=3, seq=10) -> list[dict]:
    out = []
    for s in seeds:
        inp = tiny_inputs(batch=batch, seq=seq, seed=s)
        if family in DECODERS:
            inp["attention_mask"] = torch.ones_like(inp["attention_mask"])
        out.append(inp)
    return out


def pad_more(inp: dict, extra: int) -> dict:
    B = inp["input_ids"].shape[0]
    return {"input_ids": torch.cat([inp["input_ids"], torch.zeros(B, extra, dtype=torch.long)], 1),
            "attention_mask": torch.cat([inp["attention_mask"], torch.zeros(B, extra, dtype=torch.long)], 1)}


@torch.no_grad()
def direct_statistics(model, adapter, batches) -> dict:
    """float64 n, Σa, Σaaᵀ of each output projection's input (and post-LN energies) on real tokens only."""
    acc = {(i, s): {"rows": [], "norm": []} for i in range(adapter.num_layers) for s in SUBLAYERS}
    handles, mask = [], {}

    def grab(key, field):
        def hook(module, args):
            x = args[0].reshape(-1, args[0].shape[-1])[mask["m"]]
            acc[key][field].append(x.double())
        return hook

    for i in range(adapter.num_layers):
        for s in SUBLAYERS:
            if adapter.empty(i, s):
                continue
            out = adapter.out_proj(i, s)
            handles.append(out.register_forward_pre_hook(grab((i, s), "rows")))
            norm = adapter.norm(i, s)
            if norm is not None:
                handles.append(norm.register_forward_pre_hook(grab((i, s), "norm")))
    try:
        for enc in batches:
            mask["m"] = enc["attention_mask"].reshape(-1).bool()
            model(**enc)
    finally:
        for h in handles:
            h.remove()
    result = {}
    for key, d in acc.items():
        if not d["rows"]:
            continue
        a = torch.cat(d["rows"])
        entry = {"n": a.shape[0], "sum": a.sum(0), "gram": a.T @ a}
        if d["norm"]:
            s = torch.cat(d["norm"])
            entry["norm_energy"] = float(((s - s.mean(1, keepdim=True)) ** 2).sum())
            entry["norm_tokens"] = s.shape[0]
        result[key] = entry
    return result


def assert_rel_close(x: torch.Tensor, y: torch.Tensor, rel: float = 1e-5):
    scale = float(y.abs().max().clamp_min(1e-30))
    assert float((x - y).abs().max()) <= rel * scale, (float((x - y).abs().max()), scale)


def assert_same_stats(a: Statistics, b: Statistics, rel=1e-5, votes_exact=True):
    assert sorted(a.modules) == sorted(b.modules)
    for name in a.modules:
        sa, sb = a.modules[name], b.modules[name]
        assert sa.n == sb.n
        assert sa.empty == sb.empty
        if sa.empty:
            continue
        assert_rel_close(sa.sx, sb.sx, rel)
        assert_rel_close(sa.sxx, sb.sxx, rel)
        assert sa.norm_tokens == sb.norm_tokens
        assert sa.norm_energy == pytest.approx(sb.norm_energy, rel=rel)
        if sa.votes is not None or sb.votes is not None:
            if votes_exact:
                assert torch.equal(sa.votes, sb.votes)
            else:
                assert float(sa.votes.sum()) == float(sb.votes.sum())


# --- equality with direct hooks ----------------------------------------------------------------------------

@pytest.mark.parametrize("family", list(FACTORIES))
def test_collected_statistics_equal_direct_statistics_on_real_tokens(family):
    model = FACTORIES[family]()
    adapter = get_adapter(model)
    batches = batches_for(family)
    stats = collect_statistics(model, adapter, batches, vote_topk=VOTE_TOPK)
    direct = direct_statistics(model, adapter, batches)
    real = int(sum(b["attention_mask"].sum() for b in batches))
    total = sum(b["attention_mask"].numel() for b in batches)
    if family not in DECODERS:
        assert real < total  # the batches really are padded
    assert stats.tokens == real and stats.sequences == 6
    assert stats.mean_length == pytest.approx(real / 6)
    for i in range(adapter.num_layers):
        for s in SUBLAYERS:
            st, d = by_layer(stats, adapter)[i][s], direct[(i, s)]
            assert st.n == d["n"] == real
            assert st.sx.dtype == st.sxx.dtype == torch.float64
            assert_rel_close(st.mean * real, d["sum"])  # sums are kept around a shift; the moments are what count
            assert_rel_close(st.second_moment * real, d["gram"])
            torch.testing.assert_close(st.cov, d["gram"] / real - torch.outer(d["sum"], d["sum"]) / real**2,
                                       rtol=1e-4, atol=1e-6)
            if adapter.post_norm:
                assert st.norm_tokens == real
                assert st.norm_energy == pytest.approx(d["norm_energy"], rel=1e-5)
                assert st.norm_scale == pytest.approx(d["norm_energy"] / real, rel=1e-5)
            else:
                assert st.norm_scale is None
            if s == "ffn":  # each real token votes for ceil(topk·N) distinct neurons
                k = math.ceil(VOTE_TOPK * st.sx.shape[0])
                assert float(st.votes.sum()) == real * k
                assert float(st.votes.max()) <= real
            else:
                assert st.votes is None


def test_padding_tokens_do_not_change_statistics():
    model = FACTORIES["bert"]()
    adapter = get_adapter(model)
    batches = batches_for("bert")
    base = collect_statistics(model, adapter, batches)
    padded = collect_statistics(model, adapter, [pad_more(b, 5) for b in batches])
    assert padded.tokens == base.tokens and padded.mean_length == base.mean_length
    assert_same_stats(padded, base, votes_exact=False)  # top-k votes: near-ties may flip with the shapes
    vote_diff = sum(float((p[s].votes - b[s].votes).abs().sum()) for p, b in zip(by_layer(padded, adapter), by_layer(base, adapter))
                    for s in SUBLAYERS if b[s].votes is not None)
    assert vote_diff <= 2  # at most one flipped vote


# --- memory does not grow with samples -------------------------------------------------------------------------

def state_shapes(stats: Statistics) -> dict:
    return {k: tuple(v.shape) for k, v in stats.to_tensors().items()}


def test_state_size_is_independent_of_the_number_of_batches():
    model = FACTORIES["bert"]()
    adapter = get_adapter(model)
    one = collect_statistics(model, adapter, batches_for("bert", seeds=(1,)))
    many = collect_statistics(model, adapter, batches_for("bert", seeds=(1, 2, 3, 4, 5, 6), batch=4, seq=12))
    assert state_shapes(one) == state_shapes(many)
    assert by_layer(many, adapter)[0]["attn"].n > 3 * by_layer(one, adapter)[0]["attn"].n
    for stats in (one, many):
        for layer in by_layer(stats, adapter):
            for st in layer.values():  # nothing per-token is kept: only fixed-size tensors and scalars
                tensors = [v for v in vars(st).values() if isinstance(v, torch.Tensor)]
                assert all(t.dim() <= 2 and max(t.shape) <= 48 for t in tensors)
                assert not any(isinstance(v, (list, tuple)) for v in vars(st).values())
    assert not any(isinstance(v, (list, tuple)) for k, v in vars(many).items())
    # the hooks are gone afterwards: a further forward leaves the stats unchanged
    n = by_layer(many, adapter)[0]["attn"].n
    with torch.no_grad():
        model(**batches_for("bert", seeds=(9,))[0])
    assert by_layer(many, adapter)[0]["attn"].n == n


# --- persistence ---------------------------------------------------------------------------------------------------

def test_to_tensors_from_tensors_round_trip():
    model = FACTORIES["bert"]()
    adapter = get_adapter(model)
    stats = collect_statistics(model, adapter, batches_for("bert"))
    tensors = stats.to_tensors()
    info = {"tokens": stats.tokens, "sequences": stats.sequences, "mean_length": stats.mean_length}
    back = Statistics.from_tensors(tensors, info)
    assert_same_stats(back, stats, rel=0.0)
    assert (back.tokens, back.sequences, back.mean_length) == (stats.tokens, stats.sequences, stats.mean_length)
    for layer_a, layer_b in zip(by_layer(back, adapter), by_layer(stats, adapter)):
        for s in SUBLAYERS:
            assert torch.equal(layer_a[s].sxx, layer_b[s].sxx) and torch.equal(layer_a[s].sx, layer_b[s].sx)
            assert layer_a[s].norm_energy == layer_b[s].norm_energy


def test_round_trip_with_empty_sublayers():
    model = FACTORIES["bert"]()
    adapter = get_adapter(model)
    adapter.slice_([[], [0, 1]], [[0, 5, 9], []])
    stats = collect_statistics(model, adapter, batches_for("bert"))
    layers = by_layer(stats, adapter)
    assert layers[0]["attn"].empty and layers[1]["ffn"].empty
    assert layers[0]["ffn"].sxx.shape == (3, 3)
    assert layers[1]["attn"].sxx.shape == (2 * adapter.head_dim,) * 2
    assert len(stats.modules) == 2  # keyed by module: the emptied sublayers have no entry
    info = {"tokens": stats.tokens, "sequences": stats.sequences, "mean_length": stats.mean_length}
    back = Statistics.from_tensors(stats.to_tensors(), info)
    assert_same_stats(back, stats, rel=0.0)
    assert by_layer(back, adapter)[0]["attn"].n == 0


def test_empty_batch_list_raises():
    model = FACTORIES["bert"]()
    with pytest.raises(ValueError, match="empty"):
        collect_statistics(model, get_adapter(model), [])
    with pytest.raises(ValueError, match="empty"):
        collect_statistics(model, get_adapter(model), iter(()))
    # the failed call left no hooks behind
    assert all(not m._forward_pre_hooks for m in model.modules())
