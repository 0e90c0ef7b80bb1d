"""What every stage shares: the file layout, device choice, logging, and the CLI wrapper that turns a
stage function into `python -m stages.<name>` (clear one-line errors, wall time, peak memory, artifact sizes)."""

from __future__ import annotations

import argparse
import logging
import resource
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from pruneflow.params import Params, ParamsError, load_params, parse_overrides

log = logging.getLogger("pruneflow")


WINDOWS_FILE = "windows.safetensors"  # the causal-LM task's token windows (calib, eval), in the prepared folder


def spaced(n_pool: int, count: int) -> list[int]:
    """`count` indices evenly spaced over `n_pool` windows, first and last included (how LM calibration windows
    are chosen from the texts, and a subset of them from those)."""
    import torch

    return torch.linspace(0, n_pool - 1, count).round().long().tolist()


@dataclass(frozen=True)
class Layout:
    """Where each stage reads and writes: data (DVC's), metrics and plots folders under the project root. One
    pipeline, one layout: the classifier's is data/, metrics/, plots/; the causal LM's (lm/dvc.yaml) runs the
    same stages on data/lm/, metrics/lm/, plots/lm/ (`--data data/lm --metrics metrics/lm --plots plots/lm`)."""

    root: Path = Path(".")
    data: str = "data"
    metrics_dir: str = "metrics"
    plots_dir: str = "plots"

    def __truediv__(self, rel: str) -> Path:
        return self.root / rel

    @property
    def prepared(self) -> Path: return self.root / self.data / "prepared"
    @property
    def windows(self) -> Path: return self.prepared / WINDOWS_FILE
    @property
    def dense(self) -> Path: return self.root / self.data / "dense"
    @property
    def stats(self) -> Path: return self.root / self.data / "stats"
    @property
    def ranking(self) -> Path: return self.root / self.data / "rank/ranking.json"
    @property
    def selection(self) -> Path: return self.root / self.data / "select/selection.json"
    @property
    def pruned(self) -> Path: return self.root / self.data / "pruned"
    @property
    def onnx(self) -> Path: return self.root / self.data / "onnx"
    @property
    def metrics(self) -> Path: return self.root / self.metrics_dir
    @property
    def plots(self) -> Path: return self.root / self.plots_dir


def load_tokenizer(path: str | Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(path))


def pick_device(device: str) -> str:
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise ParamsError("runtime.device=cuda but torch sees no CUDA device; use 'auto' or 'cpu'")
    return device


def setup_torch(params: Params) -> str:
    import torch

    if params.runtime.threads:
        torch.set_num_threads(params.runtime.threads)
    return pick_device(params.runtime.device)


def release_freed_memory_to_os(threshold_bytes: int = 1 << 20) -> None:
    """Serve allocations above `threshold_bytes` with mmap, so freeing them returns memory to the OS. glibc
    otherwise keeps freed heap blocks, and batches of ever-different shapes make the process's peak RSS grow
    with the number of batches although nothing is retained (glibc only; elsewhere a no-op)."""
    import ctypes

    try:
        ctypes.CDLL("libc.so.6").mallopt(-3, threshold_bytes)  # -3 = M_MMAP_THRESHOLD
    except (OSError, AttributeError):
        pass


def trim_freed_memory() -> None:
    """Hand the heap's free pages back to the OS now (glibc malloc_trim; elsewhere a no-op). After a phase that
    allocated and freed many large tensors (Bonsai's sliced sub-models), glibc keeps that memory as free heap, and
    the process's RSS would carry it into the next phase's peak."""
    import ctypes

    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def peak_memory() -> dict[str, float]:
    """The process's peak resident memory, and the GPU's peak allocation where CUDA was used (MiB)."""
    import torch

    out = {"peak_rss_mb": round(peak_rss_mb(), 1)}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        out["peak_cuda_mb"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
    return out


def setup_logging(level: int = logging.INFO) -> None:
    if not logging.getLogger().handlers:
        logging.basicConfig(level=level, format="%(asctime)s %(name)s %(levelname)s %(message)s", datefmt="%H:%M:%S")
    for noisy in ("httpx", "urllib3", "fvcore", "onnxscript", "torch.onnx"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def stage_main(name: str, run: Callable[[Params, Layout], dict | None], argv: list[str] | None = None) -> int:
    """CLI entry of one stage: `python -m stages.<name> [--params params.yaml] [--root .] [--set k=v ...]`."""
    parser = argparse.ArgumentParser(prog=f"python -m stages.{name}", description=(run.__doc__ or "").strip())
    parser.add_argument("--params", default="params.yaml", help="params file (default: params.yaml)")
    parser.add_argument("--root", default=".", help="project root holding data/ and metrics/")
    parser.add_argument("--data", default="data", help="data folder under the root (the LM pipeline: data/lm)")
    parser.add_argument("--metrics", default="metrics", help="metrics folder under the root (LM: metrics/lm)")
    parser.add_argument("--plots", default="plots", help="plots folder under the root (LM: plots/lm)")
    parser.add_argument("--dataset", default=None, metavar="NAME",
                        help="apply the params of datasets.NAME (another labeled task; see datasets/dvc.yaml)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a param for this run only, e.g. --set select.budget=0.4")
    args = parser.parse_args(argv)
    setup_logging()
    t0 = time.perf_counter()
    try:
        params = load_params(args.params, parse_overrides(args.overrides), args.dataset)
        summary = run(params, Layout(Path(args.root), args.data, args.metrics, args.plots)) or {}
    except (ParamsError, ValueError, FileNotFoundError) as err:
        # Expected, user-fixable problems: one clear message, no traceback, nothing half-written.
        message = "; ".join(line.strip() for line in str(err).splitlines() if line.strip())
        print(f"[{name}] error: {message}", file=sys.stderr)
        return 2
    wall = time.perf_counter() - t0
    extras = " ".join(f"{k}={v}" for k, v in summary.items())
    log.info("[%s] done in %.1fs, peak RSS %.0f MiB %s", name, wall, peak_rss_mb(), extras)
    return 0
