"""Sequential correction: with nothing pruned it reproduces the dense model; with units pruned, the layer
outputs it propagates (computed from captures, without re-running the layer) equal a real forward pass."""

from __future__ import annotations

import copy

import pytest
import torch

from pruneflow import sequential
from pruneflow.adapters import get_adapter
from pruneflow.params import CorrectParams
from pruneflow.stats import tokenized_batches
from tiny import WORDS, tiny_bert, tiny_distilbert, tiny_tokenizer

TEXTS = [" ".join(WORDS[(i * 7 + k) % len(WORDS)] for k in range(3 + i % 9)) for i in range(24)]


@pytest.mark.parametrize("factory", [tiny_bert, tiny_distilbert])
def test_nothing_pruned_reproduces_dense(tmp_path, factory):
    dense = factory()
    pruned = copy.deepcopy(dense)
    tok = tiny_tokenizer(tmp_path)
    trace = sequential.DenseTrace(dense, tokenized_batches(tok, TEXTS, 8, 32, "cpu"), "cpu")
    sequential.correct_sequential(pruned, "lstsq", 0.0, trace, "cpu")
    enc = tok(TEXTS, padding=True, return_tensors="pt")
    with torch.no_grad():
        torch.testing.assert_close(pruned(**enc).logits, dense(**enc).logits, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("factory", [tiny_bert, tiny_distilbert])
def test_propagated_outputs_equal_a_forward_pass(tmp_path, factory, monkeypatch):
    dense = factory(layers=3)
    pruned = copy.deepcopy(dense)
    get_adapter(pruned).slice_([[0, 2], [], [1, 2, 3]], [list(range(0, 48, 3)), list(range(20)), []])
    tok = tiny_tokenizer(tmp_path)
    propagated = {}
    monkeypatch.setattr(sequential, "_after_layer", lambda i, h: propagated.__setitem__(i, h[0].clone()))
    trace = sequential.DenseTrace(dense, tokenized_batches(tok, TEXTS, len(TEXTS), 32, "cpu"), "cpu")  # one batch
    sequential.correct_sequential(pruned, "lstsq", CorrectParams().ridge, trace, "cpu")
    lengths = [len(ids) for ids in tok(TEXTS, truncation=True, max_length=32)["input_ids"]]
    order = sorted(range(len(TEXTS)), key=lambda i: lengths[i])  # the batching order (by token length)
    enc = tok([TEXTS[i] for i in order], padding=True, truncation=True, max_length=32, return_tensors="pt")
    with torch.no_grad():
        real = pruned(**enc, output_hidden_states=True).hidden_states
    mask = enc["attention_mask"].bool()
    for i in range(3):  # compare on real tokens (padding positions are never used downstream)
        torch.testing.assert_close(propagated[i][mask], real[i + 1][mask], rtol=1e-4, atol=1e-4)
