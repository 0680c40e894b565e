"""make-shards / verify-shards user mistakes and awkward inputs: one-line errors, nothing lost, every input reported.

Each test is the regression test of one reviewed defect; all fixtures are small files generated in tmp_path.
"""

import fcntl
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
from test_shards_audioset import _written

from shard_tools.cli import build_parser
from shard_tools.cli import main as cli_main
from shard_tools.verify import main as verify_main

ROOT = Path(__file__).resolve().parents[1]
SR = 8000
LONG = 7.0  # seconds: >= 608 frames
CLASS_INDEX = 'index,mid,display_name\n0,/m/09x0r,Speech\n1,/m/04rlf,"Music, all kinds"\n'


def tone(path: Path, seconds: float = LONG, sr: int = SR, freq: float = 440.0) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    t = np.arange(int(sr * seconds)) / sr
    sf.write(os.fsencode(path), 0.3 * np.sin(2 * np.pi * freq * t), sr)  # bytes: any file name
    return path


def run(*argv: str) -> int:
    return cli_main([*argv, "--workers", "0", "--no-progress"])


def manifest(out: Path) -> dict[str, dict]:
    lines = [json.loads(line) for line in (out / "manifest.jsonl").read_text(encoding="utf-8").splitlines()]
    return {line["source"]: line for line in lines}


def verify(out: Path, *extra: str) -> int:
    return verify_main([str(out), "--no-progress", *extra])


def non_utf8_name(folder: Path, raw: bytes) -> Path:
    """Rename a fresh wav to a file name that is not valid UTF-8 (skip where the file system refuses that)."""
    tone(folder / "tmp.wav")
    target = os.fsencode(folder) + b"/" + raw
    try:
        os.rename(os.fsencode(folder / "tmp.wav"), target)
    except OSError:
        pytest.skip("this file system does not accept non-UTF-8 file names")
    return Path(os.fsdecode(target))


def audioset_files(tmp_path: Path, segments: str, class_index: str = CLASS_INDEX) -> list[str]:
    (tmp_path / "seg.csv").write_bytes(segments.encode("utf-8") if isinstance(segments, str) else segments)
    (tmp_path / "ci.csv").write_bytes(class_index.encode("utf-8") if isinstance(class_index, str) else class_index)
    return ["audioset", "--segments", str(tmp_path / "seg.csv"), "--class-index", str(tmp_path / "ci.csv"),
            "--audio-root", str(tmp_path / "root")]


SEGMENTS = (
    "# Segments csv created Sun Mar  5 10:54:31 2017\n# num_ytids=3, num_segs=3, num_unique_labels=2\n"
    "# YTID, start_seconds, end_seconds, positive_labels\n"
    '--PJHxphWEs, 30.000, 40.000, "/m/09x0r,/m/04rlf"\n'
    '-0CamVQdP_Y, 0.000, 10.000, "/m/04rlf"\n'
    'AE5oZzfu2-E, 239.800, 249.800, "/m/09x0r"\n'
)


# ------------------------------------------------------------------------------------------- 1. non-UTF-8 names
def test_non_utf8_file_and_folder_names_are_written_with_valid_json(tmp_path):
    d = tmp_path / "in"
    tone(d / "cls" / "a.wav")
    non_utf8_name(d / "cls", b"\xff\xfe latin.wav")
    (d / "x").mkdir()
    os.rename(os.fsencode(d / "x"), os.fsencode(d) + b"/\xe9t\xe9")
    tone(Path(os.fsdecode(os.fsencode(d) + b"/\xe9t\xe9")) / "c.wav")
    out = tmp_path / "out"
    assert run("folder", str(d), "--out", str(out)) == 0
    text = (out / "manifest.jsonl").read_bytes().decode("utf-8")  # strict: no lone surrogates anywhere
    lines = manifest(out)
    assert set(lines) == {"cls/a.wav", "cls/\\xff\\xfe latin.wav", "\\xe9t\\xe9/c.wav"}
    assert all("shard" in line for line in lines.values()) and "\\udc" not in text
    stats = json.loads((out / "stats.json").read_text(encoding="utf-8"))
    assert stats["written"] == 3 and stats["classes"] == ["\\xe9t\\xe9", "cls"]
    assert verify(out) == 0


def test_non_utf8_name_in_audioset_root_is_reported(tmp_path):
    tone(tmp_path / "root" / "Y--PJHxphWEs.wav", 10.0)
    non_utf8_name(tmp_path / "root", b"\xff junk.wav")
    out = tmp_path / "out"
    assert run(*audioset_files(tmp_path, SEGMENTS), "--out", str(out)) == 0
    lines = manifest(out)
    assert lines["\\xff junk.wav"]["skipped"] == "not_in_csv"
    assert lines["Y--PJHxphWEs.wav"]["key"] == "--PJHxphWEs_30000"


# ------------------------------------------------------------------------------------------ 2. nothing written
def test_empty_folder_is_a_one_line_error(tmp_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.txt").write_text("not audio")
    with pytest.raises(SystemExit, match=r"no audio files under input folder .*1 other files were ignored"):
        run("folder", str(tmp_path / "empty"), "--out", str(tmp_path / "o"))
    assert not (tmp_path / "o").exists()


def test_all_too_short_is_an_error_with_a_hint_and_the_folder_stays_usable(tmp_path, capsys):
    d, out = tmp_path / "in", tmp_path / "out"
    for i in range(3):
        tone(d / "digits" / f"{i}.wav", 0.5)
    with pytest.raises(SystemExit) as e:
        run("folder", str(d), "--out", str(out))
    msg = str(e.value)
    assert "\n" not in msg and "nothing written: all 3 inputs were skipped (too_short 3)" in msg
    assert "--short pad" in msg and "manifest.jsonl" in msg
    assert sorted(p.name for p in out.iterdir()) == ["manifest.jsonl"]  # no stats.json, no .make-shards: not locked
    assert {line["skipped"] for line in manifest(out).values()} == {"too_short"}
    assert verify(out) == 1
    assert "OK" not in capsys.readouterr().out.split()
    tone(d / "digits" / "long.wav")  # a rerun with more files works
    assert run("folder", str(d), "--out", str(out)) == 0
    assert json.loads((out / "stats.json").read_text())["written"] == 1
    # and the hint was right: --short pad keeps them all
    assert run("folder", str(d), "--out", str(tmp_path / "pad"), "--short", "pad") == 0


def test_m2d_clips_shorter_than_the_reflect_padding_are_too_short_not_a_crash(tmp_path):
    """m2d pads each side by n_fft // 2 = 200 samples (reflect), which needs more samples than that: a 1-200 sample
    clip (at 16 kHz) is skipped as too_short with the reason; it used to stop the whole run with a traceback."""
    d = tmp_path / "in"
    tone(d / "c" / "long.wav", sr=16000)
    for n in (1, 150, 200, 201):
        sf.write(d / "c" / f"n{n}.wav", 0.3 * np.cos(np.arange(n) / 3.0), 16000)
    assert run("folder", str(d), "--out", str(tmp_path / "out"), "--frontend", "m2d") == 0
    lines = manifest(tmp_path / "out")
    for n in (1, 150, 200):
        assert lines[f"c/n{n}.wav"]["skipped"] == "too_short"
        assert "gives no log-mel frame (one frame needs 12.6 ms)" in lines[f"c/n{n}.wav"]["detail"]
    assert "skipped" not in lines["c/n201.wav"] and "skipped" not in lines["c/long.wav"]


def test_two_paths_with_one_key_get_two_keys(tmp_path, capsys):
    """A path key keeps 80 characters of the path and 32 bits of its hash: these two names (found by a search over
    117,594 names of one long prefix) share one. make-shards wrote both under it, and verify-shards called the set
    CORRUPT (one sample with two .npy members)."""
    from shard_tools.discover import path_key

    stem = "c/long_recording_session_of_the_left_calibration_microphone_array_take_" + "x" * 14
    a, b = f"{stem}0075043.wav", f"{stem}0117594.wav"
    assert path_key(a) == path_key(b)
    tone(tmp_path / "in" / a)
    tone(tmp_path / "in" / b, freq=660.0)
    out = tmp_path / "out"
    assert run("folder", str(tmp_path / "in"), "--out", str(out)) == 0
    lines = manifest(out)
    keys = [lines[x]["key"] for x in (a, b)]
    assert len(set(keys)) == 2 and all(k.startswith(path_key(a) + "-") for k in keys), keys
    assert verify(out) == 0 and "OK" in capsys.readouterr().out
    with tarfile.open(out / "shards-000000.tar") as t:
        assert sorted(m.name for m in t.getmembers()) == sorted(f"{k}.{ext}" for k in keys for ext in ("json", "npy"))


def test_verify_never_says_ok_for_a_set_without_samples(tmp_path, capsys):
    out = tmp_path / "legacy"  # what an older make-shards left for an empty input
    out.mkdir()
    (out / "sizes.json").write_text("{}")
    (out / "stats.json").write_text(json.dumps({"format_version": 1, "plan_hash": "x", "written": 0, "inputs": 0,
                                                "n_frames": 0, "skipped": {}}))
    (out / "manifest.jsonl").write_text("")
    assert verify(out) == 1
    assert "no samples" in capsys.readouterr().out
    tone(tmp_path / "in" / "c" / "a.wav")  # the empty set does not lock the folder either
    assert run("folder", str(tmp_path / "in"), "--out", str(out)) == 0


# ---------------------------------------------------------------------------------------------- 3. --out a file
def test_out_that_is_a_file_or_under_a_file(tmp_path):
    tone(tmp_path / "in" / "c" / "a.wav")
    f = tmp_path / "afile"
    f.write_text("mine")
    with pytest.raises(SystemExit, match=r"--out .*afile is a file, not a folder"):
        run("folder", str(tmp_path / "in"), "--out", str(f))
    with pytest.raises(SystemExit, match=r"afile is a file, so no folder can be made under it"):
        run("folder", str(tmp_path / "in"), "--out", str(f / "sub" / "x"))
    assert f.read_text() == "mine"


# ----------------------------------------------------------------------------------- 4. options before the plan
def test_bad_seed_is_refused_before_anything_is_written(tmp_path):
    tone(tmp_path / "in" / "c" / "a.wav")
    out = tmp_path / "out"
    with pytest.raises(SystemExit, match="--seed must be a whole number >= 0"):
        run("folder", str(tmp_path / "in"), "--out", str(out), "--seed", "-1")
    assert not out.exists()
    assert run("folder", str(tmp_path / "in"), "--out", str(out), "--seed", "3") == 0


def test_a_plan_without_work_does_not_lock_the_folder(tmp_path):
    """An older version wrote plan.json, then failed: the folder refused every later command."""
    tone(tmp_path / "in" / "c" / "a.wav")
    out = tmp_path / "out"
    (out / ".make-shards").mkdir(parents=True)
    (out / ".make-shards" / "plan.json").write_text(json.dumps({"plan_hash": "other", "inputs": 1}))
    assert run("folder", str(tmp_path / "in"), "--out", str(out)) == 0
    assert not (out / ".make-shards").exists()
    # a plan with journaled work is another command's interrupted run: still refused, with the way out
    (out / ".make-shards").mkdir()
    (out / ".make-shards" / "plan.json").write_text(json.dumps({"plan_hash": "other", "inputs": 1}))
    (out / ".make-shards" / "journal.jsonl").write_text(json.dumps({"shard": None, "start": 0, "end": 1}) + "\n")
    # (sizes.json too: one that neither a stats.json nor the journal lists the shards of is no longer make-shards')
    (out / "stats.json").unlink()
    (out / "sizes.json").unlink()
    with pytest.raises(SystemExit, match="interrupted run with other inputs.*--overwrite"):
        run("folder", str(tmp_path / "in"), "--out", str(out))


# --------------------------------------------------------------------------------- 5. --overwrite another name
def test_overwrite_with_another_name_deletes_the_earlier_set_only(tmp_path, capsys):
    tone(tmp_path / "in" / "c" / "a.wav")
    tone(tmp_path / "in" / "c" / "b.wav", freq=660)
    out = tmp_path / "out"
    assert run("folder", str(tmp_path / "in"), "--out", str(out), "--name", "first", "--shard-size", "1") == 0
    assert sorted(p.name for p in out.glob("first-*.tar")) == ["first-000000.tar", "first-000001.tar"]
    (out / "notes.txt").write_text("mine")
    (out / "first-backup.tar").write_text("mine too")  # not a shard name make-shards writes
    assert run("folder", str(tmp_path / "in"), "--out", str(out), "--name", "second", "--overwrite") == 0
    assert sorted(p.name for p in out.iterdir()) == [  # the earlier shards' index files went with them
        "first-backup.tar", "manifest.jsonl", "notes.txt", "second-000000.tar", "second-000000.tar.idx", "sizes.json",
        "stats.json",
    ]
    capsys.readouterr()
    assert verify(out) == 0
    assert "warning: first-backup.tar is not part of this shard set" in capsys.readouterr().out


def _interrupted_after_one_shard(monkeypatch, out: Path, root: Path, **options) -> None:
    """A make-shards run stopped (KeyboardInterrupt) as its second shard was renamed but not journaled yet: the
    state a kill between the two leaves."""
    from shard_tools import pipeline
    from shard_tools.api import make_folder_shards

    calls = []
    real = pipeline._append_line

    def stopped_at_the_second_line(path, obj):
        calls.append(obj)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(path, obj)

    with monkeypatch.context() as m:
        m.setattr(pipeline, "_append_line", stopped_at_the_second_line)
        with pytest.raises(KeyboardInterrupt):
            make_folder_shards(out, root, shard_size="1", workers=0, progress=False, **options)


def test_overwrite_deletes_only_the_shards_a_set_lists(tmp_path, monkeypatch):
    """A user's `first-000042.tar` beside a set named `first` is no shard of it: --overwrite under another name
    deleted it (every `<old name>-NNNNNN.tar` went). An interrupted run's journaled shards and the shard it had just
    renamed, unjournaled (killed between the two), still go."""
    for i in range(3):
        tone(tmp_path / "in" / "c" / f"{i}.wav", freq=440 + 110 * i)
    out = tmp_path / "out"
    _interrupted_after_one_shard(monkeypatch, out, tmp_path / "in", name="first")
    assert {p.name for p in out.glob("first-*")} == {  # 1: not journaled
        "first-000000.tar", "first-000000.tar.idx", "first-000001.tar", "first-000001.tar.idx"}
    (out / "first-000042.tar").write_text("mine")
    (out / "first-000042.tar.idx").write_text("mine too")
    assert run("folder", str(tmp_path / "in"), "--out", str(out), "--name", "second", "--overwrite") == 0
    assert sorted(p.name for p in out.iterdir()) == [
        "first-000042.tar", "first-000042.tar.idx", "manifest.jsonl", "second-000000.tar", "second-000000.tar.idx",
        "sizes.json", "stats.json"]
    assert (out / "first-000042.tar").read_text() == "mine"
    # a complete set: the shards its sizes.json lists go, the user's file stays
    assert run("folder", str(tmp_path / "in"), "--out", str(out), "--name", "third", "--overwrite") == 0
    assert sorted(p.name for p in out.glob("*.tar")) == ["first-000042.tar", "third-000000.tar"]


# ------------------------------------------------------------------------------------ 6. verify an interrupted run
def test_verify_reports_an_interrupted_run_as_incomplete(tmp_path, capsys):
    tone(tmp_path / "in" / "c" / "a.wav")
    out = tmp_path / "out"
    assert run("folder", str(tmp_path / "in"), "--out", str(out)) == 0
    for name in ("sizes.json", "stats.json", "manifest.jsonl"):  # the state of a run killed after its first shard
        (out / name).unlink()
    (out / ".make-shards").mkdir()
    (out / "shards-000001.tar.tmp").write_bytes(b"\0" * 512)
    capsys.readouterr()
    assert verify(out) == 1
    text = capsys.readouterr().out
    assert "INCOMPLETE" in text and "run the same make-shards command again" in text
    assert "CORRUPT" not in text and "missing" not in text
    # the same state while a make-shards run holds the folder's lock: running, not interrupted
    from matpac_fast.locks import close_lock_fd
    from shard_tools.pipeline import _lock_out_dir

    fd = _lock_out_dir(out)
    try:
        assert verify(out) == 1
    finally:
        close_lock_fd(fd)
    text = capsys.readouterr().out
    if Path("/proc/locks").exists():  # read from Linux's lock table; elsewhere the run is called interrupted
        assert f"INCOMPLETE: {out} is being written by a make-shards run now; verify it once that run has ended" \
            in text


# ----------------------------------------------------------------------------------------------- 7. --top
def test_verify_top(tmp_path, capsys):
    tone(tmp_path / "in" / "c" / "a.wav")
    out = tmp_path / "out"
    assert run("folder", str(tmp_path / "in"), "--out", str(out)) == 0
    capsys.readouterr()
    assert verify(out, "--top", "0") == 0
    text = capsys.readouterr().out
    assert "labels: 1 classes present" in text and "top" not in text and text.rstrip().endswith("OK")
    with pytest.raises(SystemExit) as e:
        verify(out, "--top", "-1")
    assert e.value.code == 2 and "--top" in capsys.readouterr().err
    with pytest.raises(SystemExit, match="not a folder"):
        verify(tmp_path / "nope")


# ------------------------------------------------------------------------------------------- 8. manifest CSVs
def test_manifest_bom_dedupe_and_empty_paths(tmp_path, capsys):
    tone(tmp_path / "x.wav")
    tone(tmp_path / "y.wav", freq=660)
    csv = tmp_path / "list.csv"
    csv.write_text(f"\ufeffpath,label\nx.wav,dog\n./x.wav,dog\n{tmp_path / 'x.wav'},dog\n,cat\ny.wav,cat\n  ,\n",
                   encoding="utf-8")
    out = tmp_path / "out"
    assert run("manifest", str(csv), "--out", str(out)) == 0
    printed = capsys.readouterr()
    lines = manifest(out)
    assert "shard" in lines["x.wav"] and "shard" in lines["y.wav"]
    for dup in ("./x.wav", str(tmp_path / "x.wav")):
        assert lines[dup]["skipped"] == "duplicate" and "same file as 'x.wav' (line 2)" in lines[dup]["detail"]
    assert "ignored 2 row(s) with an empty path (line 5, 7)" in printed.err
    stats = json.loads((out / "stats.json").read_text())
    assert stats["classes"] == ["cat", "dog"] and stats["skipped"] == {"duplicate": 2}


@pytest.mark.parametrize("header,message", [
    # said "needs a 'path' column (and optionally 'label')", not that file or filename are read as the path column
    ("name,label", "no path column: name the column of audio paths 'path' (or 'file' or 'filename'); 'label' is "
                   "optional; got ['name', 'label']"),
    ("filenames,label", "unknown column 'filenames' (did you mean 'filename'?); accepted columns: path (or file, "
                        "filename), label"),  # was "needs a 'path' column"
    ("file,filename,label", "columns 'file' and 'filename' could each be the path column; rename the one that holds "
                            "the audio paths to 'path'"),  # was "needs a 'path' column", with both there
])
def test_manifest_without_a_path_column_names_the_accepted_names(tmp_path, header, message):
    csv_path = tmp_path / "m.csv"
    csv_path.write_text(f"{header}\nx.wav,dog,\n")
    with pytest.raises(SystemExit) as e:
        run("manifest", str(csv_path), "--out", str(tmp_path / "o"))
    assert str(e.value) == f"make-shards: error: {csv_path}: {message}"
    assert not (tmp_path / "o").exists()


def test_manifest_encoding_and_column_errors(tmp_path, capsys):
    tone(tmp_path / "x.wav")
    bad = tmp_path / "latin1.csv"
    bad.write_bytes(b"path,label\nx.wav,dog\nx.wav,caf\xe9\n")
    with pytest.raises(SystemExit, match=r"latin1\.csv: line 3 is not UTF-8 .*save the file as UTF-8"):
        run("manifest", str(bad), "--out", str(tmp_path / "o"))
    typo = tmp_path / "typo.csv"
    typo.write_text("path,labels\nx.wav,dog\n")
    with pytest.raises(SystemExit, match=r"unknown column 'labels' \(did you mean 'label'\?\); accepted columns: "
                                         r"path \(or file, filename\), label"):
        run("manifest", str(typo), "--out", str(tmp_path / "o"))
    extra = tmp_path / "extra.csv"
    extra.write_text("Path,duration\nx.wav,7\n")
    assert run("manifest", str(extra), "--out", str(tmp_path / "o")) == 0
    assert "ignored column(s) 'duration' (accepted: path (or file, filename), label); there is no 'label' column, " \
           "so every clip is unlabelled" in capsys.readouterr().err
    nopath = tmp_path / "nopath.csv"
    nopath.write_text("name,label\nx.wav,dog\n")
    with pytest.raises(SystemExit, match="no path column"):
        run("manifest", str(nopath), "--out", str(tmp_path / "o2"))
    alias = tmp_path / "alias.csv"  # FSDD's labels.csv and matpac-eval's CSVs name the column filename / file
    alias.write_text("filename,label,speaker\nx.wav,dog,a\n")
    assert run("manifest", str(alias), "--out", str(tmp_path / "o4")) == 0
    assert manifest(tmp_path / "o4")["x.wav"].get("shard") is not None
    missing = tmp_path / "missing.csv"
    missing.write_text("path\nnot_there.wav\n")
    with pytest.raises(SystemExit, match=r"nothing written: all 1 inputs were skipped \(not_found 1\); the listed "
                                         r"files do not exist"):
        run("manifest", str(missing), "--out", str(tmp_path / "o3"))
    assert "no such file" in manifest(tmp_path / "o3")["not_there.wav"]["detail"]
    # a quote left open: every later row became one not_found path, without a word; past the csv module's field
    # limit (128 KiB of rows), a _csv.Error traceback. Both are one line naming where the quote opens.
    open_quote = tmp_path / "open_quote.csv"
    open_quote.write_text('path,label\nx.wav,dog\n"b, with comma.wav,dog\nx.wav,cat\n')
    with pytest.raises(SystemExit, match=r"open_quote\.csv: line 3: a quoted cell runs over 2 lines \(a quote left "
                                         r"open\?\); close the quote"):
        run("manifest", str(open_quote), "--out", str(tmp_path / "o5"))
    header = tmp_path / "header.csv"
    header.write_text('"path,label\n' + "x.wav,cat\n" * 20000)  # in the header line: a traceback too
    with pytest.raises(SystemExit, match=r"header\.csv: line 1 \(the header\): field larger than field limit"):
        run("manifest", str(header), "--out", str(tmp_path / "o7"))
    huge = tmp_path / "huge.csv"
    huge.write_text('path,label\n"b.wav,dog\n' + "x.wav,cat\n" * 20000)
    with pytest.raises(SystemExit, match=r"huge\.csv: line \d+: field larger than field limit .*check the quoting"):
        run("manifest", str(huge), "--out", str(tmp_path / "o6"))
    assert not (tmp_path / "o5").exists() and not (tmp_path / "o6").exists()


# ------------------------------------------------------------------------------------------- 9. AudioSet CSVs
def test_audioset_csvs_with_bom_or_plain_header(tmp_path):
    tone(tmp_path / "root" / "Y--PJHxphWEs.wav", 10.0)
    plain = 'YTID,start_seconds,end_seconds,positive_labels\n--PJHxphWEs,30,40,"/m/09x0r,/m/04rlf"\n'
    out = tmp_path / "out"
    assert run(*audioset_files(tmp_path, "\ufeff" + plain, "\ufeff" + CLASS_INDEX), "--out", str(out)) == 0
    stats = json.loads((out / "stats.json").read_text())
    assert stats["written"] == 1 and stats["classes"] == ["Speech", "Music, all kinds"]
    assert stats["segments"] == {"in_csvs": 1, "with_file": 1, "missing": 0}
    bom_hash = "\ufeff" + SEGMENTS  # a BOM before AudioSet's '#' lines
    assert run(*audioset_files(tmp_path, bom_hash), "--out", str(tmp_path / "o2")) == 0


@pytest.mark.parametrize(
    "segments,class_index,error",
    [
        ('# h\n--PJHxphWEs, thirty, 40, "/m/09x0r"\n', CLASS_INDEX,
         r"seg\.csv: line 2 \(data row 1\): start 'thirty' is not a number of seconds"),
        ('--PJHxphWEs, 30, 40, "/m/09x0r"\n--PJHxphWEs, 50, nan, "/m/09x0r"\n', CLASS_INDEX,
         r"seg\.csv: line 2 \(data row 2\): end 'nan' is not a number of seconds"),
        ('--PJHxphWEs, 30, 20, "/m/09x0r"\n', CLASS_INDEX, r"line 1 \(data row 1\): end 20 is not after start 30"),
        ('--PJHxphWEs, 30, 40\n', CLASS_INDEX, r"line 1 \(data row 1\) has 3 fields"),
        (SEGMENTS, "index,mid,display_name\nx,/m/09x0r,Speech\n", r"ci\.csv: line 2: index 'x' is not a whole number"),
        (SEGMENTS, b"index,mid,display_name\n0,/m/09x0r,Sp\xe9ech\n", r"ci\.csv: line 2 is not UTF-8"),
    ],
)
def test_audioset_csv_errors_name_file_and_row(tmp_path, segments, class_index, error):
    tone(tmp_path / "root" / "Y--PJHxphWEs.wav", 10.0)
    with pytest.raises(SystemExit, match=error):
        run(*audioset_files(tmp_path, segments, class_index), "--out", str(tmp_path / "o"))
    assert not (tmp_path / "o").exists()


# ------------------------------------------------------------------------------------------------ 10. symlinks
def test_a_file_edited_in_place_with_its_size_kept_is_noticed(tmp_path, monkeypatch, capsys):
    """Other audio of the same length (same size) in a.wav: the rerun of a complete set said "already complete", and
    a resume would have mixed old and new audio. Sizes and modification times now stand for the content. A set whose
    stats.json holds the older hash (no times) is still recognised."""
    from shard_tools import pipeline
    from shard_tools.cli import build_parser, config_from_args, discover

    d, out = tmp_path / "in", tmp_path / "out"
    for name, freq in (("a", 440.0), ("b", 550.0), ("c", 660.0)):
        tone(d / "k" / f"{name}.wav", freq=freq)
    argv = ["folder", str(d), "--out", str(out), "--shard-size", "1"]
    assert run(*argv) == 0
    stats = json.loads((out / "stats.json").read_text())
    args = build_parser().parse_args([*argv, "--workers", "0", "--no-progress"])
    legacy = pipeline.plan_hash(discover(args), config_from_args(args), mtimes=False)
    assert legacy != stats["plan_hash"]
    (out / "stats.json").write_text(json.dumps({**stats, "plan_hash": legacy}))  # as an older version wrote it
    assert run(*argv) == 0 and "already complete" in capsys.readouterr().out
    (out / "stats.json").write_text(json.dumps(stats))  # (an older set is checked by sizes alone, as it was made)

    size = (d / "k" / "a.wav").stat().st_size
    tone(d / "k" / "a.wav", freq=880.0)
    st = (d / "k" / "a.wav").stat()
    os.utime(d / "k" / "a.wav", ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))  # a coarse clock: a later second
    assert (d / "k" / "a.wav").stat().st_size == size
    with pytest.raises(SystemExit, match="already holds a different shard set .*inputs added, removed, modified"):
        run(*argv)
    # an interrupted run of these files: the edited file is noticed on resume too
    _interrupted_after_one_shard(monkeypatch, tmp_path / "o2", d)
    tone(d / "k" / "b.wav", freq=990.0)
    st = (d / "k" / "b.wav").stat()
    os.utime(d / "k" / "b.wav", ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    with pytest.raises(SystemExit, match=r"inputs changed since \(3 both times; files added, removed, resized, "
                                         r"modified or relabelled\)"):
        run("folder", str(d), "--out", str(tmp_path / "o2"), "--shard-size", "1")


def test_symlink_loops_aliases_and_broken_links(tmp_path, capsys):
    d = tmp_path / "lp"
    tone(d / "cls" / "a.wav")
    try:
        (d / "cls" / "loop").symlink_to("..")
    except OSError:
        pytest.skip("no symlinks here")
    (d / "cls" / "alias.wav").symlink_to("a.wav")
    (d / "cls" / "broken.wav").symlink_to("nothere.wav")
    (d / "again").symlink_to("cls")  # a second name for a folder: entered once
    tone(tmp_path / "ext" / "b.wav", freq=550)
    tone(tmp_path / "ext" / "deep" / "c.wav", freq=660)
    (d / "zz_ext").symlink_to(tmp_path / "ext")  # outside the tree: entered, once
    (d / "aa_deep").symlink_to(tmp_path / "ext" / "deep")  # met first; zz_ext/deep is then not entered again
    out = tmp_path / "out"
    assert run("folder", str(d), "--out", str(out)) == 0
    lines = manifest(out)
    assert set(lines) == {"cls/a.wav", "cls/alias.wav", "cls/broken.wav", "zz_ext/b.wav", "aa_deep/c.wav"}
    assert lines["cls/alias.wav"]["skipped"] == "duplicate" and "same file as cls/a.wav" in lines["cls/alias.wav"][
        "detail"]
    assert lines["cls/broken.wav"]["skipped"] == "not_found"
    assert "broken symbolic link" in lines["cls/broken.wav"]["detail"]
    assert json.loads((out / "stats.json").read_text())["written"] == 3
    assert "did not enter 3 symlinked folder(s) whose target is scanned anyway" in capsys.readouterr().err


# ----------------------------------------------------------------------------------- 11. other people's files
@pytest.mark.parametrize("text", ["my own notes, not JSON\n", "[" * 100_000])  # deep JSON: was a RecursionError
def test_foreign_stats_json_is_named_and_kept(tmp_path, text):
    tone(tmp_path / "in" / "c" / "a.wav")
    out = tmp_path / "out"
    out.mkdir()
    (out / "stats.json").write_text(text)
    for extra in ([], ["--overwrite"]):
        with pytest.raises(SystemExit) as e:
            run("folder", str(tmp_path / "in"), "--out", str(out), *extra)
        msg = str(e.value)
        assert str(out / "stats.json") in msg and "move it out of" in msg and "\n" not in msg
    assert (out / "stats.json").read_text() == text
    assert sorted(p.name for p in out.iterdir()) == ["stats.json"]


@pytest.mark.parametrize("first", [
    '{"source": "freesound/123", "path": "a.wav", "license": "CC-BY", "author": "x"}',  # an attribution list
    '{"source": "a.wav", "label": "dog"}',
    '{"source": "a.wav", "shard": "shards-000000.tar", "license": "CC0"}',
])
def test_a_users_manifest_jsonl_is_kept_and_both_tools_call_it_foreign(tmp_path, capsys, first):
    """A manifest.jsonl whose first line merely had a "source" key counted as make-shards' own and was replaced
    without --overwrite (security review 3a); verify-shards already called the first one foreign: one rule now."""
    tone(tmp_path / "in" / "c" / "a.wav")
    out = tmp_path / "out"
    out.mkdir()
    text = first + '\n{"source": "b.wav"}\n'
    (out / "manifest.jsonl").write_text(text)
    for extra in ([], ["--overwrite"]):
        with pytest.raises(SystemExit) as e:
            run("folder", str(tmp_path / "in"), "--out", str(out), *extra)
        msg = str(e.value)
        assert "manifest.jsonl is not a make-shards manifest" in msg and "move it out of" in msg and "\n" not in msg
    assert sorted(p.name for p in out.iterdir()) == ["manifest.jsonl"]
    assert (out / "manifest.jsonl").read_text() == text
    capsys.readouterr()
    assert verify(out) == 1
    assert "NOT A SHARD SET" in capsys.readouterr().out


def test_make_shards_and_verify_agree_on_whose_manifest_it_is(tmp_path):
    from shard_tools.pipeline import _not_ours
    from shard_tools.verify import _foreign

    lines = ['{"key": "k", "shard": "shards-000000.tar", "source": "a.wav"}',
             '{"flags": ["cropped"], "key": "k", "shard": "shards-000000.tar", "source": "a.wav"}',
             '{"skipped": "too_short", "source": "a.wav"}', '{"detail": "x", "skipped": "empty", "source": "a.wav"}',
             '{"source": "a.wav"}', '{"source": "a.wav", "path": "a.wav"}', '{"source": 3, "skipped": "empty"}',
             '{"key": "k", "source": "a.wav"}', '["source"]']
    for i, line in enumerate(lines):  # the first four are lines make-shards writes
        (tmp_path / "manifest.jsonl").write_text(line + "\n")
        assert _foreign(tmp_path / "manifest.jsonl") == (i >= 4), line
        assert (_not_ours(tmp_path / "manifest.jsonl") is not None) == (i >= 4), line


@pytest.mark.parametrize("change", [{"written": 0}, {"written": None}, {"written": "4"}, {"shard_sha256": None},
                                    {"shard_sha256": {}}, {"shard_sha256": ["shards-000000.tar"]}])
def test_a_stats_json_not_as_make_shards_writes_it_deletes_nothing(small_set, tmp_path, change):
    """stats.json with "written" 0 (or without "written") counted as an empty set of an older version: the whole set
    went without --overwrite, every shard it listed and a user's shards-000099.tar too, and a smaller set took its
    place (security review 3c). Now refused in one line, with or without --overwrite, nothing deleted."""
    out = tmp_path / "set"
    shutil.copytree(small_set, out)
    stats = json.loads((out / "stats.json").read_text())
    stats.update(change)
    if change.get("written", 1) is None:
        del stats["written"]
    (out / "stats.json").write_text(json.dumps(stats))
    (out / "shards-000099.tar").write_bytes(b"mine")
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    for extra in ([], ["--overwrite"]):
        with pytest.raises(SystemExit) as e:
            run("synthetic", "--n", "4", "--out", str(out), *extra)
        msg = str(e.value)
        assert "stats.json is not as make-shards writes it" in msg and "nothing was changed" in msg, msg
        assert "\n" not in msg
        assert {p.name: p.read_bytes() for p in out.iterdir()} == before


def test_an_empty_set_of_an_older_version_is_replaced_but_not_a_users_shard_file(tmp_path):
    out = tmp_path / "legacy"
    out.mkdir()
    (out / "sizes.json").write_text("{}")
    (out / "stats.json").write_text(json.dumps({"format_version": 1, "plan_hash": "x", "written": 0, "inputs": 0}))
    (out / "shards-000099.tar").write_bytes(b"mine")
    with pytest.raises(SystemExit, match="already has 1 shards-NNNNNN.tar file.s. from an unknown run"):
        run("synthetic", "--n", "2", "--out", str(out))
    assert sorted(p.name for p in out.iterdir()) == ["shards-000099.tar", "sizes.json", "stats.json"]
    assert run("synthetic", "--n", "2", "--out", str(out), "--name", "other") == 0
    assert (out / "shards-000099.tar").read_bytes() == b"mine"
    assert json.loads((out / "stats.json").read_text())["written"] == 2


def test_another_tools_sizes_json_and_its_shards_are_kept(small_set, tmp_path):
    """A WebDataset set's sizes.json ({"audio-000000.tar": n}) has make-shards' shape: it was replaced, and with
    --overwrite the audio-*.tar shards it lists were deleted (security review 3b)."""
    out = tmp_path / "wds"
    out.mkdir()
    for i in range(2):
        shutil.copy(small_set / f"shards-00000{i}.tar", out / f"audio-00000{i}.tar")
    (out / "sizes.json").write_text(json.dumps({"audio-000000.tar": 4, "audio-000001.tar": 4}))
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    for extra in ([], ["--overwrite"]):
        with pytest.raises(SystemExit) as e:
            run("synthetic", "--n", "4", "--out", str(out), *extra)
        assert "sizes.json is not make-shards'" in str(e.value) and "nothing was changed" in str(e.value)
        assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    # a make-shards set's sizes.json beside another tool's stats.json-less shards: the same
    shutil.copy(small_set / "sizes.json", out / "sizes.json")
    with pytest.raises(SystemExit, match="sizes.json is not make-shards'"):
        run("synthetic", "--n", "4", "--out", str(out), "--overwrite")
    assert sorted(p.name for p in out.iterdir()) == ["audio-000000.tar", "audio-000001.tar", "sizes.json"]


def test_a_run_killed_between_sizes_json_and_stats_json_is_finished(tmp_path, monkeypatch):
    from shard_tools import pipeline

    real = pipeline._write_atomic

    def killed_before_stats(path, text):
        if path.name == "stats.json":
            raise KeyboardInterrupt
        real(path, text)

    out = tmp_path / "out"
    with monkeypatch.context() as m:
        m.setattr(pipeline, "_write_atomic", killed_before_stats)
        with pytest.raises(SystemExit, match="130"):  # the CLI's status for a Ctrl-C
            run("synthetic", "--n", "4", "--out", str(out), "--shard-size", "2")
    assert (out / "sizes.json").is_file() and not (out / "stats.json").exists()
    assert run("synthetic", "--n", "4", "--out", str(out), "--shard-size", "2") == 0
    assert json.loads((out / "stats.json").read_text())["written"] == 4 and verify(out) == 0


def test_verify_only_warns_about_unrelated_tar_files(tmp_path, capsys):
    tone(tmp_path / "in" / "c" / "a.wav")
    out = tmp_path / "out"
    assert run("folder", str(tmp_path / "in"), "--out", str(out)) == 0
    (out / "backup.tar").write_bytes(b"not even a tar")
    capsys.readouterr()
    assert verify(out) == 0
    assert "warning: backup.tar is not part of this shard set" in capsys.readouterr().out
    shutil.copy(out / "shards-000000.tar", out / "shards-000007.tar")  # a stray shard of this very set: a problem
    assert verify(out) == 1
    assert "shards-000007.tar looks like a shard of this set but is not in sizes.json" in capsys.readouterr().out


# --------------------------------------------------------------------------------------- 12. docs match behaviour
def test_audioset_missing_count_in_final_summary_and_stats(tmp_path, capsys):
    tone(tmp_path / "root" / "Y--PJHxphWEs.wav", 10.0)
    out = tmp_path / "out"
    assert run(*audioset_files(tmp_path, SEGMENTS), "--out", str(out)) == 0
    printed = capsys.readouterr()
    line = "segments in CSVs: 3; with an audio file: 1; missing: 2"
    assert line in printed.err and line in printed.out.splitlines()[1]
    assert json.loads((out / "stats.json").read_text())["segments"] == {"in_csvs": 3, "with_file": 1, "missing": 2}


def test_truncated_clip_rule_matches_help(tmp_path):
    """A 4 s file for a 10 s segment: too_short by default, written with the flag 'truncated' under --short pad."""
    tone(tmp_path / "root" / "Y--PJHxphWEs.wav", 4.0)
    tone(tmp_path / "root" / "AE5oZzfu2-E_239.8.wav", 10.0)
    args = audioset_files(tmp_path, SEGMENTS)
    assert run(*args, "--out", str(tmp_path / "drop")) == 0
    assert manifest(tmp_path / "drop")["Y--PJHxphWEs.wav"]["skipped"] == "too_short"
    assert run(*args, "--out", str(tmp_path / "pad"), "--short", "pad") == 0
    assert manifest(tmp_path / "pad")["Y--PJHxphWEs.wav"]["flags"] == ["truncated"]
    sub = build_parser()._subparsers._group_actions[0].choices["audioset"]
    help_text = " ".join(sub.format_help().split())
    assert "is kept with the flag 'truncated'" not in help_text
    assert "written if it has at least --min-frames frames, else --short decides" in help_text


def test_pad_zero_frame_detail(tmp_path):
    tone(tmp_path / "in" / "c" / "tiny.wav", 0.01)
    tone(tmp_path / "in" / "c" / "ok.wav")
    out = tmp_path / "out"
    assert run("folder", str(tmp_path / "in"), "--out", str(out), "--short", "pad") == 0
    detail = manifest(out)["c/tiny.wav"]["detail"]
    assert "608" not in detail and "no log-mel frame" in detail
    assert run("folder", str(tmp_path / "in"), "--out", str(tmp_path / "drop")) == 0
    assert "< --min-frames 608" in manifest(tmp_path / "drop")["c/tiny.wav"]["detail"]


@pytest.mark.parametrize("name", ["my set", "a[", "a*", "x.y", "é"])
def test_name_is_letters_digits_underscore_dash(tmp_path, name):
    tone(tmp_path / "in" / "c" / "a.wav")
    with pytest.raises(SystemExit, match=r"--name .*use only letters, digits, '_' and '-'"):
        run("folder", str(tmp_path / "in"), "--out", str(tmp_path / "o"), "--name", name)
    assert not (tmp_path / "o").exists()


@pytest.mark.skipif("MP3" not in sf.available_formats(), reason="libsndfile without MP3")
def test_text_named_mp3_is_undecodable_and_quiet(tmp_path, capfd):
    d = tmp_path / "in" / "c"
    tone(d / "ok.wav")
    (d / "text.mp3").write_text("hello, this is not audio\n" * 50)
    (d / "zeros.mp3").write_bytes(b"ID3" + bytes(300))
    out = tmp_path / "out"
    assert run("folder", str(tmp_path / "in"), "--out", str(out)) == 0
    err = capfd.readouterr().err
    assert "Note:" not in err and "libmpg123" not in err
    lines = manifest(out)
    for src in ("c/text.mp3", "c/zeros.mp3"):
        assert lines[src]["skipped"] == "undecodable"
        assert "not a valid .mp3 audio file" in lines[src]["detail"] and "pipe" not in lines[src]["detail"]


def test_an_unreadable_file_says_permission_denied(tmp_path, monkeypatch):
    """libsndfile says only "System error." for a file without read permission. Root reads any file, so the
    refusal is played by the decoder's open(); as another user, chmod 000 is the real thing."""
    import builtins

    from shard_tools import decode

    d = tmp_path / "in" / "c"
    tone(d / "ok.wav")
    locked = tone(d / "locked.wav")
    if os.geteuid() == 0:
        def refuse(path, *args, **kwargs):
            if os.fsdecode(path) == str(locked):
                raise PermissionError(13, "Permission denied", str(path))
            return builtins.open(path, *args, **kwargs)

        real_soundfile = sf.SoundFile
        monkeypatch.setattr(decode, "open", refuse, raising=False)
        monkeypatch.setattr(sf, "SoundFile", lambda p, *a, **k: (_ for _ in ()).throw(RuntimeError("System error."))
                            if os.fsdecode(p) == str(locked) else real_soundfile(p, *a, **k))
    else:
        locked.chmod(0)
    out = tmp_path / "out"
    assert run("folder", str(tmp_path / "in"), "--out", str(out)) == 0
    line = manifest(out)["c/locked.wav"]
    assert line["skipped"] == "undecodable"
    assert line["detail"] == "undecodable: cannot open the file: Permission denied (check its permissions)", line


def test_a_temp_named_file_in_a_folder_is_read(tmp_path):
    """Only an AudioSet download's <name>.temp.<ext> is yt-dlp's unfinished file; in a folder it may be the user's
    (and earlier versions decoded it, so their sets' plans count it as an input)."""
    tone(tmp_path / "in" / "c" / "rec.temp.wav")
    assert run("folder", str(tmp_path / "in"), "--out", str(tmp_path / "out")) == 0
    assert "skipped" not in manifest(tmp_path / "out")["c/rec.temp.wav"]


def test_readme_lists_every_skip_reason():
    section = (ROOT / "docs" / "make-shards.md").read_text(encoding="utf-8")
    code = "".join(p.read_text() for p in (ROOT / "shard_tools").glob("*.py"))
    reasons = set(re.findall(r'Skip\(\s*"([a-z_]+)"', code)) | set(re.findall(r'skip="([a-z_]+)"', code))
    reasons |= set(re.findall(r'"(not_found|duplicate|partial_download|not_in_csv)"', code))
    assert {"not_found", "too_short", "undecodable", "duplicate"} <= reasons
    for reason in reasons:
        assert f"`{reason}`" in section, reason


# ------------------------------------------------------------------------ 13. labels: unknown, or given twice
def test_unknown_audioset_label_names_the_csv_row(tmp_path):
    bad = SEGMENTS + 'Agi5ySKb1tY, 23.700, 33.700, "/m/nosuchmid"\n'
    with pytest.raises(SystemExit) as e:
        run(*audioset_files(tmp_path, bad), "--out", str(tmp_path / "o"))
    msg = str(e.value)
    assert f"{tmp_path / 'seg.csv'}: line 7" in msg and "'/m/nosuchmid' is not in the class index" in msg
    assert "check --class-index" in msg and "..." not in msg and "nor are" not in msg and "\n" not in msg
    worse = bad + 'Bh4oxwlwQMY, 86.100, 96.100, "/m/other,/m/09x0r"\n'
    with pytest.raises(SystemExit, match=r"line 7.*'/m/nosuchmid'.*\(nor are 1 other label\(s\): '/m/other'\)"):
        run(*audioset_files(tmp_path, worse), "--out", str(tmp_path / "o"))
    assert not (tmp_path / "o").exists()


def test_audioset_segment_relisted_with_other_labels_warns_and_keeps_the_first(tmp_path, capsys):
    tone(tmp_path / "root" / "Y--PJHxphWEs.wav", 10.0)
    args = audioset_files(tmp_path, SEGMENTS)
    (tmp_path / "more.csv").write_text(
        '--PJHxphWEs, 30.000, 40.000, "/m/04rlf"\n'  # other labels: dropped, with a warning
        '-0CamVQdP_Y, 0.000, 10.000, "/m/04rlf"\n'  # the same labels: harmless, silent
        'AE5oZzfu2-E, 239.800, 249.800, "/m/04rlf,/m/09x0r"\n'  # other labels: counted
    )
    args.insert(args.index("--class-index"), str(tmp_path / "more.csv"))
    out = tmp_path / "out"
    assert run(*args, "--out", str(out)) == 0
    err = capsys.readouterr().err
    assert (f"warning: 2 segment(s) listed again with other labels; the first listing's labels are used (e.g. "
            f"{tmp_path / 'more.csv'}: line 1 lists --PJHxphWEs at 30 s, already in {tmp_path / 'seg.csv'}: line 4)"
            ) in err
    assert err.count("listed again") == 1
    meta = json.loads((out / "stats.json").read_text())
    assert meta["segments"]["in_csvs"] == 3
    with tarfile.open(out / "shards-000000.tar") as tar:
        sample = json.loads(tar.extractfile("--PJHxphWEs_30000.json").read())
    assert sample["labels"] == ["/m/09x0r", "/m/04rlf"]


def _two_tones_manifest(tmp_path, capsys, text: str) -> tuple[Path, Path, str]:
    """x.wav and y.wav, a manifest `list.csv` holding `text`, make-shards run on it: (csv, out, stderr)."""
    tone(tmp_path / "x.wav")
    tone(tmp_path / "y.wav", freq=660)
    csv = tmp_path / "list.csv"
    csv.write_text(text, encoding="utf-8")
    out = tmp_path / "out"
    assert run("manifest", str(csv), "--out", str(out)) == 0
    return csv, out, capsys.readouterr().err


def test_manifest_duplicate_with_other_labels_is_explained(tmp_path, capsys):
    csv, out, err = _two_tones_manifest(tmp_path, capsys, "path,label\nx.wav,zero\nx.wav,one\ny.wav,a\n./y.wav,a\n")
    lines = [json.loads(line) for line in (out / "manifest.jsonl").read_text().splitlines()]
    dups = {line["detail"] for line in lines if line.get("skipped") == "duplicate"}
    assert "duplicate: line 3: same file as 'x.wav' (line 2); labels differ: that row's 'zero' are used, not 'one'" \
        in dups
    assert "duplicate: line 5: same file as 'y.wav' (line 4)" in dups  # same labels: no remark
    assert (f"warning: {csv}: 1 duplicate row(s) give a file other labels than its first row; the first row's "
            "labels are used (e.g. line 3: 'x.wav' labelled 'one', first 'x.wav' (line 2) labelled 'zero')") in err


def test_manifest_label_with_a_comma_is_one_label_and_said_so(tmp_path, capsys):
    # matpac-eval reads a quoted "dog,cat" as two labels, make-shards as one: the warning names the difference.
    csv, out, err = _two_tones_manifest(tmp_path, capsys,
                                        'path,label\nx.wav,"Male speech, man speaking"\ny.wav,dog;cat\n')
    assert (f"warning: {csv}: 1 row(s) have a label with a ',' (e.g. line 2: 'Male speech, man speaking'); "
            "make-shards separates labels by ';' only, so each is one label; write dog;cat for several "
            "(matpac-eval reads a quoted dog,cat as two)") in err
    assert json.loads((out / "stats.json").read_text())["classes"] == ["Male speech, man speaking", "cat", "dog"]
    tone_only = tmp_path / "plain.csv"
    tone_only.write_text("path,label\nx.wav,dog\n", encoding="utf-8")
    assert run("manifest", str(tone_only), "--out", str(tmp_path / "out2")) == 0
    assert "with a ','" not in capsys.readouterr().err


def test_manifest_row_with_an_unquoted_comma_is_an_error(tmp_path, capsys):
    """A row with more fields than the header (an unquoted ',' in a label or path) lost its extra fields without a
    word: x.wav was labelled 'Male speech' and 'Dog, bark/y.wav' became the path 'Dog'."""
    tone(tmp_path / "x.wav")
    tone(tmp_path / "y.wav", freq=660)
    csv = tmp_path / "list.csv"
    csv.write_text("path,label\ny.wav,dog,\nx.wav,Male speech, man speaking\n", encoding="utf-8")
    with pytest.raises(SystemExit, match=r"list\.csv: line 3 has 3 fields but the header has 2 \(extra: ' man "
                                         r"speaking'\); quote a path or label that holds a ','"):
        run("manifest", str(csv), "--out", str(tmp_path / "out"))
    assert not (tmp_path / "out").exists()
    csv.write_text('path,label\ny.wav,dog,\nx.wav,"Male speech, man speaking"\n', encoding="utf-8")
    assert run("manifest", str(csv), "--out", str(tmp_path / "out")) == 0  # a trailing empty field is harmless
    assert json.loads((tmp_path / "out" / "stats.json").read_text())["classes"] == ["Male speech, man speaking",
                                                                                    "dog"]


# --------------------------------------------------------------------- 14. verify a folder of someone else's files
@pytest.mark.parametrize("name,text", [
    ("stats.json", '{"mean": 0.5, "inputs": 3}\n'),
    ("manifest.jsonl", '{"path": "a.wav", "label": "dog"}\n'),
    ("sizes.json", '{"train.tar": "many"}\n'),
])
def test_verify_names_a_file_make_shards_did_not_write(tmp_path, capsys, name, text):
    (tmp_path / name).write_text(text)
    assert verify(tmp_path) == 1
    out = capsys.readouterr().out
    assert out == f"NOT A SHARD SET: {tmp_path / name} is not a make-shards file; this folder holds no shard set\n"


def test_verify_still_tells_an_empty_make_shards_run(tmp_path, capsys):
    (tmp_path / "manifest.jsonl").write_text('{"source": "a.wav", "skipped": "too_short"}\n')
    assert verify(tmp_path) == 1
    assert "make-shards wrote no sample there; manifest.jsonl gives each file's reason" in capsys.readouterr().out


def test_verify_of_a_folder_holding_a_shard_set_names_that_subfolder(tmp_path, capsys):
    # `verify-shards runs/demo` (make demo's run folder; its set is runs/demo/shards) said only "it has no sizes.json
    # or stats.json", not which folder to pass
    demo = tmp_path / "demo"
    assert run("synthetic", "--n", "3", "--out", str(demo / "shards")) == 0
    (demo / "train").mkdir()
    capsys.readouterr()
    assert verify(demo) == 1
    assert capsys.readouterr().out == (f"NOT A SHARD SET: {demo} is not a shard set: it has no sizes.json or "
                                       f"stats.json, but its subfolder {demo / 'shards'} is one: pass "
                                       f"{demo / 'shards'}\n")
    shutil.copytree(demo / "shards", demo / "more")
    assert verify(demo) == 1
    assert capsys.readouterr().out.endswith(f"but its subfolders {demo / 'more'}, {demo / 'shards'} are shard sets: "
                                            "pass one of them\n")


def test_a_second_make_shards_into_the_same_folder_is_refused_while_the_first_runs(tmp_path, capsys):
    """Two jobs writing one --out (a double submit) would delete each other's half-written shards: the second is
    refused in one line before it touches anything; the lock goes with the process that holds it."""
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    # Another process holds the folder's lock, as a running make-shards does.
    holder = subprocess.Popen([sys.executable, "-c", "import fcntl, os, sys, time\n"
                               f"fd = os.open({str(out)!r}, os.O_RDONLY); fcntl.flock(fd, fcntl.LOCK_EX)\n"
                               "print('locked', flush=True); time.sleep(60)"], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(SystemExit, match="another make-shards is writing --out .*choose another --out"):
            run("synthetic", "--n", "3", "--out", str(out))
        assert sorted(p.name for p in out.iterdir()) == ["keep.txt"]  # nothing written, nothing removed
    finally:
        holder.kill()
        holder.wait()
    assert run("synthetic", "--n", "3", "--out", str(out)) == 0  # the holder died: its lock went with it
    fd = os.open(out, os.O_RDONLY)  # and make-shards released its own
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    finally:
        os.close(fd)


@pytest.mark.parametrize("argv", [
    ["folder", "IN", "--out", ""],  # `--out "$OUT"` with OUT unset: Path("") is ".", the shards went into the cwd
    ["folder", "", "--out", "OUT"],
    ["manifest", "", "--out", "OUT"],
])
def test_an_empty_path_is_an_error_not_the_current_folder(tmp_path, monkeypatch, capsys, argv):
    tone(tmp_path / "in" / "a" / "x.wav")
    monkeypatch.chdir(tmp_path)
    argv = [{"IN": str(tmp_path / "in"), "OUT": str(tmp_path / "out")}.get(a, a) for a in argv]
    with pytest.raises(SystemExit) as e:
        run(*argv)
    assert e.value.code == 2
    assert "empty path: give a folder or file" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in"]


@pytest.fixture(scope="module")
def small_set(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("small") / "set"
    assert run("synthetic", "--n", "12", "--out", str(out), "--shard-size", "4") == 0
    return out


@pytest.mark.parametrize(("file", "field", "value", "said"), [
    ("sizes.json", None, None, "sizes.json is damaged: a JSON object {shard: sample count} was expected, found null"),
    ("sizes.json", None, [], "found []"),
    ("sizes.json", "shards-000000.tar", "4", "shard shards-000000.tar has count \"4\"; counts are integers >= 0"),
    ("stats.json", "frontend", None, "'frontend' is null, expected a JSON object with n_mels >= 1"),
    ("stats.json", "frontend", {"n_mels": 0}, "'frontend' is {\"n_mels\": 0}"),
    ("stats.json", "classes", 5, "'classes' is 5, expected a list of strings or null"),
    ("stats.json", "skipped", ["x"], "'skipped' is [\"x\"], expected a JSON object {reason: count}"),
    ("stats.json", "mean", "x", "'mean' is \"x\", expected a finite number"),
    # the loader normalises with them: these passed verify-shards (and the loader) before
    ("stats.json", "mean", float("nan"), "'mean' is NaN, expected a finite number"),
    ("stats.json", "std", -1, "'std' is -1, expected a finite number >= 0"),
    ("stats.json", "shard_sha256", ["x"], "'shard_sha256' is [\"x\"]"),  # used to switch the hash check off
    ("stats.json", "written", "12", "'written' is \"12\", expected an integer >= 0"),
])
def test_verify_reports_damaged_metadata_in_one_line(small_set, tmp_path, capsys, file, field, value, said):
    """Valid JSON of the wrong shape used to print OK (sizes.json null or []) or a traceback (stats.json fields)."""
    out = tmp_path / "set"
    shutil.copytree(small_set, out)
    doc = json.loads((out / file).read_text()) if field else value
    if field:
        doc[field] = value
    (out / file).write_text(json.dumps(doc))
    capsys.readouterr()
    assert verify(out) == 1
    text = capsys.readouterr().out
    assert "CORRUPT" in text and f"{file} is damaged: " in text and said in text, text
    assert "OK" not in text.split()


@pytest.mark.parametrize("name", ["../outside/victim.tar", "/abs/victim.tar", "victim.tar", "shards-000007.tar\n",
                                  "shards-\u0660\u0660\u0660\u0660\u0660\u0661.tar"])
def test_shard_names_in_stats_json_are_plain_shard_file_names(small_set, tmp_path, capsys, name):
    """A name in stats.json's shard_sha256 was joined onto --out: rerunning a complete set's command wrote
    <name>.idx wherever it pointed (../outside/victim.tar.idx), and verify-shards said OK (security review 6)."""
    root = tmp_path / "r"
    out = root / "set"
    shutil.copytree(small_set, out)
    (root / "outside").mkdir()
    shutil.copy(out / "shards-000000.tar", root / "outside" / "victim.tar")
    stats = json.loads((out / "stats.json").read_text())
    stats["shard_sha256"][name.replace("/abs", str(root / "outside"))] = "0" * 64
    (out / "stats.json").write_text(json.dumps(stats))
    capsys.readouterr()
    assert verify(out) == 1
    text = capsys.readouterr().out
    assert "CORRUPT" in text and "stats.json is damaged: 'shard_sha256'" in text, text
    with pytest.raises(SystemExit, match="stats.json is not as make-shards writes it .'shard_sha256' is"):
        run("synthetic", "--n", "12", "--out", str(out), "--shard-size", "4")
    assert sorted(p.name for p in (root / "outside").iterdir()) == ["victim.tar"]


def test_verify_wants_stats_json_and_sizes_json_to_list_the_same_shards(small_set, tmp_path, capsys):
    out = tmp_path / "set"
    shutil.copytree(small_set, out)
    stats = json.loads((out / "stats.json").read_text())
    (out / "stats.json").write_text(json.dumps({**stats, "shard_sha256": {**stats["shard_sha256"],
                                                                          "shards-000007.tar": "0" * 64}}))
    capsys.readouterr()
    assert verify(out) == 1
    assert "stats.json lists shard \"shards-000007.tar\" that sizes.json does not" in capsys.readouterr().out
    (out / "stats.json").write_text(json.dumps(stats))
    sizes = json.loads((out / "sizes.json").read_text())
    (out / "sizes.json").write_text(json.dumps({("x.tar" if k == "shards-000000.tar" else k): n
                                                for k, n in sizes.items()}))
    os.rename(out / "shards-000000.tar", out / "x.tar")
    assert verify(out) == 1
    assert "shard name \"x.tar\" is not a file name in the set's folder of the form" in capsys.readouterr().out


def _tar_header(name: str, size_field: bytes, kind: bytes = b"0") -> bytes:
    """A ustar header block with a raw size field (GNU base-256 or octal), as a crafted shard holds."""
    b = bytearray(512)
    b[0:len(name)] = name.encode()
    b[100:108], b[108:116], b[116:124] = b"0000644\0", b"0000000\0", b"0000000\0"
    b[124:136], b[136:148], b[156:157] = size_field, b"00000000000\0", kind
    b[257:263], b[263:265] = b"ustar\0", b"00"
    b[148:156] = b" " * 8
    b[148:156] = b"%06o\0 " % sum(b)
    return bytes(b)


def _member(name: str, data: bytes, kind: bytes = b"0") -> bytes:
    return _tar_header(name, b"%011o\0" % len(data), kind) + data + bytes(-len(data) % 512)


def _sample(key: str, npy: bytes | None = None, **meta) -> bytes:
    doc = {"key": key, "source": f"{key}.wav", "ytid": None, "start": None, "end": None, "labels": [],
           "label_indices": [], "source_sr": 16000, "duration": 7.0, "n_frames": 700, "flags": [], **meta}
    npy_data = npy if npy is not None else _npy(np.zeros((80, 700), np.float16))
    return _member(f"{key}.npy", npy_data) + _member(f"{key}.json", json.dumps(doc).encode())


def _npy(arr) -> bytes:
    import io

    buf = io.BytesIO()
    np.save(buf, arr)
    return buf.getvalue()


@pytest.mark.parametrize(("stats_change", "shard", "said"), [
    ({}, _tar_header("././@LongLink", bytes([0x80]) + (2**80).to_bytes(11, "big"), b"L") + bytes(512) + _sample("a"),
     "shards-000000.tar: unreadable tar"),  # a GNU base-256 size of 2**80
    ({}, _member("pax", b"28 size=99999999999999999999\n", b"x") + _sample("a"), "shards-000000.tar: unreadable tar"),
    ({}, _sample("s", npy=_npy(np.array([["a"] * 700] * 80))), "sample 's': dtype <U1, expected float16"),
    ({}, _sample("f", flags=[[1]]), "sample 'f': json field 'flags' holds something other than strings"),
    ({"classes": None}, _sample("f", labels=[[1]], label_indices=[0]),
     "sample 'f': json field 'labels' holds something other than strings"),
    ({"mean": 10**400}, None, "'mean' is 1000000000"),
    ({}, _sample("n", duration=float("nan")), "sample 'n': json duration NaN, expected seconds >= 0"),  # said OK
    ({}, _sample("n", duration=10**400), "sample 'n': json duration 1000000000"),
    ({}, _sample("n", duration=-7.0), "sample 'n': json duration -7.0, expected seconds >= 0"),
])
def test_verify_reports_hostile_shards_and_stats_without_a_traceback(small_set, tmp_path, capsys, stats_change, shard,
                                                                     said):
    """Each was a traceback (OverflowError, TypeError: unhashable list or isfinite of strings) where verify-shards
    promises a report (security review 7)."""
    import hashlib

    out = tmp_path / "set"
    shutil.copytree(small_set, out)
    stats = json.loads((out / "stats.json").read_text())
    if shard is not None:
        data = shard + bytes(1024)
        (out / "shards-000000.tar").write_bytes(data)
        (out / "shards-000000.tar.idx").unlink()
        stats["shard_sha256"]["shards-000000.tar"] = hashlib.sha256(data).hexdigest()
    (out / "stats.json").write_text(json.dumps({**stats, **stats_change}))
    capsys.readouterr()
    for workers in ("1", "2"):
        assert verify(out, "--workers", workers) == 1
        text = capsys.readouterr().out
        assert "CORRUPT" in text and said in text, text


def test_verify_needs_the_shard_hashes_to_say_ok(small_set, tmp_path, capsys):
    """stats.json without its shard_sha256 list (or without one shard's entry) skipped the content check silently
    and said OK, even for a shard with garbage appended. --no-hash still checks the rest."""
    out = tmp_path / "set"
    shutil.copytree(small_set, out)
    stats = json.loads((out / "stats.json").read_text())
    with open(out / "shards-000001.tar", "ab") as f:
        f.write(b"\0" * 1024)  # whole zero blocks: still a readable tar of the same samples
    (out / "shards-000001.tar.idx").unlink()  # made for the tar before: verify would call it stale, rightly
    for doc, said in (
        ({k: v for k, v in stats.items() if k != "shard_sha256"}, "stats.json has no shard_sha256, so the shards' "
         "contents cannot be checked: rebuild the set with make-shards, or pass --no-hash to check the rest"),
        ({**stats, "shard_sha256": {k: v for k, v in stats["shard_sha256"].items() if k != "shards-000001.tar"}},
         "shards-000001.tar has no sha256 in stats.json: its content cannot be checked"),
    ):
        (out / "stats.json").write_text(json.dumps(doc))
        capsys.readouterr()
        assert verify(out) == 1
        text = capsys.readouterr().out
        assert "CORRUPT" in text and said in text, text
        assert verify(out, "--no-hash") == 0


def test_verify_refuses_a_shard_cut_after_its_last_member_without_hashes(small_set, tmp_path, capsys):
    """tarfile reads such a file to the end; the loader drops the whole shard, so verify-shards --no-hash must not
    call it OK."""
    out = tmp_path / "set"
    shutil.copytree(small_set, out)
    assert verify(out, "--no-hash") == 0  # the intact set passes the end-of-archive check
    shard = out / "shards-000001.tar"
    data = shard.read_bytes()
    end = len(data.rstrip(b"\0"))
    shard.write_bytes(data[: (end + 511) // 512 * 512])  # the last payload block kept, every zero block after cut
    with tarfile.open(shard) as tar:
        assert len(tar.getmembers()) == 8  # still a readable tar of 4 samples
    capsys.readouterr()
    assert verify(out, "--no-hash") == 1
    text = capsys.readouterr().out
    assert "shards-000001.tar: truncated tar (no end-of-archive marker after the last member)" in text


def test_the_shard_tools_start_without_torch():
    """make-shards imports torch inside main()'s try block (a Ctrl-C there is its one line); importing the package
    `matpac_fast` for a helper used to import torch first, before any handler (a traceback, and 2 s per --help)."""
    code = ("import sys, shard_tools.cli, shard_tools.verify, matpac_fast.cli_args\n"
            "assert 'torch' not in sys.modules, 'torch imported'\n"
            "import matpac_fast\n"
            "assert 'torch' not in sys.modules and matpac_fast.__version__\n"
            "from matpac_fast import Encoder, get_model_config\n"
            "assert Encoder.__name__ == 'Encoder' and get_model_config('tiny').dim > 0\n"
            "assert set(matpac_fast.__all__) <= set(dir(matpac_fast))\n"
            "assert matpac_fast.flops.flops_per_sample is matpac_fast.flops_per_sample\n"  # submodules as attributes
            "assert not hasattr(matpac_fast, 'no_such_module')\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 0, r.stderr


def _interrupted_folder_run(tmp_path, monkeypatch) -> tuple[Path, Path]:
    """A folder run stopped after journaling all its shards, before stats.json (as a kill there would leave it)."""
    import shard_tools.pipeline as pipeline

    for i in range(3):
        tone(tmp_path / "in" / "c" / f"{i}.wav", freq=300 + 100 * i)
    out = tmp_path / "out"

    def killed(*_a, **_k):
        raise KeyboardInterrupt

    with monkeypatch.context() as m:
        m.setattr(pipeline, "_finalize", killed)
        with pytest.raises(SystemExit):
            run("folder", str(tmp_path / "in"), "--out", str(out), "--shard-size", "1")
    assert (out / ".make-shards" / "journal.jsonl").is_file() and not (out / "stats.json").exists()
    return tmp_path / "in", out


def test_resume_refused_because_the_files_changed_says_so(tmp_path, monkeypatch, capsys):
    """The same command after a download finished used to be told to "rerun that exact command"."""
    src, out = _interrupted_folder_run(tmp_path, monkeypatch)
    tone(src / "c" / "late.wav", freq=900)
    with pytest.raises(SystemExit) as e:
        run("folder", str(src), "--out", str(out), "--shard-size", "1")
    msg = str(e.value)
    assert "\n" not in msg and "with these options, but its inputs changed since (3 then, 4 now" in msg
    assert "--overwrite" in msg
    assert "rerun that exact command" not in msg
    with pytest.raises(SystemExit) as e:  # other options: the message it always gave
        run("folder", str(src), "--out", str(out), "--shard-size", "2")
    assert "other inputs or options; rerun that exact command" in str(e.value)
    (src / "c" / "late.wav").unlink()
    tone(src / "new_class" / "late.wav", freq=900)  # a new class folder changes the class list: still the inputs
    with pytest.raises(SystemExit) as e:
        run("folder", str(src), "--out", str(out), "--shard-size", "1")
    assert "inputs changed since (3 then, 4 now" in str(e.value)
    shutil.rmtree(src / "new_class")  # the files as they were: the resume goes on
    assert run("folder", str(src), "--out", str(out), "--shard-size", "1") == 0
    assert json.loads((out / "stats.json").read_text())["written"] == 3


def test_rerun_of_a_complete_set_with_a_lost_or_garbled_shard_is_not_already_complete(small_set, tmp_path):
    out = tmp_path / "set"
    shutil.copytree(small_set, out)
    again = ("synthetic", "--n", "12", "--out", str(out), "--shard-size", "4")
    assert run(*again) == 0  # intact: "already complete"
    (out / "shards-000001.tar").unlink()
    (out / "shards-000002.tar").write_text("garbage\n")
    with pytest.raises(SystemExit) as e:
        run(*again)
    msg = str(e.value)
    assert "\n" not in msg and "shards-000001.tar (missing), shards-000002.tar (8 bytes: not a whole tar)" in msg
    assert "verify-shards" in msg and "--overwrite" in msg
    assert run(*again, "--overwrite") == 0 and verify(out) == 0


def test_rerun_of_a_complete_set_with_a_shard_cut_on_a_page_boundary_is_not_already_complete(small_set, tmp_path):
    """A shard cut short at a 4 KiB boundary (a full disk, a killed copy) is a whole number of tar blocks: the
    rerun said "already complete" and the loader met the cut mid-training. The tar end marker catches it."""
    out = tmp_path / "set"
    shutil.copytree(small_set, out)
    shard = out / "shards-000001.tar"
    data = shard.read_bytes()
    cut = (len(data) // 2) // 4096 * 4096
    assert cut >= 1024 and data[cut - 1024:cut].count(0) < 1024  # the cut lands in member data
    shard.write_bytes(data[:cut])
    again = ("synthetic", "--n", "12", "--out", str(out), "--shard-size", "4")
    with pytest.raises(SystemExit) as e:
        run(*again)
    msg = str(e.value)
    assert "\n" not in msg and "shards-000001.tar (no tar end marker: cut short) is damaged" in msg, msg
    assert "verify-shards" in msg and "--overwrite" in msg
    shard.write_bytes(data)  # the file as it was: "already complete" again
    assert run(*again) == 0


def test_rerun_of_a_complete_set_made_before_index_files_adds_them(small_set, tmp_path, capsys):
    """Without index files the loader walks every shard's headers each epoch: the rerun of the set's command writes
    them (the same bytes a fresh run writes), and says so; then there is nothing to do."""
    out = tmp_path / "set"
    shutil.copytree(small_set, out)
    made = {p.name: p.read_bytes() for p in sorted(out.glob("*.tar.idx"))}
    assert len(made) == 3
    for name in made:
        (out / name).unlink()
    again = ("synthetic", "--n", "12", "--out", str(out), "--shard-size", "4")
    capsys.readouterr()
    assert run(*again) == 0
    text = capsys.readouterr().out
    assert "already complete (same inputs and options); wrote the index files of 3 shard(s) made before" in text
    assert {p.name: p.read_bytes() for p in sorted(out.glob("*.tar.idx"))} == made
    assert run(*again) == 0 and "nothing to do" in capsys.readouterr().out
    assert verify(out) == 0


def test_rerun_of_a_complete_set_in_a_read_only_folder_cannot_add_index_files_and_says_so(small_set, tmp_path,
                                                                                         monkeypatch, capsys):
    """Index files are optional: the rerun of a complete set made before them, in a folder it may not write (a
    shared, read-only set), was "error: Permission denied: ...tar.idx.tmp; fix that and run the same command again
    to finish", exit 1. It says the set is complete, that they could not be written and what that costs."""
    from matpac_fast import safe_files

    out = tmp_path / "set"
    shutil.copytree(small_set, out)
    for p in out.glob("*.tar.idx"):
        p.unlink()
    before = sorted(p.name for p in out.iterdir())
    if os.geteuid() == 0:  # root writes anywhere: the refusal is played by the creation of the .tmp file
        create_new = safe_files.create_new

        def refuse(path, *args, **kwargs):
            if os.fsdecode(path).endswith(".tar.idx.tmp"):
                raise PermissionError(13, "Permission denied", str(path))
            return create_new(path, *args, **kwargs)

        monkeypatch.setattr(safe_files, "create_new", refuse)
    else:
        out.chmod(0o555)
    try:
        capsys.readouterr()
        assert run("synthetic", "--n", "12", "--out", str(out), "--shard-size", "4") == 0
    finally:
        out.chmod(0o755)
    text = capsys.readouterr().out
    assert "already complete (same inputs and options); index files of shards made before make-shards wrote them: " \
           "3 could not be written (Permission denied), so the loader reads those shards' headers instead" in text
    assert sorted(p.name for p in out.iterdir()) == before  # no .tmp left behind


def test_unknown_shard_files_are_counted_and_overwrite_says_it_deletes_them(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    for i in range(2):
        (out / f"shards-00000{i}.tar").write_bytes(b"someone else's")
    (out / "notes.txt").write_text("mine")
    with pytest.raises(SystemExit) as e:
        run("synthetic", "--n", "3", "--out", str(out))
    assert "already has 2 shards-NNNNNN.tar file(s) from an unknown run; pass --overwrite to delete them" in str(
        e.value)
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt", "shards-000000.tar", "shards-000001.tar"]
    assert run("synthetic", "--n", "3", "--out", str(out), "--overwrite") == 0
    assert (out / "notes.txt").read_text() == "mine" and not (out / "shards-000001.tar").exists()
    assert "this run's `--name`, which it would overwrite" in (ROOT / "docs" / "make-shards.md").read_text()


def test_manifest_repeated_label_counts_once_and_missing_twice_is_not_found_twice(tmp_path):
    tone(tmp_path / "a.wav")
    (tmp_path / "m.csv").write_text('path,label\na.wav,"x;y;x"\nnope.wav,x\n./nope.wav,x\n')
    out = tmp_path / "out"
    assert run("manifest", str(tmp_path / "m.csv"), "--out", str(out)) == 0
    lines = manifest(out)
    assert lines["nope.wav"]["skipped"] == lines["./nope.wav"]["skipped"] == "not_found"
    with tarfile.open(out / "shards-000000.tar") as tar:
        meta = json.loads(tar.extractfile(next(m for m in tar if m.name.endswith(".json"))).read())
    assert meta["labels"] == ["x", "y"] and meta["label_indices"] == [0, 1]


def test_a_decoder_warning_names_its_file(tmp_path, capfd):
    """libmpg123 warns about a cut MP3 on stderr without a file name: make-shards says which file it was."""
    d = tmp_path / "in" / "c"
    d.mkdir(parents=True)
    t = np.arange(16000 * 8) / 16000
    try:
        sf.write(d / "whole.mp3", 0.3 * np.sin(2 * np.pi * 440 * t), 16000)
    except (sf.LibsndfileError, TypeError, ValueError):
        pytest.skip("this libsndfile cannot write MP3")
    data = (d / "whole.mp3").read_bytes()
    (d / "cut.mp3").write_bytes(data[: len(data) // 2])  # its Xing header still gives the whole length
    out = tmp_path / "out"
    assert run("folder", str(tmp_path / "in"), "--out", str(out), "--short", "pad") == 0
    err = [line for line in capfd.readouterr().err.splitlines() if "Xing" in line]
    assert err and all(line.startswith(f"make-shards: {d / 'cut.mp3'}: ") for line in err), err


def test_a_long_input_scan_shows_a_file_counter_unless_no_progress(tmp_path, capsys, monkeypatch):
    """Discovery printed nothing until its scan ended: minutes for 2 million files on a network share. A scan that
    takes longer than SCAN_PROGRESS_DELAY_S (2 s; 0 here) shows a counter of the audio files found."""
    import shard_tools.discover as discover

    monkeypatch.setattr(discover, "SCAN_PROGRESS_DELAY_S", 0.0)
    for i, label in enumerate(("a", "a", "b")):
        (tmp_path / "in" / label).mkdir(parents=True, exist_ok=True)
        tone(tmp_path / "in" / label / f"{i}.wav", freq=300 + 100 * i)
    (tmp_path / "in" / "readme.txt").write_text("not audio")
    assert cli_main(["folder", str(tmp_path / "in"), "--out", str(tmp_path / "out"), "--workers", "0"]) == 0
    err = capsys.readouterr().err
    assert re.search(rf"scanning {re.escape(str(tmp_path / 'in'))}: 3 audio files ", err), err
    assert run("folder", str(tmp_path / "in"), "--out", str(tmp_path / "out2")) == 0  # --no-progress: none
    assert "scanning" not in capsys.readouterr().err


@pytest.mark.parametrize(("header", "said"), [("path,label", "'path'"), ("Filename,label", "'Filename'")])
def test_a_manifest_without_rows_names_its_own_path_header(tmp_path, header, said):
    """A header-only manifest: the advice named the 'path' header also when the file's path column is 'Filename'."""
    (tmp_path / "m.csv").write_text(header + "\n")
    with pytest.raises(SystemExit) as e:
        run("manifest", str(tmp_path / "m.csv"), "--out", str(tmp_path / "out"))
    msg = str(e.value)
    assert "\n" not in msg and f"no rows with a path; add one row per audio file under the {said} header" in msg, msg


@pytest.mark.parametrize(("sep", "name"), [(";", "semicolon"), ("\t", "tab")])
def test_a_manifest_separated_by_another_character_says_so(tmp_path, sep, name):
    """A spreadsheet saved in a locale that separates with ';' (or a TSV): the error was "no path column ... got
    ['path;label']", which did not say what was wrong."""
    (tmp_path / "m.csv").write_text(f"path{sep}label\na.wav{sep}x\n")
    with pytest.raises(SystemExit) as e:
        run("manifest", str(tmp_path / "m.csv"), "--out", str(tmp_path / "out"))
    msg = str(e.value)
    assert "\n" not in msg and f"is a single column: the file looks {name}-separated" in msg, msg
    assert "save it with commas" in msg and not (tmp_path / "out").exists()


def test_default_workers_are_the_cpus_this_process_may_use(monkeypatch, tmp_path, capsys):
    """A SLURM job or `taskset` allots fewer CPUs than the machine has: the default --workers ("all cores") counted
    the machine (os.cpu_count), so an 8-CPU job on a 128-core node started 128 processes, each importing torch.
    The demo's own --workers was ignored as well (`os.cpu_count() or 1 if workers is None else workers` reads as
    `os.cpu_count() or (...)`)."""
    import matpac_fast.demo as demo
    import shard_tools.api as api
    from shard_tools.pipeline import MakeConfig

    monkeypatch.setattr(os, "cpu_count", lambda: 64)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {3}, raising=False)
    args = build_parser().parse_args(["synthetic", "--n", "1", "--out", str(tmp_path / "o")])
    assert args.workers == 1
    assert MakeConfig(out=tmp_path / "o").workers == 1
    with pytest.raises(SystemExit):
        verify_main(["--help"])
    assert "1 here" in capsys.readouterr().out
    seen = []
    monkeypatch.setattr(api, "make_synthetic_shards", lambda out, **kw: seen.append(kw["workers"]) or {})
    monkeypatch.setattr(api, "format_summary", lambda s: "")
    demo.shards_step(tmp_path / "d", n=4, workers=2)
    demo.shards_step(tmp_path / "d", n=4)
    assert seen == [2, 1]


def test_verify_does_not_count_unlabelled_samples_as_a_class(tmp_path, capsys):
    """A folder set whose files lie partly in DIR itself (no label): the histogram's "(no label)" row was counted
    as one of the "classes present" (2 classes in folders a and b read as 3)."""
    for rel, seed in (("a/x.wav", 1), ("b/y.wav", 2), ("z.wav", 3)):
        p = tmp_path / "in" / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        t = np.arange(8000) / 8000
        sf.write(p, (0.2 * np.sin(2 * np.pi * 200 * seed * t)).astype(np.float32), 8000)
    out = tmp_path / "out"
    assert cli_main(["folder", str(tmp_path / "in"), "--out", str(out), "--short", "pad", "--workers", "0",
                     "--no-progress"]) == 0
    capsys.readouterr()
    assert verify_main([str(out), "--no-progress", "--workers", "1"]) == 0
    text = capsys.readouterr().out
    assert "labels (2 classes present, 1 sample without a label; top 3):" in text and "(no label)  1" in text
    assert verify_main([str(out), "--no-progress", "--workers", "1", "--top", "0"]) == 0
    assert "labels: 2 classes present, 1 sample without a label" in capsys.readouterr().out


def test_a_huge_stats_json_in_out_is_refused_without_being_read_whole(tmp_path, capsys, monkeypatch):
    """make-shards reads a stats.json (sizes.json, plan.json) found in --out to tell its own from another's: read
    whole, one of gigabytes took gigabytes of memory before its 'is not valid JSON'. Reads are capped now
    (JSON_MAX_BYTES, lowered here)."""
    from shard_tools import pipeline

    monkeypatch.setattr(pipeline, "JSON_MAX_BYTES", 1000)
    out = tmp_path / "out"
    out.mkdir()
    (out / "stats.json").write_text(json.dumps({"x": "y" * 2000}))
    with pytest.raises(SystemExit) as e:
        run("synthetic", "--n", "4", "--out", str(out))
    err = str(e.value)
    assert err.startswith(f"make-shards: error: {out / 'stats.json'} cannot be read (") and "more than the 1000" in err
    assert sorted(p.name for p in out.iterdir()) == ["stats.json"]  # nothing written


def test_a_huge_manifest_jsonl_first_line_is_not_read_whole(tmp_path, monkeypatch):
    """make-shards (and verify-shards, in a folder without stats.json) read manifest.jsonl's first line to tell
    make-shards' own from another's: a file of gigabytes without a newline was read whole (300 MB: +465 MB peak RSS
    in make-shards, +600 MB in verify-shards), the very cost JSON_MAX_BYTES bounds for stats.json. The line is read
    up to the cap (lowered here); a longer one is not make-shards'."""
    import tracemalloc

    from shard_tools import pipeline, verify

    monkeypatch.setattr(pipeline, "JSON_MAX_BYTES", 1000)
    monkeypatch.setattr(verify, "JSON_MAX_BYTES", 1000)
    path = tmp_path / "manifest.jsonl"
    path.write_bytes(b" " * 4_000_000 + b'{"source": "a.wav", "skipped": "silent"}\n')
    tracemalloc.start()
    try:
        why = pipeline._not_ours(path)
        foreign = verify._foreign(path)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 1_000_000, peak
    assert why == "is not a make-shards manifest (its first line is over 1000 bytes)"
    assert foreign is False  # unreadable as JSON: not called another's (as before for invalid JSON)


def test_a_fifo_in_place_of_the_journal_is_refused_not_waited_on(tmp_path):
    """A FIFO at --out/.make-shards/journal.jsonl (beside a plan.json) made make-shards wait for ever: the journal
    was opened for reading after an exists() check only. Now it is one line; --overwrite clears it and runs."""
    out = tmp_path / "o"
    (out / ".make-shards").mkdir(parents=True)
    os.mkfifo(out / ".make-shards" / "journal.jsonl")
    (out / ".make-shards" / "plan.json").write_text('{"plan_hash": "x"}\n')
    cmd = [sys.executable, "-m", "shard_tools", "synthetic", "--n", "4", "--out", str(out), "--no-progress",
           "--workers", "0"]
    r = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert r.returncode == 1 and r.stderr.strip() == (
        f"make-shards: error: {out}/.make-shards/journal.jsonl is not a regular file, which make-shards keeps its "
        "journal in: delete it, pass --overwrite, or choose another --out"), r.stderr
    r = subprocess.run([*cmd, "--overwrite"], capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert r.returncode == 0 and (out / "stats.json").is_file(), r.stderr


def test_manifest_paths_with_leading_or_trailing_spaces_are_read_as_named(tmp_path, capsys):
    """A path cell was stripped before the lookup: ' a.wav' was read as a.wav (another file) and 'b.wav ' was
    not_found. The exact cell is used when that file exists; else the stripped one (a hand-written 'c.wav , dog')."""
    tone(tmp_path / " a.wav", seconds=7.0)
    tone(tmp_path / "a.wav", seconds=8.0, freq=660)
    tone(tmp_path / "b.tmp.wav", seconds=9.0).rename(tmp_path / "b.wav ")  # soundfile writes by extension
    tone(tmp_path / "c.wav", seconds=10.0)
    csv = tmp_path / "m.csv"
    csv.write_text("path,label\n a.wav,x\nb.wav ,y\nc.wav , z\na.wav,w\n  nope.wav ,v\n", encoding="utf-8")
    out = tmp_path / "out"
    assert run("manifest", str(csv), "--out", str(out)) == 0
    lines = manifest(out)
    assert set(lines) == {" a.wav", "b.wav ", "c.wav", "a.wav", "nope.wav"}
    assert lines["nope.wav"]["skipped"] == "not_found"
    metas = _written(out)
    assert {s: round(m["duration"]) for s, m in metas.items()} == {" a.wav": 7, "b.wav ": 9, "c.wav": 10, "a.wav": 8}
    assert metas["c.wav"]["labels"] == ["z"]
    capsys.readouterr()
    assert verify(out) == 0 and "OK" in capsys.readouterr().out


def test_a_hard_linked_file_is_written_once_under_its_first_name(tmp_path, capsys):
    """Two names for one inode (a hard link) were decoded and written twice: the same audio twice in the shards.
    The first name in path order is kept; the others are duplicates naming it, as a symlink to either is."""
    d = tmp_path / "in"
    tone(d / "cls" / "a.wav")
    tone(d / "cls" / "c.wav", freq=660)
    (d / "abc").mkdir()
    try:
        os.link(d / "cls" / "a.wav", d / "cls" / "b.wav")
        os.link(d / "cls" / "a.wav", d / "abc" / "x.wav")
    except OSError:
        pytest.skip("no hard links here")
    (d / "cls" / "l.wav").symlink_to("b.wav")
    out = tmp_path / "out"
    assert run("folder", str(d), "--out", str(out)) == 0
    lines = manifest(out)
    assert "shard" in lines["abc/x.wav"] and "shard" in lines["cls/c.wav"]
    for name in ("cls/a.wav", "cls/b.wav"):
        assert lines[name]["skipped"] == "duplicate"
        assert lines[name]["detail"] == ("duplicate: same file as abc/x.wav (hard link); labels differ: that name's "
                                         "'abc' are used, not 'cls'")
    # a symlink to a hard-linked file
    assert lines["cls/l.wav"]["detail"] == ("duplicate: same file as abc/x.wav; labels differ: that name's 'abc' are "
                                            "used, not 'cls'")
    assert set(_written(out)) == {"abc/x.wav", "cls/c.wav"}
    capsys.readouterr()
    assert verify(out) == 0 and "OK" in capsys.readouterr().out


def test_a_hard_link_or_symlink_in_another_label_folder_is_said_to_lose_its_label(tmp_path, capsys):
    """One file under two names in two label folders gets the kept name's folder label; the other label was dropped
    without a word. As in a manifest, the start warns once (count and an example) and each such duplicate's detail
    says its label differs; the kept file and the labels written are as before (the plans of existing sets stay)."""
    d = tmp_path / "in"
    tone(d / "dog" / "a.wav")
    tone(d / "dog" / "c.wav", freq=550)
    tone(d / "root.wav", freq=660)
    (d / "zoo").mkdir()
    (d / "dog2").mkdir()
    try:
        os.link(d / "dog" / "a.wav", d / "zoo" / "b.wav")
        os.link(d / "root.wav", d / "dog2" / "r.wav")  # a file directly in the root has no label
    except OSError:
        pytest.skip("no hard links here")
    (d / "cat").mkdir()
    (d / "cat" / "l.wav").symlink_to("../dog/c.wav")
    (d / "dog" / "same.wav").symlink_to("c.wav")  # same folder, same label: nothing to say
    out = tmp_path / "out"
    assert run("folder", str(d), "--out", str(out)) == 0
    lines = manifest(out)
    assert {s: line["detail"] for s, line in lines.items() if line.get("skipped")} == {
        "zoo/b.wav": "duplicate: same file as dog/a.wav (hard link); labels differ: that name's 'dog' are used, "
                     "not 'zoo'",
        "root.wav": "duplicate: same file as dog2/r.wav (hard link); labels differ: that name's 'dog2' are used, "
                    "not (none)",
        "cat/l.wav": "duplicate: same file as dog/c.wav; labels differ: that name's 'dog' are used, not 'cat'",
        "dog/same.wav": "duplicate: same file as dog/c.wav",
    }
    warnings = [line for line in capsys.readouterr().err.splitlines() if "other labels" in line]
    assert warnings == [f"make-shards: warning: {d}: 3 duplicate name(s) (hard links, symlinks) give a file other "
                        "labels than its kept name; the kept name's labels are used (e.g. cat/l.wav labelled 'cat', "
                        "kept dog/c.wav labelled 'dog')"]
    metas = _written(out)  # as before: the kept names, with their folders' labels
    assert {s: m["labels"] for s, m in metas.items()} == {"dog/a.wav": ["dog"], "dog/c.wav": ["dog"],
                                                          "dog2/r.wav": ["dog2"]}


def test_audioset_hard_links_stay_with_the_segment_matching(tmp_path):
    """An AudioSet root's hard links (one clip in a downloader's per-label folders) were, and are, one segment's
    duplicates: the folder mode's hard-link check is not applied there, so the plan of an existing set is kept."""
    from shard_tools.discover import discover_audioset

    argv = audioset_files(tmp_path, SEGMENTS)
    tone(tmp_path / "root" / "a" / "--PJHxphWEs.wav")
    (tmp_path / "root" / "b").mkdir()
    try:
        os.link(tmp_path / "root" / "a" / "--PJHxphWEs.wav", tmp_path / "root" / "b" / "Y--PJHxphWEs.wav")
    except OSError:
        pytest.skip("no hard links here")
    disc = discover_audioset([argv[2]], argv[4], argv[6])
    dup = next(it for it in disc.items if it.skip)
    assert dup.source == "b/Y--PJHxphWEs.wav" and dup.detail == "same segment as a/--PJHxphWEs.wav"
    assert dup.labels == ("/m/09x0r", "/m/04rlf")  # as before: the segment's labels (part of the plan hash)


def test_a_class_whose_files_were_all_skipped_is_kept_and_named(tmp_path, capsys):
    """A folder's classes come from its folder names before any file is decoded; a class all of whose files are
    then skipped (too short here) stays in stats.json's classes, since the samples written before hold label
    indices into that list (dropping it would renumber them, and the classes are part of the plan). Both tools
    said nothing of it: make-shards' summary and verify-shards' report now name the classes without a clip."""
    for i in range(3):
        tone(tmp_path / "in" / "dog" / f"long{i}.wav", freq=300 + 50 * i)
        tone(tmp_path / "in" / "cat" / f"short{i}.wav", seconds=1.0, freq=300 + 50 * i)
    tone(tmp_path / "in" / "ant" / "short.wav", seconds=1.0)
    tone(tmp_path / "in" / "bee" / "long.wav")
    out = tmp_path / "out"
    assert run("folder", str(tmp_path / "in"), "--out", str(out), "--shard-size", "2") == 0  # 2 journal entries
    assert "classes without a written clip: 2 of 4 ('ant', 'cat')" in capsys.readouterr().out
    stats = json.loads((out / "stats.json").read_text())
    assert stats["classes"] == ["ant", "bee", "cat", "dog"] and stats["skipped"] == {"too_short": 4}
    assert sorted(m["label_indices"] for m in _written(out).values()) == [[1], [3], [3], [3]]
    assert verify(out) == 0
    assert "classes without a sample: 2 of 4 ('ant', 'cat')" in capsys.readouterr().out
