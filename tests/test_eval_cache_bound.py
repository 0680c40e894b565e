"""matpac-eval's embedding cache folder is bounded (--cache-max-gb): the key holds the data files' times, so touching
or re-downloading a dataset added a whole new entry, and nothing was ever removed. The least recently used entries
(mtime: written or last read) go first, never the entry of the running extraction."""

from __future__ import annotations

import math
import os

from test_eval_cli_errors import _one_line_error, _run

from matpac_fast.evaluation import embed
from matpac_fast.evaluation.datasets import load_dataset

FAST = ["--checkpoint", "logmel", "--quiet", "--probe", "logreg", "--folds", "kfold:2", "--projection", "none"]


def _entries(cache) -> list[str]:
    return sorted(p.name.split("-")[0] for p in cache.glob("*.npz"))


def _extract(ds, task: str, cache, max_bytes: float = math.inf) -> embed.Extracted:
    s = embed.ExtractSettings(0.3, cache_dir=cache, progress=False, cache_max_bytes=max_bytes)
    return embed.extract(ds, embed.make_embedder("logmel"), task, s)


def test_least_recently_used_entries_go_first_and_the_entry_read_stays(tones, tmp_path, capsys):
    ds, cache = load_dataset(tones), tmp_path / "cache"
    for i, task in enumerate(("a", "b", "c")):  # three entries of one size, written long ago: a, then b, then c
        _extract(ds, task, cache)
        (entry,) = cache.glob(f"{task}-*.npz")
        os.utime(entry, (1000 + i, 1000 + i))
    size = entry.stat().st_size
    assert {p.stat().st_size for p in cache.glob("*.npz")} == {size}
    capsys.readouterr()

    hit = _extract(ds, "a", cache, max_bytes=2.5 * size)  # the oldest entry is read: now the most recently used
    assert hit.cache_hit
    assert _entries(cache) == ["a", "c"]  # b, least recently used, went; a (read by this run) stayed
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "removed 1 least recently used entry" in err and str(cache) in err, err

    _extract(ds, "d", cache, max_bytes=2.5 * size)  # written: c is now the least recently used
    assert _entries(cache) == ["a", "d"]
    _extract(ds, "e", cache, max_bytes=0)  # a bound below one entry keeps the entry of this run only
    assert _entries(cache) == ["e"]
    assert "removed 2 least recently used entries" in capsys.readouterr().err


def test_other_files_and_entries_being_written_are_left(tones, tmp_path):
    ds, cache = load_dataset(tones), tmp_path / "cache"
    _extract(ds, "a", cache)
    (entry,) = cache.glob("a-*.npz")
    writing = cache / (entry.stem + ".4242.tmp.npz")  # another run's entry being written
    other = cache / "notes.npz"  # not a name of ours
    for p in (writing, other):
        p.write_bytes(b"x" * 10_000_000)
        os.utime(p, (1, 1))
    os.utime(entry, (2, 2))
    _extract(ds, "b", cache, max_bytes=0)
    assert not entry.exists() and writing.exists() and other.exists()


def test_an_entry_another_run_removes_meanwhile_is_passed_over(tones, tmp_path, monkeypatch, capsys):
    ds, cache = load_dataset(tones), tmp_path / "cache"
    for task in ("a", "b", "c"):
        _extract(ds, task, cache)
    (gone,) = cache.glob("a-*.npz")
    lstat = os.lstat

    def lstat_then_vanish(path, *a, **k):  # another run removes a just after this one measured it
        st = lstat(path, *a, **k)
        if os.fspath(path) == os.fspath(gone):
            os.unlink(path)
        return st

    monkeypatch.setattr(embed.os, "lstat", lstat_then_vanish)
    capsys.readouterr()
    _extract(ds, "d", cache, max_bytes=0)
    assert _entries(cache) == ["d"]
    assert "removed 2 least recently used entries" in capsys.readouterr().err  # b and c: a was not this run's


def test_an_entry_removed_before_it_is_read_is_a_plain_miss(tones, tmp_path, capsys):
    # extract found the entry, then another run's bound removed it: it was reported as "unreadable ... deleting it"
    ds = load_dataset(tones)
    paths = [c.path for c in ds.clips]
    assert embed._read_cache(tmp_path / "gone.npz", embed.np.array(paths), 4800) is None
    assert capsys.readouterr().err == ""


def test_cli_cache_max_gb(tones, tmp_path, capsys):
    cache = tmp_path / "cache"
    base = FAST + ["--data", str(tones), "--out", str(tmp_path / "o"), "--cache-dir", str(cache)]
    _run(base + ["--clip-seconds", "0.3"], capsys)
    (first,) = cache.glob("*.npz")
    _, err = _run(base + ["--clip-seconds", "0.25", "--cache-max-gb", "0"], capsys)  # another key, the same name
    assert not first.exists() and len(list(cache.glob("*.npz"))) == 1
    assert "(--cache-max-gb): removed 1 least recently used entry" in err, err
    for bad in ("-1", "nan"):
        assert f"--cache-max-gb must be >= 0 (inf: no bound), got {float(bad)}" in _one_line_error(base + [
            "--cache-max-gb", bad])
