"""The budget × method sweep as a Prefect flow: the same rows, table and plot as the DVC sweep (pruneflow/sweep.py).

    python -m flows.sweep                                     # params.yaml's sweep.budgets × sweep.methods
    python -m flows.sweep --set sweep.methods='[kcm, obs]' --set sweep.budgets='[0.5, 0.4]'

1. The shared upstream stages (prepare .. collect in dvc.yaml: what run_point reads, data/prepared, data/dense,
   data/stats) are reproduced through DVC, one task each, so the sweep starts from the same cached,
   lineage-tracked artifacts as `dvc repro`. (`upstream` names the last one, should run_point need more.)
2. One Prefect task per (method, budget) point calls pruneflow.sweep.run_point in this process, with this
   run's validated params (overrides are never written into params.yaml). Points write no DVC outputs, so no
   `dvc` command runs while they do. Overrides of what the upstream stages read (prepare, finetune, collect,
   task, runtime) are refused: the points read the upstream outputs made with the committed params.
3. pruneflow.sweep.write_report writes the table, CSV and plot into `sweeps/<flow run name>/` (not the
   committed metrics/ and plots/, which only `make sweep` writes); its table is published as a Prefect
   markdown artifact.

Points run one after another: on one worker they share the same GPU (or CPU cores), so running them in threads
of one process would not be faster. To spread a sweep over several workers, give each run a share of the
methods (--set sweep.methods=...). A failing point does not stop the others: the report holds every finished
row, and the flow then fails naming the points that did not finish.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from pathlib import Path
from typing import Any

# flows.common first: it turns Prefect's telemetry off before prefect is imported.
from flows.common import USER_ERROR_EXIT, experiment_name, parse_set, resolve_params, stage_task, stages_through
from pruneflow.report import markdown_table
from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NO_CACHE
from prefect.runtime import flow_run

from pruneflow.params import Params, ParamsError
from pruneflow.runtime import Layout

SWEEP_ARTIFACT_KEY = "pruneflow-sweep"


UPSTREAM_SECTIONS = ("prepare", "finetune", "collect", "task", "runtime")


def sweep_module():
    """pruneflow.sweep, imported when a sweep runs (points, run_point, write_report)."""
    return importlib.import_module("pruneflow.sweep")


def _retry_unless_deterministic(task, task_run, state) -> bool:
    # A params or data error repeats on every try; anything else (CUDA out of memory while another job holds
    # the GPU, a killed worker thread) may not.
    return not isinstance(getattr(state, "data", None), (ParamsError, ValueError, FileNotFoundError))


@task(name="sweep-point", cache_policy=NO_CACHE, retries=1, retry_delay_seconds=30,
      retry_condition_fn=_retry_unless_deterministic)
def sweep_point(project_dir: str, params: Params, method: str, budget: float) -> dict[str, Any]:
    return sweep_module().run_point(params, Layout(Path(project_dir)), method, budget)


@task(name="sweep-report", cache_policy=NO_CACHE)
def sweep_report(out_dir: str, params: Params, rows: list[dict[str, Any]]) -> None:
    """The report of this run only, under out_dir (metrics/ and plots/ inside it)."""
    sweep_module().write_report(rows, Layout(Path(out_dir)), params)


def sweep_markdown(rows: list[dict[str, Any]], failed: list[str], report_md: Path | None = None) -> str:
    """The DVC sweep's own table (plots/sweep.md, written by write_report) when there is one, else a plain
    table of the rows' scalar columns."""
    if report_md is not None and report_md.exists():
        text = "## pruneflow sweep\n\n" + report_md.read_text().rstrip("\n")
        return text + ("\n\nfailed points: " + "; ".join(failed) if failed else "") + "\n"
    columns: list[str] = []
    for row in rows:  # union of the rows' keys, in first-seen order (method, budget, flops_ratio, ...)
        columns += [k for k, v in row.items() if k not in columns and not isinstance(v, (list, dict))]
    fmt = lambda v: format(v, ".4g") if isinstance(v, float) else v  # noqa: E731
    text = "## pruneflow sweep\n\n" + markdown_table(columns, [[fmt(r.get(c)) for c in columns] for r in rows])
    if failed:
        text += "\n\nfailed points: " + "; ".join(failed)
    return text + "\n"


@flow(name="prune-sweep")
def prune_sweep(project_dir: str = ".", params_file: str = "params.yaml",
                overrides: dict[str, Any] | None = None, upstream: str = "collect") -> list[dict[str, Any]]:
    """Reproduce dvc.yaml's stages through `upstream` with DVC, then run every sweep point in-process and
    write the sweep report under sweeps/<flow run name>/. overrides (e.g. {"sweep.budgets": [0.5, 0.4]}) are
    validated and used by this run only. Returns the rows."""
    logger = get_run_logger()
    project = str(Path(project_dir).resolve())
    upstream_overrides = sorted(k for k in (overrides or {}) if k.split(".")[0] in UPSTREAM_SECTIONS)
    if upstream_overrides:
        raise ParamsError(f"the sweep flow reads the upstream stages' outputs made with the committed params; it "
                          f"cannot override {upstream_overrides} (run prune_pipeline with them, or commit them)")
    params = resolve_params(project, params_file, overrides)  # fails before anything runs; writes nothing
    for stage in stages_through(project, upstream):
        stage_task(stage)(project, stage)

    points = sweep_module().points(params)
    logger.info("%d sweep points", len(points))
    rows, failed = [], []
    for method, budget in points:
        state = sweep_point.with_options(task_run_name=f"{method}@{budget}")(
            project, params, method, budget, return_state=True)
        if state.is_completed():
            rows.append(state.result())
        else:
            failed.append(f"{method}@{budget}: {state.message}")
            logger.error("point %s@%s failed: %s", method, budget, state.message)

    out_dir = Path(project) / "sweeps" / experiment_name(flow_run.get_name() or "sweep")
    sweep_report(str(out_dir), params, rows)
    markdown = sweep_markdown(rows, failed, Layout(out_dir).plots / "sweep.md")
    markdown += f"\nreport files: {out_dir.relative_to(project)}/{{metrics,plots}}/\n"
    create_markdown_artifact(markdown=markdown, key=SWEEP_ARTIFACT_KEY, description=f"pruneflow sweep, {project}")
    if failed:
        raise RuntimeError(f"{len(failed)} of {len(points)} sweep points failed (report holds the rest): "
                           + "; ".join(failed))
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m flows.sweep", description=(__doc__ or "").split("\n")[0])
    parser.add_argument("--project-dir", default=".")
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a param, e.g. --set sweep.budgets='[0.5, 0.4]'")
    parser.add_argument("--upstream", default="collect", help="last DVC stage reproduced before the points")
    args = parser.parse_args(argv)
    try:
        rows = prune_sweep(project_dir=args.project_dir, params_file=args.params,
                           overrides=parse_set(args.overrides) or None, upstream=args.upstream)
    except (ParamsError, RuntimeError, ValueError, FileNotFoundError, ModuleNotFoundError) as err:
        print(f"[sweep-flow] error: {err}", file=sys.stderr)
        return USER_ERROR_EXIT
    print(sweep_markdown(rows, []))
    return 0


if __name__ == "__main__":
    sys.exit(main())
