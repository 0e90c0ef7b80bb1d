"""Deploy prune_pipeline on a schedule to the `gpu` work pool:  `python -m flows.deploy [--cron "0 3 * * *"]`.

Where the stages run: the deployment's runs go to the work pool `gpu` (type process). A worker started on the GPU
machine (`prefect worker start --pool gpu`) picks each run up and runs the whole flow there as a subprocess, so
every stage, the heavy ones (finetune, collect, rank, correct, evaluate, benchmark) included, runs next to the GPU
(runtime.device=auto picks CUDA) and next to the checkout's DVC cache. We route the whole flow rather than single
tasks: the stages hand each other multi-GB artifacts through data/, which only stays cheap on one disk.

Where the code comes from: by default this checkout's absolute path (a worker on this machine, or on machines
with the checkout at the same path); `--source <git url>` makes each run clone the repository instead, for
workers elsewhere, and then `--dvc-remote` lets them share artifacts through a DVC remote (pull before, push after).

`python -m flows.deploy` needs a running Prefect server (`prefect server start --host 127.0.0.1` and
PREFECT_API_URL=http://127.0.0.1:4200/api); it creates the pool when it is missing. build_deployment() needs no
server: it only builds the deployment object.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from flows.common import parse_set  # first: turns Prefect's telemetry off before prefect is imported
from flows.pipeline import PIPELINES, prune_pipeline
from prefect.deployments.runner import RunnerDeployment

from pruneflow.params import apply_overrides, read_raw, validate_params

REPO_ROOT = Path(__file__).resolve().parents[1]
ENTRYPOINT = "flows/pipeline.py:prune_pipeline"
DEFAULT_CRON = "0 3 * * *"  # nightly at 03:00 (server's time zone: UTC unless the schedule says otherwise)
DEFAULT_POOL = "gpu"
DEFAULT_NAME = "nightly"


def build_deployment(cron: str = DEFAULT_CRON, pool: str = DEFAULT_POOL, name: str = DEFAULT_NAME,
                     source: str | Path = REPO_ROOT, overrides: dict[str, Any] | None = None,
                     dvc_remote: str | None = None, pipeline: str = "default") -> RunnerDeployment:
    """The deployment of prune_pipeline: `cron` schedule, runs on work pool `pool`. Builds, applies nothing.

    source: the checkout the worker runs (a local path) or a git URL it clones for each run. The flow runs with
    project_dir="." inside it. pipeline: which pipeline each run reproduces (flows.pipeline.PIPELINES)."""
    if pipeline not in PIPELINES:
        raise ValueError(f"pipeline {pipeline!r}: choose one of {', '.join(PIPELINES)}")
    params_file = PIPELINES[pipeline].params_file
    if overrides and Path(source).is_dir():  # a bad override would otherwise fail every scheduled run
        resolve_params_dry(Path(source), overrides, params_file)
    flow = prune_pipeline.from_source(source=str(source), entrypoint=ENTRYPOINT) if source else prune_pipeline
    return flow.to_deployment(
        name=name, work_pool_name=pool, cron=cron,
        parameters={"project_dir": ".", "params_file": params_file, "overrides": overrides or None,
                    "dvc_remote": dvc_remote, "pipeline": pipeline},
        description=f"pruneflow {pipeline} pipeline ({source}), every '{cron}', on work pool '{pool}'",
        tags=["pruneflow"],
    )


def resolve_params_dry(project_dir: Path, overrides: dict[str, Any], params_file: str = "params.yaml") -> None:
    """Validate overrides against the checkout's params file without writing anything."""
    validate_params(apply_overrides(read_raw(project_dir / params_file), overrides), "deployment overrides")


def ensure_process_pool(pool: str) -> None:
    """Create work pool `pool` (type process, its default job template) unless it exists."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import WorkPoolCreate
    from prefect.exceptions import ObjectNotFound
    from prefect.workers.process import ProcessWorker

    with get_client(sync_client=True) as client:
        try:
            found = client.read_work_pool(pool)
        except ObjectNotFound:
            client.create_work_pool(WorkPoolCreate(
                name=pool, type="process", base_job_template=ProcessWorker.get_default_base_job_template()))
            print(f"created work pool {pool!r} (type process)")
            return
        if found.type != "process":
            print(f"note: work pool {pool!r} has type {found.type!r}, not 'process'", file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m flows.deploy", description=(__doc__ or "").split("\n")[0])
    parser.add_argument("--cron", default=DEFAULT_CRON, help=f"schedule (default {DEFAULT_CRON!r})")
    parser.add_argument("--pool", default=DEFAULT_POOL, help="work pool (default gpu)")
    parser.add_argument("--name", default=DEFAULT_NAME, help="deployment name (default nightly)")
    parser.add_argument("--source", default=str(REPO_ROOT), help="checkout path or git URL the worker runs")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="param override for every scheduled run, e.g. --set select.budget=0.4")
    parser.add_argument("--dvc-remote", default=None, help="dvc pull/push with this remote around each run")
    parser.add_argument("--pipeline", default="default", choices=sorted(PIPELINES),
                        help="default (the classifier), lm (structured pruning of the causal LM) or lm-sparse")
    args = parser.parse_args(argv)
    deployment = build_deployment(args.cron, args.pool, args.name, args.source, parse_set(args.overrides) or None,
                                  args.dvc_remote, args.pipeline)
    ensure_process_pool(args.pool)
    deployment_id = deployment.apply()
    print(f"deployment '{prune_pipeline.name}/{args.name}' ({deployment_id}): '{args.cron}' on pool {args.pool!r}\n"
          f"start a worker on the GPU machine:  prefect worker start --pool {args.pool}\n"
          f"run it now:                          prefect deployment run '{prune_pipeline.name}/{args.name}'")
    return 0


if __name__ == "__main__":
    sys.exit(main())
