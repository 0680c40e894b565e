"""Folders someone else prepared (a run folder to resume, a shard set, an --out that exists): a planted symbolic
link is never written through, and a link to /dev/zero (or a FIFO) in place of a metadata file is a quick one-line
error, not a read until memory runs out (or a hang). Found by a security review; `matpac_fast.safe_files`."""

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from test_shards_cli_errors import run, tone

from matpac_fast import checkpoint as ckpt
from matpac_fast.evaluation import report
from matpac_fast.safe_files import atomic_write

ROOT = Path(__file__).resolve().parents[1]


def _victims(folder: Path, *names: str) -> dict[Path, str]:
    folder.mkdir(exist_ok=True)
    out = {}
    for n in names:
        (folder / n).write_text(f"victim {n}\n")
        out[folder / n] = f"victim {n}\n"
    return out


def _unchanged(victims: dict[Path, str]) -> None:
    for p, text in victims.items():
        assert p.read_text() == text, p


@pytest.fixture(scope="module")
def shard_set(tmp_path_factory) -> Path:
    """A complete two-clip set (make-shards of two tones)."""
    base = tmp_path_factory.mktemp("set")
    for i in range(2):
        tone(base / "audio" / "cls" / f"t{i}.wav", freq=300.0 + 200 * i)
    assert run("folder", str(base / "audio"), "--out", str(base / "shards")) == 0
    return base / "shards"


# ------------------------------------------------------------------------------- writes: links are not followed
def test_atomic_write_replaces_a_planted_tmp_link_and_leaves_nothing_on_error(tmp_path):
    victims = _victims(tmp_path / "victim", "a")
    (tmp_path / "f.json.tmp").symlink_to(tmp_path / "victim" / "a")
    with atomic_write(tmp_path / "f.json") as f:
        f.write("mine")
    assert (tmp_path / "f.json").read_text() == "mine" and not (tmp_path / "f.json.tmp").exists()
    with pytest.raises(RuntimeError), atomic_write(tmp_path / "f.json") as f:
        f.write("half")
        raise RuntimeError
    assert (tmp_path / "f.json").read_text() == "mine" and not os.path.lexists(tmp_path / "f.json.tmp")
    _unchanged(victims)


def test_make_shards_never_writes_through_planted_tmp_links(tmp_path):
    # manifest.jsonl.tmp and sizes.json.tmp linked to other files: make-shards overwrote them
    for i in range(2):
        tone(tmp_path / "audio" / "cls" / f"t{i}.wav", freq=300.0 + 200 * i)
    out = tmp_path / "out"
    out.mkdir()
    tmps = ["manifest.jsonl.tmp", "sizes.json.tmp", "stats.json.tmp", "shards-000000.tar.idx.tmp"]
    victims = _victims(tmp_path / "victim", *[t.replace(".", "_") for t in tmps])
    for t in tmps:
        (out / t).symlink_to(tmp_path / "victim" / t.replace(".", "_"))
    assert run("folder", str(tmp_path / "audio"), "--out", str(out)) == 0
    _unchanged(victims)
    for f in ("manifest.jsonl", "sizes.json", "stats.json", "shards-000000.tar.idx"):
        assert (out / f).is_file() and not (out / f).is_symlink(), f
    assert json.loads((out / "sizes.json").read_text()) == {"shards-000000.tar": 2}


def test_make_shards_refuses_a_linked_work_folder(tmp_path):
    # .make-shards linked to another folder: the plan and the journal were written there
    tone(tmp_path / "audio" / "cls" / "t.wav")
    out, elsewhere = tmp_path / "out", tmp_path / "elsewhere"
    out.mkdir()
    elsewhere.mkdir()
    (elsewhere / "keep.txt").write_text("keep")
    (out / ".make-shards").symlink_to(elsewhere)
    with pytest.raises(SystemExit, match=r"\.make-shards is a symbolic link, which make-shards never writes through"):
        run("folder", str(tmp_path / "audio"), "--out", str(out))
    assert sorted(p.name for p in elsewhere.iterdir()) == ["keep.txt"]


def test_make_shards_never_appends_to_a_planted_journal_link(tmp_path):
    # .make-shards/journal.jsonl linked to another file (a real folder, no plan.json): each shard's journal entry was
    # appended to the link's target, and the run then ended in "internal error: accounted 0 of 1 inputs"
    tone(tmp_path / "audio" / "cls" / "t.wav")
    out = tmp_path / "out"
    (out / ".make-shards").mkdir(parents=True)
    victims = _victims(tmp_path / "victim", "journal")
    (out / ".make-shards" / "journal.jsonl").symlink_to(tmp_path / "victim" / "journal")
    with pytest.raises(SystemExit, match=r"journal\.jsonl is a symbolic link, which make-shards never writes through"):
        run("folder", str(tmp_path / "audio"), "--out", str(out))
    _unchanged(victims)
    # a journal without the plan make-shards writes before any entry: no run to finish, said in one line
    (out / ".make-shards" / "journal.jsonl").unlink()
    (out / ".make-shards" / "journal.jsonl").write_text("not a journal\n")
    with pytest.raises(SystemExit, match=r"holds a journal\.jsonl but no plan\.json"):
        run("folder", str(tmp_path / "audio"), "--out", str(out))
    assert run("folder", str(tmp_path / "audio"), "--out", str(out), "--overwrite") == 0
    _unchanged(victims)


def test_a_resumed_run_never_writes_through_planted_links(tmp_path):
    # A stranger's run folder, resumed: config.json.tmp, history.jsonl.tmp and encoder.pt.tmp linked to other files
    # were overwritten, and checkpoints/step_00000006.tmp linked to another folder received the checkpoint (and the
    # link became the checkpoint). In this process (as tests/test_train_cli_errors.py runs matpac-train): the files
    # are written by the same code, without two starts of Python with torch.
    from matpac_fast import trainer

    tiny = ["--recipe", "tiny", "--shards", "synthetic:64", "--batch-size", "8", "--workers", "0", "--log-every", "1",
            "--progress", "false", "--model", "depth=1", "--model", "pred_depth=1", "--out", str(tmp_path / "run")]
    assert trainer.main([*tiny, "--max-steps", "3"]) == 0
    run_dir = tmp_path / "run"
    names = ["config.json.tmp", "history.jsonl.tmp", "encoder.pt.tmp"]
    victims = _victims(tmp_path / "victim", *names)
    for n in names:
        (run_dir / n).symlink_to(tmp_path / "victim" / n)
    outside = tmp_path / "outside"
    outside.mkdir()
    (run_dir / "checkpoints" / "step_00000006.tmp").symlink_to(outside)
    assert trainer.main([*tiny, "--max-steps", "6", "--resume", "auto"]) == 0
    _unchanged(victims)
    assert list(outside.iterdir()) == []
    final = run_dir / "checkpoints" / "step_00000006"
    assert final.is_dir() and not final.is_symlink() and (final / "trainer_state.json").is_file()
    assert not any(os.path.lexists(run_dir / n) for n in names)


def test_a_linked_or_hard_linked_lock_file_is_refused_and_its_target_kept(tmp_path):
    # .matpac-train.lock linked to another file: the lock truncated it and wrote a pid into it
    victims = _victims(tmp_path / "victim", "lock.txt")
    out = tmp_path / "run"
    out.mkdir()
    (out / ckpt.LOCK_FILE).symlink_to(tmp_path / "victim" / "lock.txt")
    with pytest.raises(ValueError, match=r"\.matpac-train\.lock is a symbolic link"):
        ckpt.OutLock(out).acquire()
    (out / ckpt.LOCK_FILE).unlink()
    os.link(tmp_path / "victim" / "lock.txt", out / ckpt.LOCK_FILE)
    with pytest.raises(ValueError, match=r"is not a plain file of its own"):
        ckpt.OutLock(out).acquire()
    _unchanged(victims)
    (out / ckpt.LOCK_FILE).unlink()
    lock = ckpt.OutLock(out)
    assert lock.acquire() is None and (out / ckpt.LOCK_FILE).read_text().startswith(f"{os.getpid()} ")
    lock.release()


def test_matpac_eval_never_writes_its_table_through_a_planted_link(tmp_path):
    victims = _victims(tmp_path / "victim", "ev.txt")
    out = tmp_path / "eval"
    out.mkdir()
    (out / "results.md.tmp").symlink_to(tmp_path / "victim" / "ev.txt")
    p = report.write_table(out)
    _unchanged(victims)
    assert report.TABLE_MARKER in p.read_text() and not os.path.lexists(out / "results.md.tmp")


def test_a_linked_history_is_refused_before_a_row_is_appended_through_it(tmp_path):
    # history.jsonl, a dangling link in a new run's --out: the rows were appended to (a new file at) its target
    out = tmp_path / "run"
    out.mkdir()
    (out / "history.jsonl").symlink_to(tmp_path / "made.txt")
    for resume in ("", "auto"):
        with pytest.raises(ValueError, match=r"history\.jsonl is a symbolic link, which matpac-train never writes"):
            ckpt.check_out(out, resume)
    assert not (tmp_path / "made.txt").exists()


# ------------------------------------------------------------------ reads: a device or FIFO is a one-line error
def _bounded(code: str, timeout: float = 60) -> str:
    """Run `code` in a Python whose address space may grow by 1 GiB at most after its imports (a read of /dev/zero
    is a MemoryError there, not the machine's memory) and that is stopped after `timeout` s (a FIFO's open
    hangs). Returns its stdout; it must end with "done"."""
    prelude = textwrap.dedent("""
        import resource
        import matpac_fast.data, matpac_fast.checkpoint, shard_tools.verify
        vm = next(int(x.split()[1]) for x in open("/proc/self/status") if x.startswith("VmSize:")) * 1024
        resource.setrlimit(resource.RLIMIT_AS, (vm + (1 << 30), resource.RLIM_INFINITY))
    """)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get(
        "PYTHONPATH", "")])}
    res = subprocess.run([sys.executable, "-c", prelude + textwrap.dedent(code) + "\nprint('done')\n"], env=env,
                         capture_output=True, text=True, timeout=timeout)
    assert res.returncode == 0 and res.stdout.rstrip().endswith("done"), (res.stdout, res.stderr[-3000:])
    return res.stdout


def _copy_of(shard_set: Path, d: Path) -> Path:
    """A copy of the shard set's files in `d`, to plant a link or FIFO in."""
    d.mkdir()
    for p in shard_set.iterdir():
        if p.is_file():
            (d / p.name).write_bytes(p.read_bytes())
    return d


@pytest.mark.parametrize("kind", ["zero", "fifo"])
def test_an_index_file_that_is_a_device_or_fifo_is_not_used(shard_set, tmp_path, kind):
    d = _copy_of(shard_set, tmp_path / "set")
    idx = d / "shards-000000.tar.idx"
    idx.unlink()
    idx.symlink_to("/dev/zero") if kind == "zero" else os.mkfifo(idx)
    out = _bounded(f"""
        import os
        from matpac_fast.data_tar import ShardError, read_index_file
        from shard_tools.verify import verify
        tar = {str(d / "shards-000000.tar")!r}
        try:
            read_index_file(tar, os.path.getsize(tar))
        except ShardError as e:
            print("error:", e)
        print("problems:", verify({str(d)!r}, workers=1, progress=False).problems)
    """)
    assert "error: unreadable: not a regular file" in out
    assert "not a regular file" in out.split("problems:")[1]


@pytest.mark.parametrize("kind", ["zero", "fifo"])
def test_sizes_json_or_trainer_state_that_is_a_device_is_a_one_line_error(shard_set, tmp_path, kind):
    d = _copy_of(shard_set, tmp_path / "set")
    (d / "sizes.json").unlink()
    (d / "sizes.json").symlink_to("/dev/zero") if kind == "zero" else os.mkfifo(d / "sizes.json")
    state = tmp_path / "ck" / "step_00000001" / ckpt.STATE_FILE
    state.parent.mkdir(parents=True)
    state.symlink_to("/dev/zero") if kind == "zero" else os.mkfifo(state)
    out = _bounded(f"""
        from matpac_fast.data import ShardSource
        from matpac_fast.checkpoint import read_state
        from shard_tools.verify import verify
        for f in (lambda: ShardSource.open({str(d)!r}), lambda: read_state({str(state.parent)!r})):
            try:
                f()
            except ValueError as e:
                print("error:", e)
        print("problems:", verify({str(d)!r}, workers=1, progress=False).problems)
    """)
    assert "sizes.json (not a regular file)" in out
    assert f"{state} is unreadable (not a regular file)" in out
    assert "sizes.json is unreadable: not a regular file" in out
