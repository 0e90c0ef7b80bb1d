"""lm_benchmark: the causal LM's deployable files and their speed, dense vs pruned, in one run.

reads   data/lm/dense, data/lm/pruned, data/lm/prepared/windows.safetensors (eval windows: real prompts)
writes  data/lm/onnx/{dense,pruned}.onnx (KV-cache decoders: pruneflow/onnx_decoder.py), metrics/lm/speed.json
params  benchmark (prefill shapes, decode batches / prompt / new tokens, warm-up, runs, threads, provider,
        parity_tokens),
        export (opset, atol), runtime
Parity first, for both models: onnxruntime's prefill logits within export.atol of PyTorch's, and
benchmark.parity_tokens greedy tokens identical (the stage fails otherwise). Then, dense and pruned taking turns:
- prefill latency at each benchmark.prefill (batch, tokens), onnxruntime and PyTorch; ideal speed-up = dense /
  pruned fvcore FLOPs at that length;
- decode throughput with the KV cache (new tokens per second after a prompt), onnxruntime and PyTorch, at each
  batch of benchmark.decode_batches; ideal speed-up = dense / pruned bytes of weights read per generated token
  (every Linear of the blocks and the LM head; one embedding row is negligible).
"""

from __future__ import annotations

import logging
import sys

import numpy as np
import torch
from tqdm.auto import tqdm

from pruneflow.artifacts import write_json
from pruneflow.flops import count_flops
from pruneflow.onnx_decoder import (decoder_session, export_decoder_onnx, greedy_generate_onnx,
                                    greedy_generate_torch, run_decoder, empty_past, prompt_positions)
from pruneflow.onnx_io import latency_ms, max_abs_diff, resolve_provider, session_runs_on, time_interleaved
from pruneflow.params import Params
from pruneflow.runtime import Layout, peak_rss_mb, setup_torch, stage_main
from pruneflow.tasks import get_task
from pruneflow.tasks.causal_lm import read_windows

log = logging.getLogger("pruneflow.lm_benchmark")
MODELS = ("dense", "pruned")


def weight_bytes_per_token(model) -> int:
    """Bytes of weights a decode step reads: every Linear (blocks and LM head)."""
    return sum(m.weight.numel() * m.weight.element_size() for m in model.modules() if isinstance(m, torch.nn.Linear))


def prompts(windows: torch.Tensor, batch: int, tokens: int) -> np.ndarray:
    """`batch` real prompts of `tokens` tokens from the eval windows (no padding)."""
    if tokens > windows.shape[1]:
        raise ValueError(f"benchmark asks for {tokens}-token prompts but the eval windows hold {windows.shape[1]}; "
                         "lower benchmark.prefill / decode_prompt or raise lm.window")
    rows = [windows[i % len(windows), :tokens] for i in range(batch)]
    return torch.stack(rows).numpy().astype(np.int64)


def run(params: Params, layout: Layout) -> dict:
    """Export both models, check parity, time prefill and decode."""
    b, ex = params.benchmark, params.export
    setup_torch(params)
    torch.set_num_threads(b.threads)
    task = get_task(params.task.kind)
    windows = read_windows(layout.prepared, "eval")
    prompts(windows, 1, max([t for _, t in b.prefill] + [b.decode_prompt]))  # too long: fails before any work
    models = {name: task.load_model(getattr(layout, name), attn=b.torch_attn).eval() for name in MODELS}
    provider = resolve_provider(b.provider)
    sessions, parity = {}, {}
    ids = prompts(windows, 2, min(32, windows.shape[1]))  # the parity prompts, the same for both models
    mask = np.ones_like(ids)
    for name, model in models.items():
        path = layout.onnx / f"{name}.onnx"
        seconds = export_decoder_onnx(model, path, ex.opset)
        sessions[name] = decoder_session(path, provider, b.threads)
        with torch.inference_mode():
            ref = model(input_ids=torch.as_tensor(ids)).logits.numpy()
        got, _ = run_decoder(sessions[name], ids, mask, prompt_positions(mask), empty_past(sessions[name], 2))
        diff = max_abs_diff(ref, got, mask)
        same = bool((greedy_generate_onnx(sessions[name], ids, mask, b.parity_tokens)
                     == greedy_generate_torch(model, ids, mask, b.parity_tokens)).all())
        parity[name] = {"prefill_max_abs_diff": diff, "greedy_tokens_identical": same, "greedy_tokens": b.parity_tokens,
                        "export_seconds": round(seconds, 1), "onnx_mb": round(path.stat().st_size / 2**20, 1)}
        log.info("%s: exported in %.1fs (%.0f MB); prefill |Δlogit| %.2e, %d greedy tokens identical: %s", name,
                 seconds, parity[name]["onnx_mb"], diff, b.parity_tokens, same)
        if not diff <= ex.atol or not same:  # also catches NaN
            raise ValueError(f"{name}: onnxruntime disagrees with PyTorch (max |Δlogit| {diff:.3g}, atol {ex.atol}; "
                             f"greedy tokens identical: {same}); the file is not deployable")

    prefill = []
    rounds = (b.warmup + b.iters) * 2 * len(b.prefill)
    with tqdm(total=rounds, desc="prefill", unit="round") as bar:
        for batch, tokens in b.prefill:
            ids = prompts(windows, batch, tokens)
            mask = np.ones_like(ids)
            flops = {n: count_flops(m, tokens).total for n, m in models.items()}
            row = {"batch": batch, "tokens": tokens, "ideal_speedup": flops["dense"] / flops["pruned"]}
            for runtime in ("ort", "torch"):
                if runtime == "ort":
                    calls = {n: (lambda s=s: run_decoder(s, ids, mask, prompt_positions(mask), empty_past(s, batch)))
                             for n, s in sessions.items()}
                else:
                    t_ids = torch.as_tensor(ids)
                    calls = {n: (lambda m=m: _torch_forward(m, t_ids)) for n, m in models.items()}
                times = time_interleaved(calls, b.warmup, b.iters, bar)
                stats = {n: latency_ms(t) for n, t in times.items()}
                row[runtime] = {"dense_median_ms": stats["dense"]["median_ms"],
                                "pruned_median_ms": stats["pruned"]["median_ms"],
                                "speedup": stats["dense"]["median_ms"] / stats["pruned"]["median_ms"]}
            prefill.append(row)
            log.info("prefill %dx%d: ORT ×%.2f, PyTorch ×%.2f (ideal ×%.2f)", batch, tokens, row["ort"]["speedup"],
                     row["torch"]["speedup"], row["ideal_speedup"])

    weights = {n: weight_bytes_per_token(m) for n, m in models.items()}
    decode = []
    with tqdm(total=len(b.decode_batches) * 2 * b.iters_decode, desc="decode", unit="round") as bar:
        for batch in b.decode_batches:
            ids = prompts(windows, batch, b.decode_prompt)
            mask = np.ones_like(ids)
            row = {"batch": batch, "prompt": b.decode_prompt, "new_tokens": b.decode_new,
                   "ideal_speedup": weights["dense"] / weights["pruned"]}
            for runtime in ("ort", "torch"):
                if runtime == "ort":
                    calls = {n: (lambda s=s: greedy_generate_onnx(s, ids, mask, b.decode_new)) for n, s in sessions.items()}
                else:
                    calls = {n: (lambda m=m: greedy_generate_torch(m, ids, mask, b.decode_new)) for n, m in models.items()}
                times = time_interleaved(calls, 0, b.iters_decode, bar)
                rate = {n: batch * b.decode_new / float(np.median(t)) for n, t in times.items()}
                row[runtime] = {"dense_tokens_per_s": rate["dense"], "pruned_tokens_per_s": rate["pruned"],
                                "speedup": rate["pruned"] / rate["dense"]}
            decode.append(row)
            log.info("decode batch %d: ORT %.1f -> %.1f tok/s ×%.2f, PyTorch ×%.2f (ideal ×%.2f)", batch,
                     row["ort"]["dense_tokens_per_s"], row["ort"]["pruned_tokens_per_s"], row["ort"]["speedup"],
                     row["torch"]["speedup"], row["ideal_speedup"])

    out = {"provider": session_runs_on(sessions["dense"]), "threads": b.threads, "parity": parity,
           "prefill": prefill, "decode": decode, "weight_bytes_per_token": weights,
           "peak_rss_mb": round(peak_rss_mb(), 1)}
    write_json(layout.metrics / "speed.json", out)
    ref = next((r for r in prefill if (r["batch"], r["tokens"]) == tuple(b.reference)), prefill[0])
    return {"prefill_ort_speedup": f"{ref['ort']['speedup']:.2f}", "ideal": f"{ref['ideal_speedup']:.2f}"}


@torch.inference_mode()
def _torch_forward(model, ids):
    return model(input_ids=ids, use_cache=False).logits


if __name__ == "__main__":
    sys.exit(stage_main("lm_benchmark", run))
