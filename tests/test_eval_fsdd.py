"""Evaluation on the real Free Spoken Digit Dataset (../shared/data/fsdd); skipped on a fresh clone."""

from __future__ import annotations

import csv
import json

import numpy as np
from test_eval import RESULT_RE

from matpac_fast.evaluation import cli
from matpac_fast.evaluation.datasets import load_dataset
from matpac_fast.evaluation.folds import make_folds


def test_fsdd_layout_and_protocols(fsdd_dir):
    ds = load_dataset(fsdd_dir)
    assert (ds.layout, len(ds), ds.classes, ds.multilabel) == ("fsdd", 3000, [str(d) for d in range(10)], False)
    assert (ds.official, ds.default_group, ds.default_clip_seconds) == ("split", "speaker", 1.0)
    (official,) = make_folds(ds, "official")
    assert (len(official.train), len(official.test)) == (2700, 300)
    speakers = np.array(ds.column("speaker"))
    loso = make_folds(ds, "group:speaker")
    assert len(loso) == 6
    assert [f.test.tolist() for f in make_folds(ds, "group")] == [f.test.tolist() for f in loso]
    for f in loso:
        assert len(set(speakers[f.test])) == 1 and speakers[f.test][0] not in set(speakers[f.train])


def test_fsdd_subset_logmel_official(fsdd_dir, tmp_path, capsys):
    # takes 0-9 of every speaker and digit: the official split puts takes 0-4 in test, so 300 train / 300 test
    with open(fsdd_dir / "labels.csv", newline="") as f:
        rows = [r for r in csv.DictReader(f) if int(r["take"]) < 10]
    sub = tmp_path / "fsdd_sub.csv"
    with open(sub, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["file", "label", "speaker", "split"])
        w.writeheader()
        for r in rows:
            w.writerow({"file": str(fsdd_dir / r["filename"]), "label": r["label"], "speaker": r["speaker"],
                        "split": r["split"]})  # fmt: skip
    args = ["--checkpoint", "logmel", "--data", str(sub), "--clip-seconds", "1", "--seeds", "1", "--quiet",
            "--out", str(tmp_path / "o"), "--cache-dir", str(tmp_path / "c"), "--task", "fsdd-sub",
            "--lr", "1e-2", "--max-epochs", "60"]  # fmt: skip
    assert cli.main(args) == 0
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert RESULT_RE.match(last) and last.startswith("RESULT eval task=fsdd-sub checkpoint=logmel metric=accuracy")
    r = json.loads((tmp_path / "o" / "fsdd-sub__logmel__linear-lr0.01-ep60.json").read_text())
    assert r["n_clips"] == 600 and r["runs"][0]["n_test"] == 300
    assert r["mean"] > 0.6  # chance is 0.1; the full-data baseline is ~0.95


def test_fsdd_from_its_file_names_is_its_labels_csv(fsdd_dir):
    """Without labels.csv (FSDD's repository ships recordings/ only), the file names give the same clips, labels,
    speakers, takes and official split as the staged copy's labels.csv, in its order."""
    from matpac_fast.evaluation.datasets import load_fsdd_recordings

    a, b = load_dataset(fsdd_dir), load_fsdd_recordings(fsdd_dir / "recordings")
    assert len(a) == len(b) == 3000
    keys = ("speaker", "take", "split")
    assert [(c.path, c.labels, *(c.meta[k] for k in keys)) for c in a.clips] == [
        (c.path, c.labels, *(c.meta[k] for k in keys)) for c in b.clips]
    assert (a.classes, a.official, a.default_group) == (b.classes, b.official, b.default_group)


def test_folder_with_a_recordings_class_is_not_fsdd(tmp_path):
    """A user's folder of classes, one of them named 'recordings' holding files named like FSDD's, is read as a
    folder: all its classes, not FSDD from that one subfolder (the other classes were dropped without a word)."""
    import numpy as np
    import soundfile as sf

    for cls, names in {"recordings": ["1_a_2.wav", "3_b_7.wav"], "speech": ["x.wav", "y.wav"]}.items():
        (tmp_path / cls).mkdir()
        for n in names:
            sf.write(tmp_path / cls / n, np.zeros(1600), 16000)
    ds = load_dataset(tmp_path)
    assert ds.layout == "folder" and ds.classes == ["recordings", "speech"] and len(ds.clips) == 4
