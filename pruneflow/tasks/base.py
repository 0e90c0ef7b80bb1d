"""The task interface: what a model predicts on eval data and how its quality is measured.

A task owns how a dense model loads (and a base model is made trainable for it), which texts calibrate and
which evaluate, how predictions are made in batches (by any runner: PyTorch or onnxruntime), which quality
metrics exist, and what the export metadata says. evaluate, finetune, benchmark, sweep and report go through
it, so a new task (the causal LM next) is a new file here plus its registration.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from pathlib import Path
from typing import Callable, ClassVar

import numpy as np
import torch
from torch import nn

from pruneflow.plan import is_pruned_dir, load_pruned

Runner = Callable[[dict[str, np.ndarray]], np.ndarray]  # a tokenized batch (numpy) -> model outputs (numpy)


def torch_runner(model: nn.Module, device: str = "cpu") -> Runner:
    from pruneflow.modeling import LogitsOnly

    model.eval().to(device)
    view = LogitsOnly(model)

    @torch.inference_mode()
    def run(batch: dict[str, np.ndarray]) -> np.ndarray:
        args = [torch.as_tensor(np.asarray(batch[k]), dtype=torch.long, device=device)
                for k in ("input_ids", "attention_mask")]
        return view(*args).float().cpu().numpy()

    return run


def ort_runner(session) -> Runner:
    def run(batch: dict[str, np.ndarray]) -> np.ndarray:
        feeds = {k: np.asarray(batch[k], dtype=np.int64) for k in ("input_ids", "attention_mask")}
        return session.run(["logits"], feeds)[0]

    return run


class Task(ABC):
    kind: ClassVar[str]
    headline: ClassVar[tuple[str, ...]]  # the quality keys a results table shows, dense first where paired

    @abstractmethod
    def load_model(self, path: str | Path, attn: str = "sdpa") -> nn.Module:
        """A dense Hugging Face directory of this task's model class, or a pruned directory (it has a manifest)."""

    @abstractmethod
    def calibration_texts(self, prepared: Path, max_samples: int | None = None) -> list[str]:
        """Unlabeled calibration text (what pruning sees); fails clearly when there is none."""

    @abstractmethod
    def eval_split(self, prepared: Path) -> tuple[list[str], list | None]:
        """Held-out eval texts and their labels (None when unlabeled)."""

    @abstractmethod
    def predict(self, run: Runner, tokenizer, texts: list[str], batch_size: int, max_length: int,
                progress: str | None = None) -> np.ndarray:
        """Outputs for `texts` in their original order."""

    @abstractmethod
    def quality(self, dense: np.ndarray, pruned: np.ndarray, labels: list | None) -> dict:
        """Quality metrics of dense vs pruned outputs on the same eval texts."""

    def item_outcomes(self, dense: np.ndarray, pruned: np.ndarray, labels: list | None) -> dict[str, np.ndarray]:
        """Per eval item, boolean outcomes named as the quality keys they average to (e.g. "accuracy_pruned":
        pruned right, "agreement": pruned agrees with dense): what paired tests between two pruned models use."""
        return {}

    @abstractmethod
    def export_metadata(self, model: nn.Module) -> dict[str, str]:
        """Key/value strings written into an exported file's metadata."""

    @staticmethod
    def load_pruned_or(path: str | Path, attn: str, load_dense: Callable[[Path], nn.Module]) -> nn.Module:
        path = Path(path)
        return load_pruned(path, attn=attn) if is_pruned_dir(path) else load_dense(path).eval()


TASKS: dict[str, type[Task]] = {}


def register(cls: type[Task]) -> type[Task]:
    TASKS[cls.kind] = cls
    return cls


def get_task(kind: str) -> Task:
    if kind not in TASKS:
        raise ValueError(f"task.kind={kind!r} is not a registered task (registered: {', '.join(sorted(TASKS))})")
    return TASKS[kind]()
