"""Shared fixtures: a complete pruneflow project on a tiny random BERT and synthetic sentences.

The project links the real `stages/` and `pruneflow/` code and copies the real dvc.yaml, so `dvc repro` in it
runs exactly the pipeline a user runs, in seconds."""

from __future__ import annotations

import os
import random
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

# No model hub is reachable here: hub look-ups (datasets, transformers) must fail at once, not time out.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

from tiny import WORDS, tiny_bert, tiny_tokenizer

REPO = Path(__file__).resolve().parents[1]

TINY_PARAMS = {
    "prepare": {"source": "file", "path": "raw/sentences.jsonl", "eval_fraction": 0.25, "calib_size": 48},
    "finetune": {"base_model": "base", "epochs": 1, "batch_size": 8, "max_length": 24, "max_train_samples": 32},
    "collect": {"batch_size": 16, "max_length": 24, "time_forward": True},
    "rank": {"method": "obs", "chunk": 0.1},
    "select": {"budget": 0.6, "min_neurons": 2},
    "evaluate": {"batch_size": 16, "max_length": 24},
    "export": {"optimize": False},
    "benchmark": {"batch_sizes": [1, 2], "seq_lens": [8], "warmup": 0, "iters": 2, "reference": [2, 8]},
    "sweep": {"budgets": [0.8, 0.5], "methods": ["obs", "activation+uniform"]},
}


def synthetic_sentences(n: int = 160, seed: int = 0) -> list[dict]:
    """Sentences whose label is whether 'good'-ish words outnumber 'bad'-ish ones."""
    rng = random.Random(seed)
    pos, neg = ["good", "great", "fun"], ["bad", "awful", "dull"]
    rows = []
    for i in range(n):
        label = i % 2
        words = [rng.choice(WORDS) for _ in range(rng.randint(3, 18))]
        words += [rng.choice(pos if label else neg) for _ in range(2)]
        rng.shuffle(words)
        rows.append({"text": " ".join(words) + ".", "label": label})
    return rows


def make_tiny_project(root: Path, params: dict | None = None) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    for name in ("stages", "pruneflow"):
        (root / name).symlink_to(REPO / name)
    # The real dvc.yaml, less the `assets` stage: it downloads the packaged RT sentences from PyPI, and the tiny
    # project reads synthetic sentences instead (tests/test_assets.py covers that stage without the network).
    pipeline = yaml.safe_load((REPO / "dvc.yaml").read_text())
    del pipeline["stages"]["assets"]
    (root / "dvc.yaml").write_text(yaml.safe_dump(pipeline, sort_keys=False))
    from pruneflow.params import Params

    merged = Params().model_dump(mode="json")  # DVC wants every section a stage lists to be present
    for overrides in (TINY_PARAMS, params or {}):
        for k, v in overrides.items():
            merged[k].update(v)
    (root / "params.yaml").write_text(yaml.safe_dump(merged))
    (root / "raw").mkdir()
    import json

    (root / "raw/sentences.jsonl").write_text("\n".join(json.dumps(r) for r in synthetic_sentences()) + "\n")
    model = tiny_bert(layers=2)
    model.save_pretrained(str(root / "base"))
    tiny_tokenizer(root / "vocab").save_pretrained(str(root / "base"))
    subprocess.run([sys.executable, "-m", "dvc", "init", "--no-scm", "-q"], cwd=root, check=True)
    subprocess.run([sys.executable, "-m", "dvc", "config", "core.analytics", "false"], cwd=root, check=True)
    return root


def project_env() -> dict:
    """Environment for subprocesses in a tiny project: the repo on the path, the venv's python first."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), str(REPO / "tests"), env.get("PYTHONPATH", "")])
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", DO_NOT_TRACK="1", PREFECT_SERVER_ANALYTICS_ENABLED="false")
    return env


@pytest.fixture
def tiny_project(tmp_path) -> Path:
    return make_tiny_project(tmp_path / "project")


@pytest.fixture
def one_thread():
    """Tiny matrices: thread start-up costs more than the work, and the CPU is shared. Use it per module with
    `pytestmark = pytest.mark.usefixtures("one_thread")`."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
