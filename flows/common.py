"""What the Prefect flows share: running the pipeline as a DVC experiment (prune_pipeline) or one stage at a
time (the sweep's upstream stages), validating param overrides, the per-checkout lock, and reading an
experiment's files back.

DVC stays the one source of caching and lineage: a task never decides by itself whether a stage is stale. A
pipeline run is `dvc exp run --temp -S ...` (the checkout is untouched; the run cache restores unchanged stages);
a single stage is `dvc repro --single-item <stage>`, which skips it when unchanged and records what ran in
dvc.lock. So a flow run right after a finished `dvc repro` recomputes nothing, and vice versa.
"""

from __future__ import annotations

import os

# Before prefect is imported: its server's telemetry was its only network use, and the temporary local
# server started by a flow run inherits this environment.
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("DO_NOT_TRACK", "1")

import contextlib
import json
import re
import subprocess
import sys
from collections import deque
from pathlib import Path
from typing import Any, Iterator

import yaml
from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE

from pruneflow.params import Params, apply_overrides, read_raw, validate_params
from pruneflow.validate import check_all
from pruneflow.params import parse_overrides as parse_set  # noqa: F401  (the flows' CLI --set)

# The exit code of a stage's expected, user-fixable failure (pruneflow.runtime.stage_main): bad params,
# bad data, a missing file. Running it again gives the same error, so it is never retried.
USER_ERROR_EXIT = 2

# Retries per stage. Only stages whose failures can be transient get them: the heavy compute stages on a
# shared GPU worker can die of CUDA out-of-memory when another job holds the card, or be killed (OOM killer,
# preemption), or meet a DVC lock held for a moment by a `dvc status` on the same checkout. prepare (reads
# local files), select (deterministic FLOP counting) and export (a deterministic tolerance check) fail the
# same way every time, so a retry only delays the error. Stages not listed (e.g. ones a user adds) get none.
# Even on those stages only a transient-looking failure is retried (see is_transient): a params error or a bug
# would fail again, after the stage had burnt its compute time once more.
STAGE_RETRIES = {"finetune": 2, "collect": 2, "rank": 2, "correct": 2, "evaluate": 2, "benchmark": 2}
RETRY_DELAY_SECONDS = 30
TRANSIENT_SIGNS = re.compile(r"out of memory|CUDA error|cuDNN|NCCL|Unable to acquire lock|ConnectionError|"
                             r"Connection reset|Killed", re.IGNORECASE)


class StageError(RuntimeError):
    """A DVC stage failed; the message is the stage's own error (its `[stage] error: ...` lines)."""

    def __init__(self, stage: str, returncode: int, message: str, transient: bool = False):
        self.stage, self.returncode, self.message, self.transient = stage, returncode, message, transient
        super().__init__(f"stage {stage!r} failed (exit {returncode}): {message}")

    def __reduce__(self):  # picklable, for when Prefect persists a failed state's exception
        return StageError, (self.stage, self.returncode, self.message, self.transient)


def is_transient(returncode: int, lines: list[str]) -> bool:
    """Worth a retry: killed by a signal (OOM killer, preemption: exit < 0, 137, 143), or a failure whose
    output names a passing cause (CUDA out of memory, DVC's lock, a dropped connection). Never exit 2, the
    stages' "fix your params or data" code; not an ordinary exception (a bug repeats)."""
    if returncode == USER_ERROR_EXIT:
        return False
    if returncode < 0 or returncode in (137, 143):
        return True
    return any(TRANSIENT_SIGNS.search(line) for line in lines)


# ----------------------------------------------------------------------------------------- running DVC


def dvc_env() -> dict[str, str]:
    """Environment for DVC and the stages it starts: `python` must resolve to this interpreter's venv."""
    env = dict(os.environ)
    venv_bin = str(Path(sys.executable).parent)  # not resolved: a venv's python is a symlink
    env["PATH"] = venv_bin + os.pathsep + env.get("PATH", "")
    env.setdefault("PYTHONUNBUFFERED", "1")  # stage logs reach the task log as they happen
    env.setdefault("DVC_NO_ANALYTICS", "1")
    return env


def run_dvc(args: list[str], project_dir: str | Path, logger=None, tail: int = 200) -> tuple[int, list[str]]:
    """Run `dvc <args>` in project_dir with this venv's DVC, streaming its output (stage output included)
    line by line to `logger`. Returns the exit code and the last `tail` lines."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "dvc", *args], cwd=project_dir, env=dvc_env(),
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1,
    )
    lines: deque[str] = deque(maxlen=tail)
    assert proc.stdout is not None
    for raw in proc.stdout:
        line = raw.rstrip("\n")
        lines.append(line)
        if logger is not None and line.strip():
            is_error = line.startswith("ERROR") or re.match(r"^\[[\w-]+\] error:", line)
            (logger.error if is_error else logger.info)(line)
    return proc.wait(), list(lines)


def stage_error_message(stage: str, lines: list[str]) -> str:
    """The stage's own message: from its `[stage] error:` line up to DVC's closing `ERROR:` line. Without one
    (a crash with a traceback, a missing command), the last lines of output and DVC's error."""
    start = next((i for i, l in enumerate(lines) if re.match(rf"^\[{re.escape(stage)}\] error:", l)), None)
    if start is None:  # a stage that names itself differently still prints "[x] error:"
        start = next((i for i, l in enumerate(lines) if re.match(r"^\[[\w-]+\] error:", l)), None)
    if start is not None:
        own = []
        for line in lines[start:]:
            if line.startswith("ERROR:"):
                break
            own.append(line)
        return "\n".join(own).strip()
    # A crash (traceback) or a command that never started: the output's tail, then DVC's own error line.
    first_error = next((i for i, l in enumerate(lines) if l.startswith("ERROR")), len(lines))
    tail = [l for l in lines[:first_error] if l.strip()][-10:]
    return "\n".join(tail + lines[first_error:]).strip() or "no output"


def stage_exit_code(dvc_returncode: int, lines: list[str]) -> int:
    """The stage command's own exit code: DVC exits 255 on any failure and names the command's code in
    "ERROR: failed to reproduce 'x': failed to run: <cmd>, exited with 2". DVC's code when the command never ran."""
    for line in reversed(lines):
        found = re.search(r"exited with (-?\d+)", line)
        if line.startswith("ERROR") and found:
            return int(found.group(1))
    return dvc_returncode


def stage_status(stage: str, lines: list[str]) -> str:
    """What DVC did: 'ran', 'unchanged' (skipped), or 'restored' (outputs checked out from the run cache)."""
    text = "\n".join(lines)
    if f"Stage '{stage}' didn't change" in text:
        return "unchanged"
    if f"Stage '{stage}' is cached" in text:
        return "restored"
    return "ran"


def pipeline_stages(project_dir: str | Path) -> list[str]:
    """Stage names in dvc.yaml order (the file lists them upstream first)."""
    path = Path(project_dir) / "dvc.yaml"
    if not path.exists():
        raise FileNotFoundError(f"{path}: no dvc.yaml; pass project_dir= the pruneflow checkout (or a DVC project)")
    stages = (yaml.safe_load(path.read_text()) or {}).get("stages") or {}
    if not stages:
        raise ValueError(f"{path}: no stages defined")
    return list(stages)


def stages_through(project_dir: str | Path, last: str) -> list[str]:
    """The stages of dvc.yaml up to and including `last`."""
    stages = pipeline_stages(project_dir)
    if last not in stages:
        raise ValueError(f"stage {last!r} is not in {Path(project_dir) / 'dvc.yaml'} (it has: {', '.join(stages)})")
    return stages[: stages.index(last) + 1]


def retry_if_transient(task, task_run, state) -> bool:
    """Prefect's retry_condition_fn: retry a StageError only when it looks transient; anything else (the task
    itself failing, e.g. the worker losing its connection) may be retried."""
    exc = getattr(state, "data", None)
    return exc.transient if isinstance(exc, StageError) else True


@task(cache_policy=NO_CACHE)  # DVC decides what is stale, never Prefect's cache
def reproduce_stage(project_dir: str, stage: str) -> str:
    """`dvc repro --single-item <stage>`: DVC skips it when nothing it depends on changed."""
    logger = get_run_logger()
    returncode, lines = run_dvc(["repro", "--single-item", stage], project_dir, logger)
    if returncode != 0:
        code = stage_exit_code(returncode, lines)
        raise StageError(stage, code, stage_error_message(stage, lines), is_transient(code, lines))
    status = stage_status(stage, lines)
    logger.info("stage %s: %s", stage, status)
    return status


def stage_task(stage: str):
    """The Prefect task that reproduces `stage`, with that stage's retry policy (STAGE_RETRIES)."""
    retries = STAGE_RETRIES.get(stage, 0)
    return reproduce_stage.with_options(
        name=f"dvc-{stage}", task_run_name=stage, retries=retries,
        retry_delay_seconds=RETRY_DELAY_SECONDS if retries else 0,
        retry_condition_fn=retry_if_transient if retries else None,
    )


@task(cache_policy=NO_CACHE)
def dvc_transfer(project_dir: str, command: str, remote: str) -> None:
    """`dvc pull` / `dvc push` of outputs and the run cache, so workers sharing a remote share results.
    Transfers are network I/O, so they are retried."""
    args = [command, "--run-cache", "-r", remote]
    if command == "pull":
        args.append("--allow-missing")  # a fresh remote lacks what was never pushed: that is not an error
    returncode, lines = run_dvc(args, project_dir, get_run_logger())
    if returncode != 0:
        errors = [l for l in lines if l.startswith("ERROR")] or lines[-10:]
        raise RuntimeError(f"dvc {command} -r {remote} failed (exit {returncode}): " + "\n".join(errors))


dvc_pull = dvc_transfer.with_options(name="dvc-pull", retries=2, retry_delay_seconds=30)
dvc_push = dvc_transfer.with_options(name="dvc-push", retries=2, retry_delay_seconds=30)


# ------------------------------------------------------------------------------------------ parameters


def resolve_params(project_dir: str | Path, params_file: str = "params.yaml",
                   overrides: dict[str, Any] | None = None) -> Params:
    """Validate params_file with `overrides` applied exactly as a stage would (unknown keys, types, ranges,
    registered methods: the error names the key). Nothing is written: a run's overrides reach DVC as
    `dvc exp run -S` values, in the run's own workspace, never in the checkout's params file."""
    path = Path(project_dir) / params_file
    raw = read_raw(path)
    return check_all(validate_params(apply_overrides(raw, overrides or {}), f"{path} with overrides {overrides}"
                                     if overrides else str(path)))


def set_params_args(overrides: dict[str, Any] | None, params_file: str = "params.yaml") -> list[str]:
    """`-S key=value` arguments for `dvc exp run` (values as JSON, which DVC parses as YAML)."""
    prefix = "" if params_file == "params.yaml" else f"{params_file}:"
    args: list[str] = []
    for key, value in (overrides or {}).items():
        args += ["-S", f"{prefix}{key}={json.dumps(value)}"]
    return args


# ----------------------------------------------------------------------------------------- experiments

EXPERIMENT_NAME = re.compile(r"[^A-Za-z0-9_.-]+")


def experiment_name(run_name: str) -> str:
    """A git-ref-safe experiment name from a Prefect flow run's name (e.g. 'glorious-okapi')."""
    name = EXPERIMENT_NAME.sub("-", run_name).strip("-.") or "run"
    return name[:80]


def experiment_statuses(lines: list[str]) -> dict[str, str]:
    """What `dvc exp run` did per stage, in order: ran, unchanged (skipped) or restored (from the run cache)."""
    out: dict[str, str] = {}
    for line in lines:
        found = (re.match(r"Running stage '([^']+)'", line) or re.match(r"Stage '([^']+)' didn't change", line)
                 or re.match(r"Stage '([^']+)' is cached", line))
        if found:
            stage = found.group(1).split(":")[-1]
            out[stage] = "ran" if line.startswith("Running") else "unchanged" if "didn't change" in line else "restored"
    return out


@contextlib.contextmanager
def checkout_lock(project_dir: str | Path, what: str, logger=None, poll_seconds: float = 5.0) -> Iterator[None]:
    """One pruneflow run at a time per checkout. DVC's experiment setup takes the repository's lock, so a
    second run started meanwhile would fail; instead it waits here, saying for whom."""
    import fcntl
    import time

    path = Path(project_dir) / ".dvc" / "tmp" / "pruneflow-run.lock"
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+") as handle:
        waited = False
        while True:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if not waited and logger is not None:
                    handle.seek(0)
                    logger.warning("another pruneflow run holds %s (%s); waiting for it to finish", project_dir,
                                   handle.read().strip() or "unknown")
                waited = True
                time.sleep(poll_seconds)
        handle.seek(0)
        handle.truncate()
        handle.write(what)
        handle.flush()
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def run_experiment(project_dir: str, name: str, overrides: dict[str, Any] | None, params_file: str = "params.yaml",
                   logger=None, target: str | None = None) -> dict[str, str]:
    """`dvc exp run --temp -n <name> -S ...`: the whole pipeline in a temporary workspace (the checkout's
    params.yaml, metrics and outputs are untouched), kept as experiment `name`. DVC's run cache still decides
    what is stale: stages whose code, deps and params match an earlier run are restored, not recomputed.
    Returns each stage's status; raises StageError with the failing stage's own message. target: another
    pipeline's dvc.yaml (e.g. lm/dvc.yaml); None runs the project's dvc.yaml."""
    args = ["exp", "run", "--temp", "-n", name, *set_params_args(overrides, params_file), *([target] if target else [])]
    returncode, lines = run_dvc(args, project_dir, logger, tail=2000)
    statuses = experiment_statuses(lines)
    if returncode != 0:
        stage = next((s for s, st in reversed(list(statuses.items())) if st == "ran"), "experiment")
        code = stage_exit_code(returncode, lines)
        raise StageError(stage, code, stage_error_message(stage, lines), is_transient(code, lines))
    return statuses


def experiment_ref(project_dir: str | Path, name: str) -> str:
    """The git ref DVC keeps experiment `name` under (refs/exps/.../<name>)."""
    refs = subprocess.run(["git", "for-each-ref", "--format=%(refname)", "refs/exps"], cwd=project_dir,
                          capture_output=True, text=True, check=True).stdout.split()
    found = [r for r in refs if r.rsplit("/", 1)[-1] == name]
    if not found:
        raise RuntimeError(f"no DVC experiment named {name!r} in {project_dir} (dvc exp list)")
    return found[-1]


def experiment_file_reader(project_dir: str | Path, name: str, parse=json.loads):
    """read(rel) -> the file `rel` as committed in experiment `name` (parsed as JSON, or by `parse`; str for the
    text itself), or None where it has none."""
    ref = experiment_ref(project_dir, name)

    def read(rel: str):
        shown = subprocess.run(["git", "show", f"{ref}:{rel}"], cwd=project_dir, capture_output=True, text=True)
        return parse(shown.stdout) if shown.returncode == 0 else None

    return read
