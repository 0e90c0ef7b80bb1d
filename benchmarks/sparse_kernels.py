"""2:4 sparse vs dense matmul on the GPU, for the Linear shapes of real models (issue 11: honest 2:4 speed).

A dense kernel does not get faster from zeros: only a kernel that skips them does. PyTorch's semi-structured
sparse tensors (`torch.sparse.to_sparse_semi_structured`, CUTLASS and cuSPARSELt backends) run 2:4 weights on
the sparse tensor cores of Ampere and later GPUs. For every distinct Linear shape of each model and every token
count, this times `F.linear(x, W)` with W dense (zeros included) and with W semi-structured, from the same 2:4
weights: CUDA events around `--inner` calls, `--warmup` untimed repeats, median of `--repeats`. Reported:
dense ms, sparse ms, dense/sparse (> 1 = sparse faster), and max |sparse − dense| of the outputs. The same is
timed again with the calls captured in a CUDA graph and replayed ("graphed"): that leaves the kernels and drops
per-call host work, which for PyTorch's cuSPARSELt path is large (it builds and frees the matmul plan on every
call) and which a serving engine that caches plans would not pay. The per-model line sums the isolated matmuls
over all of a model's Linears (7 per block × blocks): what 2:4 could save in the Linears, not an end-to-end
latency.

Weights are random (no assets) with a valid 2:4 mask from pruneflow.sparsity.nm_mask, which imports nothing
but torch, so this runs on a machine with only torch installed:

    python benchmarks/sparse_kernels.py --out metrics/sparse_kernels.json
    python benchmarks/sparse_kernels.py --models smollm2-135m --tokens 128 2048 --dtypes bf16

Without CUDA it prints why it skipped, writes {"skipped": true, "reason": ...} to --out and exits 0.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as a file: make `pruneflow` importable from the checkout
    sys.path.insert(0, str(ROOT))

from pruneflow.sparsity import nm_mask  # noqa: E402  (torch only)

# (hidden, intermediate, key/value width = kv heads × head_dim, blocks)
MODELS = {
    "smollm2-135m": (576, 1536, 3 * 64, 30),
    "llama-7b": (4096, 11008, 32 * 128, 32),
}
DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16}
BACKENDS = ("cutlass", "cusparselt")


def linear_shapes(hidden: int, intermediate: int, kv: int) -> dict[str, tuple[int, int]]:
    """(out, in) of the 7 Linears of a Llama-style block."""
    return {"q_proj": (hidden, hidden), "k_proj": (kv, hidden), "v_proj": (kv, hidden), "o_proj": (hidden, hidden),
            "gate_proj": (intermediate, hidden), "up_proj": (intermediate, hidden), "down_proj": (hidden, intermediate)}


def two_four_weight(out_features: int, in_features: int, seed: int = 0, dtype=torch.float32,
                    device="cpu") -> torch.Tensor:
    """A random [out, in] weight with the 2 smallest |w| of every 4 consecutive inputs zeroed (valid 2:4)."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(out_features, in_features, generator=g) / in_features ** 0.5
    w = w.masked_fill(nm_mask(w.abs(), 2, 4), 0.0)
    return w.to(device=device, dtype=dtype).contiguous()


def is_two_four(w: torch.Tensor) -> bool:
    """Every group of 4 consecutive weights of a row has at most 2 nonzeros (what the sparse kernels need)."""
    rows, cols = w.shape
    return cols % 4 == 0 and bool(((w != 0).reshape(rows, cols // 4, 4).sum(-1) <= 2).all())


def to_semi_structured(w: torch.Tensor, backend: str):
    cls = {"cutlass": torch.sparse.SparseSemiStructuredTensorCUTLASS,
           "cusparselt": torch.sparse.SparseSemiStructuredTensorCUSPARSELT}[backend]
    return cls.from_dense(w)


def cuda_median_ms(fn, warmup: int, repeats: int, inner: int) -> float:
    """Median over `repeats` of the CUDA-event time of `inner` back-to-back calls, divided by `inner`."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(inner):
            fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / inner)
    return statistics.median(times)


def graph_median_ms(fn, warmup: int, repeats: int, inner: int) -> float:
    """The same, with the `inner` calls captured once in a CUDA graph and replayed: host-side work per call
    (cuSPARSELt builds and frees its matmul plan on every call in PyTorch <= 2.11) drops out, kernels remain."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm up off the default stream before capture, as CUDA graphs require
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(inner):
            fn()
    return cuda_median_ms(graph.replay, warmup, repeats, 1) / inner


def backend_available(backend: str) -> tuple[bool, str]:
    if backend == "cusparselt" and not torch.backends.cusparselt.is_available():
        return False, "torch.backends.cusparselt.is_available() is False"
    return True, ""


def bench_shape(shape: tuple[int, int], tokens: int, dtype_name: str, backend: str, args) -> dict:
    out_f, in_f = shape
    dtype = DTYPES[dtype_name]
    w = two_four_weight(out_f, in_f, seed=out_f * 7 + in_f, dtype=dtype, device="cuda")
    x = torch.randn(tokens, in_f, generator=torch.Generator().manual_seed(tokens), dtype=torch.float32)
    x = x.to(device="cuda", dtype=dtype)
    ws = to_semi_structured(w, backend)
    with torch.inference_mode():
        dense_out, sparse_out = F.linear(x, w), F.linear(x, ws)
        diff = float((sparse_out.float() - dense_out.float()).abs().max())
        scale = float(dense_out.float().abs().max())
        dense_ms = cuda_median_ms(lambda: F.linear(x, w), args.warmup, args.repeats, args.inner)
        sparse_ms = cuda_median_ms(lambda: F.linear(x, ws), args.warmup, args.repeats, args.inner)
        row = {"out": out_f, "in": in_f, "tokens": tokens, "dtype": dtype_name, "backend": backend,
               "dense_ms": dense_ms, "sparse_ms": sparse_ms, "dense_over_sparse": dense_ms / sparse_ms,
               "max_abs_diff": diff, "max_abs_dense_out": scale}
        if args.graphs:
            try:
                dg = graph_median_ms(lambda: F.linear(x, w), args.warmup, args.repeats, args.inner)
                sg = graph_median_ms(lambda: F.linear(x, ws), args.warmup, args.repeats, args.inner)
                row.update(graph_dense_ms=dg, graph_sparse_ms=sg, graph_dense_over_sparse=dg / sg)
            except RuntimeError as e:  # capture refused (e.g. a host sync inside the sparse call)
                row["graph_error"] = str(e).splitlines()[0][:200]
    return row


def model_totals(rows: list[dict], model: str) -> list[dict]:
    """Per (dtype, backend, tokens): the model's Linears summed (each shape × its count per block × blocks)."""
    hidden, inter, kv, blocks = MODELS[model]
    counts: dict[tuple[int, int], int] = {}
    for shape in linear_shapes(hidden, inter, kv).values():
        counts[shape] = counts.get(shape, 0) + blocks
    out = []
    keys = sorted({(r["dtype"], r["backend"], r["tokens"]) for r in rows})
    for dtype, backend, tokens in keys:
        sel = {(r["out"], r["in"]): r for r in rows
               if (r["dtype"], r["backend"], r["tokens"]) == (dtype, backend, tokens)}
        if not all(s in sel for s in counts):
            continue
        dense = sum(sel[s]["dense_ms"] * n for s, n in counts.items())
        sparse = sum(sel[s]["sparse_ms"] * n for s, n in counts.items())
        total = {"model": model, "dtype": dtype, "backend": backend, "tokens": tokens, "linears": sum(counts.values()),
                 "dense_ms": dense, "sparse_ms": sparse, "dense_over_sparse": dense / sparse}
        if all("graph_sparse_ms" in sel[s] for s in counts):
            dg = sum(sel[s]["graph_dense_ms"] * n for s, n in counts.items())
            sg = sum(sel[s]["graph_sparse_ms"] * n for s, n in counts.items())
            total.update(graph_dense_ms=dg, graph_sparse_ms=sg, graph_dense_over_sparse=dg / sg)
        out.append(total)
    return out


def write_json(path: str | Path, obj: dict) -> None:
    """Atomically (temp file + rename), as pruneflow.artifacts does; that module needs numpy, this script not."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(obj, indent=2) + "\n")
    os.replace(tmp, path)


def environment() -> dict:
    env = {"torch": torch.__version__, "cuda_available": torch.cuda.is_available()}
    if torch.cuda.is_available():
        env.update(device=torch.cuda.get_device_name(), capability=list(torch.cuda.get_device_capability()),
                   cuda=torch.version.cuda, cusparselt=torch.backends.cusparselt.version()
                   if torch.backends.cusparselt.is_available() else None)
    return env


def print_table(rows: list[dict], totals: list[dict]) -> None:
    print(f"{'shape (out×in)':>16} {'tokens':>6} {'dtype':>8} {'backend':>10} {'dense ms':>9} {'2:4 ms':>9} "
          f"{'dense/2:4':>9} {'max|Δ|':>9} | graphed: {'dense ms':>9} {'2:4 ms':>9} {'dense/2:4':>9}")
    for r in rows:
        if "error" in r:
            print(f"{r['out']:>7}×{r['in']:<8} {r['tokens']:>6} {r['dtype']:>8} {r['backend']:>10}  error: {r['error']}")
            continue
        graphed = (f"{r['graph_dense_ms']:>9.4f} {r['graph_sparse_ms']:>9.4f} {r['graph_dense_over_sparse']:>9.2f}"
                   if "graph_sparse_ms" in r else r.get("graph_error", "-"))
        print(f"{r['out']:>7}×{r['in']:<8} {r['tokens']:>6} {r['dtype']:>8} {r['backend']:>10} {r['dense_ms']:>9.4f} "
              f"{r['sparse_ms']:>9.4f} {r['dense_over_sparse']:>9.2f} {r['max_abs_diff']:>9.2e} | graphed: {graphed}")
    print("\nAll Linears of the model, isolated matmuls summed (not end-to-end latency):")
    for t in totals:
        print(f"{t['model']:>14} {t['linears']:>4} Linears {t['tokens']:>6} tok {t['dtype']:>8} {t['backend']:>10} "
              f"dense {t['dense_ms']:9.3f} ms  2:4 {t['sparse_ms']:9.3f} ms  dense/2:4 {t['dense_over_sparse']:.2f}"
              + (f"  | graphed: dense {t['graph_dense_ms']:8.3f} ms  2:4 {t['graph_sparse_ms']:8.3f} ms  "
                 f"dense/2:4 {t['graph_dense_over_sparse']:.2f}" if "graph_sparse_ms" in t else ""))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    ap.add_argument("--tokens", nargs="+", type=int, default=[128, 512, 2048, 8192])
    ap.add_argument("--dtypes", nargs="+", default=["fp16", "bf16"], choices=list(DTYPES))
    ap.add_argument("--backends", nargs="+", default=list(BACKENDS), choices=list(BACKENDS))
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--repeats", type=int, default=25)
    ap.add_argument("--inner", type=int, default=10, help="calls per timed repeat (amortises launch overhead)")
    ap.add_argument("--no-graphs", dest="graphs", action="store_false",
                    help="skip the CUDA-graph timings (kernels without per-call host work)")
    ap.add_argument("--out", default="metrics/sparse_kernels.json")
    args = ap.parse_args(argv)

    if not torch.cuda.is_available():
        reason = "needs a CUDA GPU (torch.cuda.is_available() is False)"
        print(f"skipped: {reason}")
        write_json(args.out, {"skipped": True, "reason": reason, "environment": environment()})
        return 0

    t0 = time.perf_counter()
    rows, totals, skipped = [], [], {}
    backends = []
    for b in args.backends:
        ok, why = backend_available(b)
        if ok:
            backends.append(b)
        else:
            skipped[b] = why
    for model in args.models:
        shapes = sorted(set(linear_shapes(*MODELS[model][:3]).values()))
        model_rows = []
        for dtype_name in args.dtypes:
            for backend in backends:
                for shape in shapes:
                    for tokens in args.tokens:
                        try:
                            r = bench_shape(shape, tokens, dtype_name, backend, args)
                        except (RuntimeError, NotImplementedError) as e:  # a backend/dtype/shape the build lacks
                            r = {"out": shape[0], "in": shape[1], "tokens": tokens, "dtype": dtype_name,
                                 "backend": backend, "error": str(e).splitlines()[0][:200]}
                        model_rows.append(dict(r, model=model))
        rows += model_rows
        totals += model_totals([r for r in model_rows if "error" not in r], model)
    print_table(rows, totals)
    if skipped:
        print("backends skipped:", skipped)
    write_json(args.out, {"skipped": False, "environment": environment(), "settings": vars(args),
                          "backends_skipped": skipped, "seconds": time.perf_counter() - t0,
                          "rows": rows, "model_totals": totals})
    return 0


if __name__ == "__main__":
    sys.exit(main())
