"""Benchmark scripts' command lines: bad values are one-line argparse errors given before any work, and
loader.py --keep never reuses data generated with other settings. (train_throughput.py and the GPU suite are
covered in test_train_throughput.py.)"""

import csv
import importlib.util
import io
import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch

from matpac_fast.data import ShardSource

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "benchmarks"
sys.path.insert(0, str(BENCH))
ENV = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}


def _load(name: str):
    """A benchmark script as a module under a private name (`loader` and `kernels` are common names)."""
    spec = importlib.util.spec_from_file_location(f"_bench_{name}", BENCH / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


loader = _load("loader")
make_shards = _load("make_shards")
shard_index = _load("shard_index")
shard_writer = _load("shard_writer")
resume = _load("resume")


def _one_line_error(fn, argv, capsys) -> str:
    with pytest.raises(SystemExit) as e:
        fn(argv)
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err and err[-1].split(": error: ", 1)[0].endswith(".py"), err
    return err[-1]


# ------------------------------------------------------------------------------------------------ loader.py
@pytest.mark.parametrize("argv, message", [
    (["--passes", "0"], "--passes must be >= 1"),
    (["--per-shard", "0"], "--per-shard must be >= 1"),
    (["--batch", "0"], "--batch must be >= 1"),
    (["--frames", "0"], "--frames must be >= 1"),
    (["--workers", "-1"], "--workers must be >= 0"),
    (["--crop", "2000"], "--crop 2000 is longer than the clips (--frames 1000)"),
    (["--paths", "indexed,foo"], "unknown --paths entries ['foo']"),
    # one batch per pass: the first is not timed, and the RESULT said 0 samples/s
    (["--clips", "8", "--batch", "8", "--workers", "1"], "--clips must be at least --batch x max(2, --workers) = 16"),
    (["--csv", "/"], "--csv / is a folder; give a file path"),
])
def test_loader_bad_arguments(argv, message, capsys):
    assert message in _one_line_error(loader.parse_args, argv, capsys)


def test_loader_keep_folder_checks(tmp_path, capsys):
    (tmp_path / "file").write_text("x")
    assert "is a file" in _one_line_error(loader.parse_args, ["--keep", str(tmp_path / "file")], capsys)
    old = tmp_path / "old"
    (old / "shards").mkdir(parents=True)  # an older version's kept folder: settings unknown, left alone
    assert "without settings.json" in _one_line_error(loader.parse_args, ["--keep", str(old)], capsys)
    assert (old / "shards").is_dir()
    foreign = tmp_path / "project"  # another program's settings.json: it was overwritten and shards/ deleted
    (foreign / "shards").mkdir(parents=True)
    (foreign / "settings.json").write_text('{"editor.tabSize": 4}')
    assert "was not written by this script" in _one_line_error(loader.parse_args, ["--keep", str(foreign)], capsys)
    assert (foreign / "shards").is_dir()
    other = tmp_path / "other.csv"
    other.write_text("a,b\n1,2\n")
    assert "other columns" in _one_line_error(loader.parse_args, ["--csv", str(other)], capsys)


def test_loader_output_csv_checks(tmp_path, capsys):
    binary = tmp_path / "binary.csv"
    binary.write_bytes(bytes(range(128, 256)))
    assert f"--csv {binary} cannot be read as a CSV" in _one_line_error(loader.parse_args, ["--csv", str(binary)],
                                                                       capsys)
    # an empty file gets the header (rows were appended without one), a missing folder is created (the run's
    # figures were lost to FileNotFoundError at the end)
    for path in (tmp_path / "empty.csv", tmp_path / "new" / "sub" / "l.csv"):
        if path.name == "empty.csv":
            path.write_text("")
        loader.main(["--clips", "16", "--frames", "640", "--per-shard", "16", "--batch", "8", "--workers", "0",
                     "--passes", "1", "--paths", "synthetic", "--csv", str(path)])
        with open(path, newline="") as f:
            rows = list(csv.DictReader(f))
        assert [r["path"] for r in rows] == ["synthetic"] and float(rows[0]["samples_per_s"]) > 0


def test_loader_mode_reaches_the_loader_and_the_csv(tmp_path, monkeypatch, capsys):
    seen, real = [], loader.make_loader
    monkeypatch.setattr(loader, "make_loader", lambda cfg, **kw: (seen.append(cfg.mode), real(cfg, **kw))[1])
    path = tmp_path / "l.csv"
    loader.main(["--clips", "16", "--frames", "640", "--per-shard", "16", "--batch", "8", "--workers", "0",
                 "--passes", "1", "--paths", "indexed", "--mode", "resampled", "--csv", str(path)])
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    assert seen and set(seen) == {"resampled"} and [r["mode"] for r in rows] == ["resampled"]


def test_loader_pipe_path_with_a_space_in_the_folder(tmp_path, capsys):
    """The pipe:cat path's command named the shard folder unquoted: a --keep (or temp) folder with a space in its
    name ended the run in a traceback (`cat /x/a` and `b/shards/sizes.json`: no such files)."""
    keep = tmp_path / "with space"
    loader.main(["--clips", "16", "--frames", "640", "--per-shard", "16", "--batch", "8", "--workers", "0",
                 "--passes", "1", "--paths", "pipe", "--keep", str(keep)])
    out = capsys.readouterr().out
    assert "RESULT loader" in out and any(line.startswith("pipe ") for line in out.splitlines()), out


def test_loader_pass_with_one_batch_is_an_error_not_zero_samples_per_s(monkeypatch, tmp_path, capsys):
    one_batch = {"lms": np.zeros((8, 1, 80, 16), np.float16)}
    with pytest.raises(loader.NothingTimed, match="indexed: a pass delivered at most one batch, so nothing was timed"):
        loader.measure("indexed", lambda: iter([one_batch]), 1, 1, 1)
    with pytest.raises(loader.NothingTimed, match="nothing was timed"):
        loader.measure("indexed", lambda: iter([]), 1, 1, 1)
    assert loader.measure("indexed", lambda: iter([one_batch] * 3), 1, 1, 1)["samples"] == 16
    dropped = []  # --cold: the page cache is dropped before each timed pass, not before the warm-up
    monkeypatch.setattr(loader._common, "drop_caches", lambda: dropped.append(1))
    assert loader.measure("indexed", lambda: iter([one_batch] * 3), 2, 1, 1, cold=True)["samples"] == 32
    assert dropped == [1, 1]
    # in a run: that path is an error (exit status 1), the other paths' rows are still written
    real = loader.time_pass

    def time_pass(make, label):  # indexed's timed passes deliver one batch: nothing timed
        return (0, 0.0, 0.1, 0.1, 0.1) if label == "indexed" else real(make, label)

    monkeypatch.setattr(loader, "time_pass", time_pass)
    path = tmp_path / "l.csv"
    with pytest.raises(SystemExit, match="nothing was timed for indexed: a pass delivered at most one batch"):
        loader.main(["--clips", "16", "--frames", "640", "--per-shard", "16", "--batch", "8", "--workers", "0",
                     "--passes", "1", "--paths", "indexed,synthetic", "--csv", str(path)])
    with open(path, newline="") as f:
        assert [r["path"] for r in csv.DictReader(f)] == ["synthetic"]
    assert "RESULT loader samples_per_s=nan" in capsys.readouterr().out  # a path timed: its RESULT, nan for the rest
    with pytest.raises(SystemExit, match="nothing was timed for indexed: a pass delivered at most one batch"):
        loader.main(["--clips", "16", "--frames", "640", "--per-shard", "16", "--batch", "8", "--workers", "0",
                     "--passes", "1", "--paths", "indexed"])
    assert "RESULT" not in capsys.readouterr().out  # nothing timed: no RESULT line of nan figures


def test_loader_paths_take_turns(tmp_path, monkeypatch, capsys):
    """Each path's warm-up, then one timed pass of each path per round: the paths were timed one after another (all
    of indexed's passes, then all of npy's), so a busy spell of the machine could fall on one side of the ratio."""
    order, real = [], loader.time_pass
    monkeypatch.setattr(loader, "time_pass", lambda make, label: (order.append(label), real(make, label))[1])
    loader.main(["--clips", "16", "--frames", "640", "--per-shard", "8", "--batch", "4", "--workers", "0",
                 "--passes", "2", "--paths", "indexed,npy"])
    assert order == ["indexed warm-up", "npy warm-up", "indexed", "npy", "indexed", "npy"]
    result = capsys.readouterr().out.strip().splitlines()[-1]
    assert result.startswith("RESULT loader samples_per_s=") and "ratio=" in result and "nan" not in result


def test_loader_keep_regenerates_when_settings_differ(tmp_path, capsys):
    """--clips 16 then --clips 12 --frames 700 into the same --keep: the second run reads 12 clips of 700 frames
    (it used to read the first run's clips while reporting the new settings)."""
    keep, out = tmp_path / "keep", tmp_path / "loader.csv"
    common = ["--batch", "4", "--workers", "0", "--passes", "1", "--paths", "indexed,npy", "--keep", str(keep)]
    loader.main(["--clips", "16", "--frames", "1000", "--per-shard", "8", *common])
    assert json.loads((keep / "settings.json").read_text()) == {"clips": 16, "frames": 1000, "per_shard": 8}
    loader.main(["--clips", "12", "--frames", "700", "--per-shard", "4", *common, "--csv", str(out)])
    assert json.loads((keep / "settings.json").read_text()) == {"clips": 12, "frames": 700, "per_shard": 4}
    source = ShardSource.open(str(keep / "shards"))
    assert source.total == 12 and len(source.urls) == 3
    with tarfile.open(source.urls[0]) as tf:
        member = next(m for m in tf.getmembers() if m.name.endswith(".npy"))
        assert np.load(io.BytesIO(tf.extractfile(member).read()), allow_pickle=False).shape == (80, 700)
    npys = sorted((keep / "npy").glob("*.npy"))
    assert len(npys) == 12 and np.load(npys[0], allow_pickle=False).shape == (80, 700)
    with open(out, newline="") as f:
        rows = list(csv.DictReader(f))
    assert [r["path"] for r in rows] == ["indexed", "npy"]
    for r in rows:
        assert (r["clips"], r["frames"]) == ("12", "700")
        clip_bytes = 80 * 700 * 2 * (2 if r["path"] == "npy" else 1)
        assert float(r["read_MB_s"]) == pytest.approx(float(r["samples_per_s"]) * clip_bytes / 1e6, rel=0.01)
    # same settings again: the data is reused as is
    mtime = (keep / "shards" / "stats.json").stat().st_mtime_ns
    loader.main(["--clips", "12", "--frames", "700", "--per-shard", "4", *common])
    assert (keep / "shards" / "stats.json").stat().st_mtime_ns == mtime
    assert capsys.readouterr().out.count("RESULT loader") == 3


# ------------------------------------------------------------------------------------------------ make_shards.py
def test_make_shards_clip_length_is_checked_up_front(tmp_path, capsys):
    msg = _one_line_error(make_shards.parse_args, ["--n", "4", "--seconds", "1"], capsys)
    assert "--seconds 1 gives 98 log-mel frames" in msg and "--short pad" in msg
    assert "no log-mel frame" in _one_line_error(make_shards.parse_args, ["--seconds", "0.01", "--short", "pad"],
                                                 capsys)
    assert "--seconds must be > 0" in _one_line_error(make_shards.parse_args, ["--seconds", "0"], capsys)
    assert "--sr must be >= 8000" in _one_line_error(make_shards.parse_args, ["--sr", "100"], capsys)
    assert "no such folder" in _one_line_error(make_shards.parse_args, ["--work", str(tmp_path / "no")], capsys)
    assert make_shards.parse_args(["--n", "4", "--seconds", "1", "--short", "pad"]).short == "pad"
    assert make_shards.parse_args(["--seconds", "6.1"]).seconds == 6.1  # 608 frames: the minimum


def test_make_shards_one_worker_runs_both_approaches_alike(tmp_path, monkeypatch, capsys):
    """--workers 1: make-shards runs its one worker in this process, so the per-file approach must too (it spawned a
    pool, whose start-up, ~1.3 s of imports, made the ratio 25.9 instead of 1.4 at --n 8 --repeats 2); and both are
    run once untimed first (in one process, the first calls fell on whichever approach ran first)."""
    def no_spawn(*a, **k):
        raise AssertionError("--workers 1 spawned a process")

    monkeypatch.setattr(make_shards.mp, "get_context", no_spawn)
    calls = []
    for name in ("per_file_approach", "make_shards_approach"):
        real = getattr(make_shards, name)

        def record(*a, real=real, name=name):
            calls.append((name, Path(a[1]).name))
            return real(*a)

        monkeypatch.setattr(make_shards, name, record)
    make_shards.main(["--n", "2", "--seconds", "6.5", "--workers", "1", "--repeats", "1", "--work", str(tmp_path)])
    assert calls == [("per_file_approach", "per_file"), ("make_shards_approach", "make_shards"),  # the warm-up
                     ("per_file_approach", "per_file_0"), ("make_shards_approach", "make_shards_0")]
    assert "RESULT make_shards" in capsys.readouterr().out
    assert list(tmp_path.iterdir()) == []


# ------------------------------------------------------------------------------------------------ shard_index.py
def test_shard_index_bad_arguments_and_a_tiny_run(tmp_path, capsys, monkeypatch):
    for argv, message in ((["--clips", "0"], "--clips must be >= 1"), (["--per-shard", "0"], "--per-shard must be"),
                          (["--tmp", str(tmp_path / "no")], "is not a folder")):
        assert message in _one_line_error(shard_index.parse_args, argv, capsys)
    monkeypatch.setattr(shard_index._common, "DROP_CACHES", str(tmp_path / "no" / "drop_caches"))  # as without root
    assert "--cold needs to write" in _one_line_error(shard_index.parse_args, ["--cold"], capsys)
    assert "--cold needs to write" in _one_line_error(loader.parse_args, ["--cold"], capsys)
    assert shard_index.main(["--clips", "7", "--per-shard", "3", "--frames", "20", "--passes", "1",
                             "--tmp", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "7 clips of 80 x 20 in 3 shards" in out and "RESULT shard_index clips=7 shards=3 warm walk/file" in out
    rows = [line.split() for line in out.splitlines() if line.startswith("warm")]
    assert [r[1] for r in rows] == ["walk", "index"] and all(float(r[-1]) > 0 for r in rows)  # ms/shard
    assert list(tmp_path.iterdir()) == []  # the data is deleted


# ------------------------------------------------------------------------------------------------ shard_writer.py
def test_shard_writer_bad_arguments_and_a_tiny_run(tmp_path, capsys):
    for argv, message in ((["--clips", "0"], "--clips must be >= 1"), (["--repeats", "0"], "--repeats must be"),
                          (["--shard-size", "1XB"], "--shard-size '1XB'"),
                          (["--tmp", str(tmp_path / "no")], "is not a folder")):
        assert message in _one_line_error(shard_writer.parse_args, argv, capsys)
    shard_writer.main(["--clips", "9", "--frames", "30", "--shard-size", "4", "--repeats", "2", "--tmp", str(tmp_path)])
    out = capsys.readouterr().out
    assert out.count("repeat ") == 2 and "9 clips" in out and "RESULT shard_writer clips_per_s=" in out, out
    assert float(out.split("clips_per_s=")[1].split()[0]) > 0
    assert list(tmp_path.iterdir()) == []  # the shards are deleted


# ------------------------------------------------------------------------------------------------ profile / attention
def test_profile_step_bad_arguments(tmp_path, capsys):
    import profile_step

    assert "invalid choice: 'foo'" in _one_line_error(profile_step.parse_args, ["--preset", "foo"], capsys)
    (tmp_path / "d.json").mkdir()
    assert "is a folder" in _one_line_error(profile_step.parse_args, ["--trace", str(tmp_path / "d.json")], capsys)
    # the first compiled step compiles: profiled, its table was the compiler's host work (train_throughput refuses it)
    assert "--warmup 0 with compiled+kernels would profile the compilation" in _one_line_error(
        profile_step.parse_args, ["--warmup", "0", "--device", "cpu"], capsys)
    assert profile_step.parse_args(["--warmup", "0", "--mode", "eager", "--device", "cpu"]).warmup == 0
    notes = tmp_path / "README.md"  # the trace used to be written over any file named
    notes.write_text("mine")
    assert "give a .json (or .json.gz) path" in _one_line_error(profile_step.parse_args, ["--trace", str(notes)],
                                                                capsys)
    assert notes.read_text() == "mine"
    (tmp_path / "f").write_text("")
    assert "cannot create its folder" in _one_line_error(
        profile_step.parse_args, ["--trace", str(tmp_path / "f" / "t.json")], capsys)
    assert "not a usable shard set" in _one_line_error(profile_step.parse_args, ["--data", str(tmp_path)], capsys)
    # these were tracebacks from the trainer
    assert "--attn-impl cudnn needs a CUDA GPU" in _one_line_error(
        profile_step.parse_args, ["--attn-impl", "cudnn", "--device", "cpu"], capsys)
    assert "--data synthetic:4 holds 4 clips, fewer than one global batch (8)" in _one_line_error(
        profile_step.parse_args, ["--data", "synthetic:4", "--batch", "8", "--device", "cpu"], capsys)
    if not torch.cuda.is_available():  # a refused run made the trace's folders first
        assert "--device cuda but torch sees no CUDA device" in _one_line_error(
            profile_step.parse_args, ["--trace", str(tmp_path / "c" / "t.json"), "--device", "cuda"], capsys)
        assert not (tmp_path / "c").exists()
    args = profile_step.parse_args(["--trace", str(tmp_path / "a" / "b" / "t.json"), "--device", "cpu"])
    assert (tmp_path / "a" / "b").is_dir() and args.preset == "matpac"


def test_attention_bad_arguments(capsys):
    attention = _load("attention")
    assert "--batch and --reps must be >= 1" in _one_line_error(attention.main, ["--batch", "0"], capsys)
    assert "invalid choice" in _one_line_error(attention.main, ["--preset", "foo"], capsys)


def test_kernels_bad_arguments(tmp_path):
    """In a subprocess: importing kernels.py sets TRITON_INTERPRET for the rest of the process."""
    other = tmp_path / "other.csv"
    other.write_text("a,b\n")
    code = ("import sys; sys.path.insert(0, 'benchmarks'); import kernels\n"
            f"for argv in (['--k', '1'], ['--tokens', '0'], ['--batches', '2,x'], ['--ops', ''], "
            f"['--out', {str(other)!r}], ['--out', {str(tmp_path)!r}]):\n"
            "    try:\n        kernels.parse_args(argv)\n    except SystemExit as e:\n        print('exit', e.code)\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=ENV, timeout=120,
                          cwd=ROOT)
    assert proc.stdout.split() == ["exit", "2"] * 6, proc.stderr[-2000:]
    err = proc.stderr
    for message in ("--k must be in [2, 8192]", "--batches, --tokens and --reps must be positive",
                    "--batches must be a comma list of integers", "unknown --ops entries [];",
                    "has other columns than this script writes", f"--out {tmp_path} is a folder; give a file path"):
        assert message in err, err


# ------------------------------------------------------------------------------------------------ resume.py
@pytest.mark.parametrize("argv, message", [
    (["--at", "1"], "--at 1.0: give a fraction of the epoch between 0 and 1"),
    (["--at", "0"], "--at 0.0: give a fraction of the epoch between 0 and 1"),
    (["--clips", "8", "--batch", "8"], "--clips 8 gives 1 batch(es) of --batch 8; it needs at least 2"),
    (["--crop", "2000"], "--crop 2000 is longer than the clips (--frames 1000)"),
    (["--workers", "-1"], "--workers >= 0"),
])
def test_resume_bad_values_are_one_line_errors(argv, message, capsys):
    assert message in _one_line_error(resume.parse_args, argv, capsys)


def test_resume_times_both_ways_to_the_same_batch(tmp_path, capsys):
    """A tiny run completes, compares the batch both ways give (it exits with an error if they differ) and prints
    its RESULT line."""
    assert resume.main(["--clips", "48", "--frames", "80", "--crop", "64", "--per-shard", "10", "--batch", "4",
                        "--workers", "1", "--keep", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "resume at batch 11 of 12" in out
    result = out.strip().splitlines()[-1]
    assert result.startswith("RESULT resume batch=11/12 cache=warm read_and_drop_s=") and "speedup=" in result


def test_resume_keep_folder_gets_loaders_checks(tmp_path, capsys):
    """resume.py --keep shares loader.py's data folder and its checks: a folder with another program's
    settings.json was rewritten (its settings.json replaced, its shards/ deleted) without a word."""
    folder = tmp_path / "project"
    (folder / "shards").mkdir(parents=True)
    (folder / "settings.json").write_text('{"name": "my project"}\n')
    (folder / "shards" / "mine.txt").write_text("precious")
    assert "was not written by this script" in _one_line_error(resume.parse_args, ["--keep", str(folder)], capsys)
    assert (folder / "shards" / "mine.txt").read_text() == "precious"
    assert json.loads((folder / "settings.json").read_text()) == {"name": "my project"}


@pytest.mark.parametrize("module", [loader, resume], ids=["loader", "resume"])
def test_keep_folder_under_a_file_is_a_one_line_error(module, tmp_path, capsys):
    """A --keep path below a file was a NotADirectoryError traceback after the arguments were accepted."""
    (tmp_path / "f").write_text("x")
    message = _one_line_error(module.parse_args, ["--keep", str(tmp_path / "f" / "data")], capsys)
    assert f"{tmp_path / 'f'} is a file, not a folder" in message


# ------------------------------------------------------------------------------------------------ ema.py
def test_ema_variants_take_turns():
    """plain, eager and compiled were each timed in a block of --repeats calls, one block after another: a busy
    spell of the machine fell on one variant (the README's loaded-machine figures moved 5x). Now: one untimed call
    of each, then rounds of one timed call of each."""
    ema = _load("ema")
    order = []
    times = ema._time_ms({name: (lambda name=name: order.append(name)) for name in ("plain", "eager", "compiled")},
                         2, "cpu")
    assert order == ["plain", "eager", "compiled"] * 3
    assert {k: len(v) for k, v in times.items()} == {"plain": 2, "eager": 2, "compiled": 2}


def test_a_benchmark_interrupted_by_ctrl_c_says_one_line_and_ends_by_sigint():
    """Ctrl-C in loader.py, make_shards.py or resume.py printed a KeyboardInterrupt traceback (nothing was left behind).
    Every benchmark but plot_results now ends through _common.command: one line, then SIGINT, as the tools end."""
    code = ("import sys; sys.path.insert(0, 'benchmarks'); import _common\n"
            "def main():\n    print('measuring', flush=True)\n    raise KeyboardInterrupt\n"
            "sys.argv[0] = 'loader.py'; _common.command(main)\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert r.returncode == -2 and r.stdout == "measuring\n", (r.returncode, r.stderr[-2000:])
    assert r.stderr.strip() == "loader.py: interrupted before its RESULT line"
    scripts = sorted(p.name for p in BENCH.glob("*.py") if 'if __name__ == "__main__":' in p.read_text())
    entries = {name: (BENCH / name).read_text().split('if __name__ == "__main__":')[1].split("\n")[1].strip()
               for name in scripts}
    assert {n for n, line in entries.items() if not line.startswith(("_common.command(main)", "run_main(main)"))} == {
        "plot_results.py"}, entries
