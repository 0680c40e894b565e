"""matpac-eval's embedding cache folder (CLI review, items 9 and 10): XDG_CACHE_HOME's errors name it, a relative
one is ignored (XDG base directory spec), and --no-cache with --cache-dir says the folder is not used."""

from __future__ import annotations

from pathlib import Path

from test_eval_cli_errors import _one_line_error, _run

from matpac_fast.evaluation import embed

FAST = ["--checkpoint", "logmel", "--quiet", "--probe", "logreg", "--folds", "kfold:2", "--projection", "none"]


def test_an_unwritable_xdg_cache_home_is_named_not_cache_dir(tones, tmp_path, monkeypatch):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    monkeypatch.setenv("XDG_CACHE_HOME", str(blocker))
    msg = _one_line_error(FAST + ["--data", str(tones), "--out", str(tmp_path / "o")])
    # before: "--cache-dir .../file/matpac_fast/embeddings: cannot create ...", an option that was never passed
    assert f"XDG_CACHE_HOME={blocker}" in msg and "--cache-dir " not in msg.split(";")[0], msg


def test_a_relative_xdg_cache_home_is_ignored(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", "rel/cache")  # before: used as given, relative to wherever the CLI ran
    monkeypatch.setenv("HOME", str(tmp_path))
    assert embed.default_cache_dir() == Path(tmp_path) / ".cache" / "matpac_fast" / "embeddings"
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "abs"))
    assert embed.default_cache_dir() == tmp_path / "abs" / "matpac_fast" / "embeddings"


def test_no_cache_with_cache_dir_says_the_folder_is_not_used(tones, tmp_path, capsys):
    cache = tmp_path / "c"
    _, err = _run(FAST + ["--data", str(tones), "--out", str(tmp_path / "o"), "--no-cache", "--cache-dir", str(cache)],
                  capsys)  # fmt: skip
    assert f"--no-cache: --cache-dir {cache} is not used" in err, err
    assert not cache.exists()


def test_an_unknown_preset_is_refused_for_every_checkpoint(tones, tmp_path):
    for ckpt in ("logmel", "random"):  # before: accepted with logmel (and written into the result's JSON)
        args = ["--checkpoint", ckpt, "--preset", "foo", "--data", str(tones), "--out", str(tmp_path / "o")]
        assert "--preset foo: unknown model preset; choose one of " in _one_line_error(args)
    assert not (tmp_path / "o").exists()
