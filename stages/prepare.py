"""prepare: materialise the task data.

reads   prepare.path (the vadersentiment sdist's rated sentences: Rotten Tomatoes, Amazon, NYT or tweets; or a user's data: a
        .jsonl/.json/.csv/.tsv/.parquet/.txt file, a saved `datasets` directory, or a hub dataset name)
writes  data/prepared/{train,eval,calib}.jsonl, data/prepared/provenance.json
params  prepare
eval is held out (never used for calibration, selection or fine-tuning); calib is a sample of train texts
without labels (pruning never sees a label).
"""

from __future__ import annotations

import logging
import random
import sys

from pruneflow.artifacts import write_json, write_jsonl
from pruneflow.data import RT_LABELS, SNIPPETS, DataError, read_snippets, read_user_file
from pruneflow.params import Params
from pruneflow.runtime import Layout, stage_main

log = logging.getLogger("pruneflow.prepare")


def run(params: Params, layout: Layout) -> dict:
    """Split the task data into train / eval / calib with a fixed seed."""
    p = params.prepare
    if p.source in SNIPPETS:
        rows, info = read_snippets(layout / p.path, p.min_abs_rating, p.source)
        info |= {"package": "vadersentiment==3.3.2 (source distribution)",
                 "id2label": {str(k): v for k, v in RT_LABELS.items()}}
    else:
        rows, info = read_user_file(p.path, p.text_column, p.label_column, layout.root)
    if not rows:
        raise DataError(f"prepare.path={p.path}: no usable text rows (empty calibration data)")
    rng = random.Random(p.seed)
    order = list(range(len(rows)))
    rng.shuffle(order)
    n_eval = int(round(len(rows) * p.eval_fraction))
    eval_rows = [rows[i] for i in order[:n_eval]]
    train_rows = [rows[i] for i in order[n_eval:]]
    if not train_rows:
        raise DataError("prepare: the train split is empty; lower prepare.eval_fraction or add data")
    calib_idx = rng.sample(range(len(train_rows)), min(p.calib_size, len(train_rows)))
    calib_rows = [{"text": train_rows[i]["text"]} for i in calib_idx]  # labels dropped on purpose

    out = layout.prepared
    write_jsonl(out / "train.jsonl", train_rows)
    write_jsonl(out / "eval.jsonl", eval_rows)
    write_jsonl(out / "calib.jsonl", calib_rows)
    labels = [r["label"] for r in eval_rows if "label" in r]
    provenance = info | {
        "seed": p.seed,
        "n_total": len(rows),
        "n_train": len(train_rows),
        "n_eval": len(eval_rows),
        "n_calib": len(calib_rows),
        "eval_positive_fraction": (sum(labels) / len(labels)) if labels else None,
        "calib_mean_chars": sum(len(r["text"]) for r in calib_rows) / len(calib_rows),
    }
    write_json(out / "provenance.json", provenance)
    log.info("train %d, eval %d, calib %d sentences", len(train_rows), len(eval_rows), len(calib_rows))
    return {"n_train": len(train_rows), "n_eval": len(eval_rows), "n_calib": len(calib_rows)}


if __name__ == "__main__":
    sys.exit(stage_main("prepare", run))
