"""Task data: reading the packaged Rotten Tomatoes sentences or a user's jsonl/csv, and batching text.

Prepared splits are jsonl files with {"text": ..., "label": ...} rows (label absent for unlabeled data)."""

from __future__ import annotations

import csv
import importlib.util
import io
import json
import tarfile
from pathlib import Path
from typing import Iterator

RT_MEMBER = "hutto_ICWSM_2014/movieReviewSnippets_GroundTruth.txt"


class DataError(ValueError):
    pass


def read_rt_snippets(sdist: str | Path, min_abs_rating: float) -> tuple[list[dict], dict]:
    """Rotten Tomatoes sentences with mean human ratings in [-4, 4] (Hutto & Gilbert 2014), binarised at 0.

    The vadersentiment *source* distribution nests a second tarball holding them; rows are
    `id<TAB>rating<TAB>text` with CRLF line ends."""
    sdist = Path(sdist)
    if not sdist.exists():
        raise DataError(f"{sdist} not found: run `make assets` (pip download --no-binary :all: vadersentiment==3.3.2)")
    with tarfile.open(sdist) as outer:
        inner_name = next((m for m in outer.getnames() if m.endswith("additional_resources/hutto_ICWSM_2014.tar.gz")), None)
        if inner_name is None:
            raise DataError(f"{sdist} has no additional_resources/hutto_ICWSM_2014.tar.gz")
        inner_bytes = outer.extractfile(inner_name).read()
    with tarfile.open(fileobj=io.BytesIO(inner_bytes)) as inner:
        raw = inner.extractfile(RT_MEMBER).read()
    text = raw.decode("utf-8", errors="replace")
    rows, dropped = [], 0
    for line in text.splitlines():
        parts = line.rstrip("\r").split("\t", 2)
        if len(parts) != 3:
            continue
        rating, sentence = float(parts[1]), parts[2].strip()
        if abs(rating) < min_abs_rating:
            dropped += 1
            continue
        rows.append({"text": sentence, "label": int(rating > 0), "rating": rating})
    info = {"source": f"{sdist.name}:{inner_name}:{RT_MEMBER}", "dropped_near_neutral": dropped}
    return rows, info


def read_user_file(path: str | Path, text_column: str, label_column: str | None) -> tuple[list[dict], dict]:
    path = Path(path)
    if not path.exists():
        raise DataError(f"prepare.path={path}: file not found")
    if path.suffix == ".jsonl":
        records = [json.loads(l) for l in path.read_text().splitlines() if l.strip()]
    elif path.suffix == ".csv":
        records = list(csv.DictReader(path.open(newline="")))
    else:
        raise DataError(f"prepare.path={path}: expected a .jsonl or .csv file")
    if records and text_column not in records[0]:
        raise DataError(f"{path}: no column {text_column!r} (columns: {sorted(records[0])}); set prepare.text_column")
    rows = []
    for r in records:
        row = {"text": str(r[text_column]).strip()}
        if label_column and r.get(label_column) not in (None, ""):
            row["label"] = int(r[label_column])
        if row["text"]:
            rows.append(row)
    return rows, {"source": str(path)}


def resolve_model_path(spec: str, root: str | Path = ".") -> Path:
    """'package:<module>/<subdir>' points inside an installed package (how real models ship here); else a path
    (relative ones to the project root)."""
    if spec.startswith("package:"):
        module, _, sub = spec[len("package:"):].partition("/")
        found = importlib.util.find_spec(module)
        if found is None or not found.submodule_search_locations:
            raise DataError(f"model package {module!r} is not installed: run `make assets`")
        path = Path(list(found.submodule_search_locations)[0]) / sub
    else:
        path = Path(root) / spec
    if not (path / "config.json").exists():
        raise DataError(f"model path {path} has no config.json (expected a Hugging Face model directory)")
    return path


def batches(texts: list[str], batch_size: int) -> Iterator[list[str]]:
    for i in range(0, len(texts), batch_size):
        yield texts[i : i + batch_size]


def length_sorted(texts: list[str]) -> tuple[list[str], list[int]]:
    """Sort by length so batches pad little; returns the sorted texts and the permutation."""
    order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
    return [texts[i] for i in order], order
