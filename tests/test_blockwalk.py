"""The block walk (pruneflow.blockwalk) on every structured family's tiny random model.

It proves: block-by-block statistics equal the whole-model hooks' bit for bit (same batches, same order), with
the weights in memory, moved per block (offload=cpu) or read per block from the safetensors checkpoint
(offload=disk); with offload=disk at most one block holds real weights at any time and none after the walk;
block shards written by ShardWriter load back to the same statistics, read module by module when asked for
(not kept); the sequential correction's dense trace gives the same corrected weights from disk; a checkpoint
without safetensors, or an empty calibration set, fails with a message that says what to change.
"""

from __future__ import annotations

import copy

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

from pruneflow.adapters import get_adapter
from pruneflow.blockwalk import BlockWalk, Residency, lazy_model
from pruneflow.plan import Plan
from pruneflow.stats import ShardWriter, collect_blockwise, collect_statistics, load_statistics
from tiny import DECODERS, FACTORIES
from test_stats import batches_for


def assert_identical(a, b):
    assert a.tokens == b.tokens and a.sequences == b.sequences and a.mean_length == b.mean_length
    assert set(a.modules) == set(b.modules)
    for name in a.modules:
        sa, sb = a.modules[name], b.modules[name]
        assert sa.n == sb.n and sa.norm_tokens == sb.norm_tokens and sa.norm_energy == sb.norm_energy, name
        for field in ("sx", "sxx", "shift_x", "votes"):
            x, y = getattr(sa, field), getattr(sb, field)
            assert (x is None and y is None) or torch.equal(x, y), (name, field)


def saved(family: str, tmp_path):
    model = FACTORIES[family]()
    model.save_pretrained(tmp_path / family)
    auto = AutoModelForCausalLM if family in DECODERS else AutoModelForSequenceClassification
    return model, lazy_model(auto, tmp_path / family, attn=model.config._attn_implementation)


@pytest.mark.parametrize("family", list(FACTORIES))
@pytest.mark.parametrize("offload", ["none", "cpu", "disk"])
def test_blockwise_statistics_equal_whole_model_statistics(family, offload, tmp_path):
    model, lazy = saved(family, tmp_path)
    batches = batches_for(family)
    whole = collect_statistics(model, get_adapter(model), batches)
    walked = lazy if offload == "disk" else copy.deepcopy(model)
    adapter = get_adapter(walked)
    resident = []
    if offload == "disk":
        for layer in adapter.layers():
            layer.register_forward_pre_hook(lambda m, a: resident.append(
                sum(not p.is_meta for blk in adapter.layers() for p in blk.parameters())))
    walk = BlockWalk(walked, adapter, batches, Residency(walked, adapter, "cpu", offload))
    assert_identical(collect_blockwise(walk), whole)
    if offload == "disk":
        one_block = sum(1 for _ in adapter.layers()[0].parameters())
        assert resident and max(resident) == one_block  # only the running block's weights are real
        assert all(p.is_meta for p in walked.parameters())  # and nothing after the walk


def test_shards_load_back_to_the_same_statistics(tmp_path):
    model = FACTORIES["llama"](layers=3)
    adapter = get_adapter(model)
    batches = batches_for("llama")
    writer = ShardWriter(tmp_path / "stats")
    stats = collect_blockwise(BlockWalk(model, adapter, batches, Residency(model, adapter, "cpu", "none")), sink=writer)
    writer.finish(stats, {"family": "llama"})
    assert sorted(p.name for p in (tmp_path / "stats").glob("block-*.safetensors")) == [
        "block-000.safetensors", "block-001.safetensors", "block-002.safetensors"]
    assert not stats.modules  # handed to the writer, not kept
    loaded = load_statistics(tmp_path / "stats")
    assert_identical(loaded, collect_statistics(model, adapter, batches))
    # read from the shards module by module, when asked, and not kept: two reads are two copies
    name = next(iter(loaded.modules))
    first, again = loaded.modules[name], loaded.modules[name]
    assert torch.equal(first.sxx, again.sxx) and first.sxx.data_ptr() != again.sxx.data_ptr()
    with pytest.raises(ValueError, match="no calibration statistics"):
        loaded.of("model.no_such_module")


def test_a_collect_cut_short_leaves_nothing_to_load(tmp_path):
    writer = ShardWriter(tmp_path / "stats")
    model = FACTORIES["llama"]()
    adapter = get_adapter(model)
    collect_blockwise(BlockWalk(model, adapter, batches_for("llama"), Residency(model, adapter, "cpu", "none")),
                      sink=writer)  # no finish(): as if the process died before the end
    with pytest.raises(FileNotFoundError, match="run the collect stage"):
        load_statistics(tmp_path / "stats")


@pytest.mark.parametrize("family", ["llama", "qwen2", "bert"])
def test_sequential_correction_from_disk_gives_the_same_weights(family, tmp_path):
    from pruneflow.sequential import DenseTrace, correct_sequential

    model, lazy = saved(family, tmp_path)
    ad = get_adapter(model)
    keep_heads = [list(range(ad.group, ad.dense_heads))] * ad.num_layers
    keep_neurons = [list(range(0, ad.dense_neurons, 2))] * ad.num_layers
    results = []
    for dense, offload in ((copy.deepcopy(model), "none"), (lazy, "disk")):
        pruned = Plan(keep_heads, keep_neurons).apply(copy.deepcopy(model))
        correct_sequential(pruned, "lstsq", 1e-3, DenseTrace(dense, batches_for(family), "cpu", offload=offload), "cpu")
        results.append(pruned.state_dict())
    for k, v in results[0].items():
        torch.testing.assert_close(results[1][k], v, rtol=0, atol=0, msg=k)


def test_disk_offload_needs_safetensors(tmp_path):
    (tmp_path / "m").mkdir()
    FACTORIES["llama"]().config.save_pretrained(tmp_path / "m")
    with pytest.raises(FileNotFoundError, match="runtime.offload"):
        lazy_model(AutoModelForCausalLM, tmp_path / "m")


def test_an_empty_calibration_set_is_refused():
    model = FACTORIES["llama"]()
    adapter = get_adapter(model)
    with pytest.raises(ValueError, match="empty"):
        BlockWalk(model, adapter, [], Residency(model, adapter, "cpu", "none"))


def test_collect_without_votes_and_kcm_says_what_to_set():
    from pruneflow.params import RankParams
    from pruneflow.ranking import rank_model

    model = FACTORIES["bert"]()
    adapter = get_adapter(model)
    stats = collect_blockwise(BlockWalk(model, adapter, batches_for("bert"), Residency(model, adapter, "cpu", "none")),
                              vote_topk=None)
    assert all(s.votes is None for s in stats.modules.values())
    with pytest.raises(ValueError, match="collect.vote_topk"):
        rank_model(adapter, stats, RankParams(method="kcm"), progress=False)
    rank_model(adapter, stats, RankParams(method="kcm", kcm={"d2": "energy"}), progress=False)  # needs no votes


def test_forwards_replaced_puts_back_an_instance_forward_and_the_class_s():
    from pruneflow.blockwalk import forwards_replaced

    plain, hooked = torch.nn.Linear(2, 2), torch.nn.Linear(2, 2)
    own = lambda x: x * 0 + 7  # noqa: E731  (an instance-level forward, as accelerate's hooks install)
    hooked.forward = own
    x = torch.ones(1, 2)
    with forwards_replaced([(plain, lambda x: x + 1), (hooked, lambda x: x - 1)]):
        assert torch.equal(plain(x), x + 1) and torch.equal(hooked(x), x - 1)
    assert "forward" not in plain.__dict__ and hooked.forward is own
    assert torch.equal(hooked(x), torch.full((1, 2), 7.0))
    with pytest.raises(RuntimeError), forwards_replaced([(plain, lambda x: x)]):
        raise RuntimeError("restored on the way out too")
    assert "forward" not in plain.__dict__
