"""The task model: loading a dense or pruned classifier, batched prediction, accuracy."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from pruneflow.data import length_sorted


def load_tokenizer(path: str | Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(path))


def load_model(path: str | Path, attn: str = "sdpa"):
    """Dense HF directory, or a pruned one (it has a manifest): rebuilt from its per-layer spec, then loaded.
    sdpa is the fast default; FLOP counting switches to eager attention itself (pruneflow.flops)."""
    from pruneflow.adapters import load_pruned
    from transformers import AutoModelForSequenceClassification

    path = Path(path)
    if (path / "manifest.json").exists():
        return load_pruned(path, attn=attn)
    model = AutoModelForSequenceClassification.from_pretrained(str(path), attn_implementation=attn)
    return model.eval()


@torch.inference_mode()
def predict_logits(model, tokenizer, texts: list[str], batch_size: int = 128, max_length: int = 128,
                   device: str = "cpu", progress: str | None = None) -> np.ndarray:
    """Logits for `texts` in their original order (batches are length-sorted to pad little)."""
    model.eval().to(device)
    sorted_texts, order = length_sorted(texts)
    chunks = []
    it = range(0, len(sorted_texts), batch_size)
    for i in tqdm(it, desc=progress, disable=progress is None, leave=False):
        enc = tokenizer(sorted_texts[i : i + batch_size], padding=True, truncation=True,
                        max_length=max_length, return_tensors="pt").to(device)
        chunks.append(model(**enc).logits.float().cpu().numpy())
    logits = np.concatenate(chunks) if chunks else np.zeros((0, 2), np.float32)
    out = np.empty_like(logits)
    out[np.asarray(order)] = logits
    return out


def accuracy(logits: np.ndarray, labels: list[int]) -> float:
    return float((logits.argmax(-1) == np.asarray(labels)).mean())
