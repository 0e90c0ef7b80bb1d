"""Sequence classification (BERT-family encoders): accuracy on the labeled eval split, and agreement with the
dense model's predictions (the fraction of eval texts where both predict the same class), which separates
methods with less noise than accuracy."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from pruneflow.artifacts import read_jsonl
from pruneflow.stats import length_sorted_batches, tokenized_batches
from pruneflow.tasks.base import Calibration, Column, Runner, Task, register, torch_runner


def accuracy(logits: np.ndarray, labels: list[int]) -> float:
    return float((logits.argmax(-1) == np.asarray(labels)).mean())


@register
class Classification(Task):
    kind = "classification"
    headline = ("accuracy_dense", "accuracy_pruned", "agreement")
    primary = Column("accuracy_pruned", "accuracy_dense", "Eval accuracy %", "eval accuracy (%)", percent=True,
                     higher_is_better=True)
    secondary = Column("agreement", None, "agreement with dense %", "agreement with dense (%)", percent=True,
                       higher_is_better=True)
    paired_test = "McNemar's exact test on the same eval sentences"

    def auto_class(self):
        from transformers import AutoModelForSequenceClassification

        return AutoModelForSequenceClassification

    def load_model(self, path, attn="sdpa"):
        return self.load_pruned_or(path, attn, lambda p: self.auto_class().from_pretrained(
            str(p), attn_implementation=attn))

    def base_model(self, path: str | Path, id2label: dict[int, str]):
        """The packaged base encoder with a fresh classification head for these labels (finetune)."""
        from transformers import AutoModelForSequenceClassification

        return AutoModelForSequenceClassification.from_pretrained(
            str(path), num_labels=len(id2label), id2label=id2label, label2id={v: k for k, v in id2label.items()},
            attn_implementation="sdpa")

    def calibration_texts(self, prepared, max_samples: int | None = None) -> list[str]:
        """Unlabeled calibration sentences; fails clearly when there are none."""
        path = Path(prepared) / "calib.jsonl"
        texts = [r["text"] for r in read_jsonl(path) if r.get("text", "").strip()]
        texts = texts[:max_samples] if max_samples else texts
        if not texts:
            raise ValueError(f"{path} holds no text: empty calibration data (check prepare.source and "
                             "prepare.calib_size)")
        return texts

    def calibration_batches(self, prepared, tokenizer, c, device, max_samples=None, token_cap=True):
        texts = self.calibration_texts(prepared, c.max_samples)[:max_samples]
        cap = c.max_tokens if token_cap else None
        return Calibration(len(texts), lambda: tokenized_batches(tokenizer, texts, c.batch_size, c.max_length, device,
                                                                 cap))

    def reference(self, dense_model, prepared, tokenizer, ev, device):
        texts, labels = self.eval_split(prepared)
        dense = self.predict(torch_runner(dense_model, device), tokenizer, texts, ev.batch_size, ev.max_length,
                             "eval dense")
        return {"texts": texts, "labels": labels, "logits": dense, "tokenizer": tokenizer}

    def compare(self, reference, pruned_model, ev, device):
        r = reference
        pruned = self.predict(torch_runner(pruned_model, device), r["tokenizer"], r["texts"], ev.batch_size,
                              ev.max_length, "eval pruned")
        return (self.quality(r["logits"], pruned, r["labels"]),
                self.item_outcomes(r["logits"], pruned, r["labels"]))

    @torch.inference_mode()
    def calibration_reference(self, dense_model, batches):
        return [torch.log_softmax(dense_model(**enc).logits.float(), -1) for enc in batches]

    def reference_loss(self, reference):
        return 0.0  # KL(dense ‖ dense)

    @torch.inference_mode()
    def calibration_loss(self, model, batches, reference):
        """Mean KL(dense ‖ model) of the class distributions (no labels needed)."""
        kl = [torch.nn.functional.kl_div(torch.log_softmax(model(**enc).logits.float(), -1), ref, log_target=True,
                                         reduction="sum") for enc, ref in zip(batches, reference)]
        return float(sum(kl) / sum(len(r) for r in reference))

    def eval_split(self, prepared) -> tuple[list[str], list | None]:
        """Held-out eval texts and their labels (None when unlabeled)."""
        rows = read_jsonl(Path(prepared) / "eval.jsonl")
        labels = [r["label"] for r in rows] if rows and all("label" in r for r in rows) else None
        return [r["text"] for r in rows], labels

    def predict(self, run: Runner, tokenizer, texts: list[str], batch_size: int, max_length: int,
                progress: str | None = None) -> np.ndarray:
        """Logits for `texts` in their original order, by any runner (PyTorch or onnxruntime)."""
        from tqdm.auto import tqdm

        out, n_classes = None, None
        batches = length_sorted_batches(tokenizer, texts, batch_size, max_length, return_tensors="np")
        for idx, enc in tqdm(batches, desc=progress, disable=progress is None, leave=False,
                             total=-(-len(texts) // batch_size)):
            logits = run(enc)
            if out is None:
                n_classes = logits.shape[-1]
                out = np.empty((len(texts), n_classes), dtype=logits.dtype)
            out[np.asarray(idx)] = logits
        return out if out is not None else np.zeros((0, 2), np.float32)

    def quality(self, dense: np.ndarray, pruned: np.ndarray, labels: list | None) -> dict:
        q = {"agreement": float((dense.argmax(-1) == pruned.argmax(-1)).mean()), "n_eval": int(len(dense))}
        if labels is not None:
            q = {"accuracy_dense": accuracy(dense, labels), "accuracy_pruned": accuracy(pruned, labels)} | q
            q["accuracy_drop_points"] = 100 * (q["accuracy_dense"] - q["accuracy_pruned"])
        return q

    def item_outcomes(self, dense: np.ndarray, pruned: np.ndarray, labels: list | None) -> dict[str, np.ndarray]:
        """Per sentence: pruned right ("accuracy_pruned"), pruned agrees with dense ("agreement")."""
        out = {"agreement": dense.argmax(-1) == pruned.argmax(-1)}
        if labels is not None:
            out["accuracy_pruned"] = pruned.argmax(-1) == np.asarray(labels)
        return out

    def export_metadata(self, model):
        import json

        id2label = getattr(model.config, "id2label", None) or {}
        return {"id2label": json.dumps({int(k): v for k, v in id2label.items()})}
