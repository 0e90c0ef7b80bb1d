"""Task data: reading the packaged rated sentences (Rotten Tomatoes, Amazon reviews, NYT editorials, tweets), or a
user's data through `datasets`.

Prepared splits are jsonl files with {"text": ..., "label": ...} rows (label absent for unlabeled data)."""

from __future__ import annotations

import importlib.util
import io
import json
import tarfile
from pathlib import Path

# Hutto & Gilbert (2014) human-rated sentence sets inside the vadersentiment sdist: prepare.source -> member
SNIPPETS = {
    "rt_snippets": "hutto_ICWSM_2014/movieReviewSnippets_GroundTruth.txt",  # 10,605 Rotten Tomatoes sentences
    "amazon_snippets": "hutto_ICWSM_2014/amazonReviewSnippets_GroundTruth.txt",  # 3,708 product-review sentences
    "nyt_snippets": "hutto_ICWSM_2014/nytEditorialSnippets_GroundTruth.txt",  # 5,190 NYT editorial sentences
    "tweet_snippets": "hutto_ICWSM_2014/tweets_GroundTruth.txt",  # 4,200 tweets
}


class DataError(ValueError):
    pass


def read_snippets(sdist: str | Path, min_abs_rating: float, source: str = "rt_snippets") -> tuple[list[dict], dict]:
    """Sentences with mean human ratings in [-4, 4] (Hutto & Gilbert 2014), binarised at 0: the set `source`
    names in `SNIPPETS` (the Rotten Tomatoes sentences by default).

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
        raw = inner.extractfile(SNIPPETS[source]).read()
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
    info = {"source": f"{sdist.name}:{inner_name}:{SNIPPETS[source]}", "dropped_near_neutral": dropped}
    return rows, info


FORMATS = {".jsonl": "json", ".json": "json", ".csv": "csv", ".tsv": "csv", ".parquet": "parquet", ".txt": "text"}
RT_LABELS = {0: "negative", 1: "positive"}


def _first_bad_json_line(path: Path) -> str | None:
    """`datasets` reports a malformed JSON Lines file without its line: find the first bad line ourselves."""
    with path.open(encoding="utf-8", errors="replace") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                json.loads(line)
            except json.JSONDecodeError as err:
                return f"line {number}: {err.msg} (column {err.colno})"
    return None


def load_table(path_or_name: str | Path, root: Path = Path(".")):
    """A `datasets.Dataset` from a .jsonl/.json/.csv/.tsv/.parquet/.txt file, a directory saved with
    `save_to_disk`, or a hub dataset name ("name" or "name:split") when it is neither (needs a network)."""
    import datasets

    datasets.disable_progress_bars()
    path = root / str(path_or_name)
    if path.is_dir():
        try:
            loaded = datasets.load_from_disk(str(path))
        except FileNotFoundError as err:
            raise DataError(f"prepare.path={path_or_name}: a directory, but not one saved with "
                            f"Dataset.save_to_disk ({err})") from None
        if isinstance(loaded, datasets.DatasetDict):
            split = "train" if "train" in loaded else next(iter(loaded))
            loaded = loaded[split]
        return loaded
    if path.suffix.lower() in FORMATS or path.exists():
        if not path.exists():
            raise DataError(f"prepare.path={path_or_name}: file not found")
        builder = FORMATS.get(path.suffix.lower())
        if builder is None:
            raise DataError(f"prepare.path={path_or_name}: unsupported file type {path.suffix!r}; use one of "
                            f"{', '.join(FORMATS)} or a directory saved with Dataset.save_to_disk")
        if builder != "parquet" and not path.read_text(encoding="utf-8", errors="replace").strip():
            raise DataError(f"prepare.path={path_or_name}: the file is empty: no usable text rows (empty "
                            "calibration data)")
        kwargs = {"sep": "\t"} if path.suffix.lower() == ".tsv" else {}
        try:
            return datasets.load_dataset(builder, data_files=str(path), split="train", **kwargs)
        except Exception as err:  # noqa: BLE001 - datasets wraps parser errors in several types
            where = _first_bad_json_line(path) if builder == "json" else None
            raise DataError(f"{path}: cannot be read as {builder}" + (f": {where}" if where else f" ({err})")
                            + "; fix the file (one JSON object per line for .jsonl)") from None
    name, _, split = str(path_or_name).partition(":")
    try:
        return datasets.load_dataset(name, split=split or "train")
    except Exception as err:  # noqa: BLE001
        raise DataError(f"prepare.path={path_or_name}: not a file or directory here, so it was taken as a hub "
                        f"dataset name, and loading it failed ({type(err).__name__}: {str(err)[:200]}); "
                        "give a local file, or run with a network") from None


def _label_ids(values: list, column: str, source: str) -> tuple[list[int | None], dict[int, str]]:
    """Labels as ids and the names of the ids: strings map to ids in sorted order of the distinct names,
    booleans to 0/1, integers stay as they are (their names are their digits)."""
    present = [v for v in values if v is not None and v != ""]
    if not present:
        return [None] * len(values), {}
    if all(isinstance(v, str) for v in present):
        names = sorted(set(present))
        ids = {n: i for i, n in enumerate(names)}
        return [ids.get(v) if v not in (None, "") else None for v in values], dict(enumerate(names))
    if all(isinstance(v, bool) for v in present):
        return [None if v is None else int(v) for v in values], {0: "false", 1: "true"}
    for row, v in enumerate(values):
        if v is None or v == "":
            continue
        if isinstance(v, float) and not v.is_integer():
            raise DataError(f"{source}: row {row + 1}, column {column!r}: label {v!r} is not a class id "
                            "(ratings must be binarised first, or give class names as strings)")
        if not isinstance(v, (int, float)) or v < 0:
            raise DataError(f"{source}: row {row + 1}, column {column!r}: label {v!r} is not a class id or name")
    ints = [None if v is None or v == "" else int(v) for v in values]
    return ints, {i: str(i) for i in range(max(i for i in ints if i is not None) + 1)}


def read_user_file(path: str | Path, text_column: str, label_column: str | None, root: Path = Path(".")
                   ) -> tuple[list[dict], dict]:
    """Rows {"text", "label"?} of a user's data (any format `load_table` reads); info holds the source and
    `id2label` when labeled."""
    table = load_table(path, root)
    source = str(path)
    columns = list(table.column_names)
    if text_column not in columns:
        raise DataError(f"{source}: no column {text_column!r} (columns: {columns}); set prepare.text_column")
    if label_column and label_column not in columns:
        raise DataError(f"{source}: no label column {label_column!r} (columns: {columns}); set "
                        "prepare.label_column, or null for unlabeled text")
    texts = ["" if t is None else str(t).strip() for t in table[text_column]]
    labels, id2label = (_label_ids(list(table[label_column]), label_column, source) if label_column
                        else ([None] * len(texts), {}))
    rows = []
    for text, label in zip(texts, labels):
        if text:
            rows.append({"text": text} | ({"label": label} if label is not None else {}))
    info = {"source": source, "format": type(table).__name__, "rows_read": len(texts),
            "rows_without_text": len(texts) - len(rows), "unlabeled_rows": sum(1 for r in rows if "label" not in r)}
    if id2label:
        info["id2label"] = {str(k): v for k, v in id2label.items()}
    return rows, info


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
