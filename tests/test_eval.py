"""Evaluation: datasets, folds, metrics, probes, reports and the CLI, on small synthetic data (fast, no ../shared)."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch
from sklearn.metrics import average_precision_score

from matpac_fast.evaluation import cli, embed, probe
from matpac_fast.evaluation.datasets import Clip, LabelledSet, load_csv, load_dataset
from matpac_fast.evaluation.folds import Fold, carve_validation, make_folds
from matpac_fast.evaluation.metrics import accuracy, average_precision, mean_average_precision
from matpac_fast.evaluation.probe import LinearProbeConfig, ProbeSettings, Standardizer, fit_linear_probe, run_probes

RESULT_RE = re.compile(
    r"^RESULT eval task=\S+ checkpoint=\S+ metric=(accuracy|mAP) mean=[0-9.]+ std=[0-9.]+ probe=\S+ lr=\S+$"
)


def tone(freq: float, seconds: float = 0.3, sr: int = 16000, seed: int = 0) -> np.ndarray:
    t = np.arange(int(seconds * sr)) / sr
    noise = np.random.default_rng(seed).normal(scale=0.01, size=t.shape)
    return (0.3 * np.sin(2 * np.pi * freq * t) + noise).astype(np.float32)


@pytest.fixture
def tone_folder(tmp_path) -> Path:
    """3 classes x 8 clips of tones at 300 / 1000 / 3000 Hz; one class stored at 8 kHz to exercise resampling."""
    root = tmp_path / "tones"
    for label, freq in (("low", 300.0), ("mid", 1000.0), ("high", 3000.0)):
        (root / label).mkdir(parents=True)
        sr = 8000 if label == "low" else 16000
        for i in range(8):
            sf.write(root / label / f"{label}_{i}.wav", tone(freq * (1 + 0.02 * i), sr=sr, seed=i), sr)
    return root


def synthetic_set(n_groups: int = 6, per_group: int = 12, n_classes: int = 3) -> LabelledSet:
    clips = [
        Clip(f"/x/{g}_{i}.wav", (str(i % n_classes),), {"speaker": f"s{g}"})
        for g in range(n_groups)
        for i in range(per_group)
    ]
    return LabelledSet("syn", "/x", "csv", clips, [str(c) for c in range(n_classes)], False, "syn.csv")


# --- metrics ------------------------------------------------------------------------------------------------------
def test_map_matches_hand_computed_case():
    Y = np.array([[1, 0], [0, 1], [1, 1], [0, 0]], dtype=np.float32)
    S = np.array([[0.9, 0.2], [0.8, 0.7], [0.3, 0.6], [0.1, 0.9]])
    # class 0: ranked labels 1,0,1,0 -> precisions at the hits 1/1, 2/3 -> AP 5/6
    # class 1: ranked labels 0,1,1,0 -> precisions at the hits 1/2, 2/3 -> AP 7/12
    assert average_precision(Y[:, 0], S[:, 0]) == pytest.approx(5 / 6)
    assert average_precision(Y[:, 1], S[:, 1]) == pytest.approx(7 / 12)
    assert mean_average_precision(Y, S) == pytest.approx((5 / 6 + 7 / 12) / 2)


def test_map_counts_classes_without_positives_as_zero_like_evar_and_matches_sklearn_with_ties():
    import warnings

    rng = np.random.default_rng(0)
    Y = (rng.random((50, 4)) < 0.3).astype(np.float32)
    Y[:, 3] = 0  # no positive: AP 0, as EVAR's mean of sklearn's per-class APs (it was left out: a higher score)
    S = np.round(rng.random((50, 4)), 1)  # coarse scores -> many ties
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # sklearn warns of the class without a positive
        per_class = average_precision_score(Y, S, average=None)
    assert per_class[3] == 0
    assert mean_average_precision(Y, S) == pytest.approx(per_class.mean(), abs=1e-12)
    assert mean_average_precision(Y, S) == pytest.approx(sum(average_precision(Y[:, c], S[:, c]) for c in range(3)) / 4)
    assert accuracy(np.array([0, 1, 2]), np.eye(3)[[0, 2, 2]]) == pytest.approx(2 / 3)


# --- folds --------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("scheme", ["group:speaker", "group:speaker:3", "kfold:3:speaker"])
def test_grouped_folds_never_leak_a_group(scheme):
    ds = synthetic_set()
    speakers = np.array(ds.column("speaker"))
    folds = make_folds(ds, scheme, seed=1)
    tested = np.concatenate([f.test for f in folds])
    assert sorted(tested) == list(range(len(ds)))  # every clip is tested exactly once
    for f in folds:
        assert not set(speakers[f.train]) & set(speakers[f.test]), f.name
        assert len(f.train) + len(f.test) == len(ds)
        fit, val = carve_validation(f.train, ds.targets(), f.groups, 0.25, seed=0)
        assert not set(speakers[fit]) & set(speakers[val])  # the validation carve is grouped too
        assert set(fit) | set(val) == set(f.train) and not set(fit) & set(val)
    if scheme == "group:speaker":
        assert len(folds) == 6


def test_kfold_partitions_and_stratifies():
    ds = synthetic_set()
    y = ds.targets()
    folds = make_folds(ds, "kfold:4", seed=0)
    assert sorted(np.concatenate([f.test for f in folds])) == list(range(len(ds)))
    for f in folds:
        assert not set(f.train) & set(f.test)
        assert np.bincount(y[f.test], minlength=3).tolist() == [6, 6, 6]  # 72 clips, 3 balanced classes, 4 folds


def test_official_split_and_unseen_test_label_names_the_row(tmp_path):
    for i in range(4):
        sf.write(tmp_path / f"a{i}.wav", tone(440, 0.1), 16000)
    rows = ["file,label,split", "a0.wav,x,train", "a1.wav,y,train", "a2.wav,x,test", "a3.wav,z,test"]
    (tmp_path / "m.csv").write_text("\n".join(rows) + "\n")
    ds = load_csv(tmp_path / "m.csv")
    with pytest.raises(ValueError, match=r"row 4 \(line 5\): label 'z' has this one clip, so no fold can both"):
        make_folds(ds, "official")
    sf.write(tmp_path / "a4.wav", tone(440, 0.1), 16000)
    (tmp_path / "m.csv").write_text("\n".join([*rows, "a4.wav,z,test"]) + "\n")
    with pytest.raises(ValueError, match=r"row 4 \(line 5\): label 'z' does not occur in the training part of "
                       r"official \(its 2 clips are all in the test part\)"):
        make_folds(load_csv(tmp_path / "m.csv"), "official")


# --- CSV errors ---------------------------------------------------------------------------------------------------
def test_csv_missing_file_names_the_row(tmp_path):
    sf.write(tmp_path / "a.wav", tone(440, 0.1), 16000)
    (tmp_path / "m.csv").write_text("file,label\na.wav,dog\nmissing.wav,cat\n")
    with pytest.raises(ValueError, match=r"m\.csv: row 2 \(line 3\): file 'missing.wav' not found"):
        load_dataset(tmp_path / "m.csv")
    with pytest.raises(SystemExit, match=r"row 2 \(line 3\)"):
        cli.main(["--checkpoint", "logmel", "--data", str(tmp_path / "m.csv"), "--out", str(tmp_path / "o")])


def test_csv_unknown_label_names_the_row(tmp_path):
    sf.write(tmp_path / "a.wav", tone(440, 0.1), 16000)
    (tmp_path / "m.csv").write_text('file,label\na.wav,dog\na.wav,"dog,cow"\n')
    with pytest.raises(ValueError, match=r"row 2 \(line 3\): unknown label 'cow'"):
        load_csv(tmp_path / "m.csv", classes=["dog", "cat"])  # a fixed vocabulary (--classes filters instead)
    # FSDD's columns with a label other than a digit: not FSDD (whose vocabulary is 0-9) but a CSV read as it is
    (tmp_path / "labels.csv").write_text("filename,label,speaker,split\na.wav,3,s,train\na.wav,12,s,test\n")
    ds = load_dataset(tmp_path)
    assert ds.layout == "csv" and ds.classes == ["3", "12"]
    # all of FSDD's own columns: FSDD, whose fixed vocabulary makes a typo an error
    (tmp_path / "labels.csv").write_text("filename,label,speaker,take,split\na.wav,3,s,0,train\na.wav,12,s,1,test\n")
    with pytest.raises(ValueError, match=r"labels\.csv: row 2 \(line 3\): unknown label '12'"):
        load_dataset(tmp_path)


def test_multilabel_csv_is_detected(tmp_path):
    sf.write(tmp_path / "a.wav", tone(440, 0.1), 16000)
    (tmp_path / "m.csv").write_text('file,label,fold\na.wav,"dog,cat",1\na.wav,cat,2\n')
    ds = load_dataset(tmp_path / "m.csv")
    assert ds.multilabel and ds.classes == ["cat", "dog"] and ds.official == "fold"
    assert ds.targets().tolist() == [[1, 1], [1, 0]]


def test_known_layouts_are_recognised(tmp_path):
    w = tone(440, 0.1)
    esc = tmp_path / "ESC-50"
    (esc / "meta").mkdir(parents=True)
    (esc / "audio").mkdir()
    sf.write(esc / "audio" / "1-1-A-0.wav", w, 16000)
    (esc / "meta" / "esc50.csv").write_text(
        "filename,fold,target,category,esc10,src_file,take\n1-1-A-0.wav,1,0,dog,True,1,A\n"
    )
    us = tmp_path / "UrbanSound8K"
    (us / "metadata").mkdir(parents=True)
    (us / "audio" / "fold3").mkdir(parents=True)
    sf.write(us / "audio" / "fold3" / "7-1-0-0.wav", w, 16000)
    (us / "metadata" / "UrbanSound8K.csv").write_text(
        "slice_file_name,fsID,start,end,salience,fold,classID,class\n7-1-0-0.wav,7,0,1,1,3,2,children_playing\n"
    )
    gt = tmp_path / "gtzan" / "genres"
    for g in ("blues", "classical", "country", "disco", "hiphop", "jazz", "metal", "pop", "reggae", "rock"):
        (gt / g).mkdir(parents=True)
        sf.write(gt / g / f"{g}.00000.wav", w, 16000)
    e, u, g = load_dataset(esc), load_dataset(us), load_dataset(tmp_path / "gtzan")
    assert (e.layout, e.official, e.clips[0].labels, e.default_clip_seconds) == ("esc50", "fold", ("dog",), 5.0)
    assert (u.layout, u.official, u.clips[0].meta["fold"], u.clips[0].labels) == (
        "us8k",
        "fold",
        "3",
        ("children_playing",),
    )
    assert (g.layout, len(g), g.default_clip_seconds) == ("gtzan", 10, 30.0)


# --- probes -------------------------------------------------------------------------------------------------------
def _noisy_binary(rng, n, flip, d=100):
    X = rng.normal(size=(n, d)).astype(np.float32)
    y = (X[:, 0] > 0).astype(np.int64)
    m = rng.random(n) < flip
    y[m] = 1 - y[m]
    return X, y


def test_early_stopping_restores_the_best_epoch():
    rng = np.random.default_rng(0)
    Xf, yf = _noisy_binary(rng, 60, 0.25)  # few noisy training labels in 100-d: it over-fits after a while
    Xv, yv = _noisy_binary(rng, 200, 0.0)
    cfg = LinearProbeConfig(lr=1e-3, batch_size=32, max_epochs=200, patience=10)
    p = fit_linear_probe(Xf, yf, Xv, yv, 2, False, cfg, seed=0)
    h = p.history
    assert 0 < p.best_epoch < len(h) - 1  # a case where the last epoch is not the best
    assert len(h) == p.best_epoch + cfg.patience + 1  # stopped `patience` epochs after the best
    assert h[p.best_epoch]["val_score"] == max(e["val_score"] for e in h)
    logits = torch.from_numpy(p.scores(Xv))
    val_loss = float(torch.nn.functional.cross_entropy(logits, torch.from_numpy(yv)))
    assert val_loss == pytest.approx(h[p.best_epoch]["val_loss"], abs=1e-5)  # the returned weights are the best's
    assert val_loss != pytest.approx(h[-1]["val_loss"], abs=1e-5)


def test_standardisation_statistics_come_from_train_only(monkeypatch):
    ds = synthetic_set()
    rng = np.random.default_rng(0)
    X = rng.normal(size=(len(ds), 8)).astype(np.float32)
    X[:, 0] = np.arange(len(ds))  # column 0 identifies the row, so we can see which rows fed the statistics
    Y = ds.targets()
    folds = make_folds(ds, "group:speaker:3")
    seen: list[np.ndarray] = []
    real_fit = Standardizer.fit.__func__

    def spy(cls, A):
        seen.append(np.asarray(A)[:, 0].astype(int))
        return real_fit(cls, A)

    monkeypatch.setattr(Standardizer, "fit", classmethod(spy))
    for kind in ("linear", "logreg"):
        seen.clear()
        settings = ProbeSettings(kind, 2, LinearProbeConfig(lr=1e-2, max_epochs=5, patience=2))
        runs = run_probes(X, Y, folds, 3, False, settings, progress=False)
        per_run = [f for f in folds for _ in range(2 if kind == "linear" else 1)]
        assert len(seen) == len(runs) == len(per_run)
        for rows, fold, r in zip(seen, per_run, runs):
            assert set(rows) <= set(fold.train) and not set(rows) & set(fold.test)
            assert len(rows) == r.n_fit  # linear: the validation carve is excluded as well
            if kind == "linear":
                assert r.n_val > 0 and r.n_fit + r.n_val == len(fold.train)
    # and the statistics themselves are those of the fit rows
    s = Standardizer.fit(X[:10])
    np.testing.assert_allclose(s.mean, X[:10].mean(0), rtol=1e-6)
    np.testing.assert_allclose(s.std, X[:10].std(0), rtol=1e-5)


def test_probes_learn_a_separable_problem():
    rng = np.random.default_rng(1)
    ds = synthetic_set()
    y = ds.targets()
    X = (rng.normal(size=(len(ds), 16)) + 6 * np.eye(3, 16)[y]).astype(np.float32)
    folds = make_folds(ds, "kfold:3")
    for kind in ("linear", "logreg"):
        settings = ProbeSettings(kind, 1, LinearProbeConfig(lr=1e-2, batch_size=8, max_epochs=100, patience=10))
        mean, std = probe.summarize(run_probes(X, y, folds, 3, False, settings, progress=False))
        assert mean > 0.9, kind
    Ym = np.eye(3, dtype=np.float32)[y]  # the multi-label path (BCE + mAP) on the same problem
    runs = run_probes(
        X,
        Ym,
        [Fold("f", np.arange(0, 60), np.arange(60, 72))],
        3,
        True,
        ProbeSettings("linear", 1, LinearProbeConfig(lr=1e-2, batch_size=8, max_epochs=100)),
        progress=False,
    )
    assert runs[0].score > 0.9


# --- CLI end to end -----------------------------------------------------------------------------------------------
def _cli(args, capsys) -> list[str]:
    assert cli.main(args) == 0
    return capsys.readouterr().out.strip().splitlines()


def test_cli_end_to_end_prints_result_and_hits_the_cache(tone_folder, tmp_path, capsys, monkeypatch):
    out, cache = tmp_path / "out", tmp_path / "cache"
    args = [
        "--checkpoint",
        "logmel",
        "--data",
        str(tone_folder),
        "--folds",
        "kfold:4",
        "--seeds",
        "2",
        "--out",
        str(out),
        "--cache-dir",
        str(cache),
        "--quiet",
        "--max-epochs",
        "60",
        "--lr",
        "1e-2",
    ]
    lines = _cli(args, capsys)
    assert RESULT_RE.match(lines[-1]), lines[-1]
    assert "task=tones-kfold-4 checkpoint=logmel metric=accuracy" in lines[-1]
    r = json.loads((out / "tones-kfold-4__logmel__linear-lr0.01-ep60.json").read_text())  # non-default probe settings
    assert r["mean"] > 0.9 and len(r["runs"]) == 8 and not r["cache_hit"] and r["embedding_dim"] == 160
    assert r["clip_seconds"] == pytest.approx(0.3)  # auto: the longest clip
    table = (out / "results.md").read_text()
    assert "| tones-kfold-4 | tones | kfold:4 | logmel | linear-lr0.01-ep60 | 0.01 | accuracy |" in table
    assert (out / "tones_projection.png").stat().st_size > 1000
    assert len(list(cache.glob("*.npz"))) == 1

    def no_decoding(*a, **k):
        raise AssertionError("audio decoded although the embeddings are cached")

    monkeypatch.setattr(embed, "load_clip", no_decoding)
    lines2 = _cli(args, capsys)
    r2 = json.loads((out / "tones-kfold-4__logmel__linear-lr0.01-ep60.json").read_text())
    assert r2["cache_hit"] and r2["mean"] == r["mean"] and lines2[-1] == lines[-1]
    # a different clip length is a different cache entry
    monkeypatch.undo()
    _cli(args + ["--clip-seconds", "0.25", "--projection", "none"], capsys)
    assert len(list(cache.glob("*.npz"))) == 2


def test_cli_logreg_and_bad_folds(tone_folder, tmp_path, capsys):
    lines = _cli(
        [
            "--checkpoint",
            "logmel",
            "--data",
            str(tone_folder),
            "--folds",
            "kfold:4",
            "--probe",
            "logreg",
            "--out",
            str(tmp_path / "o"),
            "--no-cache",
            "--quiet",
            "--projection",
            "none",
        ],
        capsys,
    )
    assert RESULT_RE.match(lines[-1]) and float(lines[-1].split("mean=")[1].split()[0]) > 0.9
    with pytest.raises(SystemExit, match="--folds 'kfold:x'"):
        cli.main(["--checkpoint", "logmel", "--data", str(tone_folder), "--folds", "kfold:x"])
    with pytest.raises(SystemExit, match="no official protocol"):
        cli.main(["--checkpoint", "logmel", "--data", str(tone_folder), "--out", str(tmp_path / "o")])


def test_load_clip_resamples_like_the_front_end_and_crops_or_pads(tmp_path):
    from matpac_fast.frontend import get_spec, resample

    w = tone(700.0, 0.5, sr=8000)
    sf.write(tmp_path / "a.wav", w, 8000, subtype="FLOAT")
    ref = resample(torch.from_numpy(w), 8000, get_spec("matpac")).numpy()  # 8000 samples at 16 kHz
    long = embed.load_clip(str(tmp_path / "a.wav"), 10000, get_spec("matpac"))
    short = embed.load_clip(str(tmp_path / "a.wav"), 6000, get_spec("matpac"))
    np.testing.assert_array_equal(long[:8000], ref)  # the cached resampler gives the front end's numbers
    assert not long[8000:].any()  # zero-padded at the end
    np.testing.assert_array_equal(short, ref[:6000])  # cropped from the start


# --- labelled CSVs as users write them (from an audit: each case was a traceback or a wrong task) -
def _csv(tmp_path: Path, lines: list[str], n: int = 4) -> Path:
    for i in range(n):
        sf.write(tmp_path / f"a{i}.wav", tone(440, 0.1), 16000)
    (tmp_path / "m.csv").write_text("\n".join(lines) + "\n")
    return tmp_path / "m.csv"


def test_csv_rows_with_more_cells_than_the_header(tmp_path):
    """Trailing commas (empty extra cells) are read as make-shards reads them; an unquoted comma inside a label is a
    one-line error that names the row (DictReader's list of extras used to end in AttributeError)."""
    path = _csv(tmp_path, ["file,label", "a0.wav,dog,", "a1.wav,cat,,", "a2.wav,dog", "a3.wav,cat"])
    ds = load_csv(path)
    assert [c.labels for c in ds.clips] == [("dog",), ("cat",), ("dog",), ("cat",)] and not ds.multilabel
    path.write_text('file,label\n"a0.wav,dog\n' + "a1.wav,cat\n" * 20000)  # a quote left open: a _csv.Error
    with pytest.raises(ValueError, match=r"m.csv: line \d+: field larger than field limit .*check the quoting"):
        load_csv(path)
    path.write_text("file,label\na0.wav,dog\na1.wav,Male speech, man speaking\n")
    with pytest.raises(ValueError, match=r"m.csv: row 2 \(line 3\) has 3 cells, the header 2 \(extra: "
                       r"'man speaking'\); quote a path that holds a comma; put several labels in one cell "
                       r"separated by ';' .*is two labels here: rename such a label"):
        load_csv(path)


def test_csv_quoted_comma_label_is_warned_about(tmp_path, capsys):
    """Quoting a label that holds a comma (what the error above advised) made it two labels and the task multi-label
    (mAP, classes 'Male speech' and 'man speaking') without a word: a warning names the row and what was read."""
    path = _csv(tmp_path, ["file,label", 'a0.wav,"Male speech, man speaking"', "a1.wav,dog", "a2.wav,dog;cat"])
    ds = load_csv(path)
    assert ds.multilabel and ds.classes == ["Male speech", "cat", "dog", "man speaking"]  # documented reading
    err = capsys.readouterr().err
    assert ("m.csv: 1 row(s) have a ',' in their label cell (e.g. row 1: 'Male speech, man speaking' read as the "
            "labels 'Male speech', 'man speaking')") in err and "multi-label" in err
    load_csv(_csv(tmp_path, ["file,label", "a0.wav,cat", "a1.wav,dog;cat"]))  # ';' alone: no warning
    assert "label cell" not in capsys.readouterr().err


def test_csv_split_column_in_any_case_and_repeated_labels(tmp_path):
    path = _csv(tmp_path, ["File,Label,Split", "a0.wav,x,train", "a1.wav,y,Train", "a2.wav,x,test",
                           "a3.wav,y;y,test"])
    ds = load_csv(path)
    assert ds.official == "split" and not ds.multilabel  # 'y;y' is one label, not a two-label row
    (fold,) = make_folds(ds, "official")
    assert fold.train.tolist() == [0, 1] and fold.test.tolist() == [2, 3]
    path.write_text("File,Label,Fold\na0.wav,x,1\na1.wav,y,1\na2.wav,x,2\na3.wav,y,2\n")
    ds = load_csv(path)
    assert [f.test.tolist() for f in make_folds(ds, "official")] == [[0, 1], [2, 3]]
    # the column under its own name still serves a group scheme
    assert [f.name for f in make_folds(ds, "group:Fold")] == ["Fold=1", "Fold=2"]


def test_empty_fold_cells_are_an_error_not_a_fold(tmp_path):
    path = _csv(tmp_path, ["file,label,fold", "a0.wav,x,1", "a1.wav,y,1", "a2.wav,x,", "a3.wav,y,2"])
    with pytest.raises(ValueError, match=r"row 3 \(line 4\): empty 'fold' cell \(1 row\(s\) without a fold\)"):
        make_folds(load_csv(path), "official")


def test_kfold_with_a_class_rarer_than_k_works_for_every_seed():
    """A class of 2 clips under kfold:5: stratified folds put its clips in two different test folds, so it is
    always seen in training. Plain shuffled K-fold (used for such a class before) failed for some seeds."""
    labels = ["x"] * 2 + ["y"] * 8 + ["z"] * 6
    ds = LabelledSet(name="rare", root=".", layout="csv", classes=["x", "y", "z"], multilabel=False, source="rare",
                     clips=[Clip(f"{i}.wav", (lab,), {}, row=i + 1) for i, lab in enumerate(labels)])
    y = ds.targets()
    for seed in range(20):
        folds = make_folds(ds, "kfold:5", seed=seed)  # raised "label 'x' does not occur in the training part"
        assert sorted(np.concatenate([f.test for f in folds]).tolist()) == list(range(16))
        assert [int((y[f.test] == 0).sum()) for f in folds].count(1) == 2  # x: one clip in each of two folds


def test_logmel_embedder_per_bin_mean_and_std_by_hand():
    """The logmel baseline: normalise with the matpac pair ((x + 7.056) / 4.193), then per mel bin the mean over time
    and the standard deviation over time (n - 1 in the denominator, torch's default: the numbers cached under
    `logmel:v1`), means of all bins first. The log-mel is replaced by raw values x = -7.056 + 4.193 z for chosen z."""
    e = embed.make_embedder("logmel")
    m, s = -7.056, 4.193
    z = torch.tensor([
        [[0, 0, 4, 4], [-1, 1, -1, 1], [5, 5, 5, 5]],  # clip 0: 3 mel bins x 4 frames
        [[1, 2, 3, 4], [-1, -1, -1, -1], [0, 0, 0, 8]],  # clip 1
    ], dtype=torch.float64)
    raw = (m + s * z).float()
    seen = []
    e.mel = lambda wave: seen.append(wave) or raw  # the log-mel of any (2, N) waveform: `raw`
    got = e(torch.zeros(2, 1600))
    assert len(seen) == 1 and seen[0].shape == (2, 1600) and seen[0].dtype == torch.float32
    r3 = math.sqrt(3)
    want = np.array([
        # means 2, 0, 5; stds sqrt((4 · 2²) / 3), sqrt((4 · 1²) / 3), 0
        [2.0, 0.0, 5.0, 4 / r3, 2 / r3, 0.0],
        # means 2.5, -1, 2; stds sqrt((1.5² + 0.5² + 0.5² + 1.5²) / 3), 0, sqrt((3 · 2² + 6²) / 3) = 4
        [2.5, -1.0, 2.0, math.sqrt(5 / 3), 0.0, 4.0],
    ], dtype=np.float32)
    assert got.dtype == np.float32 and got.shape == (2, 6)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=2e-6)


def test_logmel_embedder_of_silence_by_hand():
    """Silence through the real front end: every log-mel value is ln(float32 eps) = ln(2^-23), so each of the 80
    bins has mean (ln(2^-23) + 7.056) / 4.193 and standard deviation 0."""
    got = embed.make_embedder("logmel")(np.zeros((2, 16000), dtype=np.float32))
    want = np.concatenate([np.full(80, (math.log(2.0**-23) + 7.056) / 4.193), np.zeros(80)])
    assert got.shape == (2, 160)
    np.testing.assert_allclose(got, np.stack([want, want]), rtol=1e-6, atol=1e-6)


def test_logmel_embedder_takes_what_the_encoder_embedders_take():
    # it took only float torch tensors: numpy failed with AttributeError, int16 PCM was 32,768 times too loud
    e = embed.make_embedder("logmel")
    w = (0.1 * torch.randn(2, 8000)).clamp(-1, 1)
    ref = e(w)
    assert ref.shape == (2, 160) and ref.dtype == np.float32
    np.testing.assert_allclose(e(w.numpy()), ref, rtol=1e-5, atol=1e-5)
    pcm = (w * 32767).round().to(torch.int16)
    np.testing.assert_allclose(e(pcm), e(pcm.float() / 32768), rtol=1e-5, atol=1e-5)


def test_numeric_labels_of_one_value_have_one_order():
    """'1' and '01' are two classes of one integer value: sorted by int alone they kept the order of the set, which
    changes with PYTHONHASHSEED, so one command gave other class indices and other probe scores from run to run."""
    from matpac_fast.evaluation.datasets import _sorted_labels

    assert _sorted_labels(["1", "01", "2", "10"]) == _sorted_labels(["01", "1", "10", "2"]) == ["01", "1", "2", "10"]
