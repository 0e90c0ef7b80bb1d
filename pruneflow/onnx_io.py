"""ONNX helpers: export a HF model to one self-contained ONNX file, open it in onnxruntime on a provider that
really loads, check its outputs against PyTorch, and time dense and pruned models side by side.

Conventions of every exported file: inputs `input_ids` and `attention_mask` (int64, dynamic batch and sequence
axes), output `logits` ((batch, labels) for classifiers, (batch, sequence, vocab) for causal LMs), weights
inside the file (no `.onnx.data`), attention exported as plain matmuls (eager), the label names in the
file's metadata (the task's export metadata, e.g. `id2label` as JSON).
"""

from __future__ import annotations

import functools
import logging
import time
from pathlib import Path
from typing import Callable, Literal

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from pruneflow.artifacts import atomic_path
from pruneflow.modeling import LogitsOnly, eager_attention, is_token_level

log = logging.getLogger("pruneflow.onnx")

INPUT_NAMES = ("input_ids", "attention_mask")
OUTPUT_NAME = "logits"
CPU = "CPUExecutionProvider"
CUDA = "CUDAExecutionProvider"
Exporter = Literal["torchscript", "dynamo"]


def export_onnx(model: nn.Module, path: str | Path, sample: dict[str, np.ndarray], opset: int,
                exporter: Exporter = "torchscript") -> float:
    """Write `model` to `path` as one ONNX file with dynamic batch and sequence axes; returns export seconds.

    Both exporters give matching outputs here; "torchscript" (torch.onnx.export(dynamo=False)) is the default
    because on this stack (torch 2.13, onnxruntime 1.31, MiniLM) it exports 4x faster (2 s vs 9 s) and its
    graph ran ~20% faster in onnxruntime on CPU (the dynamo graph gets fused into SkipLayerNormalization,
    which is slow on one thread). Its trace-time specialisation risk is covered by the parity check, which
    runs padded and unpadded batches of other shapes than the sample."""
    path = Path(path)
    wrapper = LogitsOnly(model).eval()
    args = tuple(torch.as_tensor(sample[k]) for k in INPUT_NAMES)
    out_axes = {0: "batch", 1: "sequence"} if is_token_level(model) else {0: "batch"}
    t0 = time.perf_counter()
    with eager_attention(model), torch.no_grad(), atomic_path(path, ".onnx") as tmp:
        if exporter == "dynamo":
            # Needs onnxscript; external_data=False keeps the weights inside the .onnx file.
            seq_dims = {0: torch.export.Dim("batch"), 1: torch.export.Dim("sequence")}
            torch.onnx.export(wrapper, args, str(tmp), dynamo=True, opset_version=opset, external_data=False,
                              input_names=list(INPUT_NAMES), output_names=[OUTPUT_NAME],
                              dynamic_shapes=(seq_dims, seq_dims))
        else:
            axes = {name: {0: "batch", 1: "sequence"} for name in INPUT_NAMES} | {OUTPUT_NAME: out_axes}
            torch.onnx.export(wrapper, args, str(tmp), dynamo=False, opset_version=opset,
                              input_names=list(INPUT_NAMES), output_names=[OUTPUT_NAME], dynamic_axes=axes)
        reject_external_data(tmp)
    return time.perf_counter() - t0


def reject_external_data(onnx_path: Path) -> None:
    """Fail (and remove the stray file) when the exporter put the weights beside the .onnx file: a model over
    the 2 GB protobuf limit cannot be the single self-contained file the stages promise."""
    stray = onnx_path.with_name(onnx_path.name + ".data")
    if stray.exists():
        stray.unlink()
        raise ValueError(f"the ONNX exporter wrote external weights ({stray.name}); a model this large "
                         f"(> 2 GB protobuf limit) cannot be a single file")


def set_metadata(path: str | Path, metadata: dict[str, str]) -> None:
    """Add key/value strings to the ONNX file's metadata_props (read back with session.get_modelmeta())."""
    import onnx

    model = onnx.load(str(path))
    existing = {p.key: p for p in model.metadata_props}
    for key, value in metadata.items():
        prop = existing.get(key) or model.metadata_props.add()
        prop.key, prop.value = key, value
    with atomic_path(path, ".onnx") as tmp:
        onnx.save(model, str(tmp))


# --- onnxruntime sessions ------------------------------------------------------------------------------

@functools.cache
def cuda_provider_loads() -> bool:
    """Whether onnxruntime's CUDA provider really loads. onnxruntime-gpu lists it even on a machine without a
    GPU or CUDA libraries, and a session asking for it silently falls back to CPU (printing error lines), so
    we open a one-node session with the error log muted and look at what it got."""
    import onnxruntime as ort
    from onnx import TensorProto, helper

    if CUDA not in ort.get_available_providers():
        return False
    io = [helper.make_tensor_value_info(n, TensorProto.FLOAT, [1]) for n in ("x", "y")]
    graph = helper.make_graph([helper.make_node("Identity", ["x"], ["y"])], "probe", io[:1], io[1:])
    # IR version 8 loads on every onnxruntime this project supports (the onnx package may default newer).
    probe = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)], ir_version=8)
    ort.set_default_logger_severity(4)  # fatal only: the failed provider load is expected here
    try:
        session = ort.InferenceSession(probe.SerializeToString(), providers=[CUDA, CPU])
        return CUDA in session.get_providers()
    except Exception:  # noqa: BLE001 - any failure means "not usable"
        return False
    finally:
        ort.set_default_logger_severity(2)


def resolve_provider(choice: Literal["auto", "cpu", "cuda"]) -> str:
    """'auto' -> 'cuda' when its provider loads, else 'cpu'; 'cuda' that does not load is an error."""
    if choice == "cpu":
        return "cpu"
    if cuda_provider_loads():
        return "cuda"
    if choice == "cuda":
        raise ValueError("benchmark.provider=cuda but onnxruntime's CUDAExecutionProvider does not load here "
                         "(no GPU, or CUDA/cuDNN libraries missing); use provider: auto or cpu")
    return "cpu"


def make_session(path: str | Path, provider: Literal["cpu", "cuda"] = "cpu", threads: int | None = 1):
    """onnxruntime session on `provider` with `threads` intra-op threads; verifies the provider it got."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    if threads:
        options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    providers = [CUDA, CPU] if provider == "cuda" else [CPU]
    session = ort.InferenceSession(str(path), options, providers=providers)
    if session.get_providers()[0] != providers[0]:
        raise ValueError(f"{path}: asked onnxruntime for {providers[0]} but the session runs on "
                         f"{session.get_providers()}; use provider: cpu")
    return session


def session_runs_on(session) -> str:
    return "cuda" if session.get_providers()[0] == CUDA else "cpu"


# --- outputs and parity --------------------------------------------------------------------------------

def ort_logits(session, batch: dict[str, np.ndarray]) -> np.ndarray:
    return session.run([OUTPUT_NAME], {k: np.asarray(batch[k], dtype=np.int64) for k in INPUT_NAMES})[0]


@torch.inference_mode()
def torch_logits(model: nn.Module, batch: dict[str, np.ndarray]) -> np.ndarray:
    device = next(model.parameters()).device
    args = [torch.as_tensor(np.asarray(batch[k]), dtype=torch.long, device=device) for k in INPUT_NAMES]
    return LogitsOnly(model)(*args).float().cpu().numpy()


def max_abs_diff(expected: np.ndarray, got: np.ndarray, attention_mask: np.ndarray) -> float:
    """Largest |expected - got|; per-token outputs are compared on real tokens only (padding is free)."""
    if expected.shape != got.shape:
        raise ValueError(f"ONNX output shape {got.shape} differs from PyTorch's {expected.shape}")
    diff = np.abs(expected.astype(np.float64) - got.astype(np.float64))
    if diff.ndim == 3:
        diff = diff[np.asarray(attention_mask) == 1]
    return float(diff.max()) if diff.size else 0.0


def parity_batches(tokenizer, texts: list[str], n: int, max_length: int) -> list[dict[str, np.ndarray]]:
    """Two real batches of different shapes: `n` sentences spread from the shortest to the longest (so most
    rows are padded), and one mid-length sentence alone (batch 1, no padding)."""
    if len(texts) < 2 or n < 2:
        raise ValueError(f"parity needs at least 2 eval sentences (have {len(texts)}, asked for {n})")
    by_length = sorted(texts, key=len)
    picks = [by_length[i] for i in np.linspace(0, len(by_length) - 1, min(n, len(by_length))).round().astype(int)]
    encode = functools.partial(tokenizer, padding=True, truncation=True, max_length=max_length, return_tensors="np")
    mixed, single = encode(picks), encode([by_length[len(by_length) // 2]])
    return [{k: np.asarray(b[k], dtype=np.int64) for k in INPUT_NAMES} for b in (mixed, single)]


def parity_diff(model: nn.Module, session, batches: list[dict[str, np.ndarray]]) -> float:
    return max(max_abs_diff(torch_logits(model, b), ort_logits(session, b), b["attention_mask"]) for b in batches)


def check_parity(model: nn.Module, session, batches: list[dict[str, np.ndarray]], atol: float, what: str) -> float:
    """Max |logit| difference onnxruntime vs PyTorch over `batches`; ValueError when above `atol`."""
    diff = parity_diff(model, session, batches)
    if not diff <= atol:  # also catches NaN
        shapes = ", ".join(f"{b['input_ids'].shape[0]}x{b['input_ids'].shape[1]}" for b in batches)
        raise ValueError(f"{what}: onnxruntime logits differ from PyTorch's by max abs diff {diff:.3g} > "
                         f"export.atol={atol:g} on real eval batches ({shapes}); the ONNX file is wrong "
                         f"(or raise export.atol if this is float noise)")
    return diff


# --- onnxruntime transformer optimizer -----------------------------------------------------------------

def optimize_transformer(src: str | Path, dst: str | Path, model_type: str = "bert") -> dict[str, int]:
    """Run onnxruntime's transformer optimizer (num_heads=0/hidden_size=0 lets it read the head count per layer
    from the graph, since pruned layers differ). Returns the fused-operator counts."""
    from onnxruntime.transformers.optimizer import optimize_model

    # Its modules log every fusion (INFO) and a warning per layer whose attention it cannot fuse, under bare
    # module names (fusion_base, onnx_model, ...); the fused-op counts we return say the same in one line.
    logging.disable(logging.WARNING)
    try:
        optimized = optimize_model(str(src), model_type=model_type, num_heads=0, hidden_size=0)
    finally:
        logging.disable(logging.NOTSET)
    with atomic_path(dst, ".onnx") as tmp:
        optimized.save_model_to_file(str(tmp), use_external_data_format=False)
    return {op: n for op, n in optimized.get_fused_operator_statistics().items() if n}


# --- timing --------------------------------------------------------------------------------------------

def time_interleaved(calls: dict[str, Callable[[], object]], warmup: int, iters: int,
                     bar: tqdm | None = None) -> dict[str, np.ndarray]:
    """Seconds per call of each callable, measured in turns (a, b, b, a, a, b, ...) so machine noise and
    cache effects hit all of them alike. Warm-up rounds run first and are not recorded."""
    names = list(calls)
    times = {name: [] for name in names}
    for round_ in range(warmup + iters):
        order = names if round_ % 2 == 0 else names[::-1]
        for name in order:
            t0 = time.perf_counter()
            calls[name]()
            elapsed = time.perf_counter() - t0
            if round_ >= warmup:
                times[name].append(elapsed)
        if bar is not None:
            bar.update(1)
    return {name: np.asarray(t) for name, t in times.items()}


def latency_ms(seconds: np.ndarray) -> dict[str, float]:
    return {"median_ms": float(np.median(seconds) * 1e3), "p90_ms": float(np.percentile(seconds, 90) * 1e3),
            "min_ms": float(seconds.min() * 1e3), "n": int(seconds.size)}


def fixed_shape_batch(tokenizer, texts: list[str], batch: int, seq_len: int) -> dict[str, np.ndarray]:
    """`batch` real sentences padded or truncated to exactly `seq_len` tokens (texts repeat if too few)."""
    rows = [texts[i % len(texts)] for i in range(batch)]
    enc = tokenizer(rows, padding="max_length", truncation=True, max_length=seq_len, return_tensors="np")
    return {k: np.asarray(enc[k], dtype=np.int64) for k in INPUT_NAMES}
