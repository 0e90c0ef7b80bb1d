"""User data through `datasets`: every supported format gives the same rows, string labels map to sorted ids
(kept as id2label, which finetune writes into the model config), and each kind of bad data fails with the file,
the line or column, and what to change."""

from __future__ import annotations

import json

import pytest

from pruneflow.data import DataError, read_user_file
from pruneflow.params import validate_params
from pruneflow.runtime import Layout

ROWS = [{"text": "a fine film", "label": "positive"}, {"text": "dull and slow", "label": "negative"},
        {"text": "great fun", "label": "positive"}, {"text": "  ", "label": "negative"}]
EXPECTED = [{"text": "a fine film", "label": 1}, {"text": "dull and slow", "label": 0}, {"text": "great fun", "label": 1}]


def write(tmp_path, fmt: str):
    import datasets

    path = tmp_path / f"data.{fmt}"
    if fmt == "jsonl":
        path.write_text("\n".join(json.dumps(r) for r in ROWS) + "\n")
    elif fmt == "json":
        path.write_text(json.dumps(ROWS))
    elif fmt in ("csv", "tsv"):
        sep = "," if fmt == "csv" else "\t"
        path.write_text("text" + sep + "label\n" + "".join(f"{r['text']}{sep}{r['label']}\n" for r in ROWS))
    elif fmt == "parquet":
        datasets.Dataset.from_list(ROWS).to_parquet(str(path))
    elif fmt == "saved":
        path = tmp_path / "saved"
        datasets.Dataset.from_list(ROWS).save_to_disk(str(path))
    return path


@pytest.mark.parametrize("fmt", ["jsonl", "json", "csv", "tsv", "parquet", "saved"])
def test_every_format_gives_the_same_rows_and_label_names(tmp_path, fmt):
    rows, info = read_user_file(write(tmp_path, fmt), "text", "label")
    assert rows == EXPECTED
    assert info["id2label"] == {"0": "negative", "1": "positive"}
    assert info["rows_without_text"] == 1


def test_plain_text_is_one_unlabeled_text_per_line(tmp_path):
    path = tmp_path / "calib.txt"
    path.write_text("first sentence\n\nsecond one\n")
    rows, info = read_user_file(path, "text", None)
    assert rows == [{"text": "first sentence"}, {"text": "second one"}] and "id2label" not in info


def test_integer_and_boolean_labels(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text('{"text": "x", "label": 2}\n{"text": "y", "label": 0}\n{"text": "z"}\n')
    rows, info = read_user_file(path, "text", "label")
    assert rows == [{"text": "x", "label": 2}, {"text": "y", "label": 0}, {"text": "z"}]
    assert info["id2label"] == {"0": "0", "1": "1", "2": "2"} and info["unlabeled_rows"] == 1
    path.write_text('{"text": "x", "label": true}\n{"text": "y", "label": false}\n')
    assert [r["label"] for r in read_user_file(path, "text", "label")[0]] == [1, 0]


@pytest.mark.parametrize("content,match", [
    ('{"text": "ok", "label": 1}\n{"text": "bad", "label": }\n', r"line 2"),
    ('{"text": "ok", "label": 0.5}\n', r"row 1, column 'label'.*binarised"),
])
def test_bad_jsonl_names_the_line_or_row(tmp_path, content, match):
    path = tmp_path / "d.jsonl"
    path.write_text(content)
    with pytest.raises(DataError, match=match) as info:
        read_user_file(path, "text", "label")
    assert "d.jsonl" in str(info.value)


def test_missing_columns_name_the_param(tmp_path):
    path = write(tmp_path, "csv")
    with pytest.raises(DataError, match=r"no column 'sentence'.*prepare.text_column"):
        read_user_file(path, "sentence", "label")
    with pytest.raises(DataError, match=r"no label column 'y'.*prepare.label_column"):
        read_user_file(path, "text", "y")


def test_missing_file_unsupported_type_and_unreachable_hub_name(tmp_path):
    with pytest.raises(DataError, match="file not found"):
        read_user_file(tmp_path / "nope.jsonl", "text", "label")
    (tmp_path / "d.xlsx").write_text("x")
    with pytest.raises(DataError, match="unsupported file type '.xlsx'"):
        read_user_file(tmp_path / "d.xlsx", "text", "label")
    with pytest.raises(DataError, match="hub dataset name"):
        read_user_file("no_such_user/no_such_dataset_here", "text", "label", root=tmp_path)


def test_prepare_records_label_names_for_finetune(tmp_path):
    import stages.prepare

    path = tmp_path / "raw.jsonl"
    path.write_text("".join(json.dumps({"text": f"sentence {i}", "label": ["neg", "pos"][i % 2]}) + "\n"
                            for i in range(20)))
    params = validate_params({"prepare": {"source": "file", "path": "raw.jsonl", "calib_size": 5}})
    stages.prepare.run(params, Layout(tmp_path))
    provenance = json.loads((tmp_path / "data/prepared/provenance.json").read_text())
    assert provenance["id2label"] == {"0": "neg", "1": "pos"}
    from stages.finetune import label_names

    assert label_names(Layout(tmp_path), []) == {0: "neg", 1: "pos"}


def test_tiny_tokenizer_knows_its_words(tmp_path):
    """The fixture every pipeline test tokenizes with: real ids, not [UNK] for every word."""
    from tiny import WORDS, tiny_tokenizer

    tok = tiny_tokenizer(tmp_path / "vocab")
    ids = tok(" ".join(WORDS[:5]))["input_ids"]
    assert tok.unk_token_id not in ids and len(set(ids)) == 7


def _hutto_sdist(tmp_path, members: dict[str, str]):
    """A stand-in vadersentiment sdist: the nested hutto_ICWSM_2014 tarball with these members (id, rating, text)."""
    import io
    import tarfile

    def add(tar, name, data: bytes):
        info = tarfile.TarInfo(name)
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))

    inner = io.BytesIO()
    with tarfile.open(fileobj=inner, mode="w:gz") as tar:
        for name, text in members.items():
            add(tar, name, text.encode())
    path = tmp_path / "vader.tar.gz"
    with tarfile.open(path, "w:gz") as tar:
        add(tar, "vaderSentiment-3.3.2/additional_resources/hutto_ICWSM_2014.tar.gz", inner.getvalue())
    return path


def test_every_packaged_snippet_source_reads_its_own_member(tmp_path):
    from pruneflow.data import SNIPPETS, read_snippets

    members = {m: f"1\t{i + 1}.5\t{src} sentence\r\n2\t-0.2\tneutral\r\n3\t-2\tbad {src}\r\n"
               for i, (src, m) in enumerate(SNIPPETS.items())}
    sdist = _hutto_sdist(tmp_path, members)
    for src, member in SNIPPETS.items():
        rows, info = read_snippets(sdist, 0.5, src)
        assert [r["text"] for r in rows] == [f"{src} sentence", f"bad {src}"]
        assert [r["label"] for r in rows] == [1, 0] and info["dropped_near_neutral"] == 1
        assert info["source"].endswith(member)


def test_prepare_reads_the_source_a_dataset_names(tmp_path):
    import stages.prepare
    from pruneflow.data import SNIPPETS

    text = "".join(f"{i}\t{(-1) ** i * 2}\ttweet number {i}\r\n" for i in range(30))
    sdist = _hutto_sdist(tmp_path, {SNIPPETS["tweet_snippets"]: text, SNIPPETS["rt_snippets"]: "1\t2\tfilm\r\n"})
    params = validate_params({"prepare": {"source": "tweet_snippets", "path": str(sdist), "calib_size": 8}})
    out = stages.prepare.run(params, Layout(tmp_path))
    assert out == {"n_train": 24, "n_eval": 6, "n_calib": 8}
    rows = [json.loads(line) for line in (tmp_path / "data/prepared/train.jsonl").read_text().splitlines()]
    assert all(r["text"].startswith("tweet number") for r in rows)
