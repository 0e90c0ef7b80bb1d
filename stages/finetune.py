"""finetune: produce the dense task model a user would normally bring. Not part of pruning.

reads   data/prepared/{train,eval}.jsonl, finetune.base_model (the packaged MiniLM) or finetune.task_model
writes  data/dense/ (HF classifier + tokenizer), metrics/finetune.json
params  finetune, runtime
With finetune.task_model set (the user's own fine-tuned classifier) nothing is trained: it is validated,
copied to data/dense and evaluated, so every later stage sees the same layout.
"""

from __future__ import annotations

import logging
import math
import random
import sys
import time

import numpy as np
import torch
from tqdm.auto import tqdm

from pruneflow.adapters import get_adapter
from pruneflow.artifacts import atomic_path, read_jsonl, write_json
from pruneflow.data import resolve_model_path
from pruneflow.params import Params
from pruneflow.runtime import Layout, setup_torch, stage_main
from pruneflow.task import accuracy, load_model, load_tokenizer, predict_logits

log = logging.getLogger("pruneflow.finetune")


def _train(model, tokenizer, rows: list[dict], p, device: str) -> float:
    torch.manual_seed(p.seed)
    rng = random.Random(p.seed)
    rows = rows[: p.max_train_samples] if p.max_train_samples else rows
    steps_per_epoch = math.ceil(len(rows) / p.batch_size)
    total = max(1, int(round(steps_per_epoch * p.epochs)))
    opt = torch.optim.AdamW(model.parameters(), lr=p.lr, weight_decay=p.weight_decay)
    warm = int(total * p.warmup_fraction)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: (s + 1) / max(1, warm) if s < warm else max(0.0, (total - s) / max(1, total - warm)))
    model.train().to(device)
    losses, step = [], 0
    bar = tqdm(total=total, desc="finetune", unit="step")
    while step < total:
        order = list(range(len(rows)))
        rng.shuffle(order)
        for i in range(0, len(order), p.batch_size):
            if step >= total:
                break
            batch = [rows[j] for j in order[i : i + p.batch_size]]
            enc = tokenizer([r["text"] for r in batch], padding=True, truncation=True,
                            max_length=p.max_length, return_tensors="pt").to(device)
            labels = torch.tensor([r["label"] for r in batch], device=device)
            loss = model(**enc, labels=labels).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step(), sched.step(), opt.zero_grad(set_to_none=True)
            losses.append(loss.item())
            step += 1
            bar.update(1)
            bar.set_postfix(loss=f"{np.mean(losses[-50:]):.3f}")
    bar.close()
    return float(np.mean(losses[-50:]))


def run(params: Params, layout: Layout) -> dict:
    """Fine-tune the packaged MiniLM on train (or adopt finetune.task_model), evaluate on eval."""
    from transformers import AutoModelForSequenceClassification

    p = params.finetune
    device = setup_torch(params)
    train_rows = read_jsonl(layout.prepared / "train.jsonl")
    eval_rows = read_jsonl(layout.prepared / "eval.jsonl")
    if not eval_rows or "label" not in eval_rows[0]:
        raise ValueError("finetune: the eval split has no labels; accuracy needs a labeled eval split")
    t0 = time.perf_counter()
    if p.task_model:
        src = resolve_model_path(p.task_model, layout.root)
        model = load_model(src)
        get_adapter(model)  # fails early, naming the supported architectures
        tokenizer = load_tokenizer(src)
        final_loss, trained = None, False
    else:
        src = resolve_model_path(p.base_model, layout.root)
        tokenizer = load_tokenizer(src)
        model = AutoModelForSequenceClassification.from_pretrained(str(src), num_labels=2, attn_implementation="sdpa")
        get_adapter(model)
        if not train_rows or "label" not in train_rows[0]:
            raise ValueError("finetune: training needs a labeled train split (or set finetune.task_model)")
        final_loss, trained = _train(model, tokenizer, train_rows, p, device), True
    train_seconds = time.perf_counter() - t0
    model.eval()
    logits = predict_logits(model, tokenizer, [r["text"] for r in eval_rows], 128, 128, device, "eval")
    acc = accuracy(logits, [r["label"] for r in eval_rows])
    with atomic_path(layout.dense) as tmp:
        model.config.id2label = {0: "negative", 1: "positive"}
        model.config.label2id = {"negative": 0, "positive": 1}
        model.save_pretrained(str(tmp))
        tokenizer.save_pretrained(str(tmp))
    write_json(layout.metrics / "finetune.json", {
        "accuracy": acc, "n_eval": len(eval_rows), "trained": trained, "source": str(src),
        "train_seconds": round(train_seconds, 1), "final_train_loss": final_loss, "device": device,
    })
    log.info("eval accuracy %.4f on %d sentences", acc, len(eval_rows))
    return {"accuracy": f"{acc:.4f}"}


if __name__ == "__main__":
    sys.exit(stage_main("finetune", run))
