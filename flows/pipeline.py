"""The pruneflow pipeline as a Prefect flow: the same DVC stages `dvc repro` runs, one Prefect task each.

    python -m flows.pipeline                                  # default params, temporary local Prefect server
    python -m flows.pipeline --set select.budget=0.4 --set rank.method=magnitude

Each task runs `dvc repro --single-item <stage>` in project_dir, so DVC alone decides what is stale and records
lineage in dvc.lock: after a finished `dvc repro` this flow recomputes nothing, and after this flow `dvc repro`
recomputes nothing. Prefect adds scheduling, retries, logs per stage and a results artifact.

How overrides reach DVC: they are validated with the whole params file exactly as a stage validates it, and
only then written into params_file (atomically, comments kept), because DVC reads params.yaml to decide what
changed. They stay there after the run, as with `dvc exp run -S`, so the workspace, dvc.lock and the outputs
agree. We do not use `dvc exp run -S`: it runs the whole pipeline as one command (no per-stage tasks, logs or
retries), needs a commit, and writes its results into the working files anyway.
Stages read params.yaml (their default --params); a different params_file only matters if dvc.yaml points there.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

# flows.common first: it turns Prefect's telemetry off before prefect is imported.
from flows.common import (
    USER_ERROR_EXIT, StageError, dvc_pull, dvc_push, parse_set, pipeline_stages, resolve_params,
    stage_task,
)
from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NO_CACHE

from pruneflow.params import Params, ParamsError
from pruneflow.report import results_markdown, results_table

RESULTS_ARTIFACT_KEY = "pruneflow-results"


# No retries: a params error is the user's to fix, and it must stop the flow before any stage runs.
@task(name="validate-params", cache_policy=NO_CACHE, retries=0)
def apply_params(project_dir: str, params_file: str, overrides: dict[str, Any] | None) -> Params:
    return resolve_params(project_dir, params_file, overrides)


# ------------------------------------------------------------------------------------------------ flow


@flow(name="prune-pipeline")
def prune_pipeline(project_dir: str = ".", params_file: str = "params.yaml",
                   overrides: dict[str, Any] | None = None, dvc_remote: str | None = None) -> dict[str, Any]:
    """Run the DVC stages of project_dir's dvc.yaml in order, one Prefect task each; publish the results table.

    overrides: dotted params, e.g. {"select.budget": 0.4, "rank.method": "magnitude"}; validated with the whole
    params file before anything runs, then written into params_file (DVC reads it).
    dvc_remote: a DVC remote name; when set, `dvc pull` before and `dvc push` after (outputs and run cache),
    so several workers on one pool share results instead of recomputing them.
    Returns the results table as a dict (None where a stage has not run) plus each stage's DVC status.
    """
    logger = get_run_logger()
    project = str(Path(project_dir).resolve())
    params = apply_params(project, params_file, overrides)
    stages = pipeline_stages(project)
    logger.info("stages (dvc.yaml order): %s", ", ".join(stages))
    if dvc_remote:
        dvc_pull(project, "pull", dvc_remote)
    statuses = {stage: stage_task(stage)(project, stage) for stage in stages}
    if dvc_remote:
        dvc_push(project, "push", dvc_remote)
    results = results_table(project, params)
    markdown = results_markdown(results, statuses)
    create_markdown_artifact(markdown=markdown, key=RESULTS_ARTIFACT_KEY,
                             description=f"pruneflow results, budget {results['budget']}, {project}")
    logger.info("\n%s", markdown)
    return results | {"stages": statuses, "markdown": markdown}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m flows.pipeline", description=(__doc__ or "").split("\n")[0])
    parser.add_argument("--project-dir", default=".", help="the DVC project (default: .)")
    parser.add_argument("--params", default="params.yaml", help="params file inside project-dir")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a param, e.g. --set select.budget=0.4 (written into the params file)")
    parser.add_argument("--dvc-remote", default=None, help="dvc pull before / dvc push after, with this remote")
    args = parser.parse_args(argv)
    try:
        results = prune_pipeline(project_dir=args.project_dir, params_file=args.params,
                                 overrides=parse_set(args.overrides) or None, dvc_remote=args.dvc_remote)
    except (ParamsError, StageError, ValueError, FileNotFoundError) as err:
        print(f"[flow] error: {err}", file=sys.stderr)  # the log above has the details
        return USER_ERROR_EXIT
    print(results["markdown"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
