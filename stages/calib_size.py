"""calib_size: how much unlabeled text pruning needs. The default and the baseline, each pruned from the first n
calibration sentences (statistics and sequential correction alike), for each n in sweep.calib_sizes.

reads   data/dense, data/prepared/{calib,eval}.jsonl
writes  metrics/calib_size.json, plots/calib_size.md (the README table), plots/calib_size.png
params  sweep (calib_sizes, calib_budgets, baseline, alpha), rank, select, correct, collect, evaluate, task,
        runtime
Per n: the statistics are collected block by block as the collect stage does (into a scratch folder, removed at
the end), then each (method, budget) point is pruned and evaluated by the sweep's run_point, and the default is
compared with the baseline on the same eval sentences (McNemar). The default is rank.method with nothing else
named; the baseline is sweep.baseline.
"""

from __future__ import annotations

import io
import logging
import os
import sys
import tempfile
from pathlib import Path

from tqdm.auto import tqdm

from pruneflow.adapters import get_adapter
from pruneflow.artifacts import atomic_path, write_json, write_text
from pruneflow.blockwalk import BlockWalk, Residency
from pruneflow.params import Params
from pruneflow.runtime import Layout, load_tokenizer, setup_torch, stage_main
from pruneflow.stats import write_statistics
from pruneflow.sweep import ITEMS, cell_text, paired_tests, release_contexts, run_point
from pruneflow.tasks import get_task

log = logging.getLogger("pruneflow.calib_size")


def collect_first(params: Params, layout: Layout, n: int, out: Layout) -> int:
    """Statistics of the first n calibration sentences into out.stats; returns how many there were."""
    task = get_task(params.task.kind)
    device = setup_torch(params)
    batches = task.calibration_batches(layout.prepared, load_tokenizer(layout.dense), params.collect, device)
    model = task.load_model(layout.dense, attn="sdpa").to(device)
    adapter = get_adapter(model)
    walk = BlockWalk(model, adapter, batches, Residency(model, adapter, device, "none"))
    return write_statistics(walk, out.stats, params.collect)[0].sequences


def run(params: Params, layout: Layout) -> dict:
    """Default vs baseline at sweep.calib_budgets, for every calibration size in sweep.calib_sizes."""
    task = get_task(params.task.kind)
    default, baseline = params.rank.method, params.sweep.baseline
    if baseline is None:
        raise ValueError("calib_size compares the default with sweep.baseline: set sweep.baseline")
    rows = []
    with tempfile.TemporaryDirectory(prefix="calib_size-") as tmp:
        for n in tqdm(params.sweep.calib_sizes, desc="calibration sizes", unit="size"):
            p = Params.model_validate(params.model_dump() | {"collect": params.collect.model_dump() | {"max_samples": n}})
            scratch = Layout(Path(tmp), f"n{n}", f"n{n}/metrics", f"n{n}/plots")
            (Path(tmp) / f"n{n}").mkdir()
            for src in (layout.dense, layout.prepared):
                os.symlink(src.resolve(), Path(tmp) / f"n{n}" / src.name)
            used = collect_first(p, layout, n, scratch)
            if used < n:
                log.warning("only %d calibration sentences, not %d: prepare.calib_size caps them", used, n)
            points = [run_point(p, scratch, m, b) | {"calib_size": n, "calib_sentences": used}
                      for b in params.sweep.calib_budgets for m in (default, baseline)]
            release_contexts()  # this size's model and dense trace, before the next size loads its own
            paired_tests(points, baseline, params.sweep.alpha, task)
            rows += points
            for r in points:
                log.info("n=%d %-18s budget %.2f: %s %.4f, %s %.4f", n, r["method"], r["budget"], task.primary.key,
                         r[task.primary.key], task.secondary.key, r[task.secondary.key])
    rows = [{k: v for k, v in r.items() if k != ITEMS} for r in rows]
    write_json(layout.metrics / "calib_size.json", {"default": default, "baseline": baseline, "points": rows})
    table = markdown(rows, default, baseline, task)
    write_text(layout.plots / "calib_size.md", table)
    _plot(rows, default, baseline, task, layout)
    print(table)
    return {"points": len(rows)}


def markdown(rows: list[dict], default: str, baseline: str, task) -> str:
    first, second = task.primary, task.secondary
    budgets = sorted({r["budget"] for r in rows}, reverse=True)
    sizes = sorted({r["calib_size"] for r in rows})
    cell = {(r["calib_size"], r["method"], r["budget"]): r for r in rows}
    out = io.StringIO()
    out.write(f"{first.title} ({second.title}) by calibration sentences, dense = {first.show(rows[0][first.dense_key])}"
              f"{'%' if first.percent else ''}. ▲ / ▼: `{default}` better / worse than `{baseline}` by "
              f"{task.paired_test} (p < alpha); no mark: within the noise.\n\n")
    head = [f"{m} @ {b:g}" for b in budgets for m in (default, baseline)]
    out.write("| calibration sentences | " + " | ".join(head) + " |\n|---|" + "---|" * len(head) + "\n")
    for n in sizes:
        vals = [cell_text(cell[(n, m, b)], task) if (n, m, b) in cell else "–"
                for b in budgets for m in (default, baseline)]
        out.write(f"| {n} | " + " | ".join(vals) + " |\n")
    return out.getvalue()


def _plot(rows: list[dict], default: str, baseline: str, task, layout: Layout) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    col = task.primary
    scale = 100 if col.percent else 1
    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    for b in sorted({r["budget"] for r in rows}, reverse=True):
        for m, style in ((default, "-"), (baseline, "--")):
            pts = sorted((r["calib_size"], scale * r[col.key]) for r in rows if r["method"] == m and r["budget"] == b)
            ax.plot(*zip(*pts), style, marker="o", ms=4, label=f"{m} @ {b:g}")
    ax.axhline(scale * rows[0][col.dense_key], color="gray", ls=":", lw=1, label="dense")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("calibration sentences")
    ax.set_ylabel(col.label)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    with atomic_path(layout.plots / "calib_size.png", ".png") as tmp:
        fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(stage_main("calib_size", run))
