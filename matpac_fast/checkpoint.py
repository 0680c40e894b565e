"""Checkpoint directories: naming, atomic completion, `--resume auto`, keep-last-N, trainer state as JSON.

A checkpoint is a directory `step_XXXXXXXX/` holding Accelerate's `save_state` output (model as safetensors, the
optimizer and RNG states loaded back with `weights_only=True`) plus `trainer_state.json`. The teacher, the centre
and the EMA shadows are part of the model's state dict, so they travel with it. We deliberately do not use
`accelerator.register_for_checkpointing`: Accelerate reloads such objects with `weights_only=False` (unpickling),
and a checkpoint from a stranger must not run code. The directory is written as `step_XXXXXXXX.tmp` and renamed
once every rank has finished, so `--resume auto` never picks a half-written checkpoint.

A damaged checkpoint (truncated or missing file, bad JSON) is a one-line `ValueError` naming the file, found before
anything is loaded or written (`read_state`, `verify`).
"""

from __future__ import annotations

import contextlib
import errno
import json
import math
import os
import re
import shutil
import socket
import stat
from pathlib import Path

from matpac_fast.locks import close_lock_fd, open_lock_fd
from matpac_fast.safe_files import JSON_MAX_BYTES, read_regular

_STEP_DIR = re.compile(r"^step_(\d{8})$")
STATE_FILE = "trainer_state.json"
# The teacher EMA's Kahan terms (Trainer._ema_residual), one tensor per teacher parameter; absent from checkpoints
# written before them (they then start from zeros)
EMA_RESIDUAL = "ema_residual.safetensors"


def checkpoint_root(out: str | Path) -> Path:
    return Path(out) / "checkpoints"


def step_dir(out: str | Path, step: int) -> Path:
    return checkpoint_root(out) / f"step_{step:08d}"


def list_checkpoints(out: str | Path) -> list[Path]:
    """Completed checkpoints, oldest first."""
    root = checkpoint_root(out)
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and _STEP_DIR.match(p.name) and (p / STATE_FILE).exists()]
    return sorted(found, key=lambda p: int(_STEP_DIR.match(p.name).group(1)))


def resolve_resume(resume: str, out: str | Path) -> Path | None:
    """'' -> None; 'auto' -> latest completed checkpoint in `out` (or None); a path -> that checkpoint."""
    if not resume:
        return None
    if resume == "auto":
        ckpts = list_checkpoints(out)
        root = checkpoint_root(out)
        # Finished checkpoints are renamed from .tmp only when complete, so a step directory without its state file
        # is damage, not work in progress: say so rather than silently resuming an older one.
        steps = sorted((p for p in root.iterdir() if p.is_dir() and _STEP_DIR.match(p.name)),
                       key=lambda p: int(_STEP_DIR.match(p.name).group(1))) if root.is_dir() else []
        if steps and (not ckpts or steps[-1] != ckpts[-1]):
            earlier = f"resume from {ckpts[-1]} with --resume PATH" if ckpts else "start a new run with a new --out"
            raise ValueError(f"--resume auto: the latest checkpoint {steps[-1]} is damaged (no {STATE_FILE}): "
                             f"{earlier}")
        return ckpts[-1] if ckpts else None
    path = Path(resume)
    if not (path / STATE_FILE).exists():
        raise ValueError(f"--resume {resume}: not a checkpoint directory (no {STATE_FILE}); use --resume auto")
    return path


# What marks a folder as holding a run: a new run there would prune, overwrite or append to them. (A run that failed
# before its first log step leaves only config.json and tb/: nothing to lose, so the corrected command may reuse it.)
RUN_FILES = ("history.jsonl", "encoder.pt")
# history.jsonl's bound (a row is ~400 bytes: millions of rows), and JSON_MAX_BYTES the bound of the small JSON files
# read here: what reading one may cost (a link to /dev/zero was read until memory ran out)
HISTORY_MAX_BYTES = 1 << 30


def check_out(out: str | Path, resume: str) -> None:
    """A new run (no --resume) must not write into a folder that holds another run, nor resume a checkpoint from
    elsewhere into a folder with checkpoints of its own (--keep-last would prune them). One-line ValueError."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out} is a file: give a directory for the run")
    if (out / "history.jsonl").is_symlink():  # appended to in place: rows went into the link's target (made if none)
        raise ValueError(f"{out / 'history.jsonl'} is a symbolic link, which matpac-train never writes through: "
                         "delete the link (not its target), or choose another --out")
    if _foreign_config(out / "config.json"):  # the run writes its own there at start: never over someone else's
        raise ValueError(f"--out {out} holds a config.json that matpac-train did not write: choose another --out (or "
                         "move that file)")
    found = (["checkpoints"] if list_checkpoints(out) else []) + [n for n in RUN_FILES if (out / n).exists()]
    if resume in ("", "auto") and found and "checkpoints" not in found:
        # E.g. a --recipe tiny run (--ckpt-every 0) killed before its end: nothing to continue. Never deleted here.
        doomed = [n for n in RUN_FILES if (out / n).exists()] + [n for n in ("tb",) if (out / n).exists()]
        raise ValueError(f"--out {out} holds a run ({', '.join(found)}) but no checkpoint to continue it from: to "
                         f"start over in it, delete {' and '.join(str(out / n) for n in doomed)}; or choose a new or "
                         "empty --out")
    if not resume and found:
        raise ValueError(f"--out {out} already holds a run ({', '.join(found)}): continue it with --resume auto, "
                         "or choose a new or empty --out")
    if resume in ("", "auto"):
        return
    if not (Path(resume) / STATE_FILE).exists():  # before the folder checks: their advice assumes a checkpoint
        raise ValueError(f"--resume {resume}: not a checkpoint directory (no {STATE_FILE}); give a "
                         f"checkpoints/step_NNNNNNNN folder, or use --resume auto")
    if list_checkpoints(out):
        if Path(resume).resolve().parent != checkpoint_root(out).resolve():
            raise ValueError(f"--out {out} holds checkpoints of another run: resume {resume} into a new or empty "
                             f"--out, or use --resume auto to continue the run in {out}")
    elif found:
        # A finished run (encoder.pt) or rows at or before the checkpoint's step, of a run with other settings: the
        # resumed one would keep its rows as its own history. (Rows after the step are this resume's own, redone
        # as after a kill; the same settings are the same run rolled back, its checkpoints moved away.)
        try:
            state = json.loads(read_regular(Path(resume) / STATE_FILE, JSON_MAX_BYTES))
        except (OSError, ValueError, RecursionError):  # RecursionError: nested too deep
            state = None  # reported in its own words when the trainer reads it (read_state)
        mixed = "encoder.pt" in found or _history_reaches(out / "history.jsonl", state)
        if mixed and not _same_settings(out / "config.json", state):
            raise ValueError(f"--out {out} holds another run ({', '.join(found)}) without checkpoints: resume "
                             f"{resume} into a new or empty --out")


def _same_settings(config: Path, state) -> bool:
    """True when --out's config.json records the settings the checkpoint (its trainer state `state`) was trained
    with: nothing that train_config.resume_changes calls blocking differs."""
    from matpac_fast.train_config import resume_changes

    try:
        run = json.loads(read_regular(config, JSON_MAX_BYTES))
        blocking, _ = resume_changes({**state["config"], "model": state["model_config"]},
                                     {**run["train"], "model": run["model"]})
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return False
    return not blocking


def _foreign_config(path: Path) -> bool:
    """True when `path` exists and is not a run config ({"train": {...}, "model": {...}}, as the trainer writes)."""
    if not path.exists():
        return False
    try:
        obj = json.loads(read_regular(path, JSON_MAX_BYTES))
    except (OSError, ValueError, RecursionError):
        return True
    return not (isinstance(obj, dict) and isinstance(obj.get("train"), dict) and isinstance(obj.get("model"), dict))


def read_history(path: Path) -> str:
    """The text of history.jsonl (OSError when it is not a regular file or is over HISTORY_MAX_BYTES)."""
    return read_regular(path, HISTORY_MAX_BYTES).decode(errors="replace")


def _history_reaches(history: Path, state) -> bool:
    """True when `history` has a row at or before the step of the checkpoint whose trainer state is `state`."""
    try:
        step = state["step"]
        rows = [json.loads(line) for line in read_history(history).splitlines() if line.strip()]
    except (OSError, ValueError, KeyError, TypeError, RecursionError):  # RecursionError: a row nested too deep
        return history.exists()  # unreadable: not this resume's to keep
    return any(isinstance(r, dict) and isinstance(r.get("step"), int) and r["step"] <= step for r in rows)


LOCK_FILE = ".matpac-train.lock"
_BUSY = (errno.EAGAIN, errno.EWOULDBLOCK, errno.EACCES)  # EACCES: a conflict as some NFS servers report it


class OutLock:
    """One writer per run folder: an exclusive `fcntl.flock` on `--out/.matpac-train.lock`, which holds the holder's
    "pid host". Taken by the main process only (all ranks of one job share --out) and held for the run's lifetime;
    the kernel drops it when the process dies, so a SIGKILLed run leaves at most a stale file, never a stale lock
    (forked children, such as DataLoader workers, do not inherit the descriptor: `matpac_fast.locks`).
    `release` removes the file (while still holding the lock: `acquire` re-checks that the file it locked is the one
    at the path, so a process that opened the old file before the removal tries again)."""

    def __init__(self, out: str | Path):
        self.out = Path(out)
        self.path = self.out / LOCK_FILE
        self._fd: int | None = None
        self._unsupported = False

    def acquire(self) -> str | None:
        """Lock (a no-op when held). ValueError when another process holds the lock; a file system without
        flock (or a lock file that cannot be created) returns the reason as a warning text, once: never blocking."""
        import fcntl

        if self._fd is not None or self._unsupported:
            return None
        for _ in range(20):
            try:
                # O_NOFOLLOW: the file is truncated below; through a planted link it was the link's target
                fd = open_lock_fd(self.path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o644)
            except OSError as e:
                if e.errno == errno.ELOOP:
                    raise ValueError(f"{self.path} is a symbolic link, which matpac-train never writes through: "
                                     "delete the link (not its target), or choose another --out") from None
                return self._degrade(f"cannot create {self.path} ({e.strerror or e})")
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode) or st.st_nlink > 1:  # a FIFO, or a hard link to someone's file
                close_lock_fd(fd)
                raise ValueError(f"{self.path} is not a plain file of its own (a FIFO, device or hard link), which "
                                 "matpac-train never writes into: delete it, or choose another --out")
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as e:
                holder = _read_holder(fd) if e.errno in _BUSY else None
                close_lock_fd(fd)
                if holder is None:  # ENOLCK, EOPNOTSUPP, ENOSYS, ...: this file system does not lock
                    return self._degrade(f"the file system cannot lock {self.path} ({e.strerror or e})")
                raise ValueError(f"another process{holder} is writing --out {self.out}; wait for it to end or "
                                 "choose another --out") from None
            try:
                st = os.stat(self.path)
                same = (st.st_ino, st.st_dev) == (os.fstat(fd).st_ino, os.fstat(fd).st_dev)
            except FileNotFoundError:
                same = False
            if not same:  # its holder removed it between our open and flock: lock the file now at the path
                close_lock_fd(fd)
                continue
            try:
                os.ftruncate(fd, 0)
                os.write(fd, f"{os.getpid()} {socket.gethostname()}\n".encode())
            except OSError as e:  # a full disk (ENOSPC): it was a traceback, the resume after a checkpoint's failure
                with contextlib.suppress(OSError):
                    os.unlink(self.path)  # ours: locked, and checked above to be the file at the path
                close_lock_fd(fd)
                then = "free space on that disk, then run again" if e.errno in DISK_FULL else "choose another --out"
                raise ValueError(f"--out {self.out}: cannot write {self.path}: {write_failure(e)}; {then}") from None
            self._fd = fd
            return None
        return self._degrade(f"{self.path} keeps being replaced")

    def _degrade(self, reason: str) -> str:
        self._unsupported = True
        return (f"--out {self.out}: {reason}; training without the lock: make sure no other process writes this "
                "--out")

    def release(self) -> None:
        if self._fd is None:
            return
        try:
            os.unlink(self.path)
        except OSError:
            pass
        close_lock_fd(self._fd)
        self._fd = None


def _read_holder(fd: int) -> str:
    """' (pid N)' or ' (pid N on HOST)' from the lock file; '' while its holder has not written it yet."""
    try:
        pid, _, host = os.pread(fd, 256, 0).decode(errors="replace").strip().partition(" ")
    except OSError:
        return ""
    if not pid.isdigit():
        return ""
    return f" (pid {pid})" if host in ("", socket.gethostname()) else f" (pid {pid} on {host})"


def write_state(path: Path, state: dict) -> None:
    (path / STATE_FILE).write_text(json.dumps(state, indent=1, sort_keys=True))


_EARLIER = "pick an earlier checkpoint with --resume PATH"
_REQUIRED = ("step", "epoch", "batch_in_epoch")


def read_state(path: Path) -> dict:
    """trainer_state.json of checkpoint `path`, checked: a one-line ValueError naming the file if it is unusable."""
    f = Path(path) / STATE_FILE
    try:
        state = json.loads(read_regular(f, JSON_MAX_BYTES))
    except FileNotFoundError:
        raise ValueError(f"{f} is missing: the checkpoint is incomplete; {_EARLIER}") from None
    except OSError as e:  # not a regular file (a link to /dev/zero, a FIFO), too large, unreadable
        raise ValueError(f"{f} is unreadable ({e.strerror or e}); {_EARLIER}") from None
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:  # nested too deep
        raise ValueError(f"{f} is not valid JSON ({e}); {_EARLIER}") from None
    bad = [k for k in _REQUIRED if not isinstance(state, dict) or type(state.get(k)) is not int]
    if bad:
        raise ValueError(f"{f} lacks a whole-number {', '.join(bad)}: it is damaged or not a trainer state; "
                         f"{_EARLIER}")
    for key, value in _misfits(state):
        shown = json.dumps(value)
        shown = shown if len(shown) <= 40 else shown[:37] + "..."
        raise ValueError(f"{f}: {key} is {shown}, not {_FIELDS.get(key.split('.')[0], 'an object')}: the file is "
                         f"damaged or was edited; {_EARLIER}")
    return state


# What each field of trainer_state.json holds as the trainer writes it (save_checkpoint). A field from after a
# checkpoint's version is absent from it, and not checked; a present one of another kind (a hand-edited "1", a
# list) was a traceback (TypeError, AttributeError) or a nonsense comparison ("written by 1 processes, this run
# has 1", "schedules 32 steps, this run 32") after the resume error had sent the user to this file.
_FIELDS = {"step": "a whole number of 0 or more", "epoch": "a whole number of 0 or more",
           "batch_in_epoch": "a whole number of 0 or more", "skipped_shards": "a whole number of 0 or more",
           "total_steps": "a whole number of 0 or more", "world_size": "a whole number of 1 or more",
           "nonfinite_total": "a finite number of 0 or more", "nonfinite_run": "a finite number of 0 or more",
           "config": "an object", "model_config": "an object",
           "data_fingerprint": "a text or null", "data_reader": "a text or null"}
# the objects inside "config" (TrainConfig.to_dict): every one is an object of settings
_CONFIG_SECTIONS = ("run", "data", "optim", "schedule", "model", "inductor")


def _misfits(state: dict):
    """(field, value) of each field of `state` that holds something other than _FIELDS says."""
    for key, value in state.items():
        want = _FIELDS.get(key)
        if want is None:
            continue
        if want.startswith("a whole number"):
            ok = type(value) is int and value >= (1 if key == "world_size" else 0)
        elif want.startswith("a finite number"):
            ok = type(value) in (int, float) and math.isfinite(value) and value >= 0
        elif want == "an object":
            ok = isinstance(value, dict)
        else:
            ok = value is None or isinstance(value, str)
        if not ok:
            yield key, value
    for section in _CONFIG_SECTIONS if isinstance(state.get("config"), dict) else ():
        value = state["config"].get(section)
        if value is not None and not isinstance(value, dict):
            yield f"config.{section}", value


def verify(path: Path) -> None:
    """Check that checkpoint `path`'s model and optimizer files are complete before anything is loaded (a
    truncated file otherwise fails deep inside Accelerate without naming itself). Reads headers only: the
    safetensors header, and the optimizer's zip directory through a memory map (`weights_only=True`); and each
    random-state file weights-only (a few KB)."""
    import torch
    from safetensors import SafetensorError, safe_open

    path = Path(path)
    model = path / "model.safetensors"
    if not model.is_file():
        raise ValueError(f"{model} is missing: the checkpoint is incomplete; {_EARLIER}")
    residual = path / EMA_RESIDUAL
    for f in (model, residual) if residual.exists() else (model,):
        try:
            with safe_open(str(f), framework="pt") as opened:
                opened.keys()
        except (SafetensorError, OSError) as e:
            raise ValueError(f"{f} is damaged ({e}); {_EARLIER}") from None
    optim = sorted(path.glob("optimizer*.bin"))
    if not optim:
        raise ValueError(f"{path / 'optimizer.bin'} is missing: the checkpoint is incomplete; {_EARLIER}")
    for f in optim:
        try:
            torch.load(f, map_location="cpu", weights_only=True, mmap=True)
        except Exception as e:  # torch raises RuntimeError, UnpicklingError, EOFError, ... for a damaged file
            raise _unloadable(f, e) from None
    for f in sorted(path.glob("random_states_*.pkl")):
        _check_random_states(f)


def _unloadable(f: Path, e: Exception) -> ValueError:
    """The one-line error for weights-only file `f` whose load raised `e`: pickled objects, named as such (intact,
    but not weights-only data: never called damaged, nor unpickled), else damaged."""
    from matpac_fast.encoder import _pickled_object

    pickled = _pickled_object(e)
    if pickled:
        return ValueError(f"{f} holds pickled Python objects ({pickled}), which could run code when loaded: refused "
                          f"(checkpoints are read weights-only); {_EARLIER}")
    msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    return ValueError(f"{f} is damaged ({msg.split('. ')[0]}); {_EARLIER}")


def _rng_safe_globals() -> list:
    """What Accelerate's random-state files hold beyond tensors (numpy's RNG state: arrays, dtypes, bytes through
    codecs.encode): Accelerate's own allow-list where it has one, else the same by hand; plus `numpy_aliases`."""
    try:
        from accelerate.utils.other import TORCH_SAFE_GLOBALS

        return [*TORCH_SAFE_GLOBALS, *numpy_aliases()]
    except ImportError:
        import codecs

        import numpy as np

        core = getattr(np, "_core", None) or np.core
        return [core.multiarray._reconstruct, np.ndarray, np.dtype, codecs.encode,
                *([np.dtypes.UInt32DType] if hasattr(np, "dtypes") else []), *numpy_aliases()]


def numpy_aliases() -> list[tuple]:
    """numpy's array reconstructor under both of its module names: a random-state file written with numpy 1.x names
    numpy.core.multiarray._reconstruct, one written with numpy 2 numpy._core.multiarray._reconstruct, and a
    weights-only load allows a global by the name it is pickled under. Without the other name, a genuine checkpoint
    made with the other numpy was refused here as holding pickled objects."""
    import numpy as np

    core = getattr(np, "_core", None) or np.core
    return [(core.multiarray._reconstruct, f"numpy.{m}.multiarray._reconstruct") for m in ("core", "_core")]


def _check_random_states(f: Path) -> None:
    """A random-state file must read weights-only (with numpy's arrays allowed). Accelerate versions before its
    weights-only default unpickle it in full, and later ones refuse a pickled object in it and then resume without a
    word, not exactly: refused here, before Accelerate reads it."""
    import torch

    try:
        with torch.serialization.safe_globals(_rng_safe_globals()):
            torch.load(f, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - as for the optimizer file
        raise _unloadable(f, e) from None


# errno values of a full disk: out of space, out of quota
DISK_FULL = (errno.ENOSPC, errno.EDQUOT)
# torch's zip writer reports a short write (its errno lost) as "[enforce fail at inline_container.cc:N] . unexpected
# pos N vs M", or "... failed writing file X: file write failed"
_TORCH_SHORT_WRITE = ("unexpected pos", "file write failed")


def write_failure(e: BaseException) -> str | None:
    """What `e`, raised while files were written, says about the disk, in a few words (None: `e` is no failed write).
    A full disk surfaces as an OSError from Python's own writes, as torch's RuntimeError above (a GB-sized
    optimizer.bin is usually what no longer fits), or as safetensors' SafetensorError "I/O error: ... (os error 28)"."""
    if isinstance(e, OSError):
        return f"the disk is full ({e.strerror})" if e.errno in DISK_FULL else (e.strerror or str(e))
    text = str(e).strip().splitlines()[0] if str(e).strip() else ""
    if isinstance(e, RuntimeError) and any(s in text for s in _TORCH_SHORT_WRITE):
        return f"the disk is full or failing (torch's writer: {text})"
    if type(e).__name__ == "SafetensorError" and "I/O error" in text:
        full = any(f"os error {n})" in text for n in DISK_FULL)
        return f"the disk is full ({text})" if full else f"the disk is failing ({text})"
    return None


def start_tmp(tmp: Path) -> None:
    """Make `tmp` (step_XXXXXXXX.tmp) a new, empty folder for a checkpoint to be written into (main process, before
    save_state). What is there is a save cut short by a kill, or not ours: a symbolic link is removed, never its
    target (save_state wrote a whole checkpoint into the folder it pointed to, and the link became the checkpoint),
    and a leftover folder is deleted (files in it, links included, would be written over in place)."""
    if tmp.is_symlink() or (tmp.exists() and not tmp.is_dir()):
        tmp.unlink()
    elif tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)


def finalize(tmp: Path, final: Path) -> None:
    """Atomically publish a completed checkpoint directory (main process only)."""
    if final.is_symlink():  # not ours: the link goes, never what it points to (rmtree refuses a link: a traceback)
        final.unlink()
    elif final.exists():
        shutil.rmtree(final)
    tmp.rename(final)


def prune(out: str | Path, keep_last: int) -> list[Path]:
    """Delete all but the newest `keep_last` completed checkpoints and stale .tmp directories; returns deleted."""
    ckpts = list_checkpoints(out)
    doomed = ckpts[:-keep_last] if keep_last > 0 else []
    root = checkpoint_root(out)
    if root.is_dir():
        doomed += [p for p in root.iterdir() if p.is_dir() and p.name.endswith(".tmp")]
    for p in doomed:
        shutil.rmtree(p, ignore_errors=True)
    return doomed
