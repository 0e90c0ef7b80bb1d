"""Weight sparsity on a tiny random Mamba (`MambaForCausalLM`, no downloads): every registered sparsity method at
50% unstructured and at 2:4 prunes exactly in_proj / x_proj / dt_proj / out_proj of every block through the public
`sparsify_model`, the zeros are exactly the plan's, the result reloads with identical logits, and dense vs pruned
quality is measurable. Mamba has no heads or neurons: structured pruning is refused with one clear error.

ONNX: the tiny Mamba exports and matches onnxruntime only at the sequence length it was exported at (the
reference selective scan is a Python loop over positions); the exact errors are in pruneflow/adapters/mamba.py.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch
import transformers

from pruneflow.adapters import StructuredPruningUnsupported, get_adapter
from pruneflow.adapters.mamba import DtProjInputTap, MambaAdapter
from pruneflow.tasks.causal_lm import lm_quality
from pruneflow.plan import Plan, load_pruned, read_plan, save_pruned
from pruneflow.sparsify import SPARSITY_METHODS, Pattern, sparsify_model, sparsity_method
from pruneflow.stats import collect_statistics
from tiny import tiny_mamba

VOCAB = 64
PRUNED = ("in_proj", "x_proj", "dt_proj", "out_proj")
STRUCTURED_ERROR = ("mamba supports weight sparsity \\(sparsify\\) only; structured pruning needs attention heads "
                    "and FFN neurons")


pytestmark = pytest.mark.usefixtures("one_thread")


def token_batch(seed: int, batch: int = 3, seq: int = 12) -> dict[str, torch.Tensor]:
    """Random token ids; later rows right-padded (id 0, mask 0)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, VOCAB, (batch, seq), generator=g)
    mask = torch.ones(batch, seq, dtype=torch.long)
    for b in range(1, batch):
        mask[b, seq - 2 * b:] = 0
    ids[mask == 0] = 0
    return {"input_ids": ids, "attention_mask": mask}


def batches():
    return [token_batch(s) for s in (1, 2)]


def expected_names(layers: int = 2) -> set[str]:
    return {f"backbone.layers.{i}.mixer.{p}" for i in range(layers) for p in PRUNED}


def method_for(name: str):
    small = {"blocksize": 16} if "blocksize" in SPARSITY_METHODS[name].model_fields else {}
    return sparsity_method(name, small)


@torch.inference_mode()
def logits(model, enc):
    return model(**enc).logits


def test_get_adapter_returns_the_sparsity_only_mamba_adapter():
    adapter = get_adapter(tiny_mamba())
    assert isinstance(adapter, MambaAdapter) and adapter.family == "mamba" and not adapter.structured
    assert adapter.num_layers == 2
    assert set(adapter.block_linears()) == expected_names()  # conv1d is a Conv1d: not pruned


@pytest.mark.parametrize("method", sorted(SPARSITY_METHODS))
@pytest.mark.parametrize("spec", ["0.5", "2:4"])
def test_every_method_prunes_the_mixer_linears(method, spec, tmp_path):
    model, dense = tiny_mamba(), tiny_mamba()  # same seed: identical weights
    pattern = Pattern.parse(spec)
    report = sparsify_model(model, get_adapter(model), batches, method_for(method), pattern)

    assert set(report.plan.masks) == expected_names()
    mods = dict(model.named_modules())
    for name, kept in report.plan.masks.items():
        w = mods[name].weight
        assert kept.shape == w.shape and mods[name].in_features % 4 == 0
        assert torch.equal(w == 0, ~kept), name  # exactly the plan's zeros, no others
        if pattern.n:  # exactly n pruned in every group of m consecutive inputs of a row
            groups = (~kept).reshape(kept.shape[0], -1, pattern.m).sum(-1)
            assert torch.all(groups == pattern.n), name
        else:  # exactly half (per row for magnitude/wanda, per column block for sparsegpt/apt: same total here)
            assert int((~kept).sum()) == w.numel() // 2, name
    # everything outside the four Linears' weights is untouched: conv1d, A_log, D, norms, embeddings, biases
    masked = {f"{n}.weight" for n in report.plan.masks}
    dense_sd = dense.state_dict()
    for key, value in model.state_dict().items():
        if key not in masked:
            assert torch.equal(value, dense_sd[key]), key

    model.save_pretrained(tmp_path / "hf")
    again = transformers.MambaForCausalLM.from_pretrained(tmp_path / "hf").eval()
    enc = token_batch(7)
    assert torch.equal(logits(model, enc), logits(again, enc))

    windows = torch.randint(1, VOCAB, (4, 16), generator=torch.Generator().manual_seed(3))
    q = lm_quality(dense, model, windows)
    assert q["tokens"] == 4 * 15
    assert math.isfinite(q["perplexity_dense"]) and math.isfinite(q["perplexity_pruned"])
    assert 0 <= q["next_token_agreement"] <= 1 and q["kl_per_token"] > 0  # pruning changed the model


def test_sparse_plan_saves_and_reloads_through_pruneflows_format(tmp_path):
    model = tiny_mamba()
    report = sparsify_model(model, get_adapter(model), batches, method_for("wanda"), Pattern.parse("2:4"))
    save_pruned(model, tmp_path / "sparse", report.plan, info={"method": "wanda"})
    plan, manifest = read_plan(tmp_path / "sparse")
    assert manifest["family"] == "mamba" and manifest["shape"] is None and manifest["keep_heads"] is None
    assert {d["pattern"] for d in manifest["masks"].values()} == {"2:4"}
    assert all(torch.equal(plan.masks[n], report.plan.masks[n]) for n in report.plan.masks)
    again = load_pruned(tmp_path / "sparse")
    enc = token_batch(7)
    assert torch.equal(logits(model, enc), logits(again, enc))
    fresh = Plan(masks=plan.masks).apply(tiny_mamba())  # the masks alone re-create the zeros on a dense model
    assert all(torch.equal(fresh.get_submodule(n).weight == 0, ~m) for n, m in plan.masks.items())


def test_dt_proj_hooks_see_its_real_input():
    """MambaMixer never calls dt_proj (it uses dt_proj.weight); the adapter's x_proj tap makes its hooks fire."""
    model = tiny_mamba()
    mixer = model.backbone.layers[0].mixer
    seen, x_out = [], []
    mixer.dt_proj.register_forward_pre_hook(lambda m, a: seen.append(a[0]))
    mixer.x_proj.register_forward_hook(lambda m, a, o: x_out.append(o))
    enc = token_batch(1)
    logits(model, enc)
    assert not seen  # without the adapter, dt_proj's hooks never fire

    get_adapter(model), get_adapter(model)  # constructing it twice installs one tap
    assert sum(isinstance(h, DtProjInputTap) for h in mixer.x_proj._forward_hooks.values()) == 1
    x_out.clear()
    before = logits(model, enc)
    assert len(seen) == 1 and torch.equal(seen[0], x_out[0][..., :model.config.time_step_rank])

    clone = copy.deepcopy(model)  # the copy's tap feeds the copy's dt_proj
    copied = clone.backbone.layers[0].mixer
    tap = next(h for h in copied.x_proj._forward_hooks.values() if isinstance(h, DtProjInputTap))
    assert tap.dt_proj is copied.dt_proj
    assert torch.equal(logits(clone, enc), before)


def test_structured_pruning_is_refused_with_one_clear_error():
    model = tiny_mamba()
    adapter = get_adapter(model)
    for ask in (lambda: adapter.shape(), lambda: adapter.units("attn"), lambda: adapter.attn_in(0),
                lambda: adapter.dense_heads, lambda: adapter.slice_([[0]] * 2, [[0]] * 2)):
        with pytest.raises(StructuredPruningUnsupported, match=STRUCTURED_ERROR):
            ask()
    assert not hasattr(adapter, "masked")  # also an AttributeError: hasattr / getattr(default) stay usable
    with pytest.raises(ValueError, match=STRUCTURED_ERROR):  # ValueError: stage_main prints one line
        collect_statistics(model, adapter, batches())
    with pytest.raises(ValueError, match=STRUCTURED_ERROR):
        Plan([[0]] * 2, [[0]] * 2).apply(model)
    with pytest.raises(AttributeError, match="no attribute 'nonsense'"):
        adapter.nonsense


def test_onnx_export_is_fixed_to_the_traced_sequence_length(tmp_path):
    """Parity at the exported length (any batch, padded); another length fails (pruneflow/adapters/mamba.py)."""
    from pruneflow.onnx_io import export_onnx, make_session, max_abs_diff, ort_logits, torch_logits

    model = tiny_mamba()
    sample = {k: v.numpy() for k, v in token_batch(1, batch=2, seq=8).items()}
    export_onnx(model, tmp_path / "mamba.onnx", sample, opset=17)
    session = make_session(tmp_path / "mamba.onnx")
    for batch in (sample, {k: v.numpy() for k, v in token_batch(2, batch=4, seq=8).items()}):
        diff = max_abs_diff(torch_logits(model, batch), ort_logits(session, batch), batch["attention_mask"])
        assert diff < 1e-4
    longer = {k: v.numpy() for k, v in token_batch(3, batch=2, seq=13).items()}
    with pytest.raises(Exception, match="broadcast an axis by a dimension other than 1. 8 by 13"):
        ort_logits(session, longer)
