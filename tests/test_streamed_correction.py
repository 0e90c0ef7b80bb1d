"""Issue 9 item 6: the sequential correction with runtime.offload=disk holds no whole model in memory.

It proves: the streamed safetensors writer writes the same bytes as safetensors' own save_file; the streamed
correction (each pruned layer read from the dense checkpoint, sliced, refit and spilled to disk) gives the same
weights bit for bit as slicing the whole model in memory, with at most one layer's weights real at any time and
none after it, on a post-LN encoder and on pre-norm decoders (with an emptied sublayer among the layers);
the model saved from the spill is byte-identical to the one saved from memory, in pruneflow's format and as a
plain Hugging Face checkpoint; the correct stage with offload=disk writes the same files as with offload=none
and leaves no spill behind.
"""

from __future__ import annotations

import copy
import json

import pytest
import torch
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

from pruneflow.adapters import get_adapter
from pruneflow.artifacts import write_safetensors_streamed
from pruneflow.blockwalk import lazy_model
from pruneflow.hf_checkpoint import save_plain_checkpoint
from pruneflow.plan import Plan, save_pruned
from pruneflow.sequential import DenseTrace, StreamedLayers, correct_sequential
from test_stats import batches_for
from test_lm_stages import lm_project  # noqa: F401 (fixture)
from tiny import DECODERS, FACTORIES

pytestmark = pytest.mark.usefixtures("one_thread")


def _header_and_data(path):
    raw = path.read_bytes()
    n = int.from_bytes(raw[:8], "little")
    return json.loads(raw[8 : 8 + n]), raw[8 + n :]


@pytest.mark.parametrize("metadata", [None, {"format": "pt"}, {"format": "pt", "a.b": "c", "z": "y"}])
def test_streamed_writer_writes_safetensors_bytes(tmp_path, metadata):
    g = torch.Generator().manual_seed(0)
    tensors = {"layer.1.w": torch.randn(3, 5, generator=g), "layer.0.w": torch.randn(7, generator=g),
               "emb": torch.randn(4, 2, generator=g).double(), "half": torch.randn(3, generator=g).half(),
               "scalar": torch.tensor(2.5)}
    library, streamed = tmp_path / "library.safetensors", tmp_path / "streamed.safetensors"
    save_file(tensors, str(library), metadata=metadata)
    loads = []
    entries = {k: (v.dtype, tuple(v.shape), lambda k=k, v=v: loads.append(k) or v) for k, v in tensors.items()}
    write_safetensors_streamed(streamed, entries, metadata)
    assert sorted(loads) == sorted(tensors)  # each loaded once, when written
    if len(metadata or {}) <= 1:
        assert streamed.read_bytes() == library.read_bytes()
    else:  # the library orders metadata keys at random (a hash map); ours are sorted
        assert _header_and_data(streamed) == _header_and_data(library)


def test_streamed_writer_refuses_a_tensor_of_another_shape(tmp_path):
    with pytest.raises(ValueError, match="declared"):
        write_safetensors_streamed(tmp_path / "x.safetensors", {"w": (torch.float32, (2, 2), lambda: torch.ones(3))})
    assert not (tmp_path / "x.safetensors").exists()  # nothing half-written


def keep_lists(ad):
    """Uneven kept units; the last layer loses its whole FFN (a constant sublayer)."""
    heads = [list(range(ad.group, ad.dense_heads))] * ad.num_layers
    neurons = [list(range(0, ad.dense_neurons, 2))] * (ad.num_layers - 1) + [[]]
    return heads, neurons


def saved_tiny(family, tmp_path):
    """A tiny 3-layer model saved under tmp_path/dense, a maker of its lazy (meta-device) twin, and keep_lists."""
    model = FACTORIES[family](layers=3)
    model.save_pretrained(tmp_path / "dense")
    auto = AutoModelForCausalLM if family in DECODERS else AutoModelForSequenceClassification
    lazy = lambda: lazy_model(auto, tmp_path / "dense", attn=model.config._attn_implementation)  # noqa: E731
    return model, lazy, *keep_lists(get_adapter(model))


@pytest.mark.parametrize("family", ["llama", "qwen2", "bert"])
def test_streamed_layers_equal_in_memory_slicing(family, tmp_path):
    model, lazy, keep_heads, keep_neurons = saved_tiny(family, tmp_path)
    plan = Plan(keep_heads, keep_neurons)

    in_memory = plan.apply(copy.deepcopy(model))
    report = correct_sequential(in_memory, "lstsq", 1e-3, DenseTrace(lazy(), batches_for(family), "cpu",
                                                                     offload="disk"), "cpu")

    streamed = lazy()
    ad = get_adapter(streamed)
    resident = []  # real layer weights whenever a layer runs
    for layer in ad.layers():
        layer.register_forward_pre_hook(lambda m, a: resident.append(
            sum(p.numel() for blk in ad.layers() for p in blk.parameters() if not p.is_meta)))
    layers = StreamedLayers(streamed, keep_heads, keep_neurons, tmp_path / "spill", "cpu")
    (tmp_path / "spill").mkdir()
    report_streamed = correct_sequential(streamed, "lstsq", 1e-3, DenseTrace(lazy(), batches_for(family), "cpu",
                                                                             offload="disk"), "cpu", layers)
    assert report_streamed == report
    assert all(p.is_meta for p in streamed.parameters())  # nothing resident after the walk
    one_layer = max(sum(p.numel() for p in blk.parameters()) for blk in get_adapter(in_memory).layers())
    assert resident and max(resident) <= one_layer
    assert ad.shape() == get_adapter(in_memory).shape()

    # saved from the spill and the checkpoint, one tensor at a time: the same bytes as saved from memory
    save_pruned(in_memory, tmp_path / "from_memory", plan, {"x": 1})
    save_pruned(streamed, tmp_path / "from_disk", plan, {"x": 1})
    for name in ("model.safetensors", "manifest.json", "config.json"):
        assert (tmp_path / "from_disk" / name).read_bytes() == (tmp_path / "from_memory" / name).read_bytes(), name


def test_streamed_plain_checkpoint_equals_save_pretrained(tmp_path):
    model = FACTORIES["llama"](layers=2)
    model.save_pretrained(tmp_path / "dense")
    ad = get_adapter(model)
    keep_heads = [list(range(ad.group, ad.dense_heads))] * ad.num_layers
    keep_neurons = [list(range(0, ad.dense_neurons, 2))] * ad.num_layers  # uniform: a plain config exists
    lazy = lambda: lazy_model(AutoModelForCausalLM, tmp_path / "dense")  # noqa: E731
    in_memory = Plan(keep_heads, keep_neurons).apply(copy.deepcopy(model))
    correct_sequential(in_memory, "lstsq", 1e-3, DenseTrace(lazy(), batches_for("llama"), "cpu", offload="disk"),
                       "cpu")
    streamed = lazy()
    (tmp_path / "spill").mkdir()
    correct_sequential(streamed, "lstsq", 1e-3, DenseTrace(lazy(), batches_for("llama"), "cpu", offload="disk"),
                       "cpu", StreamedLayers(streamed, keep_heads, keep_neurons, tmp_path / "spill", "cpu"))
    save_plain_checkpoint(in_memory, tmp_path / "a")
    save_plain_checkpoint(streamed, tmp_path / "b")
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == sorted(p.name for p in (tmp_path / "b").iterdir())
    for f in (tmp_path / "a").iterdir():
        assert (tmp_path / "b" / f.name).read_bytes() == f.read_bytes(), f.name
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "b")  # an ordinary checkpoint, no pruneflow needed
    ids = torch.tensor([[5, 9, 11, 3, 7]])
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, in_memory(ids).logits, rtol=0, atol=0)


def test_correct_stage_with_disk_offload_writes_the_same_model(lm_project, monkeypatch):
    """The LM chain on a tiny GQA Llama through the stage CLIs: rank with runtime.offload=disk (one layer's
    weights at a time) writes the same ranking, and correct (streamed) the same files as with offload=none, and
    leaves no spill folder behind. correct.return_memory's
    default (null) returns freed memory to the OS with disk only; true or false says so in any mode."""
    import shutil

    import stages.correct
    from stages import lm_prepare
    from test_lm_stages import run, run_structured, structured_params

    returned = []
    monkeypatch.setattr(stages.correct, "release_freed_memory_to_os", lambda: returned.append(True))
    assert run(lm_prepare, lm_project) == 0
    params = structured_params(lm_project)
    run_structured(lm_project, params, ("collect", "rank", "select", "correct"))
    assert returned == []
    ranking = lm_project / "data/lm/rank/ranking.json"
    in_memory_ranking = ranking.read_bytes()
    run_structured(lm_project, params, ("rank",), "--set", "runtime.offload=disk")  # layer by layer from disk
    assert ranking.read_bytes() == in_memory_ranking
    assert json.loads((lm_project / "metrics/lm/rank.json").read_text())["offload"] == "disk"
    pruned = lm_project / "data/lm/pruned"
    shutil.move(pruned, lm_project / "in_memory")
    run_structured(lm_project, params, ("correct",), "--set", "runtime.offload=disk")
    assert returned == [True]
    assert json.loads((lm_project / "metrics/lm/correct.json").read_text())["offload"] == "disk"
    assert not list(pruned.parent.glob(".*spill*"))
    written = sorted(str(f.relative_to(pruned)) for f in pruned.rglob("*") if f.is_file())
    assert written == sorted(str(f.relative_to(lm_project / "in_memory"))
                             for f in (lm_project / "in_memory").rglob("*") if f.is_file())
    assert "model.safetensors" in written and "plain/model.safetensors" in written
    for rel in written:
        assert (pruned / rel).read_bytes() == (lm_project / "in_memory" / rel).read_bytes(), rel
    for setting, calls in (("false", 1), ("true", 2)):  # in-memory mode: only when asked for
        shutil.rmtree(pruned)
        run_structured(lm_project, params, ("correct",), "--set", f"correct.return_memory={setting}")
        assert len(returned) == calls


@pytest.mark.parametrize("family", ["llama", "qwen2", "bert"])
def test_low_memory_refit_is_bit_identical_and_holds_one_batch(family, tmp_path, monkeypatch):
    """correct.low_memory: the dense and pruned hidden states and the FFN activations wait on disk, one file per
    batch, and attention runs again in the FFN pass; the weights and the fit report are the same bit for bit,
    in memory and streamed from disk, and nothing is left behind."""
    from pruneflow import sequential

    model, lazy, keep_heads, keep_neurons = saved_tiny(family, tmp_path)
    plan = Plan(keep_heads, keep_neurons)
    trace = lambda: DenseTrace(lazy(), batches_for(family), "cpu", offload="disk")  # noqa: E731

    reference = plan.apply(copy.deepcopy(model))
    report = correct_sequential(reference, "lstsq", 1e-3, trace(), "cpu")

    held = tmp_path / "activations"
    held.mkdir()
    n_batches = len(batches_for(family))
    on_disk = []  # per layer, after its refit: files per folder, and what the streams are
    monkeypatch.setattr(sequential, "_after_layer", lambda i, h: on_disk.append(
        (sorted((d.name, len(list(d.iterdir()))) for d in held.iterdir()), type(h).__name__)))
    answered = []
    attention_answers = sequential._attention_answers
    monkeypatch.setattr(sequential, "_attention_answers", lambda ad, i, x: (
        answered.append(x is not None) or attention_answers(ad, i, x)))

    low = plan.apply(copy.deepcopy(model))
    dense_trace = trace()
    assert correct_sequential(low, "lstsq", 1e-3, dense_trace, "cpu", activations_dir=held) == report
    # both streams a file per batch, the FFN activations taken as used: no per-batch list in memory
    assert on_disk == [([("dense", n_batches), ("ffn", 0), ("pruned", n_batches)], "BatchesOnDisk")] * 3
    assert isinstance(dense_trace.walk.hidden, sequential.BatchesOnDisk)
    assert not any(answered)  # nothing held from the attention pass: attention ran again
    assert all(not list(d.iterdir()) for d in held.iterdir())  # every file gone at the end

    (tmp_path / "spill").mkdir()
    streamed = lazy()
    layers = StreamedLayers(streamed, keep_heads, keep_neurons, tmp_path / "spill", "cpu")
    assert correct_sequential(streamed, "lstsq", 1e-3, trace(), "cpu", layers, activations_dir=held) == report
    for (name, a), (_, b) in zip(sorted(reference.state_dict().items()), sorted(low.state_dict().items())):
        assert torch.equal(a, b), name
    save_pruned(reference, tmp_path / "a", plan, {"x": 1})
    save_pruned(streamed, tmp_path / "b", plan, {"x": 1})
    assert (tmp_path / "a/model.safetensors").read_bytes() == (tmp_path / "b/model.safetensors").read_bytes()


def test_a_kept_trace_refuses_to_go_to_disk(tmp_path):
    trace = DenseTrace(FACTORIES["llama"](layers=2), batches_for("llama"), "cpu", keep=True)
    with pytest.raises(ValueError, match="kept dense trace"):
        trace.hold_on_disk("unused")
    with pytest.raises(ValueError, match="kept dense trace"):
        DenseTrace(FACTORIES["llama"](layers=2), batches_for("llama"), "cpu", keep=True, hidden_dir=tmp_path)


@pytest.mark.parametrize("family", ["llama", "bert"])
def test_a_trace_captured_to_disk_refits_the_same(family, tmp_path):
    """DenseTrace(hidden_dir=): each batch's hidden states entering layer 0 go to a file as they are captured
    (no batch waits in memory for the others), and the low-memory refit starts from those files: the same
    report and weights, bit for bit, as a trace captured in memory."""
    model, lazy, keep_heads, keep_neurons = saved_tiny(family, tmp_path)
    plan = Plan(keep_heads, keep_neurons)
    reference = plan.apply(copy.deepcopy(model))
    report = correct_sequential(reference, "lstsq", 1e-3, DenseTrace(lazy(), batches_for(family), "cpu",
                                                                     offload="disk"), "cpu")

    held = tmp_path / "activations"
    trace = DenseTrace(lazy(), batches_for(family), "cpu", offload="disk", hidden_dir=held / "dense")
    assert all(s[0] is None for s in trace.streams)  # nothing captured is held in memory
    assert len(list((held / "dense").iterdir())) == len(batches_for(family))
    assert trace.kept_bytes == DenseTrace(lazy(), batches_for(family), "cpu", offload="disk").kept_bytes
    with pytest.raises(ValueError, match="in a directory"):
        trace.inputs()
    low = plan.apply(copy.deepcopy(model))
    assert correct_sequential(low, "lstsq", 1e-3, trace, "cpu", activations_dir=held) == report
    for (name, a), (_, b) in zip(sorted(reference.state_dict().items()), sorted(low.state_dict().items())):
        assert torch.equal(a, b), name
    assert all(not list(d.iterdir()) for d in held.iterdir())  # every file gone at the end
