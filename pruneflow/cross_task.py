"""Methods compared across tasks: accuracy loss (points below the task's dense model) per task and budget, its mean
over tasks and budgets (how the default is chosen), and each task's paired test against the baseline (McNemar on
the same eval sentences, from the task's sweep), so a gap inside the noise is never read as a win.

Pure functions over sweep rows (`pruneflow/sweep.py`'s metrics); stages/cross_task.py reads and writes.
"""

from __future__ import annotations

import io

import numpy as np

from pruneflow.stats_tests import mark

ACC = "accuracy_pruned"


def loss_points(row: dict) -> float:
    return 100.0 * (row["accuracy_dense"] - row[ACC])


def compare(tasks: dict[str, list[dict]], budgets: list[float], default: str, baseline: str,
            targets: dict[float, float]) -> dict:
    """tasks: task name -> its sweep rows. Methods run on every task at every budget are compared; returns
    per method the loss per (task, budget), the mean over all of them, the mean agreement, the verdict of its
    paired test against `baseline` per (task, budget), and the checks of `default` against `targets` (budget ->
    the most accuracy points it may lose on any task)."""
    cells = {t: {(r["method"], r["budget"]): r for r in rows} for t, rows in tasks.items()}
    methods = [m for m in dict.fromkeys(r["method"] for rows in tasks.values() for r in rows)
               if all((m, b) in cells[t] for t in tasks for b in budgets)]
    if not methods:
        raise ValueError(f"no method was swept on every task ({', '.join(tasks)}) at every budget {budgets}")
    table = {}
    for m in methods:
        loss = {t: {b: loss_points(cells[t][(m, b)]) for b in budgets} for t in tasks}
        verdict = {t: {b: cells[t][(m, b)].get("vs_baseline", {}).get(ACC, {}).get("verdict") for b in budgets}
                   for t in tasks}
        table[m] = {"loss": loss, "verdict": verdict,
                    "mean_loss": float(np.mean([v for per in loss.values() for v in per.values()])),
                    "mean_agreement": float(np.mean([cells[t][(m, b)]["agreement"] for t in tasks for b in budgets])),
                    "wins": sum(v == "better" for per in verdict.values() for v in per.values()),
                    "losses": sum(v == "worse" for per in verdict.values() for v in per.values())}
    best = min(methods, key=lambda m: table[m]["mean_loss"])
    checks = []
    if default in table:
        for t in tasks:
            for b, most in sorted(targets.items(), reverse=True):
                if b in budgets:
                    got = table[default]["loss"][t][b]
                    checks.append({"task": t, "budget": b, "loss_points": got, "at_most": most, "met": got <= most + 1e-9})
            worse = [b for b in budgets if table[default]["verdict"][t][b] == "worse"]
            checks.append({"task": t, "not_worse_than_baseline": not worse, "worse_at": worse})
    return {"tasks": list(tasks), "budgets": budgets, "default": default, "baseline": baseline, "best_by_mean": best,
            "methods": table, "checks": checks,
            "n_eval": {t: next(iter(cells[t].values()))["n_eval"] for t in tasks},
            "accuracy_dense": {t: next(iter(cells[t].values()))["accuracy_dense"] for t in tasks}}


def markdown(summary: dict) -> str:
    tasks, budgets, table = summary["tasks"], summary["budgets"], summary["methods"]
    out = io.StringIO()
    dense = ", ".join(f"{t} {100 * summary['accuracy_dense'][t]:.2f}% ({summary['n_eval'][t]} eval sentences)"
                      for t in tasks)
    out.write(f"Accuracy points lost against each task's dense model (dense: {dense}); mean over {len(tasks)} tasks × "
              f"budgets {', '.join(f'{b:g}' for b in budgets)}. ▲ / ▼: better / worse than `{summary['baseline']}` on "
              "that task and budget by McNemar's exact test on the same eval sentences (p < 0.05); no mark: within "
              "the noise.\n\n")
    order = sorted(table, key=lambda m: table[m]["mean_loss"])
    head = [f"{t} {b:g}" for t in tasks for b in budgets]
    out.write("| method | mean loss | mean agreement | " + " | ".join(head) + " |\n")
    out.write("|---|---|---|" + "---|" * len(head) + "\n")
    for m in order:
        row = table[m]
        vals = [f"{row['loss'][t][b]:.2f}{mark(row['verdict'][t][b])}" for t in tasks for b in budgets]
        name = f"**{m}**" if m == summary["default"] else m
        out.write(f"| {name} | {row['mean_loss']:.2f} | {100 * row['mean_agreement']:.1f}% | " + " | ".join(vals) + " |\n")
    best, default = summary["best_by_mean"], summary["default"]
    out.write(f"\nLowest mean loss: `{best}`" + (" (the default)." if best == default else
                                                 f"; the default is `{default}`.") + "\n")
    for c in summary["checks"]:
        if "budget" in c:
            out.write(f"- {c['task']} at {c['budget']:g}: default loses {c['loss_points']:.2f} points "
                      f"(target ≤ {c['at_most']:g}): {'met' if c['met'] else 'NOT met'}\n")
        else:
            out.write(f"- {c['task']}: default significantly worse than the baseline "
                      + ("nowhere\n" if c["not_worse_than_baseline"] else f"at {c['worse_at']}\n"))
    return out.getvalue()


def calib_sizes(tasks: dict[str, list[dict]], default: str, baseline: str) -> dict:
    """tasks: task name -> its calib_size rows. Per task, budget and calibration size: the default's accuracy loss,
    its difference from the baseline (points, + = the default is ahead) and that difference's paired verdict."""
    out = {}
    for t, rows in tasks.items():
        cell = {(r["calib_size"], r["method"], r["budget"]): r for r in rows}
        for (n, m, b), r in cell.items():
            base = cell.get((n, baseline, b))
            if m != default or base is None:
                continue
            out.setdefault(t, {}).setdefault(f"{b:g}", {})[str(n)] = {
                "loss_points": loss_points(r), "vs_baseline_points": 100.0 * (r[ACC] - base[ACC]),
                "verdict": r.get("vs_baseline", {}).get(ACC, {}).get("verdict")}
    return out


def calib_markdown(table: dict, default: str, baseline: str) -> str:
    cols = [(t, b) for t in table for b in table[t]]
    sizes = sorted({int(n) for t, b in cols for n in table[t][b]})
    out = io.StringIO()
    out.write(f"Accuracy points `{default}` loses against the dense model, by calibration sentences (in brackets: "
              f"`{default}` − `{baseline}`, ▲ / ▼ where McNemar's test calls it significant, p < 0.05).\n\n")
    out.write("| calibration sentences | " + " | ".join(f"{t} @ {b}" for t, b in cols) + " |\n")
    out.write("|---|" + "---|" * len(cols) + "\n")
    for n in sizes:
        vals = []
        for t, b in cols:
            c = table[t][b].get(str(n))
            vals.append("–" if c is None else
                        f"{c['loss_points']:.2f} ({c['vs_baseline_points']:+.2f}{mark(c['verdict'])})")
        out.write(f"| {n} | " + " | ".join(vals) + " |\n")
    return out.getvalue()
