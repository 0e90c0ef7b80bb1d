"""sweep: accuracy vs FLOP budget for several pruning configurations, in one run.

reads   data/dense, data/stats, data/prepared/eval.jsonl
writes  metrics/sweep.json, plots/sweep.csv (a dvc plots curve), plots/sweep.md (the README table),
        plots/sweep.png
params  sweep (grid), rank, select, correct, evaluate, runtime (defaults for what a point does not name)
A point's method spec is `<rank method>[+<allocation>][+<correction>][+seq|+noseq]`; what it does not name
comes from params.yaml (`+none` fits nothing, so it is never sequential). E.g. `obs`, `activation+noseq`, `magnitude+none`, `obs+error`.
Every point re-uses the one set of calibration statistics; each rank
method is computed once; the dense model's eval predictions once.
"""

from __future__ import annotations

import copy
import csv
import io
import logging
import sys
import time
from functools import lru_cache

from pruneflow.adapters import get_adapter
from pruneflow.artifacts import read_jsonl, write_json, write_text
from pruneflow.correction import METHODS as CORRECTIONS
from pruneflow.params import Params
from pruneflow.runtime import Layout, setup_torch, stage_main
from pruneflow.task import load_model, load_tokenizer, predict_logits

log = logging.getLogger("pruneflow.sweep")

ALLOCATIONS = ("uniform", "error")


def parse_spec(spec: str, params: Params) -> Params:
    """Params for one method spec, e.g. 'activation+uniform' = rank.method=activation, select.allocation=uniform."""
    method, *mods = spec.split("+")
    rank = params.rank.model_copy(update={"method": method})
    select, correct = params.select, params.correct
    for mod in mods:
        if mod in ALLOCATIONS:
            select = select.model_copy(update={"allocation": mod})
        elif mod in CORRECTIONS:
            correct = correct.model_copy(update={"method": mod})
        elif mod in ("seq", "noseq"):
            correct = correct.model_copy(update={"sequential": mod == "seq"})
        else:
            raise ValueError(f"sweep method {spec!r}: unknown modifier {mod!r} (allocations {ALLOCATIONS}, "
                             f"corrections {CORRECTIONS}, or seq/noseq)")
    return Params.model_validate(params.model_dump() | {"rank": rank.model_dump(), "select": select.model_dump(),
                                                        "correct": correct.model_dump()})


def points(params: Params) -> list[tuple[str, float]]:
    for spec in params.sweep.methods:
        parse_spec(spec, params)  # fail before any work on a bad spec
    return [(m, b) for m in params.sweep.methods for b in params.sweep.budgets]


class _Context:
    """What every point shares, loaded once per process."""

    def __init__(self, params: Params, layout: Layout):
        from stages.collect import load_statistics

        self.device = setup_torch(params)
        self.model = load_model(layout.dense)
        self.adapter = get_adapter(self.model)
        self.stats = load_statistics(layout, self.adapter.num_layers)
        self.tokenizer = load_tokenizer(layout.dense)
        rows = read_jsonl(layout.prepared / "eval.jsonl")
        self.texts, self.labels = [r["text"] for r in rows], [r["label"] for r in rows]
        self.dense_logits = predict_logits(self.model, self.tokenizer, self.texts, params.evaluate.batch_size,
                                           params.evaluate.max_length, self.device)
        self.rankings: dict[str, tuple[dict, float]] = {}
        self.traces: dict[str, object] = {}

    def dense_trace(self, p: Params, layout: Layout):
        """One dense pass over the calibration text, shared by every sequential point."""
        from pruneflow.sequential import DenseTrace
        from stages.collect import calibration_texts

        key = f"{p.correct.max_samples}/{p.collect.batch_size}/{p.collect.max_length}"
        if key not in self.traces:
            texts = calibration_texts(p, layout)[: p.correct.max_samples]
            self.traces[key] = DenseTrace(self.model, self.tokenizer, texts, p.collect.batch_size,
                                          p.collect.max_length, self.device, keep=True)
        return self.traces[key]


@lru_cache(maxsize=2)
def _context(params_json: str, root: str) -> _Context:
    return _Context(Params.model_validate_json(params_json), Layout(__import__("pathlib").Path(root)))


def run_point(params: Params, layout: Layout, method: str, budget: float) -> dict:
    """Prune at one (method spec, budget) in memory and evaluate; returns one table row."""
    from stages.correct import correct_from_stats
    from stages.evaluate import quality
    from stages.rank import rank_model
    from stages.select import resolve_seq_len, select_units

    ctx = _context(params.model_dump_json(), str(layout.root))
    p = parse_spec(method, params)
    p = p.model_copy(update={"select": p.select.model_copy(update={"budget": budget})})
    t0 = time.perf_counter()
    key = p.rank.model_dump_json()
    if key not in ctx.rankings:
        r0 = time.perf_counter()
        ctx.rankings[key] = (rank_model(ctx.adapter, ctx.stats, p.rank, progress=False), time.perf_counter() - r0)
    ranking, rank_seconds = ctx.rankings[key]
    sel = select_units(ctx.model, ctx.adapter, ranking, p.select, resolve_seq_len(p.select, layout))
    pruned_model = copy.deepcopy(ctx.model)
    pruned = get_adapter(pruned_model)
    pruned.slice_(sel["keep_heads"], sel["keep_neurons"])
    keep = {"attn": sel["keep_heads"], "ffn": sel["keep_neurons"]}
    if p.correct.sequential and p.correct.method != "none":
        from pruneflow.sequential import correct_sequential

        correct_sequential(pruned_model, p.correct, ctx.dense_trace(p, layout), ctx.device)
    else:
        correct_from_stats(ctx.adapter, pruned, ctx.stats, keep, p.correct)
    prune_seconds = time.perf_counter() - t0 + rank_seconds
    logits = predict_logits(pruned_model, ctx.tokenizer, ctx.texts, p.evaluate.batch_size, p.evaluate.max_length, ctx.device)
    q = quality(ctx.dense_logits, logits, ctx.labels)
    return {"method": method, "budget": budget, "flops_ratio": sel["flops_ratio"], **q,
            "accuracy_drop_points": 100 * (q["accuracy_dense"] - q["accuracy_pruned"]),
            "heads_per_layer": sel["heads_per_layer"], "neurons_per_layer": sel["neurons_per_layer"],
            "seconds": round(prune_seconds, 2)}


def markdown_table(rows: list[dict]) -> str:
    """Accuracy (agreement) per method and budget; dense accuracy in the header."""
    budgets = sorted({r["budget"] for r in rows}, reverse=True)
    methods = list(dict.fromkeys(r["method"] for r in rows))
    cell = {(r["method"], r["budget"]): r for r in rows}
    dense = rows[0]["accuracy_dense"] if rows else float("nan")
    out = io.StringIO()
    out.write(f"Eval accuracy % (agreement with dense %), dense = {100 * dense:.2f}%; columns: FLOP budget\n\n")
    out.write("| method | " + " | ".join(f"{b:g}" for b in budgets) + " |\n")
    out.write("|---|" + "---|" * len(budgets) + "\n")
    for m in methods:
        vals = [f"{100 * cell[(m, b)]['accuracy_pruned']:.2f} ({100 * cell[(m, b)]['agreement']:.1f})"
                if (m, b) in cell else "–" for b in budgets]
        out.write(f"| {m} | " + " | ".join(vals) + " |\n")
    return out.getvalue()


def write_report(rows: list[dict], layout: Layout, params: Params | None = None) -> None:
    write_json(layout.metrics / "sweep.json", {"points": rows})
    buf = io.StringIO()
    cols = ["method", "budget", "flops_ratio", "accuracy_pruned", "agreement", "accuracy_dense", "seconds"]
    w = csv.DictWriter(buf, fieldnames=cols, extrasaction="ignore")
    w.writeheader()
    w.writerows(rows)
    write_text(layout.plots / "sweep.csv", buf.getvalue())
    write_text(layout.plots / "sweep.md", markdown_table(rows))
    _plot(rows, layout)


def _plot(rows: list[dict], layout: Layout) -> None:
    """Accuracy vs FLOP fraction, one line per method: the full range, and a zoom on the methods near dense."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from pruneflow.artifacts import atomic_path

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    dense = 100 * rows[0]["accuracy_dense"] if rows else None
    for ax, zoom in zip(axes, (False, True)):
        for m in dict.fromkeys(r["method"] for r in rows):
            pts = sorted((r["flops_ratio"], 100 * r["accuracy_pruned"]) for r in rows if r["method"] == m)
            ax.plot(*zip(*pts), marker="o", ms=4, label=m)
        if dense is not None:
            ax.axhline(dense, color="gray", ls="--", lw=1, label="dense")
            if zoom:
                ax.set_ylim(dense - 4, dense + 0.7)
        ax.set_xlabel("FLOPs of pruned / dense (fvcore)")
        ax.set_ylabel("eval accuracy (%)")
        ax.set_title("zoom: within 4 points of dense" if zoom else "all methods")
        ax.grid(alpha=0.3)
    axes[1].legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    with atomic_path(layout.plots / "sweep.png", ".png") as tmp:
        fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)


def run(params: Params, layout: Layout) -> dict:
    """Every (method, budget) point of params.sweep, then the table, CSV and plot."""
    from tqdm.auto import tqdm

    rows = []
    for method, budget in tqdm(points(params), desc="sweep", unit="point"):
        rows.append(run_point(params, layout, method, budget))
        log.info("%-22s budget %.2f: acc %.4f agreement %.4f (flops %.3f)", method, budget,
                 rows[-1]["accuracy_pruned"], rows[-1]["agreement"], rows[-1]["flops_ratio"])
    write_report(rows, layout, params)
    print(markdown_table(rows))
    return {"points": len(rows)}


if __name__ == "__main__":
    sys.exit(stage_main("sweep", run))
