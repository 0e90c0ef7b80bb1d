"""The task interface: what a model is fed for calibration, and how a pruned model's quality is measured.

Every task owns how a dense model loads (`load_model`), the calibration batches that collect, rank and the
sequential correction stream through the model (`calibration_batches`), and quality: the dense model's outputs
on the held-out eval data computed once (`reference`), then any pruned model compared with them (`compare`:
the metrics, and per-item outcomes for paired tests between two pruned models). collect, rank, correct,
evaluate and the sweep go through these and nothing else, so a task is a new file here plus its registration:
classification.py (labeled sentences: accuracy, agreement) and causal_lm.py (token windows: perplexity,
next-token agreement, KL). The classifier's export and latency benchmark also use `predict` with a runner.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, ClassVar, Iterator

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


@dataclass(frozen=True)
class Calibration:
    """Calibration batches ({"input_ids", "attention_mask"} on the device), re-iterable: each pass re-reads them,
    so nothing but the current batch is held. `sequences` is how many sequences one pass yields."""

    sequences: int
    make: Callable[[], Iterator[dict]]

    def __iter__(self) -> Iterator[dict]:
        return self.make()

    def __len__(self) -> int:
        return self.sequences


@dataclass(frozen=True)
class Column:
    """A quality key as the sweep's table and plot show it."""

    key: str  # the pruned model's value, e.g. accuracy_pruned
    dense_key: str | None  # the dense model's value of the same figure (None: a comparison with dense)
    title: str  # table header
    label: str  # plot axis
    percent: bool  # shown ×100
    higher_is_better: bool

    def show(self, value: float, digits: int = 2) -> str:
        return f"{100 * value:.{digits}f}" if self.percent else f"{value:.{digits}f}"


class Task(ABC):
    kind: ClassVar[str]
    headline: ClassVar[tuple[str, ...]]  # the quality keys a results table shows, dense first where paired
    primary: ClassVar[Column]  # the sweep table's and plot's main figure, e.g. accuracy, perplexity
    secondary: ClassVar[Column]  # shown in brackets beside it, e.g. agreement with the dense model
    paired_test: ClassVar[str]  # how two pruned models are compared on the same eval items, for reports

    @abstractmethod
    def load_model(self, path: str | Path, attn: str = "sdpa") -> nn.Module:
        """A dense Hugging Face directory of this task's model class, or a pruned directory (it has a manifest)."""

    @abstractmethod
    def auto_class(self):
        """The transformers Auto class of this task's dense models (e.g. AutoModelForCausalLM)."""

    def load_lazy(self, path: str | Path, attn: str = "sdpa") -> nn.Module:
        """The dense model of `path` with no weights in memory: runtime.offload=disk reads each block's weights
        from its safetensors as it runs (pruneflow.blockwalk)."""
        from pruneflow.blockwalk import lazy_model

        return lazy_model(self.auto_class(), path, attn)

    def load_shapes(self, path: str | Path) -> nn.Module:
        """The model of `path` with no weights at all (parameters on the meta device): for what reads shapes only,
        such as FLOP and parameter counts. A pruned folder (its shapes come from slicing) loads whole."""
        from pruneflow.blockwalk import lazy_model

        if is_pruned_dir(path):
            return self.load_model(path)
        return lazy_model(self.auto_class(), path, weights=False)

    @abstractmethod
    def calibration_batches(self, prepared: Path, tokenizer, c, device: str, max_samples: int | None = None,
                            token_cap: bool = True) -> Calibration:
        """The unlabeled calibration data (what pruning sees) as batches, per the `collect` params `c`; at most
        `max_samples` sequences. token_cap=False ignores `collect.max_tokens` (batches by count only: the
        sequential correction's batching, with which its committed figures were measured). Fails clearly when
        there is none."""

    def refit_batches(self, prepared: Path, tokenizer, c, device: str, max_samples: int | None = None,
                      token_cap: bool = True) -> Calibration:
        """The calibration data the sequential correction refits on: by default the same as the statistics'
        (a task may hold more text for the refit, which needs more than the statistics do)."""
        return self.calibration_batches(prepared, tokenizer, c, device, max_samples, token_cap)

    @abstractmethod
    def reference(self, dense_model: nn.Module, prepared: Path, tokenizer, ev, device: str) -> Any:
        """The dense model's outputs on the held-out eval data, computed once (`ev`: the evaluate params)."""

    @abstractmethod
    def compare(self, reference: Any, pruned_model: nn.Module, ev, device: str) -> tuple[dict, dict[str, np.ndarray]]:
        """(quality metrics of the pruned model against the dense reference, per eval item outcomes named as the
        quality keys they aggregate to). Boolean outcomes are compared by McNemar's test, numbers (e.g. a
        window's NLL) by a paired bootstrap: what the sweep's paired tests between two pruned models use."""

    def calibration_reference(self, dense_model: nn.Module, batches: list[dict]) -> Any:
        """What `calibration_loss` compares against, from the dense model on the same batches (None: nothing)."""
        return None

    def reference_loss(self, reference: Any) -> float | None:
        """`calibration_loss` of the dense model itself where the reference alone says it (a loss relative to the
        dense model's own outputs is 0 there), so no forward pass is spent on it; None: it takes one."""
        return None

    @abstractmethod
    def calibration_loss(self, model: nn.Module, batches: list[dict], reference: Any) -> float:
        """A label-free loss of `model` on calibration batches, lower is better (what forward-only searches such
        as Bonsai score sub-models by)."""

    def export_metadata(self, model: nn.Module) -> dict[str, str]:
        """Key/value strings written into an exported file's metadata."""
        return {}

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
