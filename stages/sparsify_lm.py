"""sparsify_lm: weight sparsity on the causal LM, every method x pattern in one run, dense beside each.

reads   data/lm/dense, data/lm/prepared/windows.safetensors (calib: the windows pruning sees; eval: held-out text)
writes  metrics/sparse_lm.json (per point: perplexity, next-token agreement and KL vs dense, density, times,
        relative layer errors; APT vs SparseGPT paired on the eval windows), plots/sparse_lm.{csv,md,png};
        data/lm/sparse/{dense,compressed} for `sparsify.save` (sizes on disk in the metrics)
params  sparsify, lm.batch_size, runtime
"""

from __future__ import annotations

import copy
import logging
import sys
import time

import numpy as np
import torch
from tqdm import tqdm

from pruneflow.adapters import get_adapter
from pruneflow.artifacts import load_tensors, write_json, write_text
from pruneflow.tasks.causal_lm import DenseReference, lm_quality
from pruneflow.params import Params
from pruneflow.runtime import Layout, peak_rss_mb, setup_torch, stage_main
from pruneflow.sparsify import Pattern, check_sparsify_params, density, sparsify_model, sparsity_method
from pruneflow.stats_tests import paired_bootstrap, verdict

log = logging.getLogger("pruneflow")


def run(params: Params, layout: Layout) -> dict:
    """Prune a fresh copy of the dense LM per (pattern, method); evaluate each against the dense model."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    sp = params.sparsify
    check_sparsify_params(sp)
    device = setup_torch(params)
    dense_dir = layout.dense
    if not (dense_dir / "config.json").exists():
        raise FileNotFoundError(f"{dense_dir} not found: run lm_prepare first (dvc repro lm/dvc.yaml)")
    windows = load_tensors(layout.windows)
    calib, evalw, bs = windows["calib"], windows["eval"], params.lm.batch_size
    dense = AutoModelForCausalLM.from_pretrained(str(dense_dir), dtype=torch.float32).eval()
    get_adapter(dense)  # unsupported architectures fail before any work

    def batches():
        return ({"input_ids": calib[i:i + bs]} for i in range(0, len(calib), bs))

    # The yardstick for pruning time: the plain calibration forward passes through the blocks (the walk never
    # runs the LM head either); the faster of a pass before and one after all the pruning, so a noisy neighbour
    # on a shared machine inflates neither.
    forward_seconds = plain_forward_seconds(dense, batches)
    reference = DenseReference(dense, evalw, bs)
    log.info("calibration: %d x %d tokens, plain forward %.1fs; eval: %d x %d tokens", *calib.shape, forward_seconds,
             *evalw.shape)
    patterns = [Pattern.parse(p) for p in sp.patterns]
    rows, per_window = [], {}
    for pattern in patterns:
        for name in sp.methods:
            method = sparsity_method(name, sp.section(name))
            model = copy.deepcopy(dense)
            adapter = get_adapter(model)
            with tqdm(total=len(adapter.layers()), desc=f"{name} {pattern.label}", unit="block", leave=False) as bar:
                rep = sparsify_model(model, adapter, batches, method, pattern, progress=bar,
                                     device=device if device != "cpu" else None)
            q = lm_quality(reference, model, evalw, bs)
            per_window[(pattern.label, name)] = q.pop("window_nll")
            q.pop("window_agreement")
            errs = list(rep.errors.values())
            row = {"method": name, "pattern": pattern.label, **{k: round(v, 6) if isinstance(v, float) else v
                                                               for k, v in q.items()},
                   "perplexity_ratio": round(q["perplexity_pruned"] / q["perplexity_dense"], 4),
                   "density": round(density(model, rep.plan), 4),
                   "mean_rel_error": round(float(np.mean(errs)), 6) if errs else None,
                   "prune_seconds": round(rep.seconds, 1), "walk_forward_seconds": round(rep.forward_seconds, 1),
                   "solve_seconds": round(sum(rep.layer_seconds.values()), 1),
                   "prune_over_forward": round(rep.seconds / forward_seconds, 2)}
            rows.append(row)
            log.info("%-5s %-10s perplexity %.2f (dense %.2f) agreement %.4f KL %.4f density %.3f prune %.0fs (%.1fx forward)",
                     pattern.label, name, q["perplexity_pruned"], q["perplexity_dense"], q["next_token_agreement"],
                     q["kl_per_token"], row["density"], rep.seconds, row["prune_over_forward"])
            if sp.save == f"{name}@{pattern.label}":
                row["disk"] = save_sparse(model, rep.plan, AutoTokenizer.from_pretrained(str(dense_dir)), layout)
            del model
    (layout.root / layout.data / "sparse").mkdir(parents=True, exist_ok=True)  # a DVC output even when nothing is saved
    again = plain_forward_seconds(dense, batches)
    if again < forward_seconds:
        for r in rows:
            r["prune_over_forward"] = round(r["prune_seconds"] / again, 2)
        forward_seconds = again
    comparisons = {}
    for pattern in patterns:
        if ("apt", pattern.label) in {(r["method"], r["pattern"]) for r in rows} and \
                ("sparsegpt", pattern.label) in {(r["method"], r["pattern"]) for r in rows}:
            t = paired_bootstrap(per_window[(pattern.label, "apt")], per_window[(pattern.label, "sparsegpt")])
            t["verdict"] = verdict(t["p_value"], t["mean_diff"], True, "apt", "sparsegpt")
            comparisons[pattern.label] = t
    result = {"model": str(dense_dir), "calibration": list(calib.shape), "evaluation": list(evalw.shape),
              "forward_seconds": round(forward_seconds, 1), "points": rows,
              "apt_vs_sparsegpt_window_nll": comparisons, "peak_rss_mb": round(peak_rss_mb())}
    write_json(layout / "metrics/sparse_lm.json", result)
    write_csv(layout / "plots/sparse_lm.csv", rows)
    text = markdown(result, sp.methods, [p.label for p in patterns])
    write_text(layout / "plots/sparse_lm.md", text)
    plot(layout / "plots/sparse_lm.png", rows, sp.methods, [p.label for p in patterns], rows[0]["perplexity_dense"])
    print(text)
    return {"points": len(rows)}


@torch.inference_mode()
def plain_forward_seconds(model, batches) -> float:
    t0 = time.perf_counter()
    for enc in batches():
        getattr(model, model.base_model_prefix)(**enc)  # the blocks, without the LM head
    return time.perf_counter() - t0


def save_sparse(model, plan, tokenizer, layout: Layout) -> dict:
    """The chosen point as a plain checkpoint (zeros stored) and in the compressed-tensors format; sizes."""
    from pruneflow.sparse_export import save_compressed, save_dense_checkpoint, size_on_disk

    out = layout.root / layout.data / "sparse"
    save_dense_checkpoint(model, tokenizer, out / "dense")
    save_compressed(model, plan, out / "compressed", tokenizer)
    return size_on_disk(out / "dense", out / "compressed")


def write_csv(path, rows: list[dict]) -> None:
    keys = ["method", "pattern", "perplexity_pruned", "perplexity_ratio", "next_token_agreement", "kl_per_token",
            "density", "prune_seconds"]
    write_text(path, "\n".join([",".join(keys)] + [",".join(str(r[k]) for k in keys) for r in rows]) + "\n")


def markdown(result: dict, methods: list[str], patterns: list[str]) -> str:
    cell = {(r["method"], r["pattern"]): r for r in result["points"]}
    dense = result["points"][0]["perplexity_dense"]
    lines = [f"Perplexity on {result['evaluation'][0]} x {result['evaluation'][1]} held-out tokens (next-token "
             f"agreement with dense %), dense {dense:.2f}; calibration {result['calibration'][0]} x "
             f"{result['calibration'][1]} tokens", "",
             "| method | " + " | ".join(patterns) + " |", "|---|" + "---|" * len(patterns)]
    for m in methods:
        vals = [f"{cell[(m, p)]['perplexity_pruned']:.2f} ({100 * cell[(m, p)]['next_token_agreement']:.1f})"
                if (m, p) in cell else "" for p in patterns]
        lines.append(f"| {m} | " + " | ".join(vals) + " |")
    lines += ["", "Pruning seconds (x the plain calibration forward, "
              f"{result['forward_seconds']:.0f}s):", "", "| method | " + " | ".join(patterns) + " |",
              "|---|" + "---|" * len(patterns)]
    for m in methods:
        vals = [f"{cell[(m, p)]['prune_seconds']:.0f} ({cell[(m, p)]['prune_over_forward']:.1f}x)" if (m, p) in cell
                else "" for p in patterns]
        lines.append(f"| {m} | " + " | ".join(vals) + " |")
    if result["apt_vs_sparsegpt_window_nll"]:
        lines += ["", "APT − SparseGPT, mean NLL per eval window (paired bootstrap 95% interval, sign-flip p):", ""]
        for p, t in result["apt_vs_sparsegpt_window_nll"].items():
            lines.append(f"- {p}: {t['mean_diff']:+.4f} [{t['ci_low']:+.4f}, {t['ci_high']:+.4f}], p = "
                         f"{t['p_value']:.4f} over {t['items']} windows: {t['verdict']}")
    return "\n".join(lines) + "\n"


def plot(path, rows: list[dict], methods: list[str], patterns: list[str], dense: float) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from pruneflow.artifacts import atomic_path

    cell = {(r["method"], r["pattern"]): r["perplexity_pruned"] for r in rows}
    fig, ax = plt.subplots(figsize=(7, 4))
    width = 0.8 / max(len(methods), 1)
    for k, m in enumerate(methods):
        xs = [i + (k - (len(methods) - 1) / 2) * width for i in range(len(patterns))]
        ax.bar(xs, [cell.get((m, p), np.nan) for p in patterns], width, label=m)
    ax.axhline(dense, color="k", lw=1, ls="--", label=f"dense {dense:.1f}")
    ax.set_xticks(range(len(patterns)), patterns)
    ax.set_yscale("log")
    ax.set_ylabel("held-out perplexity (log)")
    ax.set_title("Weight sparsity on the LM: every Linear of every block")
    ax.legend(fontsize=8)
    fig.tight_layout()
    with atomic_path(path, ".png") as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(stage_main("sparsify_lm", run))
