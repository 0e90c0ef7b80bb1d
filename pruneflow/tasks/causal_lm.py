"""Causal language modelling (Llama-family decoders): perplexity of dense and pruned on held-out token windows,
next-token top-1 agreement and KL(dense ‖ pruned) per token.

Data is what the lm_prepare stage cut: `<prepared>/windows.safetensors` holding `calib` and `eval`, token ids
[windows, window], from texts calibration never shares with evaluation. Windows are full (no padding), so
every batch's attention mask is all ones. The dense model's log-probabilities on the eval windows are computed
once (DenseReference, float16) and every pruned model is compared with them.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from pruneflow.runtime import WINDOWS_FILE, spaced
from pruneflow.tasks.base import Calibration, Column, Task, register


def read_windows(prepared: str | Path, split: str, fallback: str | None = None) -> torch.Tensor:
    """One split of the prepared windows; `fallback` where the file has no such split (refit -> calib)."""
    from safetensors.torch import load_file

    path = Path(prepared) / WINDOWS_FILE
    if not path.exists():
        raise FileNotFoundError(f"{path} not found: run the lm_prepare stage first (dvc repro lm/dvc.yaml:lm_prepare)")
    splits = load_file(str(path))
    windows = splits[split if split in splits or fallback is None else fallback]
    if windows.numel() == 0:
        raise ValueError(f"{path} holds no {split} windows: empty {'calibration' if split == 'calib' else 'eval'} "
                         "data (check lm.calib_windows / lm.eval_windows and the texts)")
    return windows


def window_batches(windows: torch.Tensor, batch_size: int, device: str):
    for i in range(0, len(windows), batch_size):
        ids = windows[i:i + batch_size].to(device)
        yield {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


def batch_quality(dense_logp: torch.Tensor, pruned_logits: torch.Tensor, targets: torch.Tensor) -> dict:
    """Sums over the predicted positions of one batch: NLL of both models, top-1 agreements, KL(dense‖pruned);
    and the pruned model's mean NLL per window (for paired tests between two pruned models). `dense_logp` are
    the dense model's log-probabilities (any float dtype; see DenseReference). Float32 math, float64 sums:
    float64 over a 49k vocabulary cost more than the forward passes."""
    d = dense_logp.float()
    p = F.log_softmax(pruned_logits.float(), -1)
    nll_d = -d.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    nll_p = -p.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    kl = (d.exp() * (d - p)).sum(-1)
    return {"tokens": targets.numel(), "nll_dense": float(nll_d.double().sum()), "nll_pruned": float(nll_p.double().sum()),
            "agree": int((d.argmax(-1) == p.argmax(-1)).sum()), "kl": float(kl.double().sum()),
            "window_nll": nll_p.double().mean(-1).tolist(),
            "window_agreement": (d.argmax(-1) == p.argmax(-1)).double().mean(-1).tolist()}


class DenseReference:
    """The dense model's next-token log-probabilities on the eval windows, computed once and kept in float16
    (40 x 512 tokens x 49k vocabulary = 2 GB), so every pruned model is compared without re-running the dense
    one. float16 rounds log p by at most 2⁻¹¹ relative: perplexity moves by < 1e-3 relative and KL by ~1e-4
    nats per token at most (tested)."""

    @torch.inference_mode()
    def __init__(self, dense_model, windows: torch.Tensor, batch_size: int = 4, device: str = "cpu"):
        self.batch_size = batch_size
        self.logp = [F.log_softmax(dense_model(input_ids=windows[i:i + batch_size].to(device)).logits[:, :-1].float(),
                                   -1).half().cpu()
                     for i in range(0, len(windows), batch_size)]

    def __call__(self, i: int, ids: torch.Tensor) -> torch.Tensor:
        return self.logp[i // self.batch_size].to(ids.device)


@torch.inference_mode()
def lm_quality(dense, pruned_model, windows: torch.Tensor, batch_size: int = 4, device: str = "cpu") -> dict:
    """Perplexity of dense and pruned (exp of mean token NLL), next-token top-1 agreement and mean KL(dense ‖
    pruned) per token over all windows; accumulates sums, never keeps the pruned logits. `dense` is the dense
    model, or a DenseReference of it on the same windows (computed once, shared by many pruned models)."""
    if not isinstance(dense, DenseReference):
        model = dense
        dense = lambda i, ids: F.log_softmax(model(input_ids=ids).logits[:, :-1].float(), -1)  # noqa: E731
    elif dense.batch_size != batch_size:
        raise ValueError(f"the dense reference was made with batch_size {dense.batch_size}, not {batch_size}")
    total = {"tokens": 0, "nll_dense": 0.0, "nll_pruned": 0.0, "agree": 0, "kl": 0.0, "window_nll": [],
             "window_agreement": []}
    for i in range(0, len(windows), batch_size):
        ids = windows[i:i + batch_size].to(device)
        logits_p = pruned_model(input_ids=ids).logits[:, :-1]
        for k, v in batch_quality(dense(i, ids), logits_p, ids[:, 1:]).items():
            total[k] += v
    n = max(total["tokens"], 1)
    return {"perplexity_dense": math.exp(total["nll_dense"] / n), "perplexity_pruned": math.exp(total["nll_pruned"] / n),
            "next_token_agreement": total["agree"] / n, "kl_per_token": total["kl"] / n, "tokens": total["tokens"],
            "window_nll": total["window_nll"], "window_agreement": total["window_agreement"]}


@register
class CausalLM(Task):
    kind = "causal_lm"
    headline = ("perplexity_dense", "perplexity_pruned", "next_token_agreement", "kl_per_token")
    primary = Column("perplexity_pruned", "perplexity_dense", "Held-out perplexity", "held-out perplexity",
                     percent=False, higher_is_better=False)
    secondary = Column("next_token_agreement", None, "next-token agreement with dense %",
                       "next-token agreement with dense (%)", percent=True, higher_is_better=True)
    paired_test = ("a paired bootstrap over the same eval windows (per-window mean NLL; per-window agreement), "
                   "sign-flip p")

    def auto_class(self):
        from transformers import AutoModelForCausalLM

        return AutoModelForCausalLM

    def load_model(self, path, attn="sdpa"):
        return self.load_pruned_or(path, attn, lambda p: self.auto_class().from_pretrained(
            str(p), attn_implementation=attn, dtype=torch.float32))

    def calibration_batches(self, prepared, tokenizer, c, device, max_samples=None, token_cap=True):
        # Windows have a fixed length, so a batch is `collect.batch_size` windows; max_tokens and max_length
        # (sentence tokenization) do not apply.
        return self._batches(read_windows(prepared, "calib"), c, device, max_samples)

    def refit_batches(self, prepared, tokenizer, c, device, max_samples=None, token_cap=True):
        # lm.refit_windows: the refit fits ~1,500 inputs per layer and 30 layers in a chain, and overfits 64
        # windows where the statistics do not (README, benchmarks/lm_calibration.py)
        return self._batches(read_windows(prepared, "refit", fallback="calib"), c, device, max_samples)

    @staticmethod
    def _batches(windows: torch.Tensor, c, device: str, max_samples: int | None) -> Calibration:
        # Windows are in text order, so a subset is evenly spaced over them (every text contributes), as
        # lm_prepare chose them from the texts.
        n = min(v for v in (c.max_samples, max_samples, len(windows)) if v is not None)
        if n < len(windows):
            windows = windows[spaced(len(windows), n)]
        return Calibration(len(windows), lambda: window_batches(windows, c.batch_size, device))

    @torch.inference_mode()
    def calibration_loss(self, model, batches, reference):
        """Mean next-token NLL on the calibration windows (log perplexity; no dense reference needed)."""
        nll, n = 0.0, 0
        for enc in batches:
            logits = model(input_ids=enc["input_ids"]).logits[:, :-1].float()
            target = enc["input_ids"][:, 1:]
            nll += float(F.cross_entropy(logits.reshape(-1, logits.shape[-1]), target.reshape(-1), reduction="sum"))
            n += target.numel()
        return nll / max(n, 1)

    def reference(self, dense_model, prepared, tokenizer, ev, device):
        windows = read_windows(prepared, "eval")
        return {"windows": windows, "dense": DenseReference(dense_model.to(device).eval(), windows, ev.batch_size,
                                                            device)}

    def compare(self, reference, pruned_model, ev, device):
        windows = reference["windows"]
        q = lm_quality(reference["dense"], pruned_model.to(device).eval(), windows, ev.batch_size, device)
        items = {"perplexity_pruned": np.asarray(q.pop("window_nll")),
                 "next_token_agreement": np.asarray(q.pop("window_agreement"))}
        q["perplexity_ratio"] = q["perplexity_pruned"] / q["perplexity_dense"]
        q["n_eval"] = int(len(windows))
        return q, items
