"""Seams between the tools, found by following the README end to end: what one step writes or accepts that the
next step read another way (make-shards -> matpac-eval)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from test_eval import RESULT_RE
from test_eval_cli_errors import _run

FAST = ["--quiet", "--probe", "logreg", "--folds", "kfold:2", "--projection", "none"]


def test_eval_reads_a_file_name_that_is_not_utf8_as_make_shards_does(tones, tmp_path, capsys):
    """make-shards reads such files (shown with \\xNN escapes); matpac-eval skipped them as undecodable, and with its
    embedding cache (the default) stopped on the first one: 'utf-8' codec can't encode character '\\udce9'."""
    src = tones / "low" / "low_0.wav"
    target = os.fsencode(tones / "low") + b"/caf\xe9.wav"
    try:
        os.rename(os.fsencode(src), target)
    except OSError:
        pytest.skip("this file system does not accept non-UTF-8 file names")
    args = ["--checkpoint", "logmel", "--data", str(tones), "--out", str(tmp_path / "o"),
            "--cache-dir", str(tmp_path / "cache"), *FAST]  # fmt: skip
    for _ in range(2):  # written to the cache, then read from it
        lines, err = _run(args, capsys)
        assert RESULT_RE.match(lines[-1]), lines[-1]
        assert "skipped" not in err, err
        assert any(line.startswith("embeddings 24 x 160") for line in lines), lines
    assert Path(os.fsdecode(target)).is_file()


def test_resume_refuses_a_shard_set_remade_in_place_with_other_clips(tmp_path, capsys):
    """make-shards --overwrite with another --seed keeps every shard's name and sample count; a resume compared only
    those, went on silently, and said it continued 'with the data of an uninterrupted run'. stats.json's shard
    digests tell the sets apart (a moved copy keeps them)."""
    import shutil

    from test_train_cli_errors import _main

    from shard_tools.api import make_synthetic_shards

    shards, out = tmp_path / "shards", str(tmp_path / "run")
    make_synthetic_shards(shards, n=16, seed=0, workers=0, shard_size="8", progress=False)
    assert _main(capsys, "--shards", str(shards), "--out", out, "--max-steps", "1")[0] == 0
    shutil.copytree(shards, tmp_path / "moved")  # a moved copy still resumes
    rc, _, err = _main(capsys, "--shards", str(tmp_path / "moved"), "--out", out, "--max-steps", "2", "--resume",
                       "auto")
    assert rc == 0, err
    make_synthetic_shards(shards, n=16, seed=1, workers=0, shard_size="8", progress=False, overwrite=True)
    rc, _, err = _main(capsys, "--shards", str(shards), "--out", out, "--max-steps", "3", "--resume", "auto")
    assert rc == 2 and "(other shard names or sizes, or a set re-made since: other shard contents)" in err, err


def test_resume_refuses_the_second_of_two_sets_remade_in_place(tmp_path, capsys):
    """Two sets given together ('data/*') each name their shards shards-000000.tar...: the run's fingerprint looked
    every shard up in the first set's stats.json, so a second set re-made in place resumed silently. A checkpoint
    written under that rule still resumes."""
    import hashlib
    import json

    from test_train_cli_errors import _main

    from matpac_fast.data import ShardSource
    from shard_tools.api import make_synthetic_shards

    data, out = tmp_path / "data", tmp_path / "run"
    for seed, name in enumerate("ab"):
        make_synthetic_shards(data / name, n=16, seed=seed, workers=0, shard_size="8", progress=False)
    both = ShardSource.open(str(data / "*"))
    recorded = [json.loads((data / n / "stats.json").read_text())["shard_sha256"] for n in "ab"]
    assert both.shard_digests() == [recorded[i][f"shards-{k:06d}.tar"] for i in (0, 1) for k in (0, 1)]
    assert _main(capsys, "--shards", str(data / "*"), "--out", str(out), "--max-steps", "1")[0] == 0

    state = out / "checkpoints" / "step_00000001" / "trainer_state.json"
    saved = json.loads(state.read_text())
    names = [f"shards-{k:06d}.tar" for k in (0, 1)] * 2
    first_rule = [recorded[0][n] for n in names]
    state.write_text(json.dumps({**saved, "data_fingerprint": hashlib.sha256(
        json.dumps([names, [8] * 4, first_rule]).encode()).hexdigest()[:16]}))
    rc, _, err = _main(capsys, "--shards", str(data / "*"), "--out", str(out), "--max-steps", "2", "--resume",
                       str(state.parent))
    assert rc == 0, err

    make_synthetic_shards(data / "b", n=16, seed=2, workers=0, shard_size="8", progress=False, overwrite=True)
    rc, _, err = _main(capsys, "--shards", str(data / "*"), "--out", str(out), "--max-steps", "3", "--resume", "auto")
    assert rc == 2 and "a set re-made since: other shard contents" in err, err


def test_eval_reads_a_symlinked_manifest_as_make_shards_does(tones, tmp_path, capsys):
    """A manifest's relative paths start at the folder of the CSV the link points to in make-shards; matpac-eval
    looked beside the link and stopped: "file 'low/low_0.wav' not found (looked at links/low/low_0.wav)"."""
    from shard_tools.discover import discover_manifest

    rows = [f"{label}/{label}_{i}.wav,{label}" for label in ("low", "mid", "high") for i in range(8)]
    (tones / "set.csv").write_text("path,label\n" + "\n".join(rows) + "\n")
    (tmp_path / "links").mkdir()
    (tmp_path / "links" / "set.csv").symlink_to(tones / "set.csv")
    made = discover_manifest(tmp_path / "links" / "set.csv")
    assert [it.skip for it in made.items] == [None] * 24
    lines, _ = _run(["--checkpoint", "logmel", "--data", str(tmp_path / "links" / "set.csv"), "--out",
                     str(tmp_path / "o"), "--no-cache", *FAST], capsys)  # fmt: skip
    assert RESULT_RE.match(lines[-1]), lines[-1]
    assert any(line.startswith("embeddings 24 x 160") for line in lines), lines


def test_a_csv_with_path_and_file_columns_reads_path_in_both_tools(tones, tmp_path):
    """make-shards' manifest reader takes 'path' (its aliases only without one); matpac-eval took 'file' first, so
    the shards and the evaluation of one CSV could be of different files."""
    from matpac_fast.evaluation.datasets import load_dataset
    from shard_tools.discover import discover_manifest

    rows = [f"{label}/{label}_{i}.wav,{label}/{label}_{7 - i}.wav,{label}" for label in ("low", "high")
            for i in range(4)]
    (tones / "both.csv").write_text("file,path,label\n" + "\n".join(rows) + "\n")
    made = discover_manifest(tones / "both.csv")
    ds = load_dataset(str(tones / "both.csv"))
    want = [os.path.realpath(tones / r.split(",")[1]) for r in rows]
    assert sorted(os.path.realpath(it.path) for it in made.items) == sorted(want)
    assert sorted(os.path.realpath(c.path) for c in ds.clips) == sorted(want)
