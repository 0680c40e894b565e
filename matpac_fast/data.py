"""Streaming loader: a shard set (docs/CONTRACTS.md "Shard set") -> fixed-shape fp16 batches, on one rank or many.

    source = ShardSource.open("shards/")                 # or "dir/shards-{000000..000099}.tar", "dir/*.tar",
                                                         # URLs, "pipe:...", or a list of these (concatenated)
    check_spec("matpac", source.stats)                   # one-line ValueError when the shards' front end differs
    loader = make_loader(DataConfig(batch_size=256), rank, world_size, epoch, seed, source=source)
    len(loader)                                          # batches per rank this epoch, known before iterating
    for batch in loader:                                 # {"lms": fp16 (B, 1, 80, 608), "key": [...], ...}
        x = normalize_on_device(batch["lms"], mean, std, device)

Epoch modes
-----------
`exact` (each sample at most once per epoch, every rank the same number of batches). The shard order is permuted
with (seed, epoch) — the same on every rank — and the shards laid end to end form one sequence of N samples. Rank r
owns the contiguous slice [r N / world, (r+1) N / world) of that sequence; the slice is cut again, at sample level,
into one contiguous range per worker, sized in whole batches (batch i of a rank is made by worker i % workers,
which is also the order in which a DataLoader returns them). Splitting at sample level, not shard level, is what
makes the counts equal whatever the shard count: a worker whose range starts or ends inside a shard just skips
the samples outside it. Every rank yields `batches_per_epoch` batches:
  - remainder="drop" (default, the authors' drop_last): floor(N / (world B)) batches per rank. The tail of each
    rank's slice beyond its whole batches — N - world B floor(N / (world B)) < world B samples in all — is not used
    this epoch (a different set each epoch, as the order changes). No key is yielded twice; when N is a multiple
    of world B, the union over ranks is every key.
  - remainder="fill": ceil(N / (world B)) batches per rank; a rank's last batch is completed with samples re-drawn
    by reading on past the end of its range (cyclically), flagged in batch["filled"]. The union of unflagged keys
    is then every key exactly once, divisible or not.
Samples a worker cannot use (a corrupt or missing shard, a short clip under short="drop", a clip of the wrong shape
or whose .npy / .json payload cannot be decoded: that clip alone) are replaced the same way — by reading on past the
end of its range, flagged `filled` — so the batch counts never change: DDP never hangs.
Plans follow sizes.json: a shard holding fewer samples than it lists loses the missing ones (replaced the same way),
extra samples are not read; either is warned about (on_error="raise": raised, as for a corrupt shard). A worker
whose shards hold fewer samples than sizes.json lists for them by more than a tenth (of what they list, or of the
worker's planned epoch when that is more), and by more than 100 samples (a tenth of the set, when that is fewer),
raises NoUsableData naming the shard and both counts: sizes.json saying 10**6 for a 10-clip shard, or 100 for every
10-clip shard, would make an epoch of re-drawn samples. The shares are of that worker's reading, so the rule holds
whatever the number of ranks and workers, and wherever in the epoch the short shard falls (see MAX_MISSING_SHARE).

`resampled`: each worker draws shards with replacement (seeded by seed, epoch, rank, worker) and yields exactly its
share of floor(samples_per_epoch / (world B)) batches per rank; it never runs dry. samples_per_epoch (>= 1, resampled
mode only) counts samples over all ranks; None means the shard set's size.

Readers: a local shard is mmap'd and indexed (matpac_fast.data_tar.TarIndex); a sample is a zero-copy view of its
.npy payload and only the time crop is copied, straight into the batch. In exact mode that reader shuffles a
worker's whole range (a uniform permutation); a streamed shard (URL, `pipe:` command, or reader="stream") is read
sequentially through a seeded shuffle buffer of `shuffle_buffer` cropped samples. Only .npy (raw float16, never
unpickled) and .json payloads are decoded. A shard command (`pipe:`, or gopen's curl for URLs) is killed as soon as
its shard is left, and when the loader stops (epoch end, error, or an early `break`) even while a worker is blocked
reading it, so stopping early is prompt and leaves no command running.

Batches (dicts): "lms" float16 (B, 1, n_mels, crop) CPU tensor (pinned by the DataLoader when pin_memory and CUDA);
"key" [str]; "filled" bool (B,) (re-drawn samples, see above); "labels" [[int]] (with_labels only); "worker" int;
"skipped_shards" / "skipped_samples" ints, cumulative for that worker this epoch, and "skipped_shard_ids" (the
shards it skipped, as indices into the source's urls). ShardLoader.skipped_shards counts the distinct shards its
workers skipped (a shard met by two workers is one); ShardLoader.skipped_samples sums the samples over workers (each
worker's are of its own share). A DataLoader worker's warnings (a skipped shard, a short shard) travel with its
batches and are issued by ShardLoader in the main process, each text once per epoch however many workers met it.
With reuse_buffers (default) a DataLoader worker recycles its shared-memory buffers, so "lms" is valid until
~2 x num_workers further batches have been fetched: move it to the device (or copy it) before that.

Crops: one uniform random 608-frame crop per sample per epoch (seeded by seed, epoch, rank, worker). Clips shorter
than the crop are dropped or right-padded with `pad_value`, in raw log-mel units (default `default_pad_value`: for
m2d silence, ln(eps), as M2D's data preparation pads short waveforms (make-shards pads m2d clips to 6.1 s itself, so
this applies to older m2d sets); otherwise the front end's normalisation mean, so the padding is zero after
normalisation) — by default as the shard set's stats.json "short" says.
"""

from __future__ import annotations

import fnmatch
import functools
import glob
import json
import math
import multiprocessing
import os
import re
import signal
import subprocess
import threading
import time
import warnings
from collections import deque
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch

from matpac_fast.cli_args import finite_number
from matpac_fast.data_tar import IndexCache, ShardError, iter_stream_samples, npy_view, shard_set_subfolder_hint
from matpac_fast.frontend import FrontendSpec, check_compatible, get_spec, normalize
from matpac_fast.lifetime import parent_death_setter
from matpac_fast.safe_files import JSON_MAX_BYTES, read_regular

_ORDER_SALT, _SHUFFLE_SALT, _CROP_SALT = 0x5EED, 1, 2
# OverflowError: a streamed shard's header size past any offset (a GNU base-256 2**80): a bad shard like any other,
# skipped with on_error="warn" (it ended the run)
_SHARD_EXCEPTIONS = (ShardError, OSError, ValueError, KeyError, EOFError, OverflowError)
# More samples than any shard holds (each takes at least 2 KiB: two members of a 512-byte header and a block): a count
# past it in sizes.json is damage (2**70 raised OverflowError in the plan)
MAX_SHARD_COUNT = 2**31
MAX_SYNTHETIC_CLIPS = 10**9
# A worker refuses the set (instead of filling in) when the shards whose count it has learnt hold fewer samples than
# sizes.json lists for them by more than MAX_MISSING_SHARE of that listed count (or of the worker's planned epoch,
# n_batches x B, when that is more: see _too_many_missing), and by more than MIN_MISSING_REFUSED
# samples (or a tenth of the whole set, when that is fewer: a set under 1,000 samples). sizes.json saying 10**6 for a
# 10-clip shard made an epoch of 250,000 batches of re-drawn samples (and a schedule sized for it) that only warned
# once. The share is of the shards this worker met, not of the whole set: each of 16 readers (ranks x workers) meets
# about 1/16 of the shards, so with a whole-set share a set whose every shard listed 10x its count was refused only
# 15-20 % into the epoch (once the re-drawing had read enough further shards), and one listing 1.5x (a third of each
# epoch re-drawn) was never refused. The floor keeps a few missing samples (a shard re-made a bit smaller, in a set
# of tiny shards) a warning.
MAX_MISSING_SHARE = 0.1
MIN_MISSING_REFUSED = 100


class NoUsableData(RuntimeError):
    """The shard set cannot fill a batch: every shard failed, or every clip is shorter than the crop; or its
    sizes.json lists far more samples than the shards a worker has read hold (MAX_MISSING_SHARE)."""


# ---------------------------------------------------------------------------------------------------------------
# configuration


# The longest DataConfig.timeout_s: torch waits for a batch with select/poll, which take the timeout in milliseconds
# as a C int (about 24.8 days); a longer one (or inf) raised OverflowError at the first batch. 0 means no limit.
MAX_TIMEOUT_S = 1_000_000.0


@dataclass(frozen=True)
class DataConfig:
    """Loader settings. Defaults reproduce the authors' recipe (608-frame crop, drop_last)."""

    source: str | Sequence[str] = ""  # directory, brace pattern, URL(s), "pipe:..." or "synthetic:N"
    meta: str | None = None  # where sizes.json / stats.json are, when not beside the shards
    batch_size: int = 256
    crop_frames: int = 608
    mode: str = "exact"  # "exact" | "resampled"
    remainder: str = "drop"  # exact mode: "drop" | "fill" (see the module docstring)
    # resampled mode only: the nominal epoch in samples (>= 1), over all ranks; None = the shard set's size.
    samples_per_epoch: int | None = None
    shuffle_buffer: int = 1000  # samples (stream reader: cropped arrays; indexed resampled: references)
    num_workers: int = 2
    prefetch_factor: int = 4
    pin_memory: bool = True  # only when CUDA is present
    short: str | None = None  # "drop" | "pad"; None = stats.json's "short"
    pad_value: float | None = None  # raw log-mel; None = `default_pad_value` of the shards' front end
    reader: str = "auto"  # "auto" (indexed for local files, stream otherwise) | "indexed" | "stream"
    with_labels: bool = False
    # "warn": warn, count and skip a bad shard or clip (and warn of a sample count that differs from sizes.json)
    # | "raise": raise a ShardError naming the shard instead
    on_error: str = "warn"
    # DataLoader workers recycle prefetch_factor + 2 shared-memory batch buffers each (about 2x faster on 2 cores):
    # a batch's "lms" is then valid until ~2 x num_workers further batches have been fetched. Consume it or move it
    # to the device (pinning copies it) before then; set False to get fresh tensors you may keep (e.g. list(loader)).
    reuse_buffers: bool = True
    # Seconds the workers may take to deliver one batch before the epoch raises torch's "DataLoader timed out"
    # RuntimeError (a pipe: command or URL that stopped sending hangs a run forever otherwise); 0 = no limit.
    # Workers only (num_workers >= 1): in-process reading cannot be timed out.
    timeout_s: float = 0.0
    # Local shards: clips a worker asks the OS for ahead of the one it reads, so that reads from the device overlap
    # instead of waiting one by one (a 3.9 GB set from a cold cache, 2 workers: exact epochs 13,103 samples/s with
    # 32, 6,722 with 0 at f1c24c8; before, 16 gave 13,504 and 32 15,221 against 6,848; resampled ~19,350 against
    # ~9,570); in memory it costs ~2 % of the rate. 0: none. (Not the rare top-up reads that replace lost samples.)
    read_ahead: int = 32

    def __post_init__(self):
        choices = {"mode": ("exact", "resampled"), "remainder": ("drop", "fill"), "short": (None, "drop", "pad"),
                   "reader": ("auto", "indexed", "stream"), "on_error": ("warn", "raise")}
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise ValueError(f"DataConfig.{name}={getattr(self, name)!r}: choose one of {allowed}")
        for name in ("pin_memory", "with_labels", "reuse_buffers"):
            v = getattr(self, name)  # "no" or "false" is truthy: a string here silently meant True
            if not isinstance(v, bool | np.bool_):
                raise ValueError(f"DataConfig.{name} must be True or False (got {v!r})")
            object.__setattr__(self, name, bool(v))
        for name, low in (("batch_size", 1), ("crop_frames", 1), ("shuffle_buffer", 1), ("prefetch_factor", 1),
                          ("num_workers", 0), ("read_ahead", 0)):
            v = getattr(self, name)  # a float or str here failed later, deep inside numpy / torch
            if isinstance(v, bool) or not isinstance(v, int | np.integer) or v < low:
                raise ValueError(f"DataConfig.{name} must be an integer >= {low} (got {v!r})")
            object.__setattr__(self, name, int(v))  # frozen; a numpy integer becomes a plain int
        t = self.timeout_s
        if isinstance(t, bool) or not isinstance(t, int | float) or not 0 <= t <= MAX_TIMEOUT_S:
            # inf or 1e7 passed this check and crashed the first batch (OverflowError deep in multiprocessing)
            raise ValueError(f"DataConfig.timeout_s must be a number from 0 (no limit) to {MAX_TIMEOUT_S:g} s "
                             f"(got {t!r})")
        object.__setattr__(self, "timeout_s", float(t))
        pad = self.pad_value  # NaN padded every short clip with NaN; a str failed deep in numpy at the first batch
        if pad is not None and (isinstance(pad, bool) or not isinstance(pad, int | float | np.number)
                                or not math.isfinite(pad)):
            raise ValueError(f"DataConfig.pad_value must be a finite number (raw log-mel) or None for the front "
                             f"end's default (got {pad!r})")
        n = self.samples_per_epoch
        if n is not None:
            if self.mode != "resampled":
                raise ValueError(f"DataConfig.samples_per_epoch={n!r} applies to mode='resampled' only (an exact epoch "
                                 "is the whole shard set); set mode='resampled' or leave samples_per_epoch=None")
            if isinstance(n, bool) or not isinstance(n, int | np.integer) or n < 1:
                raise ValueError(f"DataConfig.samples_per_epoch must be an integer >= 1 (got {n!r}); None means the "
                                 "shard set's size")


# ---------------------------------------------------------------------------------------------------------------
# shard sets


def default_pad_value(frontend: dict) -> float:
    """Raw log-mel value that pads a short clip: for m2d, silence, ln(log_eps) (M2D's data preparation, wav_to_lms.py,
    zero-pads waveforms shorter than 6.1 s, so its training sees silence after a short clip; make-shards does that
    itself since 2026-11-27, so this pads only older m2d sets. Raw log-mel 0, which M2D's `audio_dataset.py` would
    pad with, never fires on its data, and is a loud block, +1.7 std); otherwise the front end's normalisation mean
    (zero after normalisation; MATPAC's authors drop short clips, so there is no precedent to follow)."""
    if frontend.get("name") == "m2d":
        return math.log(float(frontend["log_eps"]))
    return float(frontend["norm_mean"])


def is_local(url: str) -> bool:
    return (not url.startswith("pipe:") and "://" not in url) or url.startswith("file://")


def _local_path(url: str) -> str:
    return url[len("file://"):] if url.startswith("file://") else url


def expand_urls(spec: str | Sequence[str]) -> list[str]:
    """Brace patterns ("a-{000..009}.tar") and lists of them -> flat list of URLs."""
    import braceexpand

    specs = [spec] if isinstance(spec, str | Path) else list(spec)
    return [u for s in specs for u in braceexpand.braceexpand(str(s))]


def sibling(url: str, name: str) -> str:
    """The URL of file `name` next to the shard at `url` (for pipe: commands, the last *.tar token is rewritten)."""
    if url.startswith("pipe:"):
        tokens = list(re.finditer(r"\S+\.tar\b", url))
        if not tokens:
            raise ValueError(f"cannot tell where sizes.json is for {url!r}: name the shard files in the command "
                             "(e.g. pipe:... .../shards-000000.tar ...) so that their folder can be found (Python: "
                             "ShardSource.open(..., meta=DIR_OR_URL))")
        t = tokens[-1]
        return url[: t.start()] + t.group(0).rsplit("/", 1)[0] + "/" + name + url[t.end():] if "/" in t.group(0) \
            else url[: t.start()] + name + url[t.end():]
    if is_local(url):
        return str(Path(_local_path(url)).parent / name)
    return url.rsplit("/", 1)[0] + "/" + name


def shard_key(url: str) -> str:
    """A shard's name in its set's sizes.json / stats.json: a local file's name, or the .tar a URL or pipe: command
    names (a signed URL's query or the words after a pipe's .tar are not part of it); as it is when none."""
    name = url.rstrip("/").rsplit("/", 1)[-1]
    if is_local(url):
        return name
    try:
        return _shard_name(url)
    except ValueError:  # not a .tar name (a synthetic source)
        return name


def _shard_name(url: str) -> str:
    tar = re.findall(r"[^\s/]+\.tar\b", url)
    if not tar:
        raise ValueError(f"{url!r} does not name a .tar shard; pass a shard directory, shard files "
                         "(dir/shards-{000000..000099}.tar, dir/*.tar) or URLs of .tar files")
    return tar[-1]


def read_bytes(url: str) -> bytes:
    if is_local(url):  # a regular file of a bounded size: a link to /dev/zero was read until memory ran out
        return read_regular(_local_path(url), JSON_MAX_BYTES)
    if url.startswith("pipe:"):
        # Through open_stream, so the command runs in its own session, as shard streams do: a Ctrl-C to the run's
        # process group is this process's KeyboardInterrupt (one line, exit 130), not the command's death read as
        # "cannot read sizes.json"; close() stops the command either way.
        f = open_stream(url)
        try:
            data = f.read()
            status = f.proc.wait()
        finally:
            f.close()
        if status != 0:
            raise OSError(f"the command exited with status {status}")
        return data
    from webdataset.gopen import gopen

    with gopen(url, "rb") as f:
        return f.read()


def open_stream(url: str):
    """A binary stream of the shard at `url`: a local file, or the output of a command (`pipe:`, or the one
    WebDataset's gopen runs for http(s)://, gs://, ...) wrapped in a `_CommandStream` that stops it on close()."""
    if is_local(url):
        return open(_local_path(url), "rb", buffering=1 << 20)
    if url.startswith("pipe:"):
        from webdataset import utils as wds_utils

        if wds_utils.enforce_security:  # as WebDataset's own gopen_pipe does under WDS_SECURE=1
            raise ValueError(f"{url}: pipe: URLs are disabled (WDS_SECURE=1)")
        # Its own session: the command's process group can be stopped as a whole (`sh -c "sleep 5 && cat x"`
        # forks; killing the shell alone would leave the rest running), and the Ctrl-C / SIGTERM that a training
        # run's process group receives (handled by finishing the step, see _worker_signals) does not cut the
        # stream mid-shard. Out of the group's reach, it would outlive a loader worker killed with SIGKILL (the
        # out-of-memory killer), orphaned: on Linux the kernel SIGKILLs it when the thread that starts it ends (a
        # command's own children are not covered: `sh -c` runs a single command in its place, not as a child).
        proc = subprocess.Popen(url[len("pipe:"):], shell=True, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                bufsize=1 << 20, start_new_session=True,
                                preexec_fn=parent_death_setter(signal.SIGKILL))
        return _CommandStream(proc, proc.stdout, own_group=True)
    from webdataset.gopen import gopen

    f = gopen(url, "rb", bufsize=1 << 20)
    proc = getattr(f, "proc", None)  # gopen's Pipe: a direct child (curl, gsutil, ...), not run through a shell
    return f if proc is None else _CommandStream(proc, f.stream, own_group=False, keep=f)


class LoaderStopped(Exception):
    """Raised in a DataLoader worker whose loader is stopping (loop left early, error): its batch is discarded."""


_COMMANDS_LOCK = threading.Lock()
_LIVE_COMMANDS: set[_CommandStream] = set()  # this process's shard commands still running
_STOPPING = False  # set in a DataLoader worker when its loader stops: running commands killed, no new one started


def _forget_parent_commands() -> None:
    """In a forked child (a DataLoader worker): the registry's commands are the parent's, not ours to kill, and
    its lock may have been held by another thread at the fork."""
    global _COMMANDS_LOCK, _STOPPING
    _COMMANDS_LOCK, _STOPPING = threading.Lock(), False
    _LIVE_COMMANDS.clear()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_parent_commands)


class _CommandStream:
    """stdout of a shard command (`pipe:` or gopen's curl/gsutil/...). close() kills the command if it still runs
    (it is only read to the end of the tar or of the segment needed) and reaps it, so that leaving a shard early,
    an early `break` or a worker's exit never leaves it running. SIGKILL, as a DataLoader worker's commands
    inherit its blocked SIGTERM (_worker_signals), and a blocked SIGTERM to the group would reach a shell that
    later unblocks it, but not a child it forked meanwhile. Reads are the pipe's own (no per-read poll)."""

    def __init__(self, proc: subprocess.Popen, stream, own_group: bool, keep=None):
        self.proc, self.stream, self.own_group, self._keep = proc, stream, own_group, keep
        self.read = stream.read
        self._reaped = False
        with _COMMANDS_LOCK:
            if not _STOPPING:
                _LIVE_COMMANDS.add(self)
                return
        self.close()
        raise LoaderStopped("the loader is stopping")

    def kill(self) -> None:
        """SIGKILL the command (its whole process group when it has one). Only while it is unreaped: until then
        its pid, which is also its group's id, cannot be reused."""
        try:
            if self.own_group:
                os.killpg(self.proc.pid, signal.SIGKILL)
            else:
                os.kill(self.proc.pid, signal.SIGKILL)
        except OSError:  # already gone
            pass

    def exit_status(self, wait_s: float = 0.1) -> int | None:
        """The command's exit status once it has exited on its own (waiting up to wait_s), without reaping it."""
        if not hasattr(os, "waitid"):
            return None
        deadline = time.monotonic() + wait_s
        while True:
            try:
                info = os.waitid(os.P_PID, self.proc.pid, os.WEXITED | os.WNOHANG | os.WNOWAIT)
            except OSError:
                return None
            if info is not None:
                return info.si_status if info.si_code == os.CLD_EXITED else -info.si_status
            if time.monotonic() >= deadline:
                return None
            time.sleep(0.005)

    def close(self) -> None:
        with _COMMANDS_LOCK:
            if self._reaped:
                return
            self._reaped = True  # from here on only this call signals or reaps it
            _LIVE_COMMANDS.discard(self)
        try:
            self.stream.close()
        except OSError:
            pass
        self.kill()  # a command that has finished is a zombie until reaped: harmless
        self.proc.wait()


def _stop_commands(reap_s: float = 0.0) -> None:
    """Kill this process's running shard commands and refuse new ones (a DataLoader worker whose loader stops);
    the reads blocked on them return at once. reap_s > 0: also reap them (the worker is about to exit)."""
    global _STOPPING
    with _COMMANDS_LOCK:
        _STOPPING = True
        live = list(_LIVE_COMMANDS)
        for c in live:
            c.kill()
    deadline = time.monotonic() + reap_s
    for c in live if reap_s > 0 else ():
        try:
            c.proc.wait(timeout=max(0.0, deadline - time.monotonic()))
        except (subprocess.TimeoutExpired, OSError):
            pass


@dataclass
class ShardSource:
    """An opened shard set: shard URLs, their sample counts (sizes.json) and stats.json."""

    urls: list[str]
    sizes: list[int]
    stats: dict
    # Each shard's recorded sha256, in `urls` order; None: look it up by shard name in stats["shard_sha256"] (one
    # set). Concatenated sets carry their own, as their stats.json each name a shards-000000.tar.
    digests: list | None = None

    def shard_digests(self) -> list:
        """Each shard's stats.json shard_sha256 entry as recorded (None where there is none), in `urls` order."""
        if self.digests is not None:
            return list(self.digests)
        recorded = self.stats.get("shard_sha256")
        recorded = recorded if isinstance(recorded, dict) else {}
        return [recorded.get(shard_key(u)) for u in self.urls]

    @property
    def total(self) -> int:
        return int(sum(self.sizes))

    @property
    def n_mels(self) -> int:
        return int(self.stats["frontend"]["n_mels"])

    @classmethod
    def open(cls, spec: str | Path | Sequence[str | Path], meta: str | None = None) -> ShardSource:
        """Open a shard set: a directory made by make-shards; shard files named by a brace pattern
        ("dir/shards-{000000..000099}.tar") or a local glob ("dir/*.tar", "data/*" for every set in data/; a shard
        that sizes.json lists and the glob would match but that is missing is kept, as the directory form keeps
        it, to be warned about, counted and skipped when read); URLs or "pipe:" commands; or a list of any of
        these, concatenated in order (each shard at most once, by path and by the shard_sha256 that stats.json
        records, so a copied set is refused; their front ends must agree). `meta` = where sizes.json / stats.json
        are when not beside the shard files (a directory always uses its own).
        "synthetic:N" = SyntheticSource(n_clips=N). Errors are one-line ValueErrors.
        """
        if isinstance(spec, str) and spec.startswith("synthetic:"):
            n = spec.split(":", 1)[1]
            if not n.isdigit():
                raise ValueError(f"{spec!r}: write synthetic:N with N the number of clips, e.g. synthetic:4096")
            if int(n) > MAX_SYNTHETIC_CLIPS:  # its table of virtual shards is a list: 10**12 was a MemoryError
                raise ValueError(f"{spec!r}: at most synthetic:{MAX_SYNTHETIC_CLIPS} clips (AudioSet has ~2 million)")
            return SyntheticSource(n_clips=int(n))
        what = ("pass a directory made by make-shards, shard files (dir/shards-{000000..000099}.tar, dir/*.tar), URLs "
                "or a list of them")
        # None (a DataConfig(source=None), an unset variable) was a bare "TypeError: 'NoneType' object is not
        # iterable"; another type was that TypeError too, or (bytes) read as a list of ints
        one = isinstance(spec, str | Path | bytes | bytearray) or not isinstance(spec, Iterable)
        specs = [spec] if one else list(spec)
        if any(s is None for s in specs):
            raise ValueError(f"no shard set given (got None): {what}")
        wrong = next((s for s in specs if not isinstance(s, str | Path)), None)
        if wrong is not None:
            raise ValueError(f"a shard set is a path or URL, got {type(wrong).__name__} {wrong!r:.60}: {what}")
        if not specs or any(not str(s) for s in specs):
            raise ValueError(f"no shard set given: {what}")
        parts = [cls._open_dir(x) if isinstance(x, Path) else cls._open_urls(*x, meta) for x in _resolve(specs, meta)]
        _check_unique(parts)
        return parts[0] if len(parts) == 1 else _concat(parts)

    @classmethod
    def _open_dir(cls, d: Path) -> ShardSource:
        sizes_all, stats = _read_meta(str(d / "sizes.json"), str(d / "stats.json"))
        # sizes.json is the list of complete shards (a shard is added when it is renamed from .tmp); a file in the
        # folder that it does not list is ignored, a listed one that is missing is a missing shard (skipped, counted).
        names = sorted(sizes_all)
        extra = sorted({p.name for p in d.glob("*.tar")} - set(names))
        if extra:
            warnings.warn(f"{d}: {len(extra)} .tar file(s) not in sizes.json ignored, e.g. {extra[0]} (not part of the "
                          "shard set: move it out of the folder to silence this)", stacklevel=3)
        return cls([str(d / n) for n in names], [int(sizes_all[n]) for n in names], stats)

    @classmethod
    def _open_urls(cls, urls: list[str], globbed: set[str], meta: str | None) -> ShardSource:
        """Shard URLs that share one sizes.json; names a glob matched but sizes.json lacks are ignored (as in a
        directory), names given explicitly must be listed."""
        where = (lambda n: meta.rstrip("/") + "/" + n) if meta else (lambda n: sibling(urls[0], n))
        sizes_all, stats = _read_meta(where("sizes.json"), where("stats.json"))
        unlisted = [u for u in urls if _shard_name(u) not in sizes_all]
        missing = [u for u in unlisted if u not in globbed]
        absent = [u for u in missing if is_local(u) and not os.path.lexists(_local_path(u))]
        if absent:  # e.g. a brace pattern's range beyond the set's last shard: not "another set's shards"
            raise ValueError(f"{len(absent)} shard file(s) do not exist, e.g. {absent[0]}, nor does "
                             f"{where('sizes.json')} list them ({len(sizes_all)} shards); fix the pattern, or give "
                             "the folder make-shards wrote")
        if missing:
            raise ValueError(f"{len(missing)} shard(s) not listed in {where('sizes.json')}, e.g. "
                             f"{_shard_name(missing[0])}: these shards belong to another set; give the folder "
                             "make-shards wrote, or re-make the shard set")
        if unlisted:
            warnings.warn(f"{len(unlisted)} .tar file(s) not in sizes.json ignored, e.g. {unlisted[0]}", stacklevel=4)
            urls = [u for u in urls if u not in set(unlisted)]
            if not urls:
                raise ValueError(f"none of the matched .tar files is listed in {where('sizes.json')}")
        return cls(urls, [int(sizes_all[_shard_name(u)]) for u in urls], stats)


_GLOB_CHARS = re.compile(r"[*?[]")


def _resolve(specs: list, meta: str | None) -> list[Path | tuple[list[str], set[str]]]:
    """Specs -> the parts of the set, in order: a Path per shard directory, and ([url], {globbed url}) per group of
    shard files that share one sizes.json (all of them when `meta` is given)."""
    parts: list = []
    groups: dict[str, tuple[list[str], set[str]]] = {}
    named: set[str] = set()  # the local shard files added, by real path
    index_files: list[str] = []  # local `<shard>.tar.idx` files named in a list (a shell's `dir/shards-*`)

    def add_file(url: str, globbed: bool) -> None:
        if is_local(url):
            named.add(os.path.realpath(_local_path(url)))
        key = meta or sibling(url, "sizes.json")
        if key not in groups:
            groups[key] = ([], set())
            parts.append(groups[key])
        groups[key][0].append(url)
        if globbed:
            groups[key][1].add(url)

    def add_local(url: str, globbed: bool) -> bool:
        path = Path(_local_path(url))
        if path.is_dir():
            parts.append(path)
        elif path.name.endswith(".tar.idx") and path.is_file() and not globbed:  # a glob skips it as a non-.tar
            # make-shards' index file of shard X.tar, read with its shard: named as a shard (a shell expands
            # `dir/shards-*` to both), it was opened as a tar, skipped as corrupt and counted, doubling the epoch
            index_files.append(url)
            return False
        elif path.exists() or path.suffix == ".tar":
            if globbed and path.suffix != ".tar":
                return False  # sizes.json, manifests, ... matched by "dir/*": not shards
            hint = _make_shards_hint(path)
            if hint:  # was "cannot read <its folder>/sizes.json", which did not say the input was the wrong kind
                raise ValueError(hint)
            if not path.parent.is_dir():
                raise ValueError(f"no such directory: {path.parent} (named by shard {url})")
            add_file(url, globbed)
        else:
            raise ValueError(f"no such shard directory: {path}; pass a directory made by make-shards or shard files "
                             "(dir/shards-{000000..000099}.tar, dir/*.tar)")
        return True

    for spec in specs:
        spec = str(spec)
        if spec.startswith("synthetic:"):
            raise ValueError(f"{spec} cannot be combined with other shard sets; pass it alone")
        literal = is_local(spec) and os.path.exists(_local_path(spec))  # a path that holds braces or [ ]
        for url in [spec] if literal else expand_urls(spec):
            if not is_local(url):
                if "*" in url and not url.startswith("pipe:"):
                    raise ValueError(f"{url}: glob patterns work only on local paths; name remote shards with a brace "
                                     "pattern, e.g. https://host/dir/shards-{000000..000099}.tar")
                add_file(url, False)
            elif _GLOB_CHARS.search(_local_path(url)) and not os.path.exists(_local_path(url)):
                found = glob.glob(_local_path(url))
                found = sorted(found + _listed_missing(_local_path(url), found, meta))
                if not found:
                    raise ValueError(f"no file or directory matches {url}")
                if not sum(add_local(f, True) for f in found):  # every match added (no short-circuit)
                    raise ValueError(f"{url} matches no .tar file or shard directory")
            else:
                add_local(url, False)
    alone = [u for u in index_files if os.path.realpath(_local_path(u).removesuffix(".idx")) not in named]
    if alone:
        raise ValueError(f"{alone[0]} is the index file of shard {alone[0].removesuffix('.idx')} (make-shards writes "
                         "one beside each shard; the loader reads it with its shard): pass the shard, or its folder")
    return parts


def _listed_missing(pattern: str, found: list[str], meta: str | None) -> list[str]:
    """Paths of the shards that a local glob misses because they are missing although the sizes.json of their
    folder (or `meta`'s, when local) lists them under a name the pattern matches. A glob cannot list a missing
    file, so without these the set would silently shrink; kept, they are warned about, counted and skipped at read
    time, as the directory form and brace patterns do."""
    head, tail = os.path.split(pattern)
    if meta is not None and not is_local(meta):
        return []
    dirs = sorted(d for d in (glob.glob(head) if _GLOB_CHARS.search(head) else [head]) if os.path.isdir(d or "."))
    present: dict[str, set[str]] = {}  # sizes.json -> names the glob found beside it
    for f in found:
        d, name = os.path.split(f)
        present.setdefault(os.path.join(_local_path(meta), "sizes.json") if meta else os.path.join(d, "sizes.json"),
                           set()).add(name)
    out = []
    for d in dirs:
        sizes_path = os.path.join(_local_path(meta), "sizes.json") if meta else os.path.join(d, "sizes.json")
        try:
            listed = json.loads(read_regular(sizes_path, JSON_MAX_BYTES))
        except (OSError, ValueError, RecursionError):  # RecursionError: nested too deep (_read_meta names the file)
            continue  # no sizes.json here: the glob is all there is (_open_urls says what is wrong, if anything)
        have = present.setdefault(sizes_path, set())
        for name in listed if isinstance(listed, dict) else ():
            hidden = name.startswith(".") and not tail.startswith(".")  # glob's * does not match a leading dot
            if ("/" not in name and not hidden and name not in have and fnmatch.fnmatchcase(name, tail)
                    and not os.path.lexists(os.path.join(d, name))):
                have.add(name)  # once per sizes.json (meta: the first folder that could hold it)
                out.append(os.path.join(d, name))
    return out


def _concat(parts: list[ShardSource]) -> ShardSource:
    """Shard sets laid end to end. Front ends must agree; stats.json counts are summed, mean/std pooled, and a
    field that differs and matters only for some uses ("short", "classes") is set to None and named in
    stats["mixed"] (make_loader then asks for DataConfig.short, or refuses with_labels)."""
    first = parts[0].stats
    for p in parts[1:]:
        diff = _frontend_diff(first["frontend"], p.stats["frontend"])
        if diff:
            raise ValueError(f"{p.urls[0] if p.urls else 'an empty set'} was made with another front end than "
                             f"{parts[0].urls[0] if parts[0].urls else 'an empty set'} ({diff}); re-make one set "
                             "with the other's --frontend")
    stats = dict(first)
    mixed = [k for k, fields in (("short", ("short",)), ("classes", ("classes", "class_ids")))
             if any(p.stats.get(f) != first.get(f) for p in parts[1:] for f in fields)]
    for k in mixed:
        stats[k] = None
    stats["mixed"] = mixed
    for k, combine in (("n_clips", sum), ("n_frames", sum), ("hours", sum), ("inputs", sum), ("written", sum),
                       ("min_frames", min), ("min_clip_frames", min)):
        vals = [p.stats.get(k) for p in parts]
        if all(isinstance(v, int | float) for v in vals):
            stats[k] = combine(vals)
        else:
            stats.pop(k, None)
    for k in ("skipped", "flags", "segments"):  # per-reason / per-flag counts: summed key by key, as inputs is
        vals = [p.stats.get(k) for p in parts]
        if all(isinstance(v, dict) and all(isinstance(n, int) for n in v.values()) for v in vals):
            stats[k] = {key: sum(v.get(key, 0) for v in vals) for key in sorted({key for v in vals for key in v})}
        else:
            stats.pop(k, None)
    frames = [p.stats.get("n_frames") for p in parts]
    w = np.array(frames if all(isinstance(f, int | float) for f in frames) else [p.total for p in parts], float)
    w = w / w.sum() if w.sum() > 0 else np.full(len(parts), 1 / len(parts))
    if all(isinstance(p.stats.get(k), int | float) for p in parts for k in ("mean", "std")):
        m = np.array([p.stats["mean"] for p in parts], float)
        sd = np.array([p.stats["std"] for p in parts], float)
        stats["mean"] = float(w @ m)
        stats["std"] = float(np.sqrt(max(float(w @ (sd**2 + m**2)) - stats["mean"] ** 2, 0.0)))
    return ShardSource([u for p in parts for u in p.urls], [n for p in parts for n in p.sizes], stats,
                       [h for p in parts for h in p.shard_digests()])


def _check_unique(parts: list[ShardSource]) -> None:
    """Each shard once, or its samples would repeat every epoch: refused when a shard is named twice (one real path
    or URL), or when two shards hold the same content by their sets' stats.json shard_sha256 (a copied folder).
    The recorded digests only: hashing shards here would read the whole set (terabytes); a set without them is
    checked by path alone. Empty shards are alike without repeating anything."""
    seen: set[str] = set()
    by_digest: dict[str, str] = {}
    for p in parts:
        for u, n, digest in zip(p.urls, p.sizes, p.shard_digests()):
            k = os.path.realpath(_local_path(u)) if is_local(u) else u
            if k in seen:
                raise ValueError(f"shard {u} is given twice; name each shard once (its samples would repeat every "
                                 "epoch)")
            seen.add(k)
            if isinstance(digest, str) and digest and n > 0:
                first = by_digest.setdefault(digest, u)
                if first != u:
                    raise ValueError(f"{u} is a copy of {first} (the same shard_sha256 in their sets' stats.json): "
                                     "drop one of the copies from the shard sets given (each sample would be read "
                                     "twice per epoch)")


def _frontend_diff(a: dict, b: dict) -> str:
    """'' when two stats.json front ends give the same log-mels, else the differing numerics."""
    try:
        x, y = FrontendSpec(**a).numerics(), FrontendSpec(**b).numerics()
    except TypeError:
        return "" if a == b else "unreadable 'frontend' entry"
    return ", ".join(f"{k}: {x[k]!r} vs {y.get(k)!r}" for k in x if x[k] != y.get(k))


def _check_source_for(cfg: DataConfig, stats: dict) -> None:
    """One-line error when concatenated shard sets disagree on something this loader config relies on."""
    mixed = stats.get("mixed") or ()
    if "short" in mixed and cfg.short is None:
        raise ValueError("the shard sets disagree on stats.json 'short' (what to do with clips shorter than the crop): "
                         "re-make one of them with make-shards --short as the other's stats.json says (from Python, "
                         "DataConfig.short='drop' or 'pad' also decides)")
    if "classes" in mixed and cfg.with_labels:
        raise ValueError("the shard sets have different class lists, so label indices would mix meanings; read "
                         "labels from one set at a time (or with_labels=False)")


_MAKE_SHARDS_WORK_DIR = ".make-shards"  # = shard_tools.pipeline.WORK_DIR (not imported: data never imports it)


def _unfinished_run(stats_url: str) -> str | None:
    """The folder of a local stats.json when it holds a make-shards run that has not finished (no stats.json yet, but
    its work folder or a .tar.tmp shard), else None. stats.json is written last, so its presence means finished."""
    if not is_local(stats_url):
        return None
    stats = Path(_local_path(stats_url))
    folder = stats.parent
    if stats.exists() or not folder.is_dir():
        return None
    if (folder / _MAKE_SHARDS_WORK_DIR).is_dir() or any(folder.glob("*.tar.tmp")):
        return str(folder)
    return None


# Common audio suffixes, for advice only (make-shards' full list is shard_tools.discover.AUDIO_EXTS; data never
# imports shard_tools).
_AUDIO_HINT_SUFFIXES = frozenset(".wav .flac .mp3 .ogg .opus .m4a .aac .aif .aiff .webm .mp4 .mka .wma".split())


def _make_shards_hint(path: Path) -> str | None:
    """For a CSV, an audio file or a folder of audio given where shards belong: the make-shards command that makes
    shards of it. None for anything else."""
    if path.is_file():
        if path.suffix.lower() == ".csv":
            return (f"{path} is a CSV file, not a shard set: make shards of the files it lists with make-shards "
                    f"manifest {path} --out DIR, then give DIR")
        if path.suffix.lower() in _AUDIO_HINT_SUFFIXES:
            return (f"{path} is an audio file, not a shard set: make shards of its folder with make-shards folder "
                    f"{path.parent} --out DIR, then give DIR")
        return None
    if path.is_dir():
        try:
            audio = next((p for _, p in zip(range(1000), path.rglob("*"))
                          if p.suffix.lower() in _AUDIO_HINT_SUFFIXES and p.is_file()), None)
        except OSError:
            return None
        if audio is not None:
            return (f"{path} holds audio files (e.g. {audio.relative_to(path)}), not shards: make shards of it with "
                    f"make-shards folder {path} --out DIR, then give DIR")
    return None


def _read_meta(sizes_url: str, stats_url: str) -> tuple[dict, dict]:
    unfinished = _unfinished_run(stats_url)
    if unfinished:
        raise ValueError(f"{unfinished} is an unfinished make-shards run: run the same make-shards command again to "
                         "finish it (verify-shards says INCOMPLETE)")
    out = []
    for url in (sizes_url, stats_url):
        try:
            raw = read_bytes(url)
        except OSError as e:
            folder = Path(_local_path(url)).parent
            if is_local(url) and not (folder / "sizes.json").exists() and (folder / "manifest.jsonl").is_file():
                raise ValueError(f"{folder} is not a shard set: make-shards wrote no sample there (manifest.jsonl "
                                 "gives each file's reason); fix the input or options and run make-shards "
                                 "again") from None
            given_dir = is_local(url) and url.endswith("/sizes.json")
            sub = shard_set_subfolder_hint(folder) if given_dir and not (folder / "stats.json").exists() else None
            if sub and not (folder / "sizes.json").exists():  # e.g. runs/demo for runs/demo/shards
                raise ValueError(f"{folder} is not a shard set, but {sub}") from None
            hint = _make_shards_hint(folder) if given_dir else None
            if hint and not (folder / "stats.json").exists():
                raise ValueError(hint) from None
            # The CLI's advice first; the last words are for Python users only (train.py has no meta option).
            # (A folder always reads its own: the meta hint names shard files, which it was followed with a folder.)
            raise ValueError(f"cannot read {url} ({e.strerror or e}): give a folder that make-shards wrote, or make "
                             "one from audio with make-shards (from Python, ShardSource.open('SHARDS/*.tar', "
                             "meta=DIR) reads sizes.json / stats.json kept elsewhere)") from None
        try:
            out.append(json.loads(raw))
        except (ValueError, RecursionError) as e:  # a UnicodeDecodeError; JSON nested too deep
            raise _damaged(url, f"not JSON: {e}") from None
    sizes, stats = out
    _check_meta(sizes, stats, sizes_url, stats_url)
    return sizes, stats


def _plain_shard_name(name: str) -> bool:
    """A file name as make-shards writes it (`<name>-NNNNNN.tar`): no folder part, so it names a file of the set."""
    return name.endswith(".tar") and not any(c in name for c in "/\\\0")


def _brief(v) -> str:
    text = repr(v)  # (an integer of 400 digits: its start)
    return text if len(text) <= 40 else text[:37] + "..."


def _damaged(url: str, what: str) -> ValueError:
    return ValueError(f"{url} is damaged ({what}); re-make the set with make-shards, or restore the file")


_FRONTEND_TYPES = {k: type(v) for k, v in FrontendSpec().to_dict().items()}  # each field's int / float / bool / str


def _check_meta(sizes, stats, sizes_url: str, stats_url: str) -> None:
    """Valid JSON of the wrong shape (a list, a count "forty" or -5, a front end without n_mels) is a damaged file,
    said in one line here rather than as a TypeError / KeyError wherever the value is first used."""
    if not isinstance(sizes, dict):
        raise _damaged(sizes_url, f"a JSON object {{shard: sample count}} was expected, found {type(sizes).__name__}")
    for name, n in sizes.items():
        if isinstance(n, bool) or not isinstance(n, int) or n < 0:
            raise _damaged(sizes_url, f"shard {name} has count {_brief(n)}; counts are integers >= 0")
        if n > MAX_SHARD_COUNT:
            raise _damaged(sizes_url, f"shard {name} has count {_brief(n)}, more than a shard can hold")
        if not _plain_shard_name(name):  # '../x.tar' or '/abs/x.tar' was read from outside the set's folder
            raise _damaged(sizes_url, f"shard name {name[:80]!r} is not a file name in the set's folder")
    if not isinstance(stats, dict):
        raise _damaged(stats_url, f"a JSON object was expected, found {type(stats).__name__}")
    if stats.get("format_version") != 1:
        raise ValueError(f"{stats_url}: unsupported stats.json (format_version {stats.get('format_version')!r}); "
                         "re-make the set with this version's make-shards")
    fe = stats.get("frontend")
    if not isinstance(fe, dict):
        raise _damaged(stats_url, "its 'frontend' entry is missing or not a JSON object")
    for name, kind in _FRONTEND_TYPES.items():
        if name not in fe:
            raise _damaged(stats_url, f"its 'frontend' entry lacks {name}")
        v = fe[name]
        if not isinstance(v, int | float if kind is float else kind) or (kind is not bool and isinstance(v, bool)):
            expected = {int: "an integer", float: "a number", bool: "true or false", str: "a string"}[kind]
            raise _damaged(stats_url, f"'frontend' {name} is {v!r}, expected {expected}")
    if fe["n_mels"] < 1:
        raise _damaged(stats_url, f"'frontend' n_mels is {fe['n_mels']}")
    if stats.get("short", "drop") not in ("drop", "pad"):
        raise _damaged(stats_url, f"'short' is {stats['short']!r}, expected 'drop' or 'pad'")
    for name in ("mean", "std"):
        if name in stats and not finite_number(stats[name]):
            raise _damaged(stats_url, f"'{name}' is {_brief(stats[name])}, expected a finite number")
    if "std" in stats and stats["std"] < 0:  # (0 is a set of constant clips: only M2D's normalisation refuses it)
        raise _damaged(stats_url, f"'std' is {stats['std']!r}, expected a number >= 0")


@dataclass
class SyntheticSource:
    """Random fp16 log-mels with the shard set's output contract, for I/O-free benchmarks and tests.

    `n_clips` virtual clips in virtual shards of `per_shard`; clip i is a view of one of `pool` pre-drawn arrays,
    so reading costs only the crop copy. Labels: i % n_classes."""

    n_clips: int = 4096
    n_frames: int = 1000
    per_shard: int = 256
    seed: int = 0
    pool: int = 32
    n_classes: int = 10
    _arrays: np.ndarray | None = field(default=None, repr=False, compare=False)

    @property
    def sizes(self) -> list[int]:
        full, rest = divmod(self.n_clips, self.per_shard)
        return [self.per_shard] * full + ([rest] if rest else [])

    @property
    def urls(self) -> list[str]:
        return [f"synthetic-{i:06d}" for i in range(len(self.sizes))]

    @property
    def total(self) -> int:
        return self.n_clips

    @property
    def n_mels(self) -> int:
        return 80

    @property
    def stats(self) -> dict:
        return {"format_version": 1, "frontend": get_spec("matpac").to_dict(), "mean": -7.0, "std": 4.0,
                "n_clips": self.n_clips, "min_frames": self.n_frames, "short": "drop", "classes": []}

    def array(self, shard: int, j: int) -> np.ndarray:
        if self._arrays is None:
            rng = np.random.default_rng(self.seed)
            self._arrays = (rng.standard_normal((self.pool, 80, self.n_frames), dtype=np.float32) * 4 - 7).astype(
                np.float16)
        return self._arrays[(shard * self.per_shard + j) % self.pool]


# ---------------------------------------------------------------------------------------------------------------
# epoch plans (pure functions of the sizes, the seed and the ids: every rank computes the same split)


class Segment(NamedTuple):
    shard: int
    start: int  # sample index inside the shard (tar order)
    stop: int


@dataclass(frozen=True)
class WorkerPlan:
    n_batches: int
    segments: tuple[Segment, ...]  # this worker's samples, in sequence order
    top_up_from: int  # sequence position where filling starts (cyclic)
    order: tuple[int, ...]  # the epoch's shard permutation


def check_run_ids(rank: int, world_size: int, epoch: int, seed: int) -> None:
    """One-line ValueError unless 0 <= rank < world_size and epoch, seed are integers >= 0 (numpy seeds need that)."""
    for name, v in (("rank", rank), ("world_size", world_size), ("epoch", epoch), ("seed", seed)):
        if isinstance(v, bool) or not isinstance(v, int | np.integer):
            raise ValueError(f"{name} must be an integer, got {v!r}")
    if world_size < 1:
        raise ValueError(f"world_size={world_size}: it must be >= 1 (the number of training processes)")
    if not 0 <= rank < world_size:
        raise ValueError(f"rank={rank} with world_size={world_size}: rank must be in [0, {world_size}) "
                         "(this process's index, e.g. accelerator.process_index)")
    for name, v in (("epoch", epoch), ("seed", seed)):
        if v < 0:
            raise ValueError(f"{name}={v}: it must be >= 0 (it seeds numpy's generators)")


def batches_per_epoch(cfg: DataConfig, total: int, world_size: int = 1) -> int:
    """Batches every rank yields in one epoch (the same on all ranks), from the shard set's sample count."""
    if world_size < 1:
        raise ValueError(f"world_size must be >= 1 (got {world_size})")
    per_step = world_size * cfg.batch_size
    if cfg.mode == "resampled":
        return int(total if cfg.samples_per_epoch is None else cfg.samples_per_epoch) // per_step
    return -(-total // per_step) if cfg.remainder == "fill" else total // per_step


def worker_batch_counts(n_batches: int, workers: int) -> list[int]:
    """Batch i of a rank is made by worker i % workers (the order a DataLoader yields them in)."""
    return [len(range(w, n_batches, workers)) for w in range(workers)]


def shard_order(n_shards: int, seed: int, epoch: int) -> np.ndarray:
    return np.random.default_rng([seed, epoch, _ORDER_SALT]).permutation(n_shards)


def _segments(order: np.ndarray, sizes: Sequence[int], start: int, stop: int) -> list[Segment]:
    """Sequence positions [start, stop) -> per-shard pieces, following the shard order."""
    ends = np.cumsum([sizes[s] for s in order])
    out, pos = [], start
    k = int(np.searchsorted(ends, pos, side="right"))
    while pos < stop:
        begin = int(ends[k] - sizes[order[k]])
        take_to = min(stop, int(ends[k]))
        if take_to > pos:
            out.append(Segment(int(order[k]), pos - begin, take_to - begin))
        pos, k = take_to, k + 1
    return out


def plan_exact(sizes: Sequence[int], cfg: DataConfig, rank: int, world: int, worker: int, workers: int,
               epoch: int, seed: int) -> WorkerPlan:
    total, B = int(sum(sizes)), cfg.batch_size
    order = shard_order(len(sizes), seed, epoch)
    nb = batches_per_epoch(cfg, total, world)
    r0, r1 = rank * total // world, (rank + 1) * total // world
    used = min(r1 - r0, nb * B)  # real samples of this rank; the rest of its slice is the dropped remainder
    counts = worker_batch_counts(nb, workers)
    quotas = [c * B for c in counts]
    if nb:
        quotas[(nb - 1) % workers] -= nb * B - used  # "fill": the rank's last batch is completed by re-drawing
    start = r0 + sum(quotas[:worker])
    stop = start + quotas[worker]
    segs = _segments(order, sizes, start, stop)
    return WorkerPlan(counts[worker], tuple(segs), stop % total if total else 0, tuple(int(s) for s in order))


# ---------------------------------------------------------------------------------------------------------------
# readers


class Sample(NamedTuple):
    key: str
    arr: np.ndarray | None  # float16 (n_mels, T), possibly a view into a mapping or a payload; None with `error`
    labels: list[int] | None
    shard: int  # index into the source's urls (for messages)
    error: str | None = None  # this clip's payload cannot be decoded: skipped alone (_crop_checked), not its shard


# A bad .npy (header, dtype) or .json payload is the clip's fault: the tar around it was read, so the shard is fine.
_CLIP_EXCEPTIONS = (ShardError, ValueError)


def _labels(raw: bytes | None) -> list[int]:
    if raw is None:
        return []
    try:
        meta = json.loads(raw)
    except (ValueError, RecursionError) as e:  # RecursionError: nested too deep (it stopped the loader)
        raise ValueError(f"its .json is not valid JSON ({e})") from None
    found = meta.get("label_indices", []) if isinstance(meta, dict) else None
    if not isinstance(found, list) or any(isinstance(x, bool) or not isinstance(x, int) for x in found):
        raise ValueError(f"its .json label_indices is {found!r}, not a list of integers")
    return found


class _IndexedReader:
    random_access = True

    def __init__(self, urls: list[str], with_labels: bool):
        self.urls, self.with_labels, self.cache = urls, with_labels, IndexCache()

    def count(self, shard: int) -> int:
        return len(self.cache.get(_local_path(self.urls[shard])))

    def get(self, shard: int, j: int, data: bool = True) -> Sample:
        """Sample j of the shard; `data=False`: its clip's bytes are not read, only its header (see WorkerIterator)."""
        idx = self.cache.get(_local_path(self.urls[shard]))  # an unreadable tar raises: the shard is skipped
        try:
            # the array first: a table from a stale index file is replaced by a walk of the tar as it is read
            array = idx.array(j, data)
            return Sample(idx.keys[j], array, _labels(idx.json_bytes(j)) if self.with_labels else None, shard)
        except _CLIP_EXCEPTIONS as e:
            return Sample(idx.keys[j] if j < len(idx) else f"#{j}", None, None, shard, str(e))

    def prefetch(self, shard: int, j: int, data: bool = True) -> None:
        self.cache.get(_local_path(self.urls[shard])).prefetch(j, data=data)


class _SyntheticReader:
    random_access = True

    def __init__(self, source: SyntheticSource, with_labels: bool):
        self.source, self.with_labels = source, with_labels

    def count(self, shard: int) -> int:
        return self.source.sizes[shard]

    def get(self, shard: int, j: int, data: bool = True) -> Sample:  # made, not read: `data` changes nothing
        i = shard * self.source.per_shard + j
        return Sample(f"syn{i:09d}", self.source.array(shard, j),
                      [i % self.source.n_classes] if self.with_labels else None, shard)


class _StreamReader:
    random_access = False

    def __init__(self, urls: list[str], with_labels: bool):
        self.urls, self.with_labels = urls, with_labels

    def stream(self, seg: Segment) -> Iterator[Sample]:
        """Samples seg.start .. seg.stop - 1 of the shard, read from its start. Once the generator is exhausted,
        `seen` is (n, True) when the tar ended after its n-th sample, or (seg.stop + 1, False) when it holds more
        than seg.stop samples (reading stops there)."""
        self.seen: tuple[int, bool] | None = None
        f = open_stream(self.urls[seg.shard])
        n = 0
        try:
            for key, parts in iter_stream_samples(f):
                if n >= seg.stop:
                    self.seen = (n + 1, False)
                    break
                n += 1
                if n <= seg.start:
                    continue
                if "npy" not in parts:
                    raise ShardError(f"sample {key!r} has no .npy member")
                try:
                    arr = npy_view(parts["npy"], 0, len(parts["npy"]))
                    sample = Sample(key, arr, _labels(parts.get("json")) if self.with_labels else None, seg.shard)
                except _CLIP_EXCEPTIONS as e:
                    sample = Sample(key, None, None, seg.shard, str(e))
                yield sample
            else:
                self.seen = (n, True)
        except _SHARD_EXCEPTIONS as e:
            if _STOPPING:  # our own kill cut the stream: not a bad shard
                raise LoaderStopped("the loader is stopping") from None
            status = f.exit_status() if isinstance(f, _CommandStream) else None
            if status:  # e.g. a fetch that failed: say so rather than only "truncated tar"
                raise ShardError(f"{e}; its command exited with status {status}") from e
            raise
        finally:
            f.close()  # a command still running (segment ended before the tar, or early stop) is stopped


def _make_reader(source, cfg: DataConfig):
    if isinstance(source, SyntheticSource):
        return _SyntheticReader(source, cfg.with_labels)
    local = all(is_local(u) for u in source.urls)
    if cfg.reader == "indexed" and not local:
        raise ValueError("reader='indexed' needs local shard files; use reader='auto' or 'stream' for URLs")
    if cfg.reader == "indexed" or (cfg.reader == "auto" and local):
        return _IndexedReader(source.urls, cfg.with_labels)
    return _StreamReader(source.urls, cfg.with_labels)


# ---------------------------------------------------------------------------------------------------------------
# per-worker iteration


def _buffer_shuffle(items: Iterator, size: int, rng: np.random.Generator) -> Iterator:
    buf = []
    for item in items:
        if len(buf) < size:
            buf.append(item)
            continue
        i = int(rng.integers(size))
        buf[i], item = item, buf[i]
        yield item
    rng.shuffle(buf)
    yield from buf


@dataclass
class WorkerCounters:
    # shards warned about and skipped, each once per worker and epoch (WorkerIterator.bad holds them; ShardLoader
    # counts the shards its workers skipped once each, however many met them)
    skipped_shards: int = 0
    # Samples of this worker's share of the epoch (its plan; in resampled mode, its draws) that it could not use:
    # clips dropped (shorter than the crop under short="drop", or malformed) and samples lost to a bad shard
    # (unreadable, cut short, or holding fewer samples than sizes.json lists). Each is replaced by a re-drawn
    # sample, so in exact mode `filled` = skipped_samples + the remainder="fill" top-up. Samples met while
    # re-drawing (filling) are not counted: they were never part of the share.
    skipped_samples: int = 0
    filled: int = 0  # samples re-drawn to keep the batch count


class WorkerIterator:
    """The batches of one (rank, worker) for one epoch; used in-process by tests and inside DataLoader workers."""

    def __init__(self, source, cfg: DataConfig, rank: int, world: int, worker: int, workers: int, epoch: int,
                 seed: int, shared_memory: bool = False, forward_warnings: bool = False, skip: int = 0):
        check_run_ids(rank, world, epoch, seed)
        _check_skip(skip)
        if not 0 <= worker < max(workers, 1):
            raise ValueError(f"worker={worker} with workers={workers}: worker must be in [0, {max(workers, 1)})")
        _check_source_for(cfg, source.stats)
        self.source, self.cfg = source, cfg
        self.rank, self.world, self.worker, self.workers = rank, world, worker, max(workers, 1)
        self.reader = _make_reader(source, cfg)
        self.sizes = list(source.sizes)
        self.counters = WorkerCounters()
        self.bad: set[int] = set()
        self._rejects = 0  # consecutive unusable clips
        self._filling = False  # past this worker's share (exact mode: re-drawing); losses then not counted
        # Shards whose sample count this worker has learnt and checked against sizes.json (a difference is reported
        # once); what sizes.json lists for them, and how many of those they hold not (see MAX_MISSING_SHARE).
        self._counted: set[int] = set()
        self._listed_counted = 0
        self._missing = 0
        # Shards read whole that hold no sample although sizes.json lists some: a resampled epoch whose every
        # drawable shard is one would draw for ever, nothing failing and nothing read.
        self._empty: set[int] = set()
        self.shared_memory = shared_memory
        # In a DataLoader worker, warnings travel with the batches and ShardLoader issues them in the main process
        # (once there, in order with its own output) instead of each worker printing its own copy to stderr.
        self.forward_warnings = forward_warnings
        self._forwarded: set[tuple[type, str]] = set()
        self._ring: list[torch.UntypedStorage] = []
        self.rng_shuffle = np.random.default_rng([seed, epoch, rank, worker, _SHUFFLE_SALT])
        self.rng_crop = np.random.default_rng([seed, epoch, rank, worker, _CROP_SALT])
        fe = source.stats["frontend"]
        self.n_mels = int(fe["n_mels"])
        self.short = cfg.short or source.stats.get("short", "drop")
        self.pad_value = float(default_pad_value(fe) if cfg.pad_value is None else cfg.pad_value)
        if cfg.mode == "exact":
            self.plan = plan_exact(self.sizes, cfg, rank, world, worker, self.workers, epoch, seed)
            self.n_batches = self.plan.n_batches
        else:
            self.plan = None
            nb = batches_per_epoch(cfg, source.total, world)
            self.n_batches = worker_batch_counts(nb, self.workers)[worker]
        # This worker's first `skip` batches are passed over, not made (a resume inside an epoch): their samples are
        # drawn as for made ones (the same order, crops, dropped clips and fills, so the batches after them are the
        # uninterrupted run's) but nothing is copied or sent, and a local shard's clip is not read, only its headers.
        self.skip = min(int(skip), self.n_batches)
        self._passing = False  # inside a passed-over batch: readers leave the clips' bytes unread

    # -- errors -----------------------------------------------------------------------------------------------
    def _fail(self, shard: int, err: BaseException) -> None:
        url = self.source.urls[shard]
        if self.cfg.on_error == "raise":
            raise ShardError(f"{url}: {err}") from err
        if shard not in self.bad:
            self.bad.add(shard)
            self.counters.skipped_shards += 1
            warnings.warn(f"skipping shard {url}: {err} (its samples are replaced by others; check the set with "
                          "verify-shards)", stacklevel=2)

    def _lost(self, n: int) -> None:
        """n samples of this worker's share could not be used (see WorkerCounters.skipped_samples)."""
        if not self._filling:
            self.counters.skipped_samples += n

    def _check_count(self, shard: int, n: int, exact: bool) -> None:
        """A shard holding n samples (exact) or more than n - 1 (not exact) where sizes.json lists another count.
        The plans (and every rank's batch count) follow sizes.json: missing samples are replaced by others, extra
        ones are never read. Warned once per text (the shard's counts, not a segment's, so every worker that meets
        it says the same), or raised with on_error="raise": the set does not match its sizes.json. Called for every
        shard read (a matching one counts in the listed total that MAX_MISSING_SHARE is a share of)."""
        listed = self.sizes[shard]
        if shard in self._counted or (n < listed and not exact):  # checked already, or its count not known yet
            return
        self._counted.add(shard)
        self._listed_counted += listed
        if n == listed:
            return
        url = self.source.urls[shard]
        what, effect = ((f"{n} samples where sizes.json lists {listed}", "the missing ones are replaced by others")
                        if n < listed else
                        (f"more samples than the {listed} that sizes.json lists", "the extra ones are not used"))
        if self.cfg.on_error == "raise":
            raise ShardError(f"{url}: {what}; check the set with verify-shards")
        self._missing += max(0, listed - n)
        if self._too_many_missing():
            raise NoUsableData(f"{url} holds {n} samples where sizes.json lists {listed} ({self._missing} of the "
                               f"{self._listed_counted} samples it lists for the {len(self._counted)} shards read "
                               "so far are missing): fix sizes.json or re-make the set (verify-shards names each "
                               "shard whose count differs)")
        warnings.warn(f"{url}: {what} ({effect}; check the set with verify-shards)", stacklevel=3)

    def _too_many_missing(self) -> bool:
        """The rule of MAX_MISSING_SHARE: a share of what sizes.json lists for the shards counted by this worker (not
        of the whole set, which each of many readers meets only a part of), above a floor of a few samples. The share
        is at least of this worker's planned epoch (n_batches x B): of the shards read so far alone, one short shard
        met early in the epoch was refused and the same shard met late was not, so a run could train some epochs and
        stop at another whose shuffle put that shard first."""
        floor = min(MIN_MISSING_REFUSED, MAX_MISSING_SHARE * sum(self.sizes))
        share = max(self._listed_counted, self.n_batches * self.cfg.batch_size)
        return self._missing > max(MAX_MISSING_SHARE * share, floor)

    # -- samples ----------------------------------------------------------------------------------------------
    def _read_segments(self, segments) -> Iterator[Sample]:
        """Samples of the segments, in order (random-access readers fetch them lazily); bad shards skipped."""
        for seg in segments:
            if seg.shard in self.bad:
                self._lost(seg.stop - seg.start)
                continue
            if self.reader.random_access:
                for s, j in self._refs([seg]):
                    sample = self._get(s, j)
                    if sample is not None:
                        yield sample
                continue
            got = 0
            try:
                for sample in self.reader.stream(seg):
                    got += 1
                    yield sample
            except _SHARD_EXCEPTIONS as e:
                self._lost(seg.stop - seg.start - got)  # the stream's samples after the fault
                self._fail(seg.shard, e)
                continue
            self._check_count(seg.shard, *self.reader.seen)
            if self.reader.seen[0] == 0:
                self._empty.add(seg.shard)
            self._lost(seg.stop - seg.start - got)  # > 0 when the tar ended early (fewer samples than listed)

    def _refs(self, segments) -> Iterator[tuple[int, int]]:
        for seg in segments:
            if seg.shard in self.bad:
                self._lost(seg.stop - seg.start)
                continue
            try:
                n = self.reader.count(seg.shard)
            except _SHARD_EXCEPTIONS as e:
                self._lost(seg.stop - seg.start)
                self._fail(seg.shard, e)
                continue
            if n == 0:
                self._empty.add(seg.shard)
            self._check_count(seg.shard, n, True)
            if n < seg.stop:  # the shard holds fewer samples than sizes.json lists
                self._lost(seg.stop - max(n, seg.start))
            for j in range(seg.start, min(seg.stop, n)):
                yield seg.shard, j

    def _get(self, shard: int, j: int) -> Sample | None:
        if shard in self.bad:
            self._lost(1)
            return None
        try:
            return self.reader.get(shard, j, not self._passing)
        except _SHARD_EXCEPTIONS as e:
            self._lost(1)
            self._fail(shard, e)
            return None

    def _prefetch(self, shard: int, j: int) -> None:
        """Ask for a clip's bytes ahead of its read (readers that can: local shards). Advice only: a shard that
        cannot be read fails, and is reported, when the clip is read."""
        if shard not in self.bad and hasattr(self.reader, "prefetch"):
            try:
                self.reader.prefetch(shard, j, data=not self._passing)
            except _SHARD_EXCEPTIONS:
                pass

    def _read_ahead(self, refs: Iterable[tuple[int, int]]) -> Iterator[Sample]:
        """The samples of `refs`, in order, each clip asked for `read_ahead` clips before its read (so that reads
        from the device overlap); unreadable ones skipped. `refs` is consumed that far ahead of the reads."""
        ahead, window = self.cfg.read_ahead, deque()
        for ref in refs:
            if ahead:
                self._prefetch(*ref)
                window.append(ref)
                if len(window) <= ahead:
                    continue
                ref = window.popleft()
            sample = self._get(*ref)
            if sample is not None:
                yield sample
        for ref in window:
            sample = self._get(*ref)
            if sample is not None:
                yield sample

    def _real(self) -> Iterator[Sample]:
        segs = self.plan.segments
        if self.reader.random_access:
            refs = list(self._refs(segs))
            yield from self._read_ahead(refs[k] for k in self.rng_shuffle.permutation(len(refs)).tolist())
        else:
            yield from _buffer_shuffle(self._precrop(self._read_segments(segs)), self.cfg.shuffle_buffer,
                                       self.rng_shuffle)

    def _top_up(self) -> Iterator[Sample]:
        """Endless samples from the sequence position after this worker's range (cyclic), for filling."""
        order, total = np.asarray(self.plan.order), sum(self.sizes)
        pos, barren = self.plan.top_up_from, 0
        while True:
            seg = _segments(order, self.sizes, pos, min(total, pos + max(1, total)))[:1]
            pos = (pos + seg[0].stop - seg[0].start) % total if seg else 0
            got = 0
            for sample in self._read_segments(seg):
                got += 1
                yield sample
            barren = 0 if got else barren + 1
            if barren > len(self.sizes):
                raise NoUsableData("no readable sample left in the shard set: every shard failed or held no sample")

    def _resampled(self) -> Iterator[Sample]:
        def draws():
            while True:
                alive = [s for s in range(len(self.sizes)) if s not in self.bad and self.sizes[s] > 0]
                if not alive or self._empty.issuperset(alive):
                    raise NoUsableData("no readable sample left in the shard set: every shard failed or held no sample")
                s = alive[int(self.rng_shuffle.integers(len(alive)))]
                yield Segment(s, 0, self.sizes[s])

        def refs():
            for seg in draws():
                got = list(self._refs([seg]))
                for k in self.rng_shuffle.permutation(len(got)):
                    yield got[k]

        if self.reader.random_access:
            yield from self._read_ahead(_buffer_shuffle(refs(), self.cfg.shuffle_buffer, self.rng_shuffle))
        else:
            yield from _buffer_shuffle(self._precrop(self._read_segments(draws())), self.cfg.shuffle_buffer,
                                       self.rng_shuffle)

    def _precrop(self, samples: Iterator[Sample]) -> Iterator[Sample]:
        """Streamed payloads are cropped before the shuffle buffer: it then holds crops, not whole clips."""
        for s in samples:
            out = np.empty((self.n_mels, self.cfg.crop_frames), np.float16)
            if self._crop_checked(out, s):
                yield Sample(s.key, out, s.labels, s.shard)

    # -- crops and batches ------------------------------------------------------------------------------------
    def _crop_into(self, dst: np.ndarray | None, arr: np.ndarray) -> bool:
        """Uniform random crop of arr (n_mels, T) into dst (n_mels, crop); short clips padded or dropped. dst None:
        the same checks and random draw, nothing copied (a passed-over batch: arr's data is then never touched)."""
        if arr.ndim != 2 or arr.shape[0] != self.n_mels:
            raise ShardError(f"clip shape {arr.shape}, expected ({self.n_mels}, T)")
        crop, T = self.cfg.crop_frames, arr.shape[1]
        if T >= crop:
            s = int(self.rng_crop.integers(T - crop + 1)) if T > crop else 0
            if dst is not None:
                np.copyto(dst, arr[:, s : s + crop])
            return True
        if self.short == "drop":
            return False
        if dst is not None:
            dst[:, :T] = arr
            dst[:, T:] = self.pad_value
        return True

    def _crop_checked(self, dst: np.ndarray | None, sample: Sample) -> bool:
        """_crop_into with a dropped or malformed clip counted and skipped (a malformed one named with its shard,
        or raised with on_error="raise"), and a guard against a set with no usable clip."""
        try:
            if sample.error is not None:
                raise ShardError(sample.error)
            ok = self._crop_into(dst, sample.arr)
        except ShardError as e:
            url = self.source.urls[sample.shard]
            if self.cfg.on_error == "raise":
                raise ShardError(f"{url}: sample {sample.key}: {e}") from None
            warnings.warn(f"skipping sample {sample.key} of {url}: {e}", stacklevel=2)
            ok = False
        if not ok:
            self._lost(1)
        self._rejects = 0 if ok else self._rejects + 1
        if self._rejects > 2 * self.source.total + self.cfg.batch_size:
            raise NoUsableData(f"no usable clip: every clip read is shorter than crop_frames={self.cfg.crop_frames} "
                               "or malformed; use short='pad' or a shorter crop")
        return ok

    def _new_batch(self, i: int) -> torch.Tensor:
        shape = (self.cfg.batch_size, 1, self.n_mels, self.cfg.crop_frames)
        if not self.shared_memory:
            return torch.empty(shape, dtype=torch.float16)
        # In a DataLoader worker the batch is written straight into shared memory, so it reaches the main process
        # without a copy. Fresh shared memory costs ~24 page faults per sample (tmpfs allocation + zeroing: as much
        # as the crop itself), so with reuse_buffers a ring of prefetch_factor + 2 buffers is recycled: a worker
        # has at most prefetch_factor batches in flight, so slot i is rewritten only after the main process has
        # handed batch i on and fetched at least two more from this worker.
        ring = self.cfg.prefetch_factor + 2 if self.cfg.reuse_buffers else 0
        if ring and i >= ring:
            storage = self._ring[i % ring]
        else:
            storage = torch.UntypedStorage._new_shared(math.prod(shape) * 2)
            if ring:
                self._ring.append(storage)
        return torch.empty(0, dtype=torch.float16).set_(storage, 0, shape)

    def samples(self) -> Iterator[tuple[Sample, bool]]:
        """(sample, filled) pairs, endless: real samples of the plan first, then filler."""
        if self.plan is None:
            for s in self._resampled():
                yield s, False
            return
        for s in self._real():
            yield s, False
        self._filling = True
        for s in self._top_up():
            yield s, True

    def __iter__(self) -> Iterator[dict]:
        """This worker's batches; each of the first `skip` as a `passed` dict instead (no "lms": the worker's counters
        and warnings so far, for ShardLoader, which drops it). One item per batch, made or passed over: the DataLoader
        then yields them in the whole epoch's order, and a worker passing over many batches still answers within the
        loader's timeout for each (held back until its first made batch, a long pass read as a stalled worker)."""
        if self.n_batches == 0:
            return
        it = self.samples()
        try:
            for i in range(self.n_batches):
                passing = i < self.skip
                if not self.forward_warnings:
                    yield self._pass(it) if passing else self._batch(i - self.skip, it)
                    continue
                with warnings.catch_warnings(record=True) as caught:
                    warnings.simplefilter("always")  # the main process's filters decide what is shown
                    batch = self._pass(it) if passing else self._batch(i - self.skip, it)
                batch["warnings"] = self._new_warnings(caught)
                yield batch
        finally:
            it.close()

    def _pass(self, it: Iterator[tuple[Sample, bool]]) -> dict:
        """Draw one batch's samples as _batch does, making nothing (see `skip`); the `passed` dict of __iter__."""
        self._passing = True
        try:
            n = 0
            while n < self.cfg.batch_size:
                sample, fill = next(it)
                if self._crop_checked(None, sample):
                    self.counters.filled += fill
                    n += 1
        finally:
            self._passing = False
        return {"passed": True, "worker": self.worker} | self._skip_counts()

    def _skip_counts(self) -> dict:
        """What this worker skipped so far this epoch, as every batch (made or passed over) carries it to ShardLoader:
        the ids, not only the count, so that a shard met by several workers counts once there."""
        return {"skipped_shards": self.counters.skipped_shards, "skipped_samples": self.counters.skipped_samples,
                "skipped_shard_ids": tuple(sorted(self.bad))}

    def _batch(self, i: int, it: Iterator[tuple[Sample, bool]]) -> dict:
        B = self.cfg.batch_size
        lms = self._new_batch(i)
        view = lms.numpy()
        keys, labels, filled = [], [], torch.zeros(B, dtype=torch.bool)
        while len(keys) < B:
            sample, fill = next(it)
            if self._crop_checked(view[len(keys), 0], sample):
                filled[len(keys)] = fill
                keys.append(sample.key)
                labels.append(sample.labels)
        self.counters.filled += int(filled.sum())
        batch = {"lms": lms, "key": keys, "filled": filled, "worker": self.worker} | self._skip_counts()
        if self.cfg.with_labels:
            batch["labels"] = labels
        return batch

    def _new_warnings(self, caught: list[warnings.WarningMessage]) -> list[tuple[type, str]]:
        """(category, text) of the warnings not yet sent by this worker this epoch (builtin categories only cross
        the process boundary; others travel as UserWarning)."""
        out = []
        for w in caught:
            category = w.category if w.category.__module__ == "builtins" else UserWarning
            item = (category, str(w.message))
            if item not in self._forwarded:
                self._forwarded.add(item)
                out.append(item)
        return out


# ---------------------------------------------------------------------------------------------------------------
# DataLoader glue


class _EpochDataset(torch.utils.data.IterableDataset):
    def __init__(self, source, cfg, rank, world, epoch, seed, skip=0):
        super().__init__()
        self.args = (source, cfg, rank, world, epoch, seed, skip)

    def __iter__(self):
        source, cfg, rank, world, epoch, seed, skip = self.args
        info = torch.utils.data.get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        # Batch i is made (or passed over, as a `passed` dict: see WorkerIterator) by worker i % workers
        return iter(WorkerIterator(source, cfg, rank, world, worker, workers, epoch, seed,
                                   shared_memory=info is not None, forward_warnings=info is not None,
                                   skip=len(range(worker, skip, workers))))


def _identity(x):
    return x


def _worker_signals(worker_id: int, stop=None) -> None:
    """DataLoader worker_init_fn: leave SIGINT/SIGTERM sent to the whole process group (Ctrl-C, `timeout`, Slurm,
    `kill -- -PGID`) to the main process, which decides when to stop (the trainer finishes its step and
    checkpoints), instead of dying mid-epoch and taking the main process down with "worker killed by signal".
    SIGINT is ignored. SIGTERM is blocked and read by a thread: from the parent (DataLoader shutdown, interpreter
    exit) it ends the worker at once, as PyTorch's own worker handler does, after killing (and reaping) the shard
    commands it runs; from anyone else it is ignored. A worker whose parent died exits through PyTorch's watchdog
    (within 5 s) or at the next SIGTERM.

    `stop` (the read end of a pipe that ShardLoader writes to when the iteration ends, raises or is left early;
    a pipe, not a multiprocessing Event, whose set() blocks forever once a waiting worker has exited): a thread
    then kills the worker's running shard commands and refuses new ones, so a worker blocked reading a slow
    `pipe:` / remote shard returns at once (its batch, discarded, ends in LoaderStopped) and the DataLoader's
    shutdown does not wait out its 5 s join timeout."""
    posix = hasattr(signal, "pthread_sigmask")  # else: keep PyTorch's defaults
    if posix:
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        # Before any thread starts: threads inherit the mask, and a group SIGTERM delivered to a thread that does
        # not block it would end the worker by the default action ("worker killed by signal" in the trainer).
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})
    if stop is not None:
        def watch() -> None:
            stop.poll(None)  # readable once written to; nobody reads it, so every worker sees it
            _stop_commands()

        threading.Thread(target=watch, name="loader-stop", daemon=True).start()
    if not posix:
        return
    parent = os.getppid()

    def wait() -> None:
        while True:
            info = signal.sigwaitinfo({signal.SIGTERM})
            if info.si_pid == parent or os.getppid() != parent:
                _stop_commands(reap_s=1.0)  # os._exit skips every `finally`: stop the shard commands here
                os._exit(0)

    threading.Thread(target=wait, name="sigterm-from-parent", daemon=True).start()


def _dead_worker_as_torch_says(it, wait_s: float = 5.0) -> Iterator[dict]:
    """`it`'s batches; a worker killed while handing over a batch (the out-of-memory killer) is torch's RuntimeError
    "DataLoader worker (pid(s) ...) exited unexpectedly", as when it is killed at any other moment.

    A batch's tensors arrive as file descriptors fetched from the worker over a socket (multiprocessing's
    resource_sharer). Killed during that fetch, the worker is still exiting when torch checks its workers, so torch
    re-raises the socket's ConnectionResetError (or EOFError) with no word of a worker, and the run ended in a
    traceback (seen under load). A worker that is gone within a few seconds of such an error is what caused it."""
    while True:
        try:
            batch = next(it)
        except StopIteration:
            return
        except (ConnectionError, EOFError) as e:
            if str(e).startswith("Caught "):  # raised inside a worker and re-raised here by torch: its own error
                raise
            workers = getattr(it, "_workers", None) or []
            deadline = time.monotonic() + wait_s
            while True:
                dead = [w for w in workers if not w.is_alive()]
                if dead or time.monotonic() > deadline:
                    break
                time.sleep(0.05)
            if not dead:
                raise
            pids = ", ".join(str(w.pid) for w in dead)
            raise RuntimeError(f"DataLoader worker (pid(s) {pids}) exited unexpectedly ({type(e).__name__} while "
                               "receiving a batch from it)") from e
        yield batch


class ShardLoader:
    """One epoch of one rank: iterable of batch dicts, `len()` = batches; `skipped_shards` the distinct shards its
    workers skipped (so far), `skipped_samples` the samples they replaced, summed over workers. With
    `skip` = k, the epoch's batches from the k-th on (those of a loader without it), the first k passed over.

    Each iteration starts fresh DataLoader workers and stops them when it ends, raises or is closed early
    (`break` out of the loop, or `close()` on the iterator)."""

    def __init__(self, source, cfg: DataConfig, rank: int, world: int, epoch: int, seed: int, skip: int = 0):
        check_run_ids(rank, world, epoch, seed)
        _check_skip(skip)
        self.source, self.cfg = source, cfg
        self.n_batches = max(0, batches_per_epoch(cfg, source.total, world) - int(skip))
        self.dataset = _EpochDataset(source, cfg, rank, world, epoch, seed, int(skip))
        self._per_worker: dict[int, tuple[tuple[int, ...], int]] = {}  # worker -> (skipped shard ids, samples)

    def __len__(self) -> int:
        return self.n_batches

    @property
    def skipped_shards(self) -> int:
        """Distinct shards skipped by this epoch's workers: a bad shard in two workers' shares (or met again by one
        worker's re-drawing) counts once, not once per worker."""
        return len(set().union(*(v[0] for v in self._per_worker.values())))

    @property
    def skipped_samples(self) -> int:
        return sum(v[1] for v in self._per_worker.values())

    def __iter__(self) -> Iterator[dict]:
        cfg = self.cfg
        kw = ({"prefetch_factor": cfg.prefetch_factor, "persistent_workers": False, "timeout": cfg.timeout_s}
              if cfg.num_workers else {})
        # Written to when this iteration ends, however it ends: see _worker_signals. (num_workers=0: the
        # generators' own `finally` stops the shard commands when the loop is left.)
        stop, stop_w = multiprocessing.Pipe(duplex=False) if cfg.num_workers else (None, None)
        dl = torch.utils.data.DataLoader(self.dataset, batch_size=None, num_workers=cfg.num_workers,
                                         collate_fn=_identity,
                                         worker_init_fn=functools.partial(_worker_signals, stop=stop),
                                         pin_memory=cfg.pin_memory and torch.cuda.is_available(), **kw)
        it = iter(dl)
        issued: set[tuple[type, str]] = set()
        try:
            for batch in _dead_worker_as_torch_says(it):
                self._per_worker[batch["worker"]] = (batch["skipped_shard_ids"], batch["skipped_samples"])
                for w in batch.pop("warnings", ()):  # the workers' warnings, issued here once (see WorkerIterator)
                    if w not in issued:
                        issued.add(w)
                        warnings.warn(w[1], w[0], stacklevel=2)
                if not batch.get("passed"):  # a batch passed over (make_loader's skip): its counts and warnings only
                    yield batch
        finally:
            # Stop the workers now, whether the epoch ended, raised or the consumer stopped early (generator
            # close). Left to the garbage collector, an iterator kept alive by a caught exception's traceback is
            # inherited by the next loader's forked workers, which then fail to shut it down ("can only test a
            # child process"). The stop signal first: a worker blocked on a slow shard command gets out at once.
            if stop_w is not None:
                stop_w.send_bytes(b"")
            shutdown = getattr(it, "_shutdown_workers", None)  # absent with num_workers=0: nothing to stop
            if shutdown is not None:
                shutdown()
            del it
            if stop_w is not None:
                stop.close()
                stop_w.close()


def make_loader(cfg: DataConfig, rank: int = 0, world_size: int = 1, epoch: int = 0, seed: int = 0,
                source: ShardSource | SyntheticSource | str | Path | Sequence[str | Path] | None = None,
                frontend: str | FrontendSpec | None = None, skip: int = 0) -> ShardLoader:
    """The loader of one rank for one epoch (build a new one each epoch: the order and crops depend on it).

    `source`: an opened ShardSource / SyntheticSource, a spec ShardSource.open takes (a path, pattern or list of
    them: opened with cfg.meta), or None for cfg.source.
    `skip`: the epoch's first `skip` batches are passed over (a resume inside an epoch): the loader yields the
    batches a loader without it yields from its skip-th on, the same keys, crops and fills, without making the
    first ones. Their samples' order, crops and drops are still drawn, which needs each clip's headers; a local
    shard's clip data is not read (a streamed shard, URL or pipe:, is read to get past it).
    rank in [0, world_size), epoch >= 0 and seed >= 0 are checked here, before any worker starts."""
    check_run_ids(rank, world_size, epoch, seed)
    _check_skip(skip)
    if source is None:
        source = ShardSource.open(cfg.source, cfg.meta)
    elif isinstance(source, str | Path | list | tuple):  # a path here failed with "'str' object has no attribute"
        source = ShardSource.open(source, cfg.meta)
    elif not isinstance(source, ShardSource | SyntheticSource):
        raise TypeError(f"make_loader: source must be a ShardSource, a shard set path or None, got "
                        f"{type(source).__name__}")
    if frontend is not None:
        check_spec(frontend, source.stats)
    _check_source_for(cfg, source.stats)
    if batches_per_epoch(cfg, source.total, world_size) == 0:
        what, fix = f"the shard set has {source.total} samples per epoch,", "add data"
        if cfg.mode == "resampled" and cfg.samples_per_epoch is not None:
            what, fix = f"samples_per_epoch={cfg.samples_per_epoch} is", "raise samples_per_epoch"
        raise ValueError(f"{what} fewer than world_size x batch_size = {world_size * cfg.batch_size}; lower "
                         f"batch_size or {fix}")
    nb = batches_per_epoch(cfg, source.total, world_size)
    if skip > nb:
        raise ValueError(f"skip={skip}: the epoch has {nb} batches per rank; skip at most that many")
    return ShardLoader(source, cfg, rank, world_size, epoch, seed, skip)


def _check_skip(skip: int) -> None:
    if isinstance(skip, bool) or not isinstance(skip, int | np.integer) or skip < 0:
        raise ValueError(f"skip must be an integer >= 0, the batches to pass over (got {skip!r})")


# ---------------------------------------------------------------------------------------------------------------
# front-end contract and on-device normalisation


def check_spec(frontend: str | FrontendSpec | dict, stats: dict) -> None:
    """One-line ValueError when the shards were made with a front end other than the training config's."""
    if isinstance(frontend, str):
        expected = get_spec(frontend)
    elif isinstance(frontend, FrontendSpec):
        expected = frontend
    elif isinstance(frontend, dict):  # checked here so that a bad one is not blamed on stats.json below
        try:
            expected = FrontendSpec(**frontend)
        except TypeError as e:
            raise ValueError(f"check_spec: frontend {frontend!r} is not a front-end spec ({e})") from None
    else:
        raise TypeError(f"check_spec: frontend must be a preset name, a FrontendSpec or its dict, got "
                        f"{type(frontend).__name__}")
    found = stats.get("frontend")
    if not isinstance(found, dict):
        raise ValueError("stats.json has no 'frontend' entry; re-make the shards with make-shards")
    try:
        check_compatible(expected, found)
    except TypeError as e:
        raise ValueError(f"stats.json 'frontend' is not a front-end spec this version understands ({e})") from None


def norm_stats(stats: dict, which: str = "frontend") -> tuple[float, float]:
    """(mean, std): "frontend" = the spec's fixed pair (MATPAC: -7.056 / 4.193); "dataset" = stats.json's."""
    if which == "frontend":
        return float(stats["frontend"]["norm_mean"]), float(stats["frontend"]["norm_std"])
    if which == "dataset":
        return float(stats["mean"]), float(stats["std"])
    raise ValueError(f"norm_stats which={which!r}: choose 'frontend' or 'dataset'")


def normalize_on_device(lms: torch.Tensor, mean: float, std: float, device=None) -> torch.Tensor:
    """Move a (pinned) fp16 batch to the device without blocking, then (x - mean) / std in float32."""
    if device is not None:
        lms = lms.to(device, non_blocking=True)
    return normalize(lms, mean, std)


__all__ = [
    "DataConfig", "ShardSource", "SyntheticSource", "ShardError", "NoUsableData", "ShardLoader", "WorkerIterator",
    "WorkerPlan", "make_loader", "batches_per_epoch", "plan_exact", "check_spec", "norm_stats", "normalize_on_device",
    "expand_urls", "sibling",
]
