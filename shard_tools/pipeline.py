"""The make-shards engine: plan -> ordered parallel decode/log-mel -> deterministic shards -> journal -> summary files.

Determinism and resumability come from one rule: the output is a pure function of the (seeded) input order.
* Inputs are discovered in sorted order, shuffled with `seed`, and processed by an *ordered* parallel map, so the
  sample sequence never depends on worker count or timing; each clip's log-mel is computed alone with one thread.
* A shard closes after the sample that makes it full, so shard k+1 always starts at the input position right after
  shard k. When a shard is renamed from `.tar.tmp` to `.tar`, one line is appended (and fsynced) to
  `OUT/.make-shards/journal.jsonl` with the input range it covers, its manifest lines and its statistics sums.
* After a kill (SIGKILL included), the same command reads the plan hash and the journal, drops any `.tmp`, and
  restarts at the first input after the last journaled shard. Because that is exactly where the uninterrupted run
  started that shard, the output is byte-identical. Totals and stats.json are always summed from the journal in
  shard order, so they are identical too.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import functools
import hashlib
import json
import os
import re
import shutil
import signal
import sys
import threading
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from matpac_fast.cli_args import bar_settings, usable_cpus
from matpac_fast.data_tar import ShardError, index_path, walk_file
from matpac_fast.frontend import FrontendSpec, LogMelSpec, get_spec
from matpac_fast.interrupts import Terminated, sigterm_is_interrupt
from matpac_fast.locks import close_lock_fd, open_lock_fd
from matpac_fast.safe_files import JSON_MAX_BYTES, create_new, read_regular, write_atomic
from shard_tools.decode import PYAV_HINT, TOO_LONG_HINT, Prepared, Skip, pad_wave_samples, prepare
from shard_tools.discover import (
    Discovery,
    Item,
    is_partial,
    is_ytdlp_temp,
    printable,
    segments_line,
    unique_keys,
)
from shard_tools.verify import (  # one rule for both
    SHARD_RE,
    brief,
    classes_without_line,
    is_make_shards_stats,
    is_manifest_line,
)
from shard_tools.workpool import WorkerDied, ordered_map
from shard_tools.writer import ShardLimit, ShardWriter, encode_json, encode_npy, parse_shard_size, write_index

FORMAT_VERSION = 1
WORK_DIR = ".make-shards"
NAME_RE = re.compile(r"^[A-Za-z0-9_-]+\Z")  # \Z: $ also matches before a final newline
SET_FILES = ("sizes.json", "stats.json", "manifest.jsonl")
CHUNK = 2  # inputs per task sent to a worker


def tool_version() -> str:
    from matpac_fast import __version__

    return f"matpac-fast {__version__}"


@dataclass(frozen=True)
class MakeConfig:
    out: Path
    frontend: str = "matpac"
    workers: int = field(default_factory=usable_cpus)
    device: str = "cpu"
    min_frames: int = 608
    # "drop": skip clips below min_frames (MATPAC's authors); "pad": keep them, the loader pads (M2D's authors; for
    # m2d the waveform is zero-padded to 6.1 s first, as their wav_to_lms.py does);
    # None: the front end's own choice, resolved in __post_init__ (m2d: pad; matpac: drop).
    short: str | None = None
    shard_size: str = "1GB"
    seed: int = 0
    name: str = "shards"
    overwrite: bool = False
    progress: bool = True
    # False only to finish or recognise an m2d --short pad set made before make-shards padded m2d waveforms to 6.1 s
    # (2026-11-27): its clips stay as they were written (`_keep_earlier_m2d_unpadded`)
    m2d_wave_pad: bool = True

    def pad_to(self) -> int:
        """Samples a shorter waveform is zero-padded to before the log-mel (0: none)."""
        return pad_wave_samples(get_spec(self.frontend), self.short) if self.m2d_wave_pad else 0

    def __post_init__(self) -> None:
        if self.short is None:  # resolved here so that the plan hash and stats.json always name the choice made
            object.__setattr__(self, "short", "pad" if self.frontend == "m2d" else "drop")
            object.__setattr__(self, "_short_defaulted", True)

    def validate(self) -> None:
        get_spec(self.frontend)
        parse_shard_size(self.shard_size)
        if self.short not in ("drop", "pad"):
            raise ValueError(f"--short must be 'drop' or 'pad' (got {self.short!r})")
        if self.min_frames < 1:
            raise ValueError(f"--min-frames must be >= 1 (got {self.min_frames})")
        if self.workers < 0:
            raise ValueError(f"--workers must be >= 0 (got {self.workers})")
        if not NAME_RE.match(self.name):
            raise ValueError(f"--name {self.name!r}: use only letters, digits, '_' and '-' (e.g. --name as2m_train)")
        if self.seed < 0:
            raise ValueError(f"--seed must be a whole number >= 0 (got {self.seed})")
        check_out_dir(Path(self.out))
        if self.device not in ("cpu", "cuda") and not self.device.startswith("cuda:"):
            raise ValueError(f"--device must be cpu or cuda (got {self.device!r})")
        if self.device.startswith("cuda") and not torch.cuda.is_available():
            raise ValueError(
                "--device cuda: CUDA is not available (torch.cuda.is_available() is False); use --device cpu"
            )


@dataclass
class Result:
    """What the writer needs for one input: a sample (members + sums) or a skip reason."""

    source: str
    key: str
    skipped: str | None = None
    detail: str = ""
    members: dict[str, bytes] | None = None
    n_frames: int = 0
    value_sum: float = 0.0
    value_sumsq: float = 0.0
    seconds: float = 0.0
    flags: tuple[str, ...] = ()


# ---------------------------------------------------------------------------------------------- per-item processing
def featurize(item: Item, prep: Prepared, mel: LogMelSpec, device: str) -> Result:
    x = torch.from_numpy(prep.wave)[None].to(device)
    lms = mel(x)[0].to(torch.float16).cpu().numpy()  # (80, T): stored as float16, the whole clip
    if not np.isfinite(lms).all():
        return Result(item.source, item.key, skipped="non_finite", detail="log-mel not finite")
    values = lms.astype(np.float64)  # statistics of exactly the values the loader will read
    meta = {
        "key": item.key,
        "source": item.source,
        "ytid": item.ytid,
        "start": item.start,
        "end": item.end,
        "labels": list(item.labels),
        "label_indices": list(item.label_indices),
        "source_sr": prep.source_sr,
        "duration": round(prep.duration, 6),
        "n_frames": int(lms.shape[1]),
        "flags": list(prep.flags),
    }
    return Result(
        item.source,
        item.key,
        members={"npy": encode_npy(lms), "json": encode_json(meta)},
        n_frames=int(lms.shape[1]),
        value_sum=float(values.sum()),
        value_sumsq=float(np.square(values).sum()),
        seconds=prep.duration,  # the source audio's, as the json's duration: not the m2d zero-padding (flag padded)
        flags=prep.flags,
    )


def _skip_result(item: Item, e: Skip) -> Result:
    detail = str(e)
    if item.path:  # keep outputs free of absolute paths (they differ between machines)
        detail = detail.replace(item.path, item.source)
    return Result(item.source, item.key, skipped=e.reason, detail=printable(detail))


def process_item(item: Item, spec: FrontendSpec, min_frames: int, short: str, mel: LogMelSpec | None,
                 pad_to: int | None = None):
    """CPU path: Result. GPU path (mel is None): (item, Prepared) for the main process to featurize, or a Result."""
    try:
        prep = prepare(item, spec, min_frames, short, pad_to)
    except Skip as e:
        return _skip_result(item, e)
    except Exception as e:  # a bug or an exotic failure must not stop the run: record it as undecodable
        return _skip_result(item, Skip("undecodable", f"{type(e).__name__}: {e}"))
    if mel is None:
        return item, prep
    return featurize(item, prep, mel, "cpu")


_WORKER: dict = {}


def _init_worker(frontend: str, min_frames: int, short: str, cpu_mel: bool, pad_to: int) -> None:
    torch.set_num_threads(1)  # one clip per process: threads would only fight, and results must not depend on them
    spec = get_spec(frontend)
    _WORKER.update(spec=spec, min_frames=min_frames, short=short, mel=LogMelSpec(spec) if cpu_mel else None,
                   pad_to=pad_to)


def _work(chunk: list[Item]) -> list:
    w = _WORKER
    return [process_item(item, w["spec"], w["min_frames"], w["short"], w["mel"], w["pad_to"]) for item in chunk]


def ordered_results(items: list[Item], cfg: MakeConfig) -> Iterator[Result]:
    """Results in input order, computed by `cfg.workers` processes (0 or 1: in this process)."""
    spec = get_spec(cfg.frontend)
    on_gpu = cfg.device.startswith("cuda")
    gpu_mel = LogMelSpec(spec).to(cfg.device) if on_gpu else None
    if cfg.workers <= 1:
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            mel = None if on_gpu else LogMelSpec(spec)
            for item in items:
                yield _finish(process_item(item, spec, cfg.min_frames, cfg.short, mel, cfg.pad_to()), gpu_mel,
                              cfg.device)
        finally:
            torch.set_num_threads(threads)
        return
    with _sigint_deferred() as stop:

        def poll() -> None:
            if stop.is_set():
                raise Terminated if stop.signum == signal.SIGTERM else KeyboardInterrupt

        chunks = (items[i : i + CHUNK] for i in range(0, len(items), CHUNK))
        # A bounded number of chunks ahead of the writer: the ones that come back before their turn wait here.
        results = ordered_map(_work, chunks, cfg.workers, ahead=chunks_ahead(cfg.workers), initializer=_init_worker,
                              initargs=(cfg.frontend, cfg.min_frames, cfg.short, not on_gpu, cfg.pad_to()),
                              poll=poll)
        with contextlib.closing(results):  # the workers end here, however the run ends
            try:
                for outs in results:
                    poll()
                    for out in outs:
                        yield _finish(out, gpu_mel, cfg.device)
            except WorkerDied as e:
                poll()  # a SIGTERM to the whole process group ends the workers too: the stop is the news
                raise WorkerDied(_died_message(e, cfg.workers), e.exitcode) from None


def chunks_ahead(workers: int) -> int:
    """Chunks handed out past the one the writer takes next. Finished ones wait in memory for their turn (~160 KB a
    10 s clip on the CPU: 80 x 1,000 fp16; ~0.64 MB as a float32 waveform for --device cuda), and a long input holds
    the others back only after this many: up to 8 workers, ~20 MB of 10 s clips (~80 MB for cuda); at least 8
    chunks per worker."""
    return max(64, 8 * workers)


def _died_message(e: WorkerDied, n_workers: int) -> str:
    oom = " (often the out-of-memory killer: long clips decode whole)" if e.exitcode == -signal.SIGKILL else ""
    fewer = f", with fewer --workers than {n_workers} if memory ran short" if n_workers > 1 else ""
    return f"{e}{oom}; the shards written so far are kept: run the same command again to finish{fewer}"


class _Stop(threading.Event):
    signum: int = 0  # the signal that set it


@contextlib.contextmanager
def _sigint_deferred() -> Iterator[_Stop]:
    """While the workers run, Ctrl-C (and a SIGTERM that the CLI turns into Terminated: interrupts.
    sigterm_as_interrupt) only sets the returned flag; the loop over results turns it into a KeyboardInterrupt (or
    Terminated) at a safe point, between two results. Raised anywhere, it could land half-way through reading a
    worker's answer or handing a shard to the close thread."""
    stop = _Stop()
    if threading.current_thread() is not threading.main_thread():
        yield stop  # not ours to change: the flag is never set
        return

    def flag(signum, frame) -> None:
        stop.signum = stop.signum or signum
        stop.set()

    ours = [s for s, mine in ((signal.SIGINT, signal.getsignal(signal.SIGINT) is signal.default_int_handler),
                              (signal.SIGTERM, sigterm_is_interrupt())) if mine]  # a caller's own handler: theirs
    old = {s: signal.signal(s, flag) for s in ours}
    try:
        yield stop
    finally:
        for s, handler in old.items():
            signal.signal(s, handler)


def _finish(out, gpu_mel: LogMelSpec | None, device: str) -> Result:
    if isinstance(out, Result):
        return out
    item, prep = out
    return featurize(item, prep, gpu_mel, device)


# ----------------------------------------------------------------------------------------------------- plan/journal
def shuffled(items: list[Item], seed: int) -> list[Item]:
    order = np.random.default_rng(seed).permutation(len(items))
    return [items[i] for i in order]


def plan_hashes(disc: Discovery, cfg: MakeConfig) -> tuple[str, str]:
    """(today's plan hash, the older one), in one pass over the inputs. The plan hash covers everything that
    determines the output bytes; a resume with a different hash is refused. Each file's size and modification time
    stand for its content (a file edited in place keeps its size: a wav of the same length). The older hash, without
    the times and with an AudioSet Y<id>.temp.wav counted not_in_csv, is what sets and plans of versions before
    those changes hold: an interrupted run of theirs resumes (and its stats.json gets today's hash), and a complete
    set is still recognised (checked by sizes, as it was made)."""
    settings = json.dumps(_settings(disc, cfg), sort_keys=True).encode()
    today, older = hashlib.sha256(settings), hashlib.sha256(settings)
    for it in disc.items:
        row = [it.source, it.key, it.labels, it.label_indices, it.size, it.skip, it.start, it.end, it.synth]
        today.update(json.dumps(row + [it.mtime_ns]).encode() + b"\n")
        if it.skip == "partial_download" and it.ytid is None and is_ytdlp_temp(it.source) and not (
                is_partial(it.source)):
            row[5] = "not_in_csv"
        older.update(json.dumps(row).encode() + b"\n")
    return today.hexdigest(), older.hexdigest()


def plan_hash(disc: Discovery, cfg: MakeConfig, mtimes: bool = True) -> str:
    """Today's plan hash (`plan_hashes`), or with `mtimes=False` the older one."""
    return plan_hashes(disc, cfg)[0 if mtimes else 1]


def settings_hash(disc: Discovery, cfg: MakeConfig) -> str:
    """The options' part of plan_hash, without what is read from the inputs (the class list, AudioSet's counts of
    segments with a file): equal settings with another plan_hash mean the inputs changed, not the options."""
    options = {k: v for k, v in _settings(disc, cfg).items() if k not in ("classes", "extra")}
    return hashlib.sha256(json.dumps(options, sort_keys=True).encode()).hexdigest()


def _settings(disc: Discovery, cfg: MakeConfig) -> dict:
    settings = {
        "format_version": FORMAT_VERSION,
        "frontend": get_spec(cfg.frontend).numerics(),
        "device": "cuda" if cfg.device.startswith("cuda") else "cpu",
        "min_frames": cfg.min_frames,
        "short": cfg.short,
        "shard_size": str(parse_shard_size(cfg.shard_size)),
        "seed": cfg.seed,
        "name": cfg.name,
        "classes": disc.class_ids,
    }
    if cfg.pad_to():  # only where it applies: every other set (and an older unpadded m2d one) keeps its plan hash
        settings["pad_wave_samples"] = cfg.pad_to()
    if disc.extra:  # e.g. AudioSet's segment counts, which are stored in stats.json
        settings["extra"] = disc.extra
    return settings


def read_journal(path: Path) -> list[dict]:
    """Complete lines only: a kill during an append leaves a partial last line, which is dropped."""
    return list(iter_journal(path))


def iter_journal(path: Path) -> Iterator[dict]:
    """`read_journal`'s entries one at a time: parsed, each input's manifest line takes ~470 bytes (~1 GB for
    AudioSet's 2 million files), so a pass that needs each entry once does not hold them all."""
    for entry, _ in _journal_entries(path):
        yield entry


def _journal_entries(path: Path) -> Iterator[tuple[dict, int]]:
    """(entry, the file offset just past its line) for each whole entry, up to the first line that is cut (no
    newline: a kill or a full disk in `_append_line`) or not JSON. Regular files only: a FIFO there blocked the open
    for good (_open_plan refuses one)."""
    if not path.is_file():
        return
    end = 0
    with open(path, "rb") as f:
        for line in f:
            if not line.endswith(b"\n"):
                return
            try:
                entry = json.loads(line)
            except ValueError:  # JSONDecodeError, or bytes that are not UTF-8
                return
            end += len(line)
            yield entry, end


def _read_and_trim_journal(path: Path) -> list[dict]:
    """`read_journal`, with the file cut back to the entries it returns, before anything is appended to it. The
    resumed run appended its own entries right after a cut last line: its first entry was glued to the cut one
    (invalid JSON), so it and every entry after it were lost, and the run ended in "internal error: accounted N of M
    inputs". A folder an older version resumed that way holds such a glued line mid-file, where reading stops: cut
    there too, or every rerun appended after it and failed the same way. Read in one pass (it may be a gigabyte)."""
    pairs = list(_journal_entries(path))
    end = pairs[-1][1] if pairs else 0
    if path.is_file() and end != path.stat().st_size:
        with open(path, "r+b") as f:
            f.truncate(end)
            f.flush()
            os.fsync(f.fileno())
    return [entry for entry, _ in pairs]


def _valid_prefix(entries: list[dict], out: Path) -> list[dict]:
    """Journaled shards whose file is still there with the journaled size (a user may have deleted one)."""
    ok = []
    for e in entries:
        if e["shard"] is not None:
            p = out / e["shard"]
            if not p.is_file() or p.stat().st_size != e["bytes"]:
                break
        ok.append(e)
    return ok


def _append_line(path: Path, obj: dict) -> None:
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(obj, sort_keys=True) + "\n")
        f.flush()
        os.fsync(f.fileno())


def _write_atomic(path: Path, text: str) -> None:
    write_atomic(path, text, encoding="utf-8")  # never through a link planted at <path>.tmp


# ------------------------------------------------------------------------------------------- the output folder
def check_out_dir(out: Path) -> None:
    """--out must be a folder, or a path where one can be made: a one-line error otherwise (checked up front)."""
    if out.is_symlink() and not out.exists():
        raise ValueError(f"--out {out} is a broken symbolic link; choose a folder path")
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out} is a file, not a folder; choose a folder path")
    parent = out
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if parent.exists() and not parent.is_dir():
        raise ValueError(f"--out {out}: {parent} is a file, so no folder can be made under it; choose another --out")


def _make_out_dir(out: Path) -> None:
    try:  # check_out_dir ran in MakeConfig.validate
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ValueError(f"cannot create --out {out}: {e.strerror}; choose another --out") from None


def shard_base(filename: str) -> str:
    """The shard a file of the set belongs to: `x.tar` for x.tar, x.tar.tmp, x.tar.idx (its index) and x.tar.idx.tmp."""
    return filename.removesuffix(".tmp").removesuffix(".idx")


def _shard_files(out: Path, names: set[str]) -> list[Path]:
    """`<name>-NNNNNN.tar` files of the given set names, their index files and the `.tmp` files of both (nothing
    else, whatever its name)."""
    found = []
    for p in out.iterdir():
        m = SHARD_RE.match(shard_base(p.name))
        if m and m["name"] in names and (p.is_file() or p.is_symlink()):
            found.append(p)
    return sorted(found)


def _read_json(path: Path):
    """(object, None) or (None, why it cannot be read)."""
    try:
        # capped: a stats.json of gigabytes in --out (not ours) was read whole to be told apart from ours
        return json.loads(read_regular(path, JSON_MAX_BYTES).decode("utf-8")), None
    except UnicodeDecodeError:
        return None, "is not UTF-8 text"
    except (json.JSONDecodeError, RecursionError) as e:  # RecursionError: nested too deep (was a traceback)
        return None, f"is not valid JSON ({e})"
    except OSError as e:  # TooLarge among them
        return None, f"cannot be read ({e.strerror})"


def _not_ours(path: Path) -> str | None:
    """Why `path` (sizes.json, stats.json or manifest.jsonl) was not written by make-shards, or None."""
    if not path.is_file():
        return "is not a regular file"
    if path.name == "manifest.jsonl":
        with open(path, "rb") as f:
            # capped as the JSON files are: a first line of gigabytes (no newline) was read whole
            first = f.readline(JSON_MAX_BYTES + 1)
        if len(first) > JSON_MAX_BYTES:
            return f"is not a make-shards manifest (its first line is over {JSON_MAX_BYTES} bytes)"
        if not first.strip():
            return None  # empty: nothing in it to lose
        try:
            line = json.loads(first)
        except (json.JSONDecodeError, UnicodeDecodeError, RecursionError):
            line = None
        # verify-shards' rule: a first line with "source" was enough here, and a user's attribution manifest (source,
        # path, license, author) was replaced without --overwrite
        return None if is_manifest_line(line) else "is not a make-shards manifest"
    obj, why = _read_json(path)
    if why:
        return why
    if path.name == "stats.json":
        return _stats_not_ours(obj)
    ok = isinstance(obj, dict) and all(SHARD_RE.match(k) and isinstance(v, int) for k, v in obj.items())
    if not ok:
        return "is not a make-shards sizes.json"
    # A WebDataset set's own sizes.json has that shape too ({"audio-000000.tar": 100}): it was replaced, and with
    # --overwrite the shards it lists were deleted. make-shards writes sizes.json just before stats.json, listing
    # the same shards, so it is make-shards' when stats.json (checked first) or, killed between the two, the
    # interrupted run's journal lists exactly its shards.
    listed = _listed_by_make_shards(path.parent)
    if listed is None or set(obj) != listed:
        return "is not make-shards' (no make-shards stats.json or interrupted run in that folder lists its shards)"
    return None


def _listed_by_make_shards(out: Path) -> set[str] | None:
    """The shards make-shards' stats.json in `out` lists, else those its interrupted run journaled; None: neither."""
    if (out / "stats.json").is_file():
        stats, _ = _read_json(out / "stats.json")
        return set(stats.get("shard_sha256", {})) if isinstance(stats, dict) and not _stats_not_ours(stats) else None
    journal = out / WORK_DIR / "journal.jsonl"
    if journal.is_file():
        return {e["shard"] for e in iter_journal(journal) if isinstance(e, dict) and isinstance(e.get("shard"), str)}
    return None


def _stats_not_ours(obj) -> str | None:
    """Why stats.json's `obj` is not one make-shards can act on, or None. make-shards deletes the shards a stats.json
    lists (--overwrite) and takes one with "written" 0 for an empty set to replace, so beyond verify-shards' rule for
    whose file it is, the fields it acts on must be as make-shards writes them: "written" a count, "shard_sha256"
    {<name>-NNNNNN.tar: digest} (absent only in an empty set), and shards listed exactly when clips were written. A
    "written" of 0 (or none) beside a list of shards replaced a complete set, a user's shards-000099.tar included."""
    if not (is_make_shards_stats(obj) and isinstance(obj.get("plan_hash"), str)):
        return "is not a make-shards stats.json (it has no plan_hash)"
    written, listed = obj.get("written"), obj.get("shard_sha256", {})
    if isinstance(written, bool) or not isinstance(written, int) or written < 0:
        return f"is not as make-shards writes it ('written' is {brief(written)})"
    if not isinstance(listed, dict) or not all(
        isinstance(k, str) and SHARD_RE.match(k) and isinstance(v, str) for k, v in listed.items()
    ):
        return f"is not as make-shards writes it ('shard_sha256' is {brief(listed)})"
    if bool(written) != bool(listed):
        return f"is not as make-shards writes it ({written} clips written, {len(listed)} shards listed)"
    return None


def _check_no_foreign_files(out: Path) -> None:
    """make-shards replaces sizes.json, stats.json and manifest.jsonl: refuse when one of them is someone else's."""
    for name in ("stats.json", "sizes.json", "manifest.jsonl"):  # stats.json first: sizes.json's check reads it
        p = out / name
        if p.exists() or p.is_symlink():
            why = _not_ours(p)
            if why:
                raise ValueError(
                    f"{p} {why}, and make-shards writes a file of that name: move it out of {out} (or remove the "
                    f"set it belongs to) or choose another --out; nothing was changed"
                )


def _written_files(out: Path, name: str) -> list[Path]:
    """What --overwrite deletes among `out`'s shard-named files: the shards an earlier set lists (sizes.json,
    stats.json's hashes, an interrupted run's journal), their index files and the temporary files of both; an
    interrupted run's shard in flight (renamed to its final name just before the kill, so not journaled yet); and
    every <name>-NNNNNN.tar of this run's name, which it would overwrite. Another `<old name>-NNNNNN.tar` that no set
    lists is left alone: it was deleted by name pattern alone before, a user's file included."""
    listed: set[str] = set()
    journal = read_journal(out / WORK_DIR / "journal.jsonl")
    listed |= {e["shard"] for e in journal if isinstance(e.get("shard"), str)}
    for f in ("sizes.json", "stats.json"):
        obj, _ = _read_json(out / f) if (out / f).is_file() else (None, None)
        if isinstance(obj, dict):
            held = obj.get("shard_sha256", {}) if f == "stats.json" else obj
            listed |= {k for k in held if isinstance(k, str)} if isinstance(held, dict) else set()
    plan, _ = _read_json(out / WORK_DIR / "plan.json") if (out / WORK_DIR / "plan.json").is_file() else (None, None)
    in_flight = None
    if isinstance(plan, dict) and isinstance(plan.get("name"), str):
        in_flight = f"{plan['name']}-{sum(1 for e in journal if e.get('shard')):06d}.tar"
    found = []
    for p in out.iterdir():
        base = shard_base(p.name)
        m = SHARD_RE.match(base)
        if m and (p.is_file() or p.is_symlink()) and (base in listed or base == in_flight or m["name"] == name):
            found.append(p)
    return sorted(found)


def _clear(out: Path, name: str, shards: bool = True) -> None:
    """--overwrite: delete what make-shards wrote in `out` (`_written_files`: every earlier set's shards, whatever
    its --name; and any <name>-NNNNNN.tar of this run's name, the files it would overwrite: a run without
    --overwrite refuses them and names them), sizes, stats, manifest and .make-shards/; never other files.
    Foreign sizes/stats/manifest files were refused before. `shards=False`: only the files that are not shards."""
    for p in _written_files(out, name) if shards else []:
        p.unlink()
    for f in SET_FILES:
        (out / f).unlink(missing_ok=True)
        (out / f"{f}.tmp").unlink(missing_ok=True)
    if (out / WORK_DIR).is_dir():
        shutil.rmtree(out / WORK_DIR)


def _open_plan(out: Path, cfg: MakeConfig, phash: str, accepted: set[str], shash: str, n_inputs: int) -> None:
    """Start (or recognise: a plan holding one of the `accepted` hashes) the plan of this run. A plan of another
    command that never completed a shard or a skip segment is replaced: nothing of it would be lost. One with work
    done is refused."""
    work, plan_path = out / WORK_DIR, out / WORK_DIR / "plan.json"
    journal = work / "journal.jsonl"
    if journal.is_symlink():  # appended to in place: the run's entries went into the link's target
        raise ValueError(f"{journal} is a symbolic link, which make-shards never writes through: delete the link (not "
                         "its target), pass --overwrite, or choose another --out")
    if journal.exists() and not journal.is_file():  # a FIFO: reading or appending to it would wait for ever
        raise ValueError(f"{journal} is not a regular file, which make-shards keeps its journal in: delete it, pass "
                         "--overwrite, or choose another --out")
    if journal.exists() and not plan_path.exists():
        # make-shards writes plan.json before any journal entry: this journal is no run's it could finish (read as
        # its own, its entries were kept and the run ended in "internal error: accounted 0 of N inputs")
        raise ValueError(f"{work} holds a journal.jsonl but no plan.json, so it is no interrupted run make-shards can "
                         "finish: pass --overwrite to delete it, or choose another --out")
    if plan_path.exists():
        plan, _ = _read_json(plan_path)
        if isinstance(plan, dict) and plan.get("plan_hash") in accepted:
            return
        if next(iter_journal(work / "journal.jsonl"), None) is not None:  # any work done (one entry is enough)
            if isinstance(plan, dict) and plan.get("settings_hash") == shash:
                # The same command, but the files changed (downloads still arriving): "rerun that exact command"
                # would send the user round in circles.
                then = plan.get("inputs")
                count = f"{then} then, {n_inputs} now" if then != n_inputs else f"{n_inputs} both times"
                raise ValueError(
                    f"{out} holds an interrupted run with these options, but its inputs changed since ({count}; "
                    "files added, removed, resized, modified or relabelled): resuming would mix two corpora; pass "
                    "--overwrite to start again with the current inputs, or choose another --out"
                )
            raise ValueError(
                f"{out} holds an interrupted run with other inputs or options; rerun that exact command to finish "
                f"it, choose another --out, or pass --overwrite"
            )
        old_name = plan.get("name") if isinstance(plan, dict) else None
        for p in _shard_files(out, {old_name} if isinstance(old_name, str) else set()):
            if p.name.endswith(".tmp"):
                p.unlink()  # the unfinished first shard of the run that never finished one
        shutil.rmtree(work)
    _refuse_unknown_shards(out, cfg.name)
    work.mkdir(exist_ok=True)
    plan = {"plan_hash": phash, "settings_hash": shash, "inputs": n_inputs, "name": cfg.name}
    _write_atomic(plan_path, json.dumps(plan) + "\n")


def _refuse_unknown_shards(out: Path, name: str) -> None:
    """A <name>-NNNNNN.tar that no run of this folder lists would be overwritten: refused (--overwrite deletes it)."""
    unknown = [p for p in _shard_files(out, {name}) if p.suffix == ".tar"]
    if unknown:
        raise ValueError(
            f"{out} already has {len(unknown)} {name}-NNNNNN.tar file(s) from an unknown run; pass --overwrite to "
            "delete them, or choose another --out"
        )


# ------------------------------------------------------------------------------------------------------------- run
class _Segment:
    """Accumulates one journal entry: the inputs from `start` up to the end of one shard."""

    def __init__(self, start: int):
        self.start = start
        self.manifest: list[dict] = []
        self.sum = self.sumsq = self.seconds = 0.0
        self.n_frames = 0
        self.min_clip_frames: int | None = None

    def add(self, r: Result, shard: str | None) -> None:
        if r.skipped:
            line = {"source": r.source, "skipped": r.skipped}
            if r.detail and r.detail != r.skipped:
                line["detail"] = r.detail
            self.manifest.append(line)
            return
        line = {"source": r.source, "key": r.key, "shard": shard}
        if r.flags:
            line["flags"] = list(r.flags)
        self.manifest.append(line)
        self.sum += r.value_sum
        self.sumsq += r.value_sumsq
        self.seconds += r.seconds
        self.n_frames += r.n_frames
        self.min_clip_frames = r.n_frames if self.min_clip_frames is None else min(self.min_clip_frames, r.n_frames)

    def entry(self, end: int, shard: str | None, count: int, n_bytes: int, sha: str | None) -> dict:
        return {
            "start": self.start,
            "end": end,
            "shard": shard,
            "count": count,
            "bytes": n_bytes,
            "sha256": sha,
            "sum": self.sum,
            "sumsq": self.sumsq,
            "seconds": self.seconds,
            "n_frames": self.n_frames,
            "min_clip_frames": self.min_clip_frames,
            "manifest": self.manifest,
        }


class _ShardCloser:
    """Closes a full shard (the end of its hash, fsync, rename, index file, then its journal entry) in a thread while
    the next shard is written: the fsync of a 1 GB shard took 0.5 s here, ~40 % of the writer loop, which is
    make-shards' ceiling with many workers. One close at a time, so journal entries keep shard order; an error in a
    close is raised in the caller at the next `close` or `wait`.

    A Ctrl-C can land anywhere in `close`, also inside `Thread.start` (before the thread exists, or after it started
    but before `start` returned): the shard is then closed by whichever of the thread and `wait` claims it first
    (`_Close.claim`), never by both, and `wait` never joins a thread that may not exist. A shard whose close fails is
    aborted (its file closed, its `.tmp` deleted, its hashing thread ended)."""

    def __init__(self, journal: Path):
        self.journal = journal
        self._job: _Close | None = None
        self._error: BaseException | None = None

    def close(self, writer: ShardWriter, seg: _Segment, end: int) -> None:
        self.wait()
        self._job = job = _Close(writer, seg, end)  # from here on the writer is this closer's
        threading.Thread(target=self._run, args=(job,), name="shard-close").start()

    def holds(self, writer: ShardWriter | None) -> bool:
        """Whether `writer` was handed to this closer (its caller must not abort it)."""
        return self._job is not None and self._job.writer is writer

    def _run(self, job: _Close) -> None:
        if job.claim.acquire(blocking=False):  # else `wait` took it back: the hand-off was interrupted
            self._do(job)

    def _do(self, job: _Close) -> None:
        try:
            path, n_bytes, sha = job.writer.close()
            _append_line(self.journal, job.seg.entry(job.end, path.name, job.writer.count, n_bytes, sha))
        except BaseException as e:  # raised in the main thread by wait()
            self._error = e
            with contextlib.suppress(BaseException):
                job.writer.abort()
        finally:
            job.done.set()

    def wait(self) -> None:
        job = self._job
        if job is not None:
            if job.claim.acquire(blocking=False):  # its thread has not started (or never will): close it here
                self._do(job)
            job.done.wait()
            self._job = None
        if self._error is not None:
            error, self._error = self._error, None
            raise error


class _Close:
    def __init__(self, writer: ShardWriter, seg: _Segment, end: int):
        self.writer, self.seg, self.end = writer, seg, end
        self.claim = threading.Lock()  # taken by whoever closes the shard: the thread, or `wait` if it is first
        self.done = threading.Event()


def _run_segments(order: list[Item], start: int, shard_index: int, cfg: MakeConfig, journal: Path) -> None:
    limit: ShardLimit = parse_shard_size(cfg.shard_size)
    from tqdm import tqdm

    bar = tqdm(
        total=len(order), initial=start, unit="file", desc="make-shards", file=sys.stderr,
        disable=not cfg.progress, dynamic_ncols=True, smoothing=0.05, **bar_settings(sys.stderr),
    )
    seg, writer, pos = _Segment(start), None, start
    counts = Counter()
    closer = _ShardCloser(journal)
    try:
        for r in ordered_results(order[start:], cfg):
            if r.skipped:
                seg.add(r, None)
                counts["skipped"] += 1
            else:
                if writer is None:
                    writer = ShardWriter(cfg.out, cfg.name, shard_index)
                writer.add(r.key, r.members)
                seg.add(r, writer.final.name)
                counts["written"] += 1
            pos += 1
            bar.update(1)
            if pos % 64 == 0:
                bar.set_postfix(counts, refresh=False)
            if writer is not None and limit.full(writer.n_bytes, writer.count):
                closer.close(writer, seg, pos)
                writer, seg, shard_index = None, _Segment(pos), shard_index + 1
        if writer is not None:  # the last shard, with the inputs skipped after its last sample
            closer.close(writer, seg, pos)
            writer, seg = None, _Segment(pos)
        closer.wait()  # its journal entry before any that follows
        if seg.manifest:  # skipped inputs after the last shard closed
            _append_line(journal, seg.entry(pos, None, 0, 0, None))
    finally:
        bar.set_postfix(counts, refresh=False)  # the final counts: the postfix is only refreshed every 64 files
        bar.close()
        try:
            closer.wait()  # interrupted: the shard being closed is finished (and journaled) first
        finally:
            # interrupted (Ctrl-C, error): leave no half shard under its final name; a writer handed to the closer
            # (a Ctrl-C inside closer.close) is the closer's to finish
            if writer is not None and not closer.holds(writer):
                writer.abort()


def _finalize(disc: Discovery, cfg: MakeConfig, journal: Path, phash: str, order: list[Item]) -> tuple[dict, list[int]]:
    """(stats.json's dict, the written clips per class index). `order`: the inputs in the order the journal lists
    them (its entry covering inputs start..end lists their manifest lines in that order)."""
    spec = get_spec(cfg.frontend)
    out = cfg.out
    per_class = [0] * len(disc.classes)
    # manifest.jsonl is written as the journal is read, one entry at a time: holding every entry with its manifest
    # lines, and the file's text, took ~800 bytes per input (1.6 GB at AudioSet's 2 million files) on top of the
    # inputs themselves, and this was the run's peak. Only the shards' entries are kept, without their lines.
    shards, skipped, flags, n_inputs = [], Counter(), Counter(), 0
    manifest_tmp = out / "manifest.jsonl.tmp"  # as _write_atomic
    with os.fdopen(create_new(manifest_tmp), "w", encoding="utf-8") as f:  # never through a planted link
        for e in iter_journal(journal):
            lines = e.pop("manifest")
            f.writelines(json.dumps(line, sort_keys=True) + "\n" for line in lines)
            for j, line in enumerate(lines):
                if "key" in line:  # written
                    for c in order[e["start"] + j].label_indices:
                        per_class[c] += 1
            n_inputs += len(lines)
            skipped.update(line["skipped"] for line in lines if "skipped" in line)
            flags.update(flag for line in lines for flag in line.get("flags", []))
            if e["shard"] is not None:
                shards.append(e)
    written = sum(e["count"] for e in shards)
    total, total_sq, frames, seconds = 0.0, 0.0, 0, 0.0
    for e in shards:  # always in shard order: the same floating-point sums whether or not the run was resumed
        total += e["sum"]
        total_sq += e["sumsq"]
        frames += e["n_frames"]
        seconds += e["seconds"]
    n_values = frames * spec.n_mels
    mean = total / n_values if n_values else 0.0
    std = float(np.sqrt(max(total_sq / n_values - mean * mean, 0.0))) if n_values else 0.0
    mins = [e["min_clip_frames"] for e in shards if e["min_clip_frames"] is not None]
    stats = {
        "format_version": FORMAT_VERSION,
        "frontend": spec.to_dict(),
        "mean": mean,
        "std": std,
        "n_clips": written,
        "n_frames": frames,
        "hours": seconds / 3600,
        "min_frames": cfg.min_frames,
        "min_clip_frames": min(mins) if mins else None,
        "short": cfg.short,
        "classes": disc.classes,
        "class_ids": disc.class_ids,
        "inputs": n_inputs,
        "written": written,
        "skipped": dict(sorted(skipped.items())),
        "flags": dict(sorted(flags.items())),
        **disc.extra,
        "tool_version": tool_version(),
        "plan_hash": phash,
        "shard_sha256": {e["shard"]: e["sha256"] for e in shards},
    }
    if stats["inputs"] != len(disc.items) or written + sum(skipped.values()) != len(disc.items):
        manifest_tmp.unlink()
        raise RuntimeError(f"internal error: accounted {stats['inputs']} of {len(disc.items)} inputs")
    keep = {e["shard"] for e in shards}
    for p in _shard_files(out, {cfg.name}):  # leftovers of an older, longer run under the same name
        if shard_base(p.name) not in keep:
            p.unlink()
    os.replace(manifest_tmp, out / "manifest.jsonl")
    if written:  # no sizes.json or stats.json for an empty set: it is not a shard set, and nothing locks the folder
        _write_atomic(out / "sizes.json", json.dumps({e["shard"]: e["count"] for e in shards}, indent=1) + "\n")
        _write_atomic(out / "stats.json", json.dumps(stats, indent=1) + "\n")  # last: its presence means "complete"
    return stats, per_class


def nothing_written(stats: dict, cfg: MakeConfig) -> str:
    """The one-line error for a run in which every input was skipped: the reasons and what to do."""
    skipped = stats["skipped"]
    top = max(skipped, key=lambda k: (skipped[k], k))
    spec = get_spec(cfg.frontend)
    hints = {
        "too_short": (
            f"they are shorter than --min-frames {cfg.min_frames} frames (about "
            f"{((cfg.min_frames - 1) * spec.hop_length + spec.n_fft) / spec.sample_rate:.1f} s): pass --short pad "
            "to keep short clips (the loader pads them) or a smaller --min-frames"
            if cfg.short == "drop"
            else "they are too short for even one log-mel frame"
        ),
        "not_in_csv": "no file name matches a segment of the --segments CSVs: check --segments and the file names "
        "under --audio-root (Y<ytid>.<ext>, <ytid>_<start>.<ext>, ...)",
        "needs_pyav": PYAV_HINT,
        "not_found": "the listed files do not exist: check the paths (relative paths start at the CSV's folder)",
        "partial_download": "only unfinished downloads (.part/.ytdl/.temp) were found: let the downloads finish",
        "too_long": f"they are longer than make-shards decodes per file: {TOO_LONG_HINT}",
    }
    hint = hints.get(top, f"most are {top}: check the files")
    reasons = ", ".join(f"{k} {v}" for k, v in sorted(skipped.items(), key=lambda kv: (-kv[1], kv[0])))
    return (
        f"nothing written: all {stats['inputs']} inputs were skipped ({reasons}); {hint}. "
        f"Each file's reason is in {Path(cfg.out) / 'manifest.jsonl'}"
    )


def _planned_hashes(out: Path) -> set:
    """The plan hashes the set (stats.json) and an interrupted run (plan.json) in `out` hold."""
    found = set()
    for path in (out / "stats.json", out / WORK_DIR / "plan.json"):
        if path.is_file():
            with contextlib.suppress(OSError, ValueError, RecursionError):  # RecursionError: nested too deep
                obj = json.loads(path.read_text(encoding="utf-8"))
                if isinstance(obj, dict):
                    found.add(obj.get("plan_hash"))
    return found


def _keep_earlier_m2d_unpadded(hashes, cfg: MakeConfig) -> MakeConfig:
    """An m2d --short pad set (or interrupted run) made before make-shards padded m2d waveforms to 6.1 s, rerun with
    the same command, is recognised (complete) or finished (interrupted) as it was made, unpadded, with a note,
    rather than refused as another plan; the loader pads its short clips with silence. `hashes`: config ->
    `plan_hashes` of the run's inputs."""
    if not cfg.pad_to() or cfg.overwrite:
        return cfg
    out = Path(cfg.out)
    found = _planned_hashes(out)
    if not found:  # nothing planned there to recognise: spare two passes over the inputs
        return cfg
    legacy = dataclasses.replace(cfg, m2d_wave_pad=False)
    if found.intersection(hashes(cfg)) or not found.intersection(hashes(legacy)):
        return cfg
    print(f"note: {out} was made before make-shards zero-padded m2d waveforms to 6.1 s (as M2D's wav_to_lms.py); "
          "it is kept, or finished, unpadded (the loader pads its short clips with silence); pass --overwrite to "
          "remake it padded", file=sys.stderr, flush=True)
    return legacy


def _keep_earlier_m2dbrief(hashes, cfg: MakeConfig) -> MakeConfig:
    """m2d's default --short was drop before it became pad (M2D's authors pad). A folder whose set (or interrupted
    run) was planned with that old default, rerun with the same command and no --short, continues with drop rather
    than being refused as another plan. `hashes`: config -> `plan_hashes` of the run's inputs."""
    if not (getattr(cfg, "_short_defaulted", False) and cfg.frontend == "m2d") or cfg.overwrite:
        return cfg
    out = Path(cfg.out)
    found = _planned_hashes(out)
    if not found:  # nothing planned there to recognise: spare two passes over the inputs
        return cfg
    legacy = dataclasses.replace(cfg, short="drop")
    if found.intersection(hashes(cfg)) or not found.intersection(hashes(legacy)):
        return cfg
    print(f"note: {out} was planned with --short drop (the m2d default before it became pad); continuing with it "
          "(pass --short pad --overwrite to redo it with padding)", file=sys.stderr, flush=True)
    return legacy


def make_shards(disc: Discovery, cfg: MakeConfig) -> dict:
    """Run (or resume, or recognise as done) one shard job. Returns stats.json's dict plus run facts.

    Everything that can be refused (options, inputs, a folder holding someone else's files) is refused before the
    first byte is written; a run that writes no sample raises ValueError and leaves only manifest.jsonl."""
    cfg.validate()
    if not disc.items:
        raise ValueError("no inputs: nothing to convert")
    disc = dataclasses.replace(disc, items=unique_keys(disc.items))  # two clips under one key: verify says CORRUPT
    order = shuffled(disc.items, cfg.seed)
    # Each config's hashes are computed once: a pass over the inputs takes ~15 s at 2 million files, and an m2d
    # run's checks for an earlier set ask for the same config's hashes again.
    hashes = functools.cache(lambda c: plan_hashes(disc, c))
    cfg = _keep_earlier_m2d_unpadded(hashes, _keep_earlier_m2dbrief(hashes, cfg))
    phash, older = hashes(cfg)
    out = Path(cfg.out)
    _make_out_dir(out)
    lock = _lock_out_dir(out)  # held until this process ends (closed with it)
    try:
        return _make_shards_locked(disc, cfg, order, phash, {phash, older}, out)
    finally:
        close_lock_fd(lock)


def _lock_out_dir(out: Path) -> int:
    """An exclusive flock on the --out folder itself (no lock file to leave behind): two make-shards writing one
    folder at once (a double submit, a requeued job) would delete each other's half-written shards. The kernel drops
    the lock when the process dies, so a killed run never leaves a stale one (forked children do not inherit the
    descriptor: `matpac_fast.locks`). Returns the descriptor to close with `close_lock_fd`."""
    fd = open_lock_fd(out, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        close_lock_fd(fd)
        raise ValueError(f"another make-shards is writing --out {out}: wait for it to end (then run this command "
                         "again to check or finish the set) or choose another --out") from None
    except OSError as e:  # a filesystem without flock (some network mounts): run unlocked, but say so
        print(f"make-shards: warning: cannot lock --out {out} ({e.strerror}); do not run two make-shards into it at "
              "once", file=sys.stderr)
    return fd


def _check_complete_set(out: Path, stats: dict) -> None:
    """A cheap look before "already complete": every shard stats.json lists is there and has a tar's shape (a
    whole number of 512-byte blocks, at least a header, ending in the tar's end marker of two zero blocks). A
    shard cut short on a 4 KiB page boundary (a full disk, a copy killed part way) keeps a whole number of
    blocks, so the end marker is what catches it: ShardWriter's tarfile always writes it, while a cut lands in
    member data. Hashing a corpus-sized set would take the time of a verify-shards run; that is the check the
    error points to."""
    bad = []
    for name in sorted(stats.get("shard_sha256") or {}):
        path = out / name
        try:
            size = path.stat().st_size
        except OSError:
            bad.append(f"{name} (missing)")
            continue
        if size < 1024 or size % 512:
            bad.append(f"{name} ({size} bytes: not a whole tar)")
            continue
        try:
            with open(path, "rb") as f:
                f.seek(size - 1024)
                tail = f.read(1024)
        except OSError as e:
            bad.append(f"{name} (unreadable: {e.strerror})")
            continue
        if tail.count(0) != 1024:
            bad.append(f"{name} (no tar end marker: cut short)")
    if bad:
        more = f" and {len(bad) - 3} more" if len(bad) > 3 else ""
        raise ValueError(
            f"{out} holds this command's complete set, but {', '.join(bad[:3])}{more} "
            f"{'is' if len(bad) == 1 else 'are'} damaged; run verify-shards "
            f"{out} for the full list, then rerun with --overwrite to rebuild the set"
        )


def _add_missing_indexes(out: Path, stats: dict, progress: bool) -> tuple[int, str | None]:
    """Index files for the shards of a complete set made before make-shards wrote them (without one, the loader walks
    a shard's headers at every epoch start: a random read per clip on a cold cache). Returns how many were written
    and, when some could not be written, why; a shard whose headers cannot be walked gets none (verify-shards says
    what is wrong with it)."""
    from tqdm import tqdm

    names = sorted(stats.get("shard_sha256") or {})
    missing = [out / name for name in names if not os.path.exists(index_path(out / name))]
    written = 0
    bar = tqdm(missing, desc="indexing shards", unit="shard", file=sys.stderr, disable=not (progress and missing))
    for path in bar:
        try:
            keys, refs, size = walk_file(path)
        except (OSError, ShardError):
            continue
        try:
            write_index(path, keys, refs, size)
        except OSError as e:
            # A read-only folder (a shared set) or a full disk: the set is complete and index files are optional, so
            # this is no error (it was one, "Permission denied ... run the same command again to finish", exit 1).
            Path(f"{index_path(path)}.tmp").unlink(missing_ok=True)
            return written, f"{len(missing) - written} could not be written ({e.strerror or e})"
        written += 1
    return written, None


def _make_shards_locked(disc: Discovery, cfg: MakeConfig, order: list[Item], phash: str, accepted: set[str],
                        out: Path) -> dict:
    _check_no_foreign_files(out)
    work, stats_path, journal = out / WORK_DIR, out / "stats.json", out / WORK_DIR / "journal.jsonl"
    if work.is_symlink():  # the plan and journal would be written into (and the folder deleted at) its target
        raise ValueError(f"{work} is a symbolic link, which make-shards never writes through: delete the link (not "
                         "its target), or choose another --out")
    if cfg.overwrite:
        _clear(out, cfg.name)
    if stats_path.exists():
        old, _ = _read_json(stats_path)
        if old.get("plan_hash") in accepted and old.get("written"):
            _check_complete_set(out, old)
            if work.is_dir():  # killed after stats.json was written, before the clean-up
                shutil.rmtree(work)
            indexed, unindexed = _add_missing_indexes(out, old, cfg.progress)
            return {**old, "out": str(out), "resumed_from": len(disc.items), "already_complete": True,
                    "indexed_now": indexed, "unindexed": unindexed}
        if old.get("written"):
            raise ValueError(f"{out} already holds a different shard set (other options, or inputs added, removed, "
                             "modified or relabelled since); choose another --out or pass --overwrite")
        # an empty set left by an older version (no shards: _stats_not_ours): its files go, but no shard-named file,
        # which is someone else's (one of this run's name is refused first, as _open_plan does)
        _refuse_unknown_shards(out, cfg.name)
        _clear(out, cfg.name, shards=False)
    _open_plan(out, cfg, phash, accepted, settings_hash(disc, cfg), len(disc.items))
    for p in _shard_files(out, {cfg.name}):  # a shard the killed run was writing
        if p.name.endswith(".tmp"):
            p.unlink()
    journaled = _read_and_trim_journal(journal)  # cut back to its whole entries before anything is appended to it
    entries = _valid_prefix(journaled, out)
    if len(entries) != len(journaled):  # rewrite the journal without the entries we cannot trust
        _write_atomic(journal, "".join(json.dumps(e, sort_keys=True) + "\n" for e in entries))
    start = entries[-1]["end"] if entries else 0
    shard_index = sum(1 for e in entries if e["shard"] is not None)
    # A resumed run held the journal twice here (parsed twice), then once for the whole run; _finalize reads it again
    del journaled, entries
    if start < len(order):
        _run_segments(order, start, shard_index, cfg, journal)
    stats, per_class = _finalize(disc, cfg, journal, phash, order)
    shutil.rmtree(work)
    if not stats["written"]:
        raise ValueError(nothing_written(stats, cfg))
    # Not in stats.json: the loader pools the stats.json of several sets, where a per-set list would be stale.
    empty = [c for c, n in zip(disc.classes, per_class) if n == 0]
    return {**stats, "out": str(out), "resumed_from": start, "already_complete": False,
            "classes_without_clips": empty}


def format_summary(s: dict) -> str:
    skipped = s["skipped"]
    parts = [
        f"inputs {s['inputs']}  written {s['written']}  skipped {sum(skipped.values())}"
        + (" (" + ", ".join(f"{k} {v}" for k, v in skipped.items()) + ")" if skipped else ""),
    ]
    if s.get("segments"):
        parts.append("AudioSet " + segments_line(s["segments"]))
    if s.get("flags"):
        parts.append("flags (kept): " + ", ".join(f"{k} {v}" for k, v in s["flags"].items()))
    if s.get("classes_without_clips"):
        parts.append(classes_without_line("classes without a written clip", s["classes_without_clips"], s["classes"])
                     + "; their label indices stay, so a probe on this set has no example of them (manifest.jsonl "
                     "says why files were skipped)")
    parts.append(
        f"shards {len(s['shard_sha256'])} in {s['out']}  hours {s['hours']:.3f}  frames {s['n_frames']}  "
        f"log-mel mean {s['mean']:.4f} std {s['std']:.4f}"
    )
    if s.get("already_complete"):
        head = "already complete (same inputs and options)"
        if s.get("indexed_now"):
            head += f"; wrote the index files of {s['indexed_now']} shard(s) made before make-shards wrote them"
        if s.get("unindexed"):  # a read-only folder: the set is complete, the index files are optional
            head += (f"; index files of shards made before make-shards wrote them: {s['unindexed']}, so the loader "
                     "reads those shards' headers instead")
        parts.insert(0, head if s.get("indexed_now") or s.get("unindexed") else f"{head}: nothing to do")
    elif s.get("resumed_from"):
        parts.insert(0, f"resumed an interrupted run at input {s['resumed_from']}")
    return "\n".join(parts)
