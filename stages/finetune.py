"""finetune: produce the dense task model a user would normally bring. Not part of pruning.

reads   data/prepared/{train,eval,provenance}.jsonl, finetune.base_model (the packaged MiniLM) or
        finetune.task_model
writes  data/dense/ (HF classifier + tokenizer; the label names from prepare in its config), metrics/finetune.json
params  finetune, task, runtime
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
from pruneflow.artifacts import atomic_path, read_json, read_jsonl, write_json
from pruneflow.data import resolve_model_path
from pruneflow.params import Params
from pruneflow.runtime import Layout, load_tokenizer, setup_torch, stage_main
from pruneflow.tasks import get_task, torch_runner

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


def label_names(layout: Layout, train_rows: list[dict]) -> dict[int, str]:
    """id -> label name: what prepare recorded (provenance.json "id2label"), else the ids themselves."""
    provenance = layout.prepared / "provenance.json"
    recorded = read_json(provenance).get("id2label") if provenance.exists() else None
    if recorded:
        return {int(k): str(v) for k, v in recorded.items()}
    ids = sorted({int(r["label"]) for r in train_rows if "label" in r}) or [0, 1]
    return {i: str(i) for i in range(max(ids) + 1)}


def run(params: Params, layout: Layout) -> dict:
    """Fine-tune the packaged MiniLM on train (or adopt finetune.task_model), evaluate on eval."""
    p = params.finetune
    device = setup_torch(params)
    task = get_task(params.task.kind)
    train_rows = read_jsonl(layout.prepared / "train.jsonl")
    texts, labels = task.eval_split(layout.prepared)
    if labels is None:
        raise ValueError("finetune: the eval split has no labels; accuracy needs a labeled eval split")
    t0 = time.perf_counter()
    if p.task_model:
        src = resolve_model_path(p.task_model, layout.root)
        model = task.load_model(src)
        get_adapter(model)  # fails early, naming the supported architectures
        tokenizer = load_tokenizer(src)
        final_loss, trained = None, False
    else:
        src = resolve_model_path(p.base_model, layout.root)
        tokenizer = load_tokenizer(src)
        torch.manual_seed(p.seed)  # the new classification head's init, too, is seeded (reproducible runs)
        model = task.base_model(src, label_names(layout, train_rows))
        get_adapter(model)
        if not train_rows or "label" not in train_rows[0]:
            raise ValueError("finetune: training needs a labeled train split (or set finetune.task_model)")
        final_loss, trained = _train(model, tokenizer, train_rows, p, device), True
    train_seconds = time.perf_counter() - t0
    model.eval()
    q = task.quality(*(2 * [task.predict(torch_runner(model, device), tokenizer, texts, 128, 128, "eval")]), labels)
    acc = q["accuracy_dense"]
    with atomic_path(layout.dense) as tmp:
        model.save_pretrained(str(tmp))
        tokenizer.save_pretrained(str(tmp))
    write_json(layout.metrics / "finetune.json", {
        "accuracy": acc, "n_eval": len(texts), "trained": trained, "source": str(src),
        "train_seconds": round(train_seconds, 1), "final_train_loss": final_loss, "device": device,
    })
    log.info("eval accuracy %.4f on %d sentences", acc, len(texts))
    return {"accuracy": f"{acc:.4f}"}


if __name__ == "__main__":
    sys.exit(stage_main("finetune", run))
