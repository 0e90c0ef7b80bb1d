"""assets: fetch the packaged real data the default pipeline reads, pinned and checksummed.

reads   the package registry (PyPI): the vadersentiment 3.3.2 *source* distribution, which holds the Rotten
        Tomatoes sentences (its wheel does not)
writes  assets/vaderSentiment-3.3.2.tar.gz (a DVC output, so an experiment's temporary workspace, which holds
        only what git or DVC tracks, gets it from the DVC cache instead of downloading it again)
params  none
"""

from __future__ import annotations

import hashlib
import subprocess
import sys
import tempfile
from pathlib import Path

from pruneflow.params import Params
from pruneflow.runtime import Layout, stage_main

# name, pip requirement, sha256 of the file pip downloads (checked: a changed upload must not change our data)
ASSETS = [("vaderSentiment-3.3.2.tar.gz", "vadersentiment==3.3.2",
           "5d7c06e027fc8b99238edb0d53d970cf97066ef97654009890b83703849632f9")]


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def fetch(name: str, requirement: str, expected: str, dest_dir: Path) -> Path:
    """pip-download `requirement`'s sdist into a temp dir, check its hash, move it to dest_dir/name."""
    dest_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=dest_dir) as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--no-binary", ":all:", requirement, "-d", tmp]
        result = subprocess.run(cmd, capture_output=True, text=True)
        got = Path(tmp) / name
        if result.returncode != 0 or not got.is_file():
            raise FileNotFoundError(f"could not download {requirement} from the package index "
                                    f"({result.stderr.strip()[-300:] or 'no file'}); check the network or pip config")
        if sha256(got) != expected:
            raise ValueError(f"{requirement}: downloaded {name} has sha256 {sha256(got)}, expected {expected}")
        got.replace(dest_dir / name)  # same filesystem: atomic
    return dest_dir / name


def run(params: Params, layout: Layout) -> dict:
    """Download the pinned packaged assets (skipped for a file already there with the right hash)."""
    for name, requirement, expected in ASSETS:
        path = layout / "assets" / name
        if not (path.is_file() and sha256(path) == expected):
            fetch(name, requirement, expected, path.parent)
    return {"assets": len(ASSETS)}


if __name__ == "__main__":
    sys.exit(stage_main("assets", run))
