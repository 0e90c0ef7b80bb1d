"""dvc.yaml (and sweep/, lm/, datasets/dvc.yaml) list every repository file each stage's module imports, transitively, so
editing any of them re-runs the stages that use it (a stale result never looks current)."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from repo_imports import REPO, transitive_files


def _stages():
    """Every stage of every pipeline; a `foreach` stage once per entry of the repo's params.yaml `datasets`, with
    ${key} filled in as DVC does."""
    datasets = yaml.safe_load((REPO / "params.yaml").read_text()).get("datasets") or {}
    for dvc_file in ("dvc.yaml", "sweep/dvc.yaml", "lm/dvc.yaml", "datasets/dvc.yaml"):
        for name, stage in yaml.safe_load((REPO / dvc_file).read_text())["stages"].items():
            if "foreach" not in stage:
                yield dvc_file, name, stage
                continue
            assert stage["foreach"] == "${datasets}", f"{dvc_file} {name}: only foreach over datasets is expected"
            for key in datasets:
                text = yaml.safe_dump(stage["do"]).replace("${key}", key)
                yield dvc_file, f"{name}@{key}", yaml.safe_load(text)


@pytest.mark.parametrize("dvc_file,name,stage", list(_stages()), ids=lambda v: v if isinstance(v, str) else "")
def test_stage_lists_its_transitive_imports(dvc_file, name, stage):
    module = stage["cmd"].split("-m", 1)[1].split()[0]
    deps = {Path(d) for d in stage["deps"]}
    needed = {f for f in transitive_files(module) if f != Path("stages/__init__.py")}
    missing = sorted(str(f) for f in needed if not any(f == d or d in f.parents for d in deps))
    assert not missing, f"{dvc_file} stage {name!r} imports these files but does not list them in deps: {missing}"


def test_listed_code_deps_exist():
    for dvc_file, name, stage in _stages():
        for d in stage["deps"]:
            if d.endswith(".py") or d.startswith(("pruneflow/", "stages/")):
                assert (REPO / d).exists(), f"{dvc_file} stage {name!r} lists {d}, which does not exist"


def test_no_library_module_imports_a_stage_and_no_stage_imports_another():
    from repo_imports import direct_imports

    for path in (REPO / "pruneflow").rglob("*.py"):
        mod = ".".join(path.relative_to(REPO).with_suffix("").parts)
        bad = [m for m in direct_imports(path, mod.rsplit(".", 1)[0]) if m.startswith("stages")]
        assert not bad, f"{path.relative_to(REPO)} imports {bad}: library code must not import stages"
    for path in (REPO / "stages").glob("*.py"):
        bad = [m for m in direct_imports(path, "stages") if m.startswith("stages.") and m != "stages"]
        assert not bad, f"{path.relative_to(REPO)} imports {bad}: stages must not import each other"


def test_every_dep_is_tracked_by_git_or_produced_by_a_stage():
    """An experiment's temporary workspace (`dvc exp run --temp`, what the Prefect flows run) holds only what git
    tracks plus DVC outputs: a dep that is neither (an ignored, hand-downloaded file) fails there with 'No such
    file' although `dvc repro` in the checkout works."""
    import subprocess

    from pruneflow.params import Params

    tracked = subprocess.run(["git", "ls-files"], cwd=REPO, capture_output=True, text=True, check=True).stdout.split()
    tracked = {Path(t) for t in tracked}
    params = Params()
    outs = set()
    for _, _, stage in _stages():
        outs |= {Path(o if isinstance(o, str) else next(iter(o))) for o in stage.get("outs", []) + stage.get("metrics", [])}
    for dvc_file, name, stage in _stages():
        for d in stage["deps"]:
            if d == "${prepare.path}":
                d = params.prepare.path
            dep = Path(d)
            produced = any(dep == o or o in dep.parents or dep in o.parents for o in outs)
            in_git = dep in tracked or any(dep in t.parents for t in tracked)
            assert produced or in_git, (f"{dvc_file} stage {name!r} depends on {d}, which neither git tracks nor a "
                                        "stage produces: an experiment's workspace would not have it")
