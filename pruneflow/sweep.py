"""The budget × method sweep: prune at every (method spec, budget) point in memory and evaluate, sharing the
calibration statistics, each ranking, the dense predictions and the dense trace of the sequential correction.

A point's method spec is `<rank method>[+<allocation>][+<correction>][+seq|+noseq]`; what it does not name
comes from params.yaml (`+none` fits nothing, so it is never sequential). E.g. `obs`, `activation+noseq`,
`magnitude+none`, `obs+error`.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import tempfile
import time
import typing
from functools import lru_cache
from pathlib import Path

from pruneflow.adapters import get_adapter
from pruneflow.artifacts import atomic_path, write_json, write_text
from pruneflow.correction import METHODS as CORRECTIONS
from pruneflow.cost import make_cost
from pruneflow.methods import METHODS
from pruneflow.params import Params, SelectParams
from pruneflow.pruning import prune_to_selection, uses_sequential
from pruneflow.ranking import rank_model
from pruneflow.runtime import Layout, setup_torch
from pruneflow.selection import resolve_seq_len, select_units
from pruneflow.stats import load_statistics
from pruneflow.tasks import get_task

ALLOCATIONS = typing.get_args(SelectParams.model_fields["allocation"].annotation)
log = logging.getLogger("pruneflow.sweep")


def parse_spec(spec: str, params: Params) -> Params:
    """Params for one method spec, e.g. 'activation+uniform' = rank.method=activation, select.allocation=uniform."""
    method, *mods = spec.split("+")
    update = {"rank": params.rank.model_dump() | {"method": method}, "select": params.select.model_dump(),
              "correct": params.correct.model_dump()}
    for mod in mods:
        if mod in ALLOCATIONS:
            update["select"]["allocation"] = mod
        elif mod in CORRECTIONS:
            update["correct"]["method"] = mod
        elif mod in ("seq", "noseq"):
            update["correct"]["sequential"] = mod == "seq"
        else:
            raise ValueError(f"sweep method {spec!r}: unknown modifier {mod!r} (allocations {ALLOCATIONS}, "
                             f"corrections {CORRECTIONS}, or seq/noseq)")
    return Params.model_validate(params.model_dump() | update)


def points(params: Params) -> list[tuple[str, float]]:
    for spec in params.sweep.methods:
        parse_spec(spec, params)  # fail before any work on a bad spec
    return [(m, b) for m in params.sweep.methods for b in params.sweep.budgets]


class _Context:
    """What every point shares, loaded once per process."""

    def __init__(self, params: Params, layout: Layout):
        self.task = get_task(params.task.kind)
        self.device = setup_torch(params)
        self.model = self.task.load_model(layout.dense)
        self.adapter = get_adapter(self.model)
        self.stats = load_statistics(layout.stats)
        from transformers import AutoTokenizer

        self.tokenizer = AutoTokenizer.from_pretrained(str(layout.dense))
        self.reference = self.task.reference(self.model, layout.prepared, self.tokenizer, params.evaluate, self.device)
        self.rankings: dict[str, tuple[dict, float]] = {}
        self.traces: dict[str, object] = {}
        self.probes: dict[str, object] = {}
        self.spill_dirs: list[tempfile.TemporaryDirectory] = []  # removed with the context

    def probe(self, p: Params, layout: Layout, ranking_key: str, ranking: dict):
        """The sensitivity allocation's probe for one ranking and closed-form refit, shared by every point that
        uses them (it memoises the loss rises per neuron count, so a budget is probed once)."""
        from pruneflow.sensitivity import LayerProbe

        key = json.dumps([ranking_key, p.select.probe_ridge, p.select.probe_samples, p.collect.batch_size])
        if key not in self.probes:
            batches = self.task.calibration_batches(layout.prepared, self.tokenizer, p.collect, self.device,
                                                    p.select.probe_samples)
            self.probes[key] = LayerProbe(self.model, self.adapter, self.stats, ranking, batches, self.task,
                                          "lstsq", p.select.probe_ridge)
        return self.probes[key]

    def dense_trace(self, p: Params, layout: Layout):
        """One dense pass over the calibration text, shared by every sequential point. Its targets (two copies of
        the calibration hidden states per layer) stay in memory when they take at most TRACE_MEMORY_SHARE of the
        memory available now, and go to a temporary directory beside the data otherwise (SmolLM2 at 256
        windows: 18 GB), read back layer by layer by each later point."""
        from pruneflow.sequential import DenseTrace

        key = f"{p.correct.max_samples}/{p.collect.batch_size}/{p.collect.max_length}"
        if key not in self.traces:
            batches = self.task.refit_batches(layout.prepared, self.tokenizer, p.collect, self.device,
                                              p.correct.max_samples, token_cap=False)
            trace = DenseTrace(self.model, batches, self.device, keep=True)
            if trace.kept_bytes > TRACE_MEMORY_SHARE * available_memory(self.device):
                self.spill_dirs.append(tempfile.TemporaryDirectory(prefix=".dense-trace-", dir=layout / layout.data))
                trace.spill_dir = Path(self.spill_dirs[-1].name)
                log.info("the dense trace's targets (%.1f GB) are kept on disk in %s", trace.kept_bytes / 1e9,
                         trace.spill_dir)
            self.traces[key] = trace
        return self.traces[key]


# The sweep's dense trace is held in memory up to this share of the memory available when it is made.
TRACE_MEMORY_SHARE = 0.5


def available_memory(device: str) -> int:
    """Bytes free now where the trace's tensors live: the GPU's free memory, or the machine's available RAM."""
    if str(device).startswith("cuda"):
        import torch

        return torch.cuda.mem_get_info(torch.device(device))[0]
    import psutil

    return psutil.virtual_memory().available


# What a context reads of the params. The points of a sweep (or of benchmarks.lm_heads) differ in rank, select
# and correct, which the context must not be keyed on: each new key loads the model, its eval reference and its
# dense trace again.
CONTEXT_SECTIONS = {"task", "runtime", "evaluate"}


@lru_cache(maxsize=2)
def _context(params_json: str, layout: Layout) -> _Context:
    return _Context(Params.model_validate_json(params_json), layout)


def context(params: Params, layout: Layout) -> _Context:
    """The shared context of every point on `layout` with these task, runtime and evaluate params."""
    return _context(params.model_dump_json(include=CONTEXT_SECTIONS), layout)


def release_contexts() -> None:
    """Drop the loaded contexts (model, statistics, dense traces with every layer's targets): a caller moving on to
    other data (calib_size, size after size) then holds one at a time."""
    _context.cache_clear()


def run_point(params: Params, layout: Layout, method: str, budget: float) -> dict:
    """Prune at one (method spec, budget) in memory and evaluate; returns one table row."""
    ctx = context(params, layout)
    p = parse_spec(method, params)
    p = p.model_copy(update={"select": p.select.model_copy(update={"budget": budget})})
    t0 = time.perf_counter()
    seq_len = resolve_seq_len(p.select.seq_len, ctx.stats.info())
    key = p.rank.model_dump_json()
    if METHODS[p.rank.method].global_plan:  # it searches for this very budget, in this cost, and reads no more
        key += json.dumps([p.select.budget, p.select.cost, p.select.tolerance, seq_len])
    if key not in ctx.rankings:
        r0 = time.perf_counter()
        calibration = lambda: ctx.task.calibration_batches(layout.prepared, ctx.tokenizer, p.collect, ctx.device)  # noqa: E731
        ctx.rankings[key] = (rank_model(ctx.adapter, ctx.stats, p.rank, progress=False, calibration=calibration,
                                        task=ctx.task, select=p.select, seq_len=seq_len), time.perf_counter() - r0)
    ranking, rank_seconds = ctx.rankings[key]
    probe = ctx.probe(p, layout, key, ranking) if p.select.allocation == "sensitivity" else None
    sel = select_units(ctx.model, ctx.adapter, ranking, p.select, make_cost(p.select.cost, seq_len, p.select.tolerance),
                       seq_len, probe)
    trace = (lambda: ctx.dense_trace(p, layout)) if uses_sequential(p.correct) else None
    pruned_model, _, _ = prune_to_selection(ctx.model, ctx.stats, sel, p.correct, ctx.device, trace)
    prune_seconds = time.perf_counter() - t0 + rank_seconds
    q, items = ctx.task.compare(ctx.reference, pruned_model, p.evaluate, ctx.device)
    items = {k: v.tolist() for k, v in items.items()}
    return {"method": method, "budget": budget, "flops_ratio": sel["flops_ratio"], **q,
            "heads_per_layer": sel["heads_per_layer"], "neurons_per_layer": sel["neurons_per_layer"],
            "seconds": round(prune_seconds, 2), ITEMS: items}


ITEMS = "_items"  # per eval item outcomes, for the paired tests; not written to the metrics


def paired_tests(rows: list[dict], baseline: str | None, alpha: float = 0.05, task=None) -> None:
    """Add `vs_baseline` to every row of a method other than `baseline`, per quality key the task gives items
    for, on the same eval items: McNemar's exact test where an item's outcome is right/wrong (accuracy: right;
    agreement: agrees with dense), a paired bootstrap of the mean difference where it is a number (a window's
    NLL or agreement); with a verdict that calls a difference inside the noise so."""
    from pruneflow.stats_tests import mcnemar, paired_bootstrap

    task = task or get_task("classification")
    higher = {c.key: c.higher_is_better for c in (task.primary, task.secondary)}
    base = {r["budget"]: r for r in rows if r["method"] == baseline}
    for r in rows:
        b = base.get(r["budget"])
        if r["method"] == baseline or b is None or ITEMS not in r or ITEMS not in b:
            continue
        tests = {}
        for key, mine in r[ITEMS].items():
            if key not in b[ITEMS]:
                continue
            if all(isinstance(v, bool) for v in mine):
                t = mcnemar(mine, b[ITEMS][key])
                better = t["a_only"] > t["b_only"]
            else:
                t = paired_bootstrap(mine, b[ITEMS][key])
                better = (t["mean_diff"] > 0) == higher.get(key, True)
            t["verdict"] = "within noise" if t["p_value"] >= alpha else "better" if better else "worse"
            tests[key] = t
        r["vs_baseline"] = {"baseline": baseline, **tests}


def _mark(row: dict, key: str) -> str:
    from pruneflow.stats_tests import mark

    return mark(row.get("vs_baseline", {}).get(key, {}).get("verdict"))


def cell_text(row: dict, task) -> str:
    """One table cell: the task's main figure (its second in brackets), each with its paired-test mark."""
    first, second = task.primary, task.secondary
    return (f"{first.show(row[first.key])}{_mark(row, first.key)} "
            f"({second.show(row[second.key], 1)}{_mark(row, second.key)})")


def markdown_table(rows: list[dict], task=None) -> str:
    """The task's main figure (its second in brackets) per method and budget; the dense value in the header;
    ▲/▼ where a paired test says the method is better/worse than the baseline at that budget (no mark: within
    noise)."""
    task = task or get_task("classification")
    first, second = task.primary, task.secondary
    budgets = sorted({r["budget"] for r in rows}, reverse=True)
    methods = list(dict.fromkeys(r["method"] for r in rows))
    cell = {(r["method"], r["budget"]): r for r in rows}
    dense = rows[0][first.dense_key] if rows else float("nan")
    out = io.StringIO()
    out.write(f"{first.title} ({second.title}), dense = {first.show(dense)}{'%' if first.percent else ''}; "
              "columns: FLOP budget\n\n")
    baseline = next((r["vs_baseline"]["baseline"] for r in rows if "vs_baseline" in r), None)
    if baseline:
        out.write(f"▲ / ▼: better / worse than `{baseline}` at the same budget by {task.paired_test} "
                  "(p < alpha); no mark: the difference is within the noise.\n\n")
    out.write("| method | " + " | ".join(f"{b:g}" for b in budgets) + " |\n")
    out.write("|---|" + "---|" * len(budgets) + "\n")
    for m in methods:
        vals = [cell_text(cell[(m, b)], task) if (m, b) in cell else "–" for b in budgets]
        out.write(f"| {m} | " + " | ".join(vals) + " |\n")
    return out.getvalue()


def write_report(rows: list[dict], layout: Layout, params: Params | None = None) -> None:
    params = params or Params()
    task = get_task(params.task.kind)
    paired_tests(rows, params.sweep.baseline, params.sweep.alpha, task)
    rows = [{k: v for k, v in r.items() if k != ITEMS} for r in rows]
    write_json(layout.metrics / "sweep.json", {"points": rows})
    buf = io.StringIO()
    cols = ["method", "budget", "flops_ratio", task.primary.key, task.secondary.key, task.primary.dense_key, "seconds"]
    w = csv.DictWriter(buf, fieldnames=cols, extrasaction="ignore")
    w.writeheader()
    w.writerows(rows)
    write_text(layout.plots / "sweep.csv", buf.getvalue())
    write_text(layout.plots / "sweep.md", markdown_table(rows, task))
    _plot(rows, layout, task)


def _plot(rows: list[dict], layout: Layout, task) -> None:
    """The task's main figure vs FLOP fraction, one line per method: the full range, and a zoom on the methods
    near dense (within 4 points of accuracy, or 1.5× the dense perplexity)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    col = task.primary
    scale = 100 if col.percent else 1
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    dense = scale * rows[0][col.dense_key] if rows else None
    for ax, zoom in zip(axes, (False, True)):
        for m in dict.fromkeys(r["method"] for r in rows):
            pts = sorted((r["flops_ratio"], scale * r[col.key]) for r in rows if r["method"] == m)
            ax.plot(*zip(*pts), marker="o", ms=4, label=m)
        if dense is not None:
            ax.axhline(dense, color="gray", ls="--", lw=1, label="dense")
            if zoom:
                ax.set_ylim(*((dense - 4, dense + 0.7) if col.higher_is_better else (dense * 0.98, dense * 1.5)))
        if not col.higher_is_better and not zoom:
            ax.set_yscale("log")
        ax.set_xlabel("FLOPs of pruned / dense (fvcore)")
        ax.set_ylabel(col.label)
        near = "within 4 points of dense" if col.higher_is_better else f"up to 1.5× the dense {col.label}"
        ax.set_title(f"zoom: {near}" if zoom else "all methods")
        ax.grid(alpha=0.3)
    axes[1].legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    with atomic_path(layout.plots / "sweep.png", ".png") as tmp:
        fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)
