"""benchmarks/sparse_kernels.py on a CPU machine: it runs with nothing but torch importable, skips cleanly with a
JSON saying why; its pure helpers make valid 2:4 weights and sum a model's Linears correctly."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from benchmarks.sparse_kernels import MODELS, is_two_four, linear_shapes, model_totals, two_four_weight

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "sparse_kernels.py"
# What a bare GPU box may lack: the script must not need any of it (pruneflow.sparsity imports only torch).
NOT_INSTALLED = ("numpy", "pydantic", "transformers", "safetensors", "compressed_tensors", "yaml")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU skip path")
def test_script_skips_without_cuda_using_only_torch(tmp_path):
    out = tmp_path / "sk.json"
    code = (f"import sys, runpy\nfor m in {NOT_INSTALLED!r}: sys.modules[m] = None\n"
            f"sys.argv = ['sparse_kernels.py', '--out', {str(out)!r}]\n"
            f"sys.exit(runpy.run_path({str(SCRIPT)!r}, run_name='__main__'))")
    # from another directory, as a file: the script finds pruneflow by itself
    res = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    assert "skipped: needs a CUDA GPU (torch.cuda.is_available() is False)" in res.stdout
    report = json.loads(out.read_text())
    assert report["skipped"] is True and "CUDA" in report["reason"]
    assert report["environment"]["cuda_available"] is False


@pytest.mark.parametrize("shape", sorted({s for m in MODELS.values() for s in linear_shapes(*m[:3]).values()}))
def test_two_four_weights_are_valid_for_every_benchmarked_shape(shape):
    if shape[0] * shape[1] > 5_000_000:
        shape = (64, shape[1])  # the 11008-wide rows are checked on fewer of them: same code, less time
    w = two_four_weight(*shape, seed=3)
    assert w.shape == shape and w.is_contiguous()
    assert is_two_four(w)
    groups = (w != 0).reshape(shape[0], -1, 4).sum(-1)
    assert torch.all(groups == 2)  # random normals: exactly the 2 largest of every 4 kept
    assert torch.equal(two_four_weight(*shape, seed=3), w)


def test_is_two_four_rejects_three_nonzeros_in_a_group_and_misaligned_widths():
    w = two_four_weight(8, 16)
    assert is_two_four(w)
    bad = w.clone()
    bad[5, 8:12] = torch.tensor([1.0, 2.0, 3.0, 0.0])
    assert not is_two_four(bad)
    assert not is_two_four(torch.zeros(4, 6))
    assert is_two_four(torch.zeros(4, 8))  # sparser than 2:4 is fine for the kernels


def test_linear_shapes_and_model_totals():
    shapes = linear_shapes(*MODELS["smollm2-135m"][:3])
    assert shapes == {"q_proj": (576, 576), "k_proj": (192, 576), "v_proj": (192, 576), "o_proj": (576, 576),
                      "gate_proj": (1536, 576), "up_proj": (1536, 576), "down_proj": (576, 1536)}
    ms = {(576, 576): (1.0, 0.5), (192, 576): (0.2, 0.2), (1536, 576): (2.0, 1.0), (576, 1536): (3.0, 1.0)}
    rows = [{"out": o, "in": i, "tokens": 128, "dtype": "fp16", "backend": "cutlass", "dense_ms": d, "sparse_ms": s}
            for (o, i), (d, s) in ms.items()]
    [t] = model_totals(rows, "smollm2-135m")
    # per block: q+o 2×, k+v 2×, gate+up 2×, down 1×; 30 blocks
    dense = 30 * (2 * 1.0 + 2 * 0.2 + 2 * 2.0 + 3.0)
    sparse = 30 * (2 * 0.5 + 2 * 0.2 + 2 * 1.0 + 1.0)
    assert t["linears"] == 210
    assert t["dense_ms"] == pytest.approx(dense) and t["sparse_ms"] == pytest.approx(sparse)
    assert t["dense_over_sparse"] == pytest.approx(dense / sparse)
    assert "graph_sparse_ms" not in t
    assert model_totals(rows[:-1], "smollm2-135m") == []  # a shape missing: no total rather than a wrong one
    graphed = [dict(r, graph_dense_ms=r["dense_ms"] / 2, graph_sparse_ms=r["sparse_ms"] / 4) for r in rows]
    [g] = model_totals(graphed, "smollm2-135m")
    assert g["graph_dense_ms"] == pytest.approx(dense / 2) and g["graph_sparse_ms"] == pytest.approx(sparse / 4)
    assert g["graph_dense_over_sparse"] == pytest.approx(2 * dense / sparse)
