"""The pruneflow pipeline as a Prefect flow: one flow run = one DVC experiment, in its own workspace.

    python -m flows.pipeline                                  # default params, temporary local Prefect server
    python -m flows.pipeline --set select.budget=0.4 --set rank.method=magnitude
    python -m flows.pipeline --pipeline lm --set select.budget=0.8    # structured pruning of the causal LM
    python -m flows.pipeline --pipeline lm-sparse --set 'sparsify.patterns=["2:4"]'   # its weight sparsity

A run validates its overrides with the whole params file (and the method/task registries) before anything
runs, then executes `dvc exp run --temp -n <flow run name> -S key=value ...`: DVC copies the committed
workspace into a temporary directory, applies the overrides there, runs the stages, and keeps the result as an
experiment named after the Prefect flow run. So
- the checkout's params.yaml, metrics and outputs are exactly as they were, whether the run succeeded, failed
  or was cancelled: the next scheduled run, with no overrides, uses the committed params;
- `dvc exp show` lists every run's params and metrics side by side, and `dvc exp apply <name>` /
  `dvc exp branch <name> <branch>` brings one back (the markdown artifact names the experiment);
- DVC's run cache still decides what is stale: stages whose code, deps and params match an earlier run (any
  experiment's, or the workspace's) are restored from the cache, not recomputed.
Trade-off against the earlier per-stage tasks: the stages run inside one DVC command, so Prefect sees one task
(its log streams every stage's output, and the per-stage status ran / unchanged / restored is parsed from it);
a transient failure retries the whole experiment, which the run cache turns into a resume from the failed
stage. Runs on one checkout queue on a lock (DVC's experiment setup holds the repository lock); for parallel
runs give each its own checkout (or `flows.deploy --source <git url>`, which clones per run).
`dvc exp run` needs a git repository with at least one commit, and runs the committed code plus the
checkout's uncommitted changes.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

# flows.common first: it turns Prefect's telemetry off before prefect is imported.
from flows.common import (
    RETRY_DELAY_SECONDS, USER_ERROR_EXIT, StageError, checkout_lock, dvc_pull, dvc_push, experiment_file_reader,
    experiment_name, parse_set, resolve_params, retry_if_transient, run_experiment,
)
from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NO_CACHE
from prefect.runtime import flow_run

from pruneflow.params import Params, ParamsError
from pruneflow.report import quality_markdown, results_markdown, results_table

RESULTS_ARTIFACT_KEY = "pruneflow-results"
EXPERIMENT_RETRIES = 2


@dataclass(frozen=True)
class Pipeline:
    target: str | None  # what `dvc exp run` reproduces (None: the project's dvc.yaml)
    params_file: str  # the params file its stages read (and overrides go to)
    table: str | None = None  # a markdown table its last stage writes, published as is
    quality: str | None = None  # else its quality.json (a results table by the task's headline keys)


# None of these: report.py's results table of the default pipeline (quality, latency, ONNX files).
PIPELINES = {
    "default": Pipeline(None, "params.yaml"),
    "lm": Pipeline("lm/dvc.yaml:evaluate", "lm/params.yaml", quality="metrics/lm/quality.json"),
    "lm-sparse": Pipeline("lm/dvc.yaml:sparsify_lm", "params.yaml", table="plots/sparse_lm.md"),
    "datasets": Pipeline("datasets/dvc.yaml:cross_task", "params.yaml", table="plots/cross_task.md"),
}


# No retries: a params error is the user's to fix, and it must stop the flow before any stage runs.
@task(name="validate-params", cache_policy=NO_CACHE, retries=0)
def apply_params(project_dir: str, params_file: str, overrides: dict[str, Any] | None) -> Params:
    return resolve_params(project_dir, params_file, overrides)


@task(name="dvc-exp-run", cache_policy=NO_CACHE, retries=EXPERIMENT_RETRIES, retry_delay_seconds=RETRY_DELAY_SECONDS,
      retry_condition_fn=retry_if_transient)
def experiment_task(project_dir: str, name: str, overrides: dict[str, Any] | None, params_file: str,
                    target: str | None = None) -> dict[str, str]:
    """The stages, as one DVC experiment in a temporary workspace; a failure names the stage that failed."""
    logger = get_run_logger()
    with checkout_lock(project_dir, f"experiment {name}", logger):
        statuses = run_experiment(project_dir, name, overrides, params_file, logger, target)
    logger.info("experiment %s: %s", name, ", ".join(f"{s} {st}" for s, st in statuses.items()))
    return statuses


# ------------------------------------------------------------------------------------------------ flow


@flow(name="prune-pipeline")
def prune_pipeline(project_dir: str = ".", params_file: str | None = None,
                   overrides: dict[str, Any] | None = None, dvc_remote: str | None = None,
                   experiment: str | None = None, pipeline: str = "default") -> dict[str, Any]:
    """Run the DVC pipeline of project_dir as one experiment named after this flow run; publish the results.

    overrides: dotted params, e.g. {"select.budget": 0.4, "rank.method": "magnitude"}; validated with the whole
    params file before anything runs, and applied to this run's experiment only.
    dvc_remote: a DVC remote name; when set, `dvc pull` before and `dvc push` after (outputs and run cache),
    so several workers on one pool share results instead of recomputing them.
    experiment: the experiment's name (default: this flow run's name).
    pipeline: which DVC pipeline: "default" (dvc.yaml, the classifier), "lm" (lm/dvc.yaml through evaluate:
    structured pruning of the causal LM, params in lm/params.yaml), "datasets" (every classifier task of params
    `datasets` swept and compared with the RT sweep: plots/cross_task.md) or "lm-sparse" (lm/dvc.yaml's sparsify_lm:
    weight sparsity of the causal LM); the same flow and experiment mechanics each time.
    params_file: default: the pipeline's own (params.yaml; lm/params.yaml for "lm").
    Returns the results table as a dict (None where a stage has not run), each stage's status and the
    experiment's name.
    """
    logger = get_run_logger()
    if pipeline not in PIPELINES:
        raise ValueError(f"pipeline {pipeline!r}: choose one of {', '.join(PIPELINES)}")
    spec = PIPELINES[pipeline]
    params_file = params_file or spec.params_file
    project = str(Path(project_dir).resolve())
    params = apply_params(project, params_file, overrides)
    name = experiment_name(experiment or flow_run.get_name() or "run")
    if dvc_remote:
        dvc_pull(project, "pull", dvc_remote)
    statuses = experiment_task(project, name, overrides, params_file, spec.target)
    if dvc_remote:
        dvc_push(project, "push", dvc_remote)
    if spec.table is None and spec.quality is None:
        results = results_table(project, params, experiment_file_reader(project, name))
        markdown = results_markdown(results, statuses, name)
    else:
        if spec.table is not None:
            table = experiment_file_reader(project, name, parse=str)(spec.table)
            results = {"budget": None, "table": table}
            body = table or f"({spec.table} was not written)"
        else:
            quality = experiment_file_reader(project, name)(spec.quality)
            results = {"budget": (quality or {}).get("budget"), "quality": quality}
            body = quality_markdown(quality, params.task.kind) if quality else f"({spec.quality} was not written)"
        markdown = (f"## pruneflow results ({pipeline} pipeline), experiment {name}\n\n" + body + "\n\nstages: "
                    + ", ".join(f"{s} {st}" for s, st in statuses.items()))
    create_markdown_artifact(markdown=markdown, key=RESULTS_ARTIFACT_KEY,
                             description=f"pruneflow results ({pipeline}), experiment {name}, budget {results['budget']}, {project}")
    logger.info("\n%s", markdown)
    return results | {"stages": statuses, "experiment": name, "markdown": markdown}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m flows.pipeline", description=(__doc__ or "").split("\n")[0])
    parser.add_argument("--project-dir", default=".", help="the DVC project, a git checkout (default: .)")
    parser.add_argument("--params", default=None, help="params file inside project-dir (default: the pipeline's "
                                                        "own: params.yaml, or lm/params.yaml for --pipeline lm)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a param for this run only, e.g. --set select.budget=0.4")
    parser.add_argument("--dvc-remote", default=None, help="dvc pull before / dvc push after, with this remote")
    parser.add_argument("--experiment", default=None, help="experiment name (default: the flow run's name)")
    parser.add_argument("--pipeline", default="default", choices=sorted(PIPELINES),
                        help="default: dvc.yaml (the classifier); lm: structured pruning of the causal LM "
                             "(lm/dvc.yaml, lm/params.yaml); lm-sparse: weight sparsity of the causal LM; datasets: "
                             "the cross-task comparison (datasets/dvc.yaml)")
    args = parser.parse_args(argv)
    try:
        results = prune_pipeline(project_dir=args.project_dir, params_file=args.params,
                                 overrides=parse_set(args.overrides) or None, dvc_remote=args.dvc_remote,
                                 experiment=args.experiment, pipeline=args.pipeline)
    except (ParamsError, StageError, ValueError, FileNotFoundError, RuntimeError) as err:
        print(f"[flow] error: {err}", file=sys.stderr)  # the log above has the details
        return USER_ERROR_EXIT
    print(results["markdown"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
