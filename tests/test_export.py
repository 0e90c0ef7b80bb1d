"""ONNX export: sliced tiny models (non-uniform heads/neurons, a layer with none) export to one file that
onnxruntime runs like PyTorch at other shapes than the export sample; the export stage writes its files and
metrics, and refuses (writing nothing) when the ONNX outputs differ."""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch

import stages.export
from pruneflow import onnx_io
from pruneflow.adapters import get_adapter
from pruneflow.plan import Plan, save_pruned
from pruneflow.artifacts import write_jsonl
from pruneflow.params import Params
from pruneflow.runtime import Layout
from tiny import WORDS, tiny_bert, tiny_inputs, tiny_llama, tiny_tokenizer

# Per-layer kept (dense) indices for 3-layer tiny models: 4 heads (Llama: 2 KV groups of 2), 48 neurons.
# Non-uniform in every case; one layer keeps no heads or no neurons (its sublayer becomes constant).
# Llama's GQA needs the same number of kept query heads in every kept group.
SLICES = {
    "zero_heads": ([[1, 3], [0, 1, 2, 3], []], [list(range(0, 48, 2)), [5], list(range(40))]),
    "zero_neurons": ([[0, 2], [2, 3], [0, 1, 2, 3]], [[], list(range(30)), list(range(0, 48, 3))]),
}
FACTORIES = {"bert": tiny_bert, "llama": tiny_llama}


def sliced(family: str, plan: str):
    model = FACTORIES[family](layers=3)
    heads, neurons = SLICES[plan]
    get_adapter(model).slice_(heads, neurons)
    return model


def as_numpy(batch: dict[str, torch.Tensor]) -> dict[str, np.ndarray]:
    return {k: v.numpy() for k, v in batch.items()}


@pytest.mark.parametrize("plan", sorted(SLICES))
@pytest.mark.parametrize("family", sorted(FACTORIES))
def test_sliced_model_exports_and_matches_torch(tmp_path, family, plan):
    model = sliced(family, plan)
    path = tmp_path / "model.onnx"
    onnx_io.export_onnx(model, path, as_numpy(tiny_inputs(2, 12)), opset=18)
    session = onnx_io.make_session(path, "cpu", threads=1)
    for batch, seq in [(1, 7), (3, 7), (1, 19), (3, 19)]:
        inputs = as_numpy(tiny_inputs(batch, seq))
        expected, got = onnx_io.torch_logits(model, inputs), onnx_io.ort_logits(session, inputs)
        assert got.shape == expected.shape
        assert onnx_io.max_abs_diff(expected, got, inputs["attention_mask"]) < 1e-4, (batch, seq)
    assert [f.name for f in tmp_path.iterdir()] == ["model.onnx"]  # weights inside: no .onnx.data


def test_onnx_file_contract(tmp_path):
    """Named int64 inputs with symbolic batch and sequence axes, one `logits` output, the asked opset."""
    path = tmp_path / "m.onnx"
    onnx_io.export_onnx(sliced("bert", "zero_heads"), path, as_numpy(tiny_inputs(2, 12)), opset=17)
    graph = onnx.load(str(path)).graph
    assert [i.name for i in graph.input] == ["input_ids", "attention_mask"]
    assert [o.name for o in graph.output] == ["logits"]
    for tensor in graph.input:
        dims = tensor.type.tensor_type.shape.dim
        assert tensor.type.tensor_type.elem_type == onnx.TensorProto.INT64
        assert all(d.dim_param and not d.dim_value for d in dims)  # both axes dynamic
    assert {o.domain: o.version for o in onnx.load(str(path)).opset_import}[""] == 17


def test_dynamo_exporter_also_matches(tmp_path):
    model = sliced("bert", "zero_neurons")
    path = tmp_path / "dynamo.onnx"
    onnx_io.export_onnx(model, path, as_numpy(tiny_inputs(2, 12)), opset=18, exporter="dynamo")
    assert [f.name for f in tmp_path.iterdir()] == ["dynamo.onnx"]
    session = onnx_io.make_session(path, "cpu")
    inputs = as_numpy(tiny_inputs(3, 17))
    diff = onnx_io.max_abs_diff(onnx_io.torch_logits(model, inputs), onnx_io.ort_logits(session, inputs),
                                inputs["attention_mask"])
    assert diff < 1e-4


def test_provider_choice_is_what_loads():
    assert onnx_io.resolve_provider("cpu") == "cpu"
    assert onnx_io.resolve_provider("auto") == ("cuda" if onnx_io.cuda_provider_loads() else "cpu")
    if not onnx_io.cuda_provider_loads():  # onnxruntime-gpu lists CUDA here, but it must not be taken
        with pytest.raises(ValueError, match="provider: auto or cpu"):
            onnx_io.resolve_provider("cuda")


# --- the stage on a tiny project ------------------------------------------------------------------------

def make_project(root: Path, n_eval: int = 24) -> Layout:
    """tmp project: data/dense (tiny BERT + tokenizer), data/pruned (sliced, non-uniform, a zero-head layer),
    data/prepared/eval.jsonl (labeled sentences of 1 to 30 words)."""
    layout = Layout(root)
    tokenizer = tiny_tokenizer(root / "vocab")
    dense = tiny_bert(layers=3)
    dense.save_pretrained(str(layout.dense))
    tokenizer.save_pretrained(str(layout.dense))
    heads, neurons = SLICES["zero_heads"]
    pruned = tiny_bert(layers=3)
    get_adapter(pruned).slice_(heads, neurons)
    save_pruned(pruned, layout.pruned, Plan(heads, neurons), {"test": True}, tokenizer)
    rng = random.Random(0)
    rows = [{"text": " ".join(rng.choice(WORDS) for _ in range(rng.randint(1, 30))) + ".", "label": i % 2}
            for i in range(n_eval)]
    write_jsonl(layout.prepared / "eval.jsonl", rows)
    return layout


def export_params(**export) -> Params:
    return Params.model_validate({"export": {"optimize_iters": 3} | export})


def test_export_stage_writes_checked_files(tmp_path):
    layout = make_project(tmp_path)
    stages.export.run(export_params(), layout)
    files = sorted(f.name for f in layout.onnx.iterdir())
    assert {"dense.onnx", "pruned.onnx", "tokenizer.json", "tokenizer_config.json"} <= set(files)
    assert not any(f.endswith(".data") or f.endswith(".tmp") for f in files)
    metrics = json.loads((layout.metrics / "export.json").read_text())
    assert metrics["opset"] == 18 and metrics["max_abs_diff"] <= metrics["atol"]
    for name in ("dense", "pruned"):
        m = metrics["models"][name]
        assert m["size_mb"] > 0 and m["export_seconds"] > 0 and m["max_abs_diff"] <= 1e-4
        assert m["parity_batches"][0][0] == 16 and m["parity_batches"][1][0] == 1  # mixed batch + single
        assert "kept" in m["optimize"]
        meta = onnx_io.make_session(layout.onnx / f"{name}.onnx").get_modelmeta().custom_metadata_map
        assert json.loads(meta["id2label"]) == {"0": "LABEL_0", "1": "LABEL_1"}
    assert metrics["models"]["pruned"]["size_mb"] < metrics["models"]["dense"]["size_mb"]


def test_export_stage_fails_when_onnx_differs(tmp_path, monkeypatch):
    """Weights changed after export: PyTorch and the ONNX file disagree, the stage names the difference and
    leaves no data/onnx or metrics behind."""
    layout = make_project(tmp_path)
    real_export = stages.export.export_onnx

    def export_then_perturb(model, path, *args, **kwargs):
        seconds = real_export(model, path, *args, **kwargs)
        with torch.no_grad():
            model.classifier.bias += 0.5
        return seconds

    monkeypatch.setattr(stages.export, "export_onnx", export_then_perturb)
    with pytest.raises(ValueError, match=r"max abs diff 0\.5\d* > export\.atol=0\.0001"):
        stages.export.run(export_params(optimize=False), layout)
    assert not layout.onnx.exists()
    assert not (layout.metrics / "export.json").exists()
    assert not [p for p in layout.onnx.parent.iterdir() if p.name.startswith(".onnx")]  # no temp left


def test_check_parity_reports_the_difference():
    model = sliced("bert", "zero_heads")

    class Shifted:  # a fake session whose logits are off by 0.01
        def run(self, names, feeds):
            return [onnx_io.torch_logits(model, feeds) + 0.01]

    batches = [as_numpy(tiny_inputs(3, 9))]
    with pytest.raises(ValueError, match=r"max abs diff 0\.01"):
        onnx_io.check_parity(model, Shifted(), batches, atol=1e-4, what="tiny")
    assert onnx_io.check_parity(model, Shifted(), batches, atol=0.02, what="tiny") == pytest.approx(0.01, abs=1e-6)
