"""matpac-eval user errors and robustness: --classes on every layout, unique result names, undecodable audio,
arguments and --out checked before any work, t-SNE on few clips, corrupt cache entries, unsafe checkpoints."""

from __future__ import annotations

import argparse
import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch
from test_eval import RESULT_RE, tone

from matpac_fast.encoder import export_encoder_state, load_encoder
from matpac_fast.evaluation import cli, embed, report
from matpac_fast.evaluation.datasets import load_dataset

FAST = ["--quiet", "--probe", "logreg", "--folds", "kfold:3"]  # + a --projection and a cache choice
FAST_NO_FILES = FAST + ["--projection", "none", "--no-cache"]


def _run(args, capsys) -> tuple[list[str], str]:
    assert cli.main(args) == 0
    c = capsys.readouterr()
    return c.out.strip().splitlines(), c.err


def _one_line_error(args) -> str:
    with pytest.raises(SystemExit) as e:
        cli.main(args)
    msg = str(e.value.code)
    assert msg.startswith("matpac-eval: error: ") and "\n" not in msg, msg
    return msg


def _no_work(monkeypatch):
    def fail(*a, **k):
        raise AssertionError("embedding started although the arguments are invalid")

    monkeypatch.setattr(embed, "extract", fail)
    monkeypatch.setattr(embed, "make_embedder", fail)


def _fsdd_like(root: Path) -> Path:
    """A 12-clip FSDD layout (labels.csv with filename,label,speaker,split) of digits 0-2."""
    (root / "recordings").mkdir(parents=True)
    rows = ["filename,label,speaker,take,split"]
    for d in range(3):
        for take in range(4):
            name = f"recordings/{d}_s_{take}.wav"
            sf.write(root / name, tone(300.0 * (d + 1), 0.1, seed=take), 8000)
            rows.append(f"{name},{d},s{take % 2},{take},{'test' if take == 0 else 'train'}")
    (root / "labels.csv").write_text("\n".join(rows) + "\n")
    return root


def test_fsdd_as_its_repository_ships_it_without_labels_csv(tmp_path):
    """FSDD's repository has recordings/ only (labels.csv is a staged copy's): read as a folder it was one class,
    'recordings' (or, given recordings/ itself, no labelled subfolder). Its file names carry label, speaker and take,
    and its README the official split (takes 0-4 test)."""
    rec = tmp_path / "fsdd" / "recordings"
    rec.mkdir(parents=True)
    for d in (2, 0):
        for spk in ("bob", "ann"):
            for take in (10, 0, 6, 4):
                sf.write(rec / f"{d}_{spk}_{take}.wav", tone(300.0 * (d + 1), 0.1, seed=take), 8000)
    for given in (tmp_path / "fsdd", rec):
        ds = load_dataset(given)
        assert (ds.layout, ds.name, ds.official, ds.default_group) == ("fsdd", "fsdd", "split", "speaker")
        assert [Path(c.path).name for c in ds.clips[:5]] == ["0_ann_0.wav", "0_ann_4.wav", "0_ann_6.wav",
                                                              "0_ann_10.wav", "0_bob_0.wav"]  # as labels.csv lists
        assert [c.meta["split"] for c in ds.clips[:4]] == ["test", "test", "train", "train"]
        assert {c.labels for c in ds.clips} == {("0",), ("2",)} and ds.column("speaker")[4] == "bob"
    (rec / "notes.txt").write_text("not FSDD's")  # anything else in it: a plain folder, as before
    assert load_dataset(tmp_path / "fsdd").layout == "folder"


# --- 9: --classes ---------------------------------------------------------------------------------------------------
def test_classes_filter_known_layouts_and_folders(tmp_path, tones):
    fsdd = _fsdd_like(tmp_path / "fsdd")
    ds = load_dataset(fsdd, classes=["2", "0"])
    assert ds.layout == "fsdd" and ds.classes == ["0", "2"] and len(ds) == 8  # dataset order, not the user's
    assert ds.targets().tolist() == [0] * 4 + [1] * 4
    with pytest.raises(ValueError, match=r"unknown label 'nosuchlabel' in .*labels\.csv \(known labels: 0, 1, 2\)"):
        load_dataset(fsdd, classes=["nosuchlabel"])
    ds = load_dataset(tones, classes=["low", "high"])
    assert ds.classes == ["high", "low"] and len(ds) == 16


def test_classes_multilabel_keeps_wanted_labels(tmp_path):
    sf.write(tmp_path / "a.wav", tone(440, 0.1), 16000)
    (tmp_path / "m.csv").write_text('file,label\na.wav,"dog,cat"\na.wav,cow\na.wav,cat\n')
    ds = load_dataset(tmp_path / "m.csv", classes=["cat", "cow"])
    assert (
        ds.multilabel
        and ds.classes == ["cat", "cow"]
        and [c.labels for c in ds.clips] == [("cat",), ("cow",), ("cat",)]
    )


def test_classes_on_real_fsdd(fsdd_dir):
    ds = load_dataset(fsdd_dir, classes=["0", "1", "2"])
    assert ds.classes == ["0", "1", "2"] and len(ds) == 900 and {c.labels[0] for c in ds.clips} == {"0", "1", "2"}
    with pytest.raises(ValueError, match=r"unknown label 'nosuchlabel'.*known labels: 0, 1, 2, 3, 4, 5, 6, 7, 8, 9\)"):
        load_dataset(fsdd_dir, classes=["nosuchlabel"])


def test_classes_cli_errors_and_file(tmp_path, monkeypatch):
    fsdd = _fsdd_like(tmp_path / "fsdd")
    base = ["--checkpoint", "logmel", "--data", str(fsdd), "--out", str(tmp_path / "o")]
    _no_work(monkeypatch)
    msg = _one_line_error(base + ["--classes", "nosuchlabel"])
    assert "unknown label 'nosuchlabel'" in msg and "known labels: 0, 1, 2" in msg
    assert "no such file" in _one_line_error(base + ["--classes", "classes_missing.txt"])
    assert "no such file" in _one_line_error(base + ["--classes", str(tmp_path / "nodir" / "classes")])
    assert "only one class ('1')" in _one_line_error(base + ["--classes", "1"])
    assert not (tmp_path / "o").exists()  # the folder made for --out is removed again when the run fails early
    (tmp_path / "cls.txt").write_text("0\n2\n")
    assert cli._classes(str(tmp_path / "cls.txt")) == ["0", "2"]
    (tmp_path / "bad.txt").write_text("0\nseven\n")
    assert "unknown label 'seven'" in _one_line_error(base + ["--classes", str(tmp_path / "bad.txt")])


def test_single_class_dataset_is_an_error(tmp_path, monkeypatch):
    (tmp_path / "only" / "dog").mkdir(parents=True)
    for i in range(3):
        sf.write(tmp_path / "only" / "dog" / f"{i}.wav", tone(440, 0.1, seed=i), 16000)
    _no_work(monkeypatch)
    msg = _one_line_error(["--checkpoint", "logmel", "--data", str(tmp_path / "only"), "--out", str(tmp_path / "o")])
    assert "only one class ('dog')" in msg and "at least 2 classes" in msg


# --- 10: unique names, no silent replacement ------------------------------------------------------------------------
def test_two_runs_encoder_pt_get_two_rows(tones, tmp_path, capsys):
    for run, seed in (("u", 1), ("y", 2)):
        torch.manual_seed(seed)
        (tmp_path / "runs" / run).mkdir(parents=True)
        torch.save(export_encoder_state(load_encoder("random", preset="tiny")), tmp_path / "runs" / run / "encoder.pt")
    out = tmp_path / "out"
    common = ["--data", str(tones), "--preset", "tiny", "--out", str(out)] + FAST_NO_FILES
    names = []
    for run in ("u", "y", "u"):
        lines, _ = _run(["--checkpoint", str(tmp_path / "runs" / run / "encoder.pt")] + common, capsys)
        names.append(re.search(r"checkpoint=(\S+)", lines[-1]).group(1))
    assert re.fullmatch(r"u-encoder-[0-9a-f]{8}", names[0]) and re.fullmatch(r"y-encoder-[0-9a-f]{8}", names[1])
    assert names[2] == names[0]  # the same checkpoint re-evaluated replaces its own row
    assert len(list(out.glob("*__linear.json"))) == 0 and len(list(out.glob("*__logreg.json"))) == 2
    table = (out / "results.md").read_text()
    assert table.count(f"| {names[0]} |") == 1 and table.count(f"| {names[1]} |") == 1


def test_a_part_trained_runs_encoder_is_said_to_be_one(tones, tmp_path, capsys):
    """A run stopped early (the demo after a Ctrl-C, a SIGTERM, --max-steps) leaves an encoder.pt that was evaluated
    as any other, its scores read as a trained encoder's. Its run's newest checkpoint says how far it got."""
    run = tmp_path / "run"
    (run / "checkpoints" / "step_00000002").mkdir(parents=True)
    torch.save(export_encoder_state(load_encoder("random", preset="tiny")), run / "encoder.pt")
    state = run / "checkpoints" / "step_00000002" / "trainer_state.json"
    common = ["--data", str(tones), "--preset", "tiny", "--out", str(tmp_path / "out")] + FAST_NO_FILES
    for step, total, said in ((2, 10, True), (10, 10, False)):
        state.write_text(json.dumps({"step": step, "total_steps": total}))
        _, err = _run(["--checkpoint", str(run)] + common, capsys)
        line = (f"{run / 'encoder.pt'} (its run's newest checkpoint, step_00000002) is at step 2 of the 10 its "
                "schedule has: a part-trained encoder")
        assert (line in err) == said, err
    folder = tmp_path / "step_00000003"  # a trainer checkpoint folder, read by its own state
    folder.mkdir()
    (folder / "trainer_state.json").write_text(json.dumps({"step": 3, "total_steps": 8}))
    assert cli._short_of_schedule(folder).startswith(f"checkpoint {folder} is at step 3 of the 8 its schedule has")
    (folder / "trainer_state.json").write_text("{")  # unreadable: no line, never an error
    assert cli._short_of_schedule(folder) is None


def test_unique_name_never_replaces_another_embedders_result(tmp_path):
    report.write_json(tmp_path, {"task": "t", "checkpoint_name": "enc", "probe": "linear", "embedder_identity": "A"})
    assert report.unique_name(tmp_path, "t", "enc", "linear", "A") == ("enc", tmp_path / "t__enc__linear.json")
    name, replaces = report.unique_name(tmp_path, "t", "enc", "linear", "B")
    assert re.fullmatch(r"enc-[0-9a-f]{8}", name) and replaces is None


# --- 11: undecodable audio ------------------------------------------------------------------------------------------
def test_undecodable_files_are_skipped_and_reported(tones, tmp_path, capsys):
    (tones / "low" / "bad.wav").write_bytes(b"not audio at all")
    (tones / "mid" / "empty.wav").write_bytes(b"")
    lines, err = _run(
        ["--checkpoint", "logmel", "--data", str(tones), "--out", str(tmp_path / "o")] + FAST_NO_FILES, capsys
    )
    assert RESULT_RE.match(lines[-1])
    warning = [line for line in err.splitlines() if "skipped 2 of 26 clips" in line]
    assert len(warning) == 1 and "bad.wav" in warning[0] and "empty.wav (empty file)" in warning[0]
    r = json.loads(next((tmp_path / "o").glob("*.json")).read_text())
    assert r["n_clips"] == 24 and sorted(Path(s["path"]).name for s in r["skipped"]) == ["bad.wav", "empty.wav"]


def test_too_few_decodable_clips_is_an_error(tmp_path):
    for label in ("a", "b"):
        (tmp_path / "d" / label).mkdir(parents=True)
    for i in range(3):
        sf.write(tmp_path / "d" / "a" / f"ok{i}.wav", tone(440, 0.1, seed=i), 16000)
        (tmp_path / "d" / "b" / f"bad{i}.wav").write_bytes(b"junk")
    msg = _one_line_error(
        ["--checkpoint", "logmel", "--data", str(tmp_path / "d"), "--out", str(tmp_path / "o")] + FAST_NO_FILES
    )
    assert msg.endswith("d: only one class ('a') after skipping 3 of 6 clips (3 cannot be decoded: convert them to "
                        "wav/flac, or re-export the damaged ones); a probe needs at least 2 classes")


def test_float_clips_with_nan_or_inf_are_reported_as_such_not_as_undecodable(tmp_path, capsys):
    # A float32 WAV holding NaN or inf samples decodes fine, but matpac-eval said it "cannot be decoded", "no decodable
    # clip left" for its class, "undecodable" in the error, and load_clip advised converting it to wav/flac
    for label in ("a", "b", "c"):
        (tmp_path / "d" / label).mkdir(parents=True)
        for i in range(3):
            wave = tone(300.0 * (1 + "abc".index(label)), 0.1, seed=i).astype(np.float32)
            if label == "c" or (label == "a" and i == 0):
                wave[7] = np.nan if i % 2 else np.inf
            sf.write(tmp_path / "d" / label / f"{i}.wav", wave, 16000, subtype="FLOAT")
    (tmp_path / "d" / "b" / "cut.wav").write_bytes((tmp_path / "d" / "b" / "0.wav").read_bytes()[:60])
    _, err = _run(["--checkpoint", "logmel", "--data", str(tmp_path / "d"), "--out", str(tmp_path / "o")]
                  + FAST_NO_FILES, capsys)
    lines = err.strip().splitlines()
    assert lines[0].startswith("matpac-eval: warning: skipped 5 of 10 clips (4 with NaN or infinite samples, 1 cannot "
                               f"be decoded): {tmp_path / 'd' / 'a' / '0.wav'} (NaN or infinite samples), "), lines
    assert lines[1] == ("matpac-eval: warning: no clip of class(es) 'c' could be used (3 with NaN or infinite "
                        "samples); evaluating without them")
    with pytest.raises(embed.UnreadableAudio) as e:
        embed.load_clip(str(tmp_path / "d" / "c" / "1.wav"), 1600, embed.get_spec("matpac"))
    assert str(e.value) == (f"{tmp_path / 'd' / 'c' / '1.wav'}: holds NaN or infinite samples; replace those samples "
                            "with finite values (e.g. numpy.nan_to_num) and save it again, or drop it")
    (tmp_path / "d" / "b" / "cut.wav").rename(tmp_path / "d" / "c" / "cut.wav")
    shutil.rmtree(tmp_path / "d" / "b")
    msg = _one_line_error(["--checkpoint", "logmel", "--data", str(tmp_path / "d"), "--out", str(tmp_path / "o2")]
                          + FAST_NO_FILES)
    assert msg == (f"matpac-eval: error: {tmp_path / 'd'}: only one class ('a') after skipping 5 of 7 clips (4 with "
                   "NaN or infinite samples: replace those samples with finite values (e.g. numpy.nan_to_num) and save "
                   "the files again; 1 cannot be decoded: convert them to wav/flac, or re-export the damaged ones); a "
                   "probe needs at least 2 classes")


# --- 12: arguments and --out before any work --------------------------------------------------------------------------
@pytest.mark.parametrize(
    "extra, expected",
    [
        (["--val-fraction", "1.5"], "--val-fraction must be between 0 and 1"),
        (["--logreg-c", "0"], "--logreg-c must be > 0"),
        (["--seeds", "100000000"], "--seeds must be at most 1000 (linear-probe runs per fold; the protocol uses 3), "
                                   "got 100000000"),
        (["--clip-seconds", "0.001"], "--clip-seconds must be between 0.035 and 600 (every batch"),
        # one frame (0.025 s) gave the log-mel baseline a NaN std; 1e12 s a 56 PiB allocation traceback
        (["--clip-seconds", "0.03"], "--clip-seconds must be between 0.035 and 600"),
        (["--clip-seconds", "1e12"], "cut longer recordings into clips), got 1000000000000.0"),
        (["--task", "a b"], "--task 'a b'"),
        (["--out", "FILE"], "exists and is not a folder"),
        (["--out", "FILE/sub"], "cannot create or write this folder"),
    ],
)
def test_arguments_and_out_are_checked_before_any_work(tones, tmp_path, monkeypatch, extra, expected):
    (tmp_path / "FILE").write_text("precious\n")
    _no_work(monkeypatch)
    extra = [str(tmp_path / e) if e.startswith("FILE") else e for e in extra]
    args = ["--checkpoint", "logmel", "--data", str(tones), "--out", str(tmp_path / "o")] + extra
    assert expected in _one_line_error(args)
    assert (tmp_path / "FILE").read_text() == "precious\n"


# --- 13: t-SNE on few clips -----------------------------------------------------------------------------------------
def test_tsne_on_fewer_than_50_clips_and_projection_failure_keeps_the_result(tones, tmp_path, capsys, monkeypatch):
    X = np.random.default_rng(0).normal(size=(12, 160)).astype(np.float32)
    assert report.project_2d(X, "tsne").shape == (12, 2) and report.project_2d(X[:2], "pca").shape == (2, 2)
    with pytest.raises(ValueError, match="at least 4 clips"):
        report.project_2d(X[:3], "tsne")

    def broken(*a, **k):
        raise ValueError("cannot project")

    monkeypatch.setattr(report, "project_2d", broken)
    args = ["--checkpoint", "logmel", "--data", str(tones), "--out", str(tmp_path / "o"), "--no-cache"] + FAST
    lines, err = _run(args + ["--projection", "tsne"], capsys)
    assert RESULT_RE.match(lines[-1]) and "no tsne projection (cannot project)" in err


def test_damaged_earlier_outputs_in_out_are_warnings_not_crashes(tones, tmp_path, capsys):
    """A damaged projection or result file left by an earlier run in --out: the new run still ends with its RESULT;
    each damaged file is named in a warning (the chart / table leave it out)."""
    out = tmp_path / "o"
    args = ["--checkpoint", "logmel", "--data", str(tones), "--out", str(out), "--no-cache", "--projection", "pca"]
    _run(args + FAST, capsys)
    (proj,) = out.glob("*.proj.npz")
    (res,) = out.glob("*__*__*.json")
    other_res = res.with_name(res.name.replace("logmel", "other"))
    other_res.write_text('{"task": ')  # a truncated result of another embedder
    proj.write_bytes(proj.read_bytes()[:100])
    lines, err = _run(args + FAST, capsys)
    assert RESULT_RE.match(lines[-1])
    assert f"{other_res} is not a readable result" in err
    # this run rewrote its own projection; an unrelated damaged one is skipped with a warning
    bad = out / "x__y.proj.npz"
    bad.write_bytes(b"PK\x03\x04 not a zip")
    assert report.plot_projections(out, "tones") is not None
    assert f"{bad} is not a readable projection" in capsys.readouterr().err


# --- 14: corrupt cache entry ----------------------------------------------------------------------------------------
def test_corrupt_cache_entry_is_recomputed(tones, tmp_path, capsys):
    args = [
        "--checkpoint",
        "logmel",
        "--data",
        str(tones),
        "--out",
        str(tmp_path / "o"),
        "--cache-dir",
        str(tmp_path / "c"),
        "--projection",
        "none",
    ] + FAST
    first, _ = _run(args, capsys)
    (entry,) = (tmp_path / "c").glob("*.npz")
    entry.write_bytes(entry.read_bytes()[:200])  # truncated
    lines, err = _run(args, capsys)
    assert lines[-1] == first[-1] and "is unreadable" in err and "recomputing" in err
    with np.load(entry, allow_pickle=False) as z:  # rewritten whole
        assert z["emb"].shape == (24, 160)
    lines, err = _run(args, capsys)
    assert ", cached)" in lines[-3] and "warning" not in err  # the recomputed entry is a valid cache hit
    entry.write_bytes(b"garbage, not an archive" * 10)  # numpy calls this "pickled data" and suggests allow_pickle=
    lines, err = _run(args, capsys)
    warning = next(line for line in err.splitlines() if "is unreadable" in line)
    assert warning.endswith(f"{entry} is unreadable (not an .npz archive); deleting it and recomputing"), warning
    assert lines[-1] == first[-1]


# --- 15: unsafe checkpoints -----------------------------------------------------------------------------------------
def test_pickled_checkpoint_is_one_line_without_the_unsafe_hint(tones, tmp_path):
    torch.save({"model": {"a": torch.zeros(1)}, "args": argparse.Namespace(a=1)}, tmp_path / "evil.pt")
    msg = _one_line_error(
        ["--checkpoint", str(tmp_path / "evil.pt"), "--data", str(tones), "--out", str(tmp_path / "o")] + FAST
    )
    assert "holds pickled Python objects (argparse.Namespace)" in msg and "refused" in msg and "weights-only" in msg
    assert ".safetensors" in msg and "weights_only" not in msg and "False" not in msg and "damaged" not in msg


def test_damaged_checkpoint_is_called_damaged_not_unsafe(tones, tmp_path):
    torch.save({"a": torch.zeros(1000)}, tmp_path / "good.pt")
    raw = (tmp_path / "good.pt").read_bytes()
    (tmp_path / "truncated.pt").write_bytes(raw[: len(raw) // 2])
    (tmp_path / "empty.pt").write_bytes(b"")
    (tmp_path / "junk.pt").write_bytes(b"\x00" * 64)
    for name, reason in (("truncated.pt", "incomplete zip archive"), ("empty.pt", "empty file"),
                         ("junk.pt", "not torch.save data")):
        msg = _one_line_error(
            ["--checkpoint", str(tmp_path / name), "--data", str(tones), "--out", str(tmp_path / "o")] + FAST
        )
        assert f"{tmp_path / name} cannot be read (damaged or truncated: {reason}" in msg, msg
        assert "pickled" not in msg and "weights_only" not in msg and "corrupted" not in msg


def test_missing_checkpoint_and_empty_classes_are_prefixed_one_line_errors(tones, tmp_path, monkeypatch):
    base = ["--data", str(tones), "--out", str(tmp_path / "o")] + FAST
    msg = _one_line_error(["--checkpoint", str(tmp_path / "nosuch.pt")] + base)
    assert "--checkpoint" in msg and "no such file" in msg  # with the "matpac-eval: error: " prefix (checked)
    _no_work(monkeypatch)
    for empty in ("", " "):
        msg = _one_line_error(["--checkpoint", "logmel", "--classes", empty] + base)
        assert "is empty" in msg and "folder" not in msg
    (tmp_path / "bad.safetensors").write_bytes(b"junk")
    with pytest.raises(ValueError, match="not a readable .safetensors file"):
        load_encoder(tmp_path / "bad.safetensors")


def test_a_shard_set_as_data_says_eval_reads_audio(tmp_path):
    """make-shards' output is the natural next thing to pass; it said only "no audio files in label subfolders"."""
    from matpac_fast.data_fixtures import clip, write_shard_set

    write_shard_set(tmp_path / "sh", [("k0", clip(np.random.default_rng(0), 80), [0])], per_shard=1, min_frames=16)
    msg = _one_line_error(["--checkpoint", "logmel", "--data", str(tmp_path / "sh"), "--out", str(tmp_path / "o")])
    assert msg.endswith(f"--data {tmp_path / 'sh'} is a make-shards shard set (log-mel): matpac-eval reads audio; "
                        "pass the folder or CSV the shards were made from"), msg
    assert not (tmp_path / "o").exists()
    # a synthetic set was made from no files: the advice to pass them could not be followed
    from shard_tools.api import make_synthetic_shards

    make_synthetic_shards(tmp_path / "syn", n=4, workers=0, progress=False)
    msg = _one_line_error(["--checkpoint", "logmel", "--data", str(tmp_path / "syn"), "--out", str(tmp_path / "o")])
    assert "is a make-shards synthetic set (log-mel of generated sounds)" in msg and "python -m matpac_fast.demo" in msg
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("option", ["--out", "--data", "--checkpoint", "--cache-dir"])
def test_an_empty_path_is_an_error_not_the_current_folder(tmp_path, monkeypatch, capsys, option):
    # `--out ""` (an unset shell variable) wrote results.md, JSON and PNG into the current folder; `--data ""`
    # evaluated whatever the current folder held.
    monkeypatch.chdir(tmp_path)
    _no_work(monkeypatch)
    args = {"--checkpoint": "logmel", "--data": str(tmp_path), "--out": str(tmp_path / "out"),
            "--cache-dir": str(tmp_path / "cache"), option: ""}
    with pytest.raises(SystemExit) as e:
        cli.main([a for k, v in args.items() for a in (k, v)])
    assert e.value.code == 2
    assert f"matpac-eval: error: argument {option}: empty path: give a folder or file" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


def test_two_tasks_of_one_dataset_are_two_projection_panels(tmp_path):
    """Two --classes tasks of one dataset with one checkpoint: the chart kept one panel (the last file read replaced
    the other). A file written before the task was saved takes it from its name."""
    xy, label = np.zeros((4, 2), np.float32), np.array([0, 1, 0, 1])
    report.save_projection(tmp_path, "fsdd-digits", "ckpt", "fsdd", xy, label, ["0", "1"], "pca")
    report.save_projection(tmp_path, "fsdd-speakers", "ckpt", "fsdd", xy, label, ["george", "jackson"], "pca")
    old = dict(np.load(report.save_projection(tmp_path, "fsdd-old", "ckpt", "fsdd", xy, label, ["a", "b"], "pca")))
    del old["task"]
    np.savez(tmp_path / "fsdd-old__ckpt.proj.npz", **old)
    report.save_projection(tmp_path, "tones", "ckpt", "tones", xy, label, ["a", "b"], "pca")  # another dataset
    panels = report.read_projections(tmp_path, "fsdd")
    assert sorted(panels) == [("fsdd-digits", "ckpt"), ("fsdd-old", "ckpt"), ("fsdd-speakers", "ckpt")]
    assert [str(c) for c in panels[("fsdd-speakers", "ckpt")]["classes"]] == ["george", "jackson"]
    assert report.plot_projections(tmp_path, "fsdd").stat().st_size > 1000


# --- 16: the encoder API given a tensor of a near-miss shape ---------------------------------------------------------
def test_encoder_given_a_log_mel_of_a_near_miss_shape_says_how_to_fix_it():
    # encode_lms named only the expected (B, 80, T) for the loader's (B, 1, 80, T) batches, and forward_chunk given
    # (B, 80, T) raised torch's "expected input[1, 2, 80, 608] to have 1 channels, but got 2 channels instead"
    enc = load_encoder("random", preset="tiny")
    for shape, hint in (((2, 1, 80, 50), ": drop the channel axis with .squeeze(1)"),
                        ((80, 50), ": add the batch axis with .unsqueeze(0)"),
                        ((2, 50, 80), ": put the mel bins second with .transpose(1, 2)"),
                        ((2, 64, 50), "")):
        with pytest.raises(ValueError) as e:
            enc.encode_lms(torch.zeros(shape))
        assert str(e.value) == f"encode_lms expects (B, 80, T) log-mel, got {shape}{hint}"
    assert enc.encode_lms(torch.zeros(2, 1, 80, 50).squeeze(1)).shape == (2, 4, 320)
    with pytest.raises(ValueError) as e:
        enc.forward_chunk(torch.zeros(2, 80, 32))
    assert str(e.value) == ("forward_chunk expects a normalised (B, 1, 80, T) chunk, got (2, 80, 32): add the channel "
                            "axis with .unsqueeze(1), or pass raw log-mel to encode_lms, which takes (B, 80, T)")
    with pytest.raises(ValueError) as e:
        enc.encode(torch.zeros(2, 1, 16000), 16000)
    assert str(e.value) == ("encode expects a waveform (N,) or (B, N), got shape (2, 1, 16000): drop the channel axis "
                            "with .squeeze(1)")


def test_known_layout_classes_without_clips_are_no_probe_outputs(tmp_path, capsys):
    """An FSDD layout holding digits 0-2 only: the probe and the result have 3 classes, not FSDD's 10 (the 7 empty
    ones were outputs the probe could predict, and were dropped only when some clip was skipped)."""
    fsdd = _fsdd_like(tmp_path / "fsdd")
    out = tmp_path / "out"
    r = cli.run(cli.build_parser().parse_args([
        "--checkpoint", "logmel", "--data", str(fsdd), "--out", str(out), "--no-cache", "--quiet", "--seeds", "1",
        "--max-epochs", "2", "--projection", "none"]))
    assert r["n_classes"] == 3 and r["classes"] == ["0", "1", "2"]


def test_part_trained_note_skips_a_half_written_checkpoint(tmp_path):
    """A step_XXXXXXXX.tmp left by a kill while the last checkpoint was being written is not the run's newest
    checkpoint: the completed one before it says the encoder is part-trained (the .tmp silenced the note)."""
    import json

    from matpac_fast.evaluation import cli

    (tmp_path / "encoder.pt").write_bytes(b"")
    for name, step in (("step_00000005", 5), ("step_00000010.tmp", 10)):
        (tmp_path / "checkpoints" / name).mkdir(parents=True)
        state = {"step": step, "total_steps": 10}
        (tmp_path / "checkpoints" / name / "trainer_state.json").write_text(json.dumps(state))
    assert "is at step 5 of the 10" in cli._short_of_schedule(tmp_path / "encoder.pt")
    # a trainer_state.json nested too deep is no note (it was a RecursionError ending matpac-eval)
    (tmp_path / "checkpoints" / "step_00000005" / "trainer_state.json").write_text("[" * 100_000)
    assert cli._short_of_schedule(tmp_path / "encoder.pt") is None
