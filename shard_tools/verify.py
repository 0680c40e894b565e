"""`verify-shards DIR`: read every sample of a shard set and check it against docs/CONTRACTS.md.

Checks: sizes.json lists exactly the shard files; each shard's sha256 matches stats.json (catches any flipped
byte); each tar reads to the end; each sample has exactly one .npy and one .json; the npy is float16 (n_mels, T)
with finite values and T equal to the json's n_frames; the json has the contract's fields and its key; keys are
unique in the set; label indices agree with stats.json's classes and point at the labels in its class_ids; counts,
frames agree with stats.json, and so do its mean, std and shortest clip, recomputed from the shards (the hashes,
kept in stats.json, do not cover it); a shard's index file (`<shard>.tar.idx`, where there is one) describes
exactly its members.
Prints counts, hours and a label histogram; exit status 1 on any problem.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import io
import json
import math
import os
import re
import sys
import tarfile
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import NoReturn

import numpy as np

from matpac_fast.cli_args import bar_settings, finite_number, usable_cpus
from matpac_fast.data_tar import ShardError, index_path, read_index_file, shard_set_subfolder_hint, walk_file
from matpac_fast.interrupts import INTERRUPTED, run_main
from matpac_fast.safe_files import JSON_MAX_BYTES, read_regular
from shard_tools.workpool import WorkerDied, ordered_map
from shard_tools.writer import sha256_file

JSON_FIELDS = {
    "key": str,
    "source": str,
    "labels": list,
    "label_indices": list,
    "source_sr": int,
    "duration": (int, float),
    "n_frames": int,
    "flags": list,
}
JSON_OPTIONAL = ("ytid", "start", "end")
MAX_REPORTED = 20
NO_LABEL = "(no label)"  # the histogram's row of the samples without a label: not a class
WORK_DIR = ".make-shards"  # = pipeline.WORK_DIR (not imported: verify must not pull in torch)
# <name>-000000.tar: what make-shards writes (pipeline uses this one). \Z, not $ (which also matches before a final
# newline), and ASCII digits, not \d (any script's): a name read from sizes.json or stats.json is a plain file name
# of this form, never a path, or no shard of the set.
SHARD_RE = re.compile(r"^(?P<name>[A-Za-z0-9_-]+)-[0-9]{6}\.tar\Z")
# manifest.jsonl's lines as make-shards writes them: a written input, or a skipped one (pipeline._Segment.add)
MANIFEST_WRITTEN, MANIFEST_SKIPPED = {"source", "key", "shard", "flags"}, {"source", "skipped", "detail"}


@dataclass
class Report:
    problems: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)  # worth knowing, but the set is intact
    interrupted: str | None = None  # a make-shards run that has not finished: not corrupt, incomplete
    not_a_set: str | None = None  # the folder holds no shard set at all (empty, or someone else's files)
    n_shards: int = 0
    n_samples: int = 0
    n_frames: int = 0
    seconds: float = 0.0
    # the log-mel values' sum and sum of squares (float64, clip by clip, shard by shard: as make-shards sums them for
    # stats.json's mean and std) and the shortest clip, to check those stats.json fields
    value_sum: float = 0.0
    value_sumsq: float = 0.0
    min_clip_frames: int | None = None
    labels: Counter = field(default_factory=Counter)
    flags: Counter = field(default_factory=Counter)
    hop_s: float = 0.01
    stats: dict = field(default_factory=dict)  # stats.json as read, less any damaged field (for the report)
    raw_stats: object = None  # stats.json as read (None: not read; not a dict: unreadable or damaged, reported)

    @property
    def ok(self) -> bool:
        return not self.problems and self.interrupted is None and self.not_a_set is None

    def to_dict(self) -> dict:
        verdicts = [v for v in (self.interrupted, self.not_a_set) if v]
        return {
            "ok": self.ok,
            "problems": list(self.problems) + verdicts,
            "warnings": list(self.warnings),
            "shards": self.n_shards,
            "samples": self.n_samples,
            "frames": self.n_frames,
            "hours": self.seconds / 3600,
            "labels": dict(self.labels.most_common()),
            "flags": dict(self.flags),
        }


_UNREADABLE = object()  # _load_json's answer for a missing or invalid file (already reported); JSON null is None


def _load_json(path: Path, report: Report):
    try:
        # a regular file of a bounded size: a link to /dev/zero was read until memory ran out
        return json.loads(read_regular(path, JSON_MAX_BYTES).decode("utf-8"))
    except FileNotFoundError:
        report.problems.append(f"{path.name} is missing")
    except OSError as e:
        report.problems.append(f"{path.name} is unreadable: {e.strerror or e}")
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as e:  # RecursionError: nested too deep
        report.problems.append(f"{path.name} is not valid JSON: {e}")
    return _UNREADABLE


def _check_sample(key: str, members: dict[str, bytes], n_mels: int, n_classes: int | None, where: str,
                  class_ids: list[str] | None = None) -> tuple[list[str], np.ndarray | None, dict | None]:
    """(the sample's problems, and when it has none its log-mel array and json). `class_ids`: stats.json's, the label
    each class index stands for in the samples' "labels"."""
    errs = []
    if set(members) != {"npy", "json"}:
        return [f"{where}: sample {key!r} has members {sorted(members)}, expected ['json', 'npy']"], None, None
    try:
        arr = np.load(io.BytesIO(members["npy"]), allow_pickle=False)
    except Exception as e:  # a damaged npy header can raise ValueError, OSError, EOFError...
        return [f"{where}: sample {key!r}: npy unreadable ({type(e).__name__}: {e})"], None, None
    try:
        meta = json.loads(members["json"].decode("utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as e:  # RecursionError: nested too deep
        return [f"{where}: sample {key!r}: json unreadable ({e})"], None, None
    if arr.dtype != np.float16:
        errs.append(f"{where}: sample {key!r}: dtype {arr.dtype}, expected float16")
    if arr.ndim != 2 or arr.shape[0] != n_mels or arr.shape[1] < 1:
        errs.append(f"{where}: sample {key!r}: shape {arr.shape}, expected ({n_mels}, T>=1)")
    elif arr.dtype.kind in "biufc" and not np.isfinite(arr).all():  # (a string or void npy: its dtype is reported)
        errs.append(f"{where}: sample {key!r}: non-finite values")
    if not isinstance(meta, dict):
        return errs + [f"{where}: sample {key!r}: json is not an object"], None, None
    for name, typ in JSON_FIELDS.items():
        if not isinstance(meta.get(name), typ):
            errs.append(f"{where}: sample {key!r}: json field {name!r} missing or not {typ}")
    if any(name not in meta for name in JSON_OPTIONAL):
        errs.append(f"{where}: sample {key!r}: json lacks one of {JSON_OPTIONAL}")
    duration = meta.get("duration")
    if isinstance(duration, int | float) and not (finite_number(duration) and duration >= 0):
        # NaN made the report's hours nan and still said OK (10**400 raised OverflowError in the sum)
        errs.append(f"{where}: sample {key!r}: json duration {brief(meta['duration'])}, expected seconds >= 0")
    for name in ("labels", "flags"):  # counted in the report's histograms: a list or object there was a traceback
        if name in meta and isinstance(meta[name], list) and not all(isinstance(x, str) for x in meta[name]):
            errs.append(f"{where}: sample {key!r}: json field {name!r} holds something other than strings")
    if errs:
        return errs, None, None
    if meta["key"] != key:
        errs.append(f"{where}: sample {key!r}: json key is {meta['key']!r}")
    if arr.ndim == 2 and meta["n_frames"] != arr.shape[1]:
        errs.append(f"{where}: sample {key!r}: json n_frames {meta['n_frames']} != npy frames {arr.shape[1]}")
    idx = meta["label_indices"]
    if len(idx) != len(meta["labels"]) or any(not isinstance(i, int) for i in idx):
        errs.append(f"{where}: sample {key!r}: labels and label_indices disagree")
    elif n_classes is not None and any(i < 0 or i >= n_classes for i in idx):
        errs.append(f"{where}: sample {key!r}: label index out of range 0..{n_classes - 1}")
    elif class_ids is not None and any(not 0 <= i < len(class_ids) or class_ids[i] != lab
                                       for i, lab in zip(idx, meta["labels"])):
        # the hashes cover the samples, not stats.json: a reordered or edited class list mislabelled every index
        errs.append(f"{where}: sample {key!r}: its labels {brief(meta['labels'])} are not stats.json's class_ids at "
                    f"its label_indices {brief(idx)}")
    return (errs, None, None) if errs else ([], arr, meta)


class _HashingReader:
    """The file object tarfile reads a shard through: every byte is hashed as it goes by, once, so a shard is read
    once for its members and its sha256 (it was read twice: a corpus-sized set read twice from the device). tarfile
    only seeks forward here (to a header, to a payload); a forward seek reads the bytes it skips. Should it ever seek
    back, `hexdigest` returns None and the caller hashes the file on its own."""

    def __init__(self, f):
        self.f, self.h, self.pos, self.whole = f, hashlib.sha256(), 0, True
        try:
            self.size = os.fstat(f.fileno()).st_size
        except OSError:  # (io.UnsupportedOperation: an in-memory file) no bound for the reads
            self.size = None

    def read(self, n: int = -1) -> bytes:
        if n is not None and n > 0 and self.size is not None:
            # tarfile reads a member (or a GNU long name) by its header's size: a base-256 size of 2**80 raised
            # OverflowError (a traceback), and 8 GiB on a small file allocated 8 GiB. No read goes past the file's end.
            n = min(n, max(self.size - self.pos, 0))
        data = self.f.read(n)
        self.h.update(data)
        self.pos += len(data)
        return data

    def seek(self, pos: int, whence: int = 0) -> int:
        if whence == 1:
            pos += self.pos
        elif whence == 2:
            pos += self.size if self.size is not None else os.fstat(self.f.fileno()).st_size
        while self.whole and pos > self.pos:
            if not self.read(min(pos - self.pos, 1 << 20)):
                break  # past the end of the file
        if pos != self.pos:
            self.whole = False  # backwards (or past the end): the hash no longer covers the file once, in order
            self.pos = self.f.seek(pos)
        return self.pos

    def tell(self) -> int:
        return self.pos

    def hexdigest(self) -> str | None:
        """sha256 of the whole file (the rest read here), or None when the reads were not one forward pass."""
        while self.whole and self.read(1 << 20):
            pass
        return self.h.hexdigest() if self.whole else None


def _stats_differ(stats: dict, report: Report, n_mels: int) -> list[str]:
    """stats.json's figures that the shards' contents do not give: the mean and std that an M2D run normalises by
    (a changed digit went unnoticed: the hashes cover the shards, not stats.json) and the shortest clip, recomputed
    as make-shards has always computed them; a tolerance for summation order only. Not the hours: make-shards before
    8e82ff4 counted the length of the waves it made the log-mels from (m2d: zero-padded to 6.1 s), which the shards
    do not hold, so an intact older set would read as CORRUPT; and nothing reads that figure."""
    problems = []
    n_values = report.n_frames * n_mels
    if n_values and _is_number(stats.get("mean")) and _is_number(stats.get("std")):
        mean = report.value_sum / n_values
        std = math.sqrt(max(report.value_sumsq / n_values - mean * mean, 0.0))
        for name, got in (("mean", mean), ("std", std)):
            if not math.isclose(stats[name], got, rel_tol=1e-7, abs_tol=1e-9):
                problems.append(f"stats.json says {name} {stats[name]!r}, the shards' log-mels give {got!r} (the file "
                                "was edited or damaged; an M2D run normalises by it): rebuild the set with make-shards")
    shortest = stats.get("min_clip_frames")
    if _is_count(shortest) and report.min_clip_frames is not None and shortest != report.min_clip_frames:
        problems.append(f"stats.json says the shortest clip has {shortest} frames, the shards' has "
                        f"{report.min_clip_frames}")
    return problems


def _read_shard(path: Path, report: Report, keys: list[str], n_mels: int, classes: list[str] | None,
                hasher: list | None = None, class_ids: list[str] | None = None) -> int:
    """Check every sample of one shard; returns the number of samples read. Its distinct keys are appended to
    `keys` in tar order (a key repeated inside the shard is reported here; across shards, by the caller). With
    `hasher` (a list), the shard's sha256 computed on the way is appended to it (None: the read was not one
    forward pass)."""
    count = 0
    current, members = None, {}
    seen: set[str] = set()

    def flush():
        nonlocal count
        if current is None:
            return
        count += 1
        if current in seen:
            report.problems.append(f"{path.name}: key {current!r} appears more than once in the set")
        else:
            seen.add(current)
            keys.append(current)
        errs, arr, meta = _check_sample(current, members, n_mels, len(classes) if classes else None, path.name,
                                        class_ids)
        report.problems.extend(errs)
        if not errs:
            values = arr.astype(np.float64)  # make-shards' own sums (pipeline.featurize)
            report.value_sum += float(values.sum())
            report.value_sumsq += float(np.square(values).sum())
            frames = arr.shape[1]
            report.min_clip_frames = frames if report.min_clip_frames is None else min(report.min_clip_frames, frames)
            report.n_frames += meta["n_frames"]
            report.seconds += meta["duration"]
            for i, lab in zip(meta["label_indices"], meta["labels"]):
                report.labels[classes[i] if classes else lab] += 1
            if not meta["labels"]:
                report.labels[NO_LABEL] += 1
            report.flags.update(meta["flags"])

    end = 0  # where the last member's padded payload ends: the end-of-archive block must follow
    try:
        with open(path, "rb") as raw:
            reader = _HashingReader(raw)
            tar = tarfile.open(fileobj=reader, mode="r:")
            for info in tar:
                end = info.offset_data + (info.size + 511) // 512 * 512
                # A sparse member reads as its declared size, holes filled with zeros: a few bytes of shard
                # would become gigabytes in memory (and the loader does not read sparse members).
                if not info.isfile() or info.issparse():
                    report.problems.append(f"{path.name}: member {info.name!r} is not a regular file")
                    continue
                base = info.name.rsplit("/", 1)[-1]
                if "." not in base:
                    report.problems.append(f"{path.name}: member {info.name!r} has no extension")
                    continue
                key, ext = base.split(".", 1)
                if key != current:
                    flush()
                    current, members = key, {}
                if ext in members:
                    report.problems.append(f"{path.name}: sample {key!r} has two .{ext} members")
                f = tar.extractfile(info)
                members[ext] = f.read() if f else b""
            flush()
            if hasher is not None:
                hasher.append(reader.hexdigest())
        # tarfile accepts a file cut right after a member; the loader does not (it drops the whole shard), so
        # neither does this check, with or without --no-hash.
        with open(path, "rb") as f:
            f.seek(end)
            if f.read(512) != bytes(512):
                report.problems.append(f"{path.name}: truncated tar (no end-of-archive marker after the last member)")
    except (tarfile.TarError, OSError, EOFError, OverflowError) as e:  # Overflow: a header's size past any offset
        report.problems.append(f"{path.name}: unreadable tar ({type(e).__name__}: {e})")
    return count


def _check_sizes(sizes, report: Report) -> dict | None:
    """sizes.json as {shard file: sample count >= 0}, or None (with the problem reported) when it is not."""
    if not isinstance(sizes, dict):
        if sizes is not _UNREADABLE:
            report.problems.append(f"sizes.json is damaged: a JSON object {{shard: sample count}} was expected, "
                                   f"found {brief(sizes)}")
        return None
    bad = [k for k, n in sizes.items() if isinstance(n, bool) or not isinstance(n, int) or n < 0]
    if bad:
        report.problems.append(f"sizes.json is damaged: shard {bad[0]} has count {brief(sizes[bad[0]])}; counts are "
                               "integers >= 0")
        return None
    odd = [k for k in sizes if not SHARD_RE.match(k)]
    if odd:  # '../x.tar' or '/abs/x.tar' named a file outside the set (the loader refuses the set too)
        report.problems.append(f"sizes.json is damaged: shard name {brief(odd[0])} is not a file name in the set's "
                               "folder of the form <name>-NNNNNN.tar")
        return None
    return sizes


def _is_count(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= 0


def _is_number(v) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool)


# stats.json fields this check and its report read, with the shape make-shards writes. A field of another shape is
# a damaged file: reported as a problem and left out, rather than a traceback where it is first used. (The loader's
# matpac_fast.data._check_meta checks the fields it reads, raising; that module imports torch, which verify-shards
# must not, and it stops at the first problem where this lists them all.)
_STATS_FIELDS = {
    "frontend": ("a JSON object with n_mels >= 1", lambda v: isinstance(v, dict) and _is_count(v.get("n_mels", 1))
                 and v.get("n_mels", 1) >= 1),
    "classes": ("a list of strings or null", lambda v: v is None or (isinstance(v, list)
                                                                    and all(isinstance(c, str) for c in v))),
    "class_ids": ("a list of strings or null", lambda v: v is None or (isinstance(v, list)
                                                                      and all(isinstance(c, str) for c in v))),
    # its names are joined onto the set's folder (make-shards indexes the shards of a complete set): '../x.tar' or
    # '/abs/x.tar' made make-shards write x.tar.idx outside --out, and verify-shards said OK
    "shard_sha256": ("a JSON object {<name>-NNNNNN.tar: hex digest}", lambda v: isinstance(v, dict)
                     and all(SHARD_RE.match(k) and isinstance(h, str) for k, h in v.items())),
    "skipped": ("a JSON object {reason: count}", lambda v: isinstance(v, dict) and all(map(_is_count, v.values()))),
    "inputs": ("an integer >= 0", _is_count),
    "written": ("an integer >= 0", _is_count),
    "n_frames": ("an integer >= 0", _is_count),
    # M2D's recipe normalises with them: NaN or a negative std is damage (the loader refuses them too); a std of 0 is
    # a set of constant clips, which the loader reads and only an m2d run refuses
    "mean": ("a finite number", lambda v: finite_number(v)),
    "std": ("a finite number >= 0", lambda v: finite_number(v) and v >= 0),
}


def _clean_stats(stats, report: Report) -> dict:
    """stats.json without its damaged fields (each one reported)."""
    if not isinstance(stats, dict):
        if stats is not _UNREADABLE:
            report.problems.append(f"stats.json is damaged: a JSON object was expected, found {brief(stats)}")
        return {}
    clean = dict(stats)
    for name, (shape, ok) in _STATS_FIELDS.items():
        if name in clean and not ok(clean[name]):
            report.problems.append(f"stats.json is damaged: {name!r} is {brief(clean[name])}, expected {shape}")
            del clean[name]
    return clean


def brief(v) -> str:
    """`v` as JSON, shortened to 60 characters for a one-line report."""
    text = json.dumps(v)
    return text if len(text) <= 60 else text[:57] + "..."


def is_make_shards_stats(obj) -> bool:
    """stats.json as make-shards writes it: format_version with tool_version or plan_hash (someone else's has
    neither)."""
    return isinstance(obj, dict) and "format_version" in obj and ("tool_version" in obj or "plan_hash" in obj)


def is_manifest_line(line) -> bool:
    """A line of manifest.jsonl as make-shards writes it: source with key and shard (a written input) or with skipped
    (a skipped one), and no other field. A user's manifest (source, path, license, ...) is not one. make-shards
    replaces a manifest.jsonl only when this says its first line is its own."""
    if not isinstance(line, dict) or not isinstance(line.get("source"), str):
        return False
    if "skipped" in line:
        return set(line) <= MANIFEST_SKIPPED and isinstance(line["skipped"], str)
    return set(line) <= MANIFEST_WRITTEN and isinstance(line.get("key"), str) and isinstance(line.get("shard"), str)


def _foreign(path: Path) -> bool:
    """True when `path` (stats.json, sizes.json or manifest.jsonl) is valid JSON that make-shards did not write.
    Unreadable or invalid JSON is not called foreign: it may be a damaged file of a set, reported as such."""
    try:
        if path.name == "manifest.jsonl":
            with open(path, "rb") as f:
                first = f.readline(JSON_MAX_BYTES)  # capped: a first line of gigabytes was read whole
            if not first.strip():
                return False  # an empty manifest: nothing to tell
            return not is_manifest_line(json.loads(first))
        obj = json.loads(read_regular(path, JSON_MAX_BYTES).decode("utf-8"))
    except (OSError, json.JSONDecodeError, UnicodeDecodeError, RecursionError):
        return False
    if path.name == "stats.json":
        return not is_make_shards_stats(obj)
    return not (isinstance(obj, dict) and all(SHARD_RE.match(k) and isinstance(v, int) for k, v in obj.items()))


def _not_a_set(out: Path) -> str | None:
    """Why `out` holds no shard set at all (and no interrupted run), or None."""
    stats, sizes, manifest = out / "stats.json", out / "sizes.json", out / "manifest.jsonl"
    for path in (stats,) if stats.is_file() else (sizes, manifest):  # make-shards writes stats.json last
        if path.is_file() and _foreign(path):
            return f"{path} is not a make-shards file; this folder holds no shard set"
    if not sizes.exists() and not stats.exists():
        why = "it has no sizes.json or stats.json"
        if manifest.is_file():
            why = "make-shards wrote no sample there; manifest.jsonl gives each file's reason"
        elif sub := shard_set_subfolder_hint(out):
            why += f", but {sub}"
        return f"{out} is not a shard set: {why}"
    return None


def _being_written(out: Path) -> bool:
    """True while a make-shards run holds `out`'s lock (pipeline._lock_out_dir: an exclusive flock on the folder).
    Read from Linux's /proc/locks, not probed with a lock of our own: a make-shards starting in that instant would
    find the folder locked and refuse to run. Without /proc/locks: False (the run is called interrupted)."""
    try:
        st = os.stat(out)
        table = Path("/proc/locks").read_text()
    except OSError:
        return False
    ident = f"{os.major(st.st_dev):02x}:{os.minor(st.st_dev):02x}:{st.st_ino}"
    return any(f[1:2] == ["FLOCK"] and len(f) > 5 and f[5] == ident for f in map(str.split, table.splitlines()))


def _interrupted(out: Path) -> str | None:
    """Why `out` holds a make-shards run that has not finished, or None."""
    if (out / "stats.json").is_file():
        return None  # stats.json is written last: the set is complete (a leftover .make-shards/ is only clean-up)
    if (out / WORK_DIR).is_dir() or any(SHARD_RE.match(p.name.removesuffix(".tmp")) for p in out.glob("*.tar.tmp")):
        if _being_written(out):  # not interrupted: running (rerunning it now would be refused)
            return f"{out} is being written by a make-shards run now; verify it once that run has ended"
        return (
            f"{out} holds an interrupted make-shards run (no stats.json yet); run the same make-shards command "
            "again to finish it"
        )
    return None


def _other_tars(out: Path, sizes: dict, report: Report) -> None:
    """.tar files not in sizes.json: a stale shard of this set is a problem; any other .tar is only a warning
    (the loader reads sizes.json and ignores it too)."""
    names = {m["name"] for m in map(SHARD_RE.match, sizes) if m}
    for p in sorted(out.glob("*.tar.idx")):
        if p.name.removesuffix(".idx") not in sizes:
            report.warnings.append(f"{p.name} is the index of no shard of this set (not in sizes.json); ignored")
    for p in sorted(out.glob("*.tar")) + sorted(out.glob("*.tar.tmp")):
        if p.name in sizes:
            continue
        m = SHARD_RE.match(p.name.removesuffix(".tmp"))
        if m and m["name"] in names:
            report.problems.append(f"{p.name} looks like a shard of this set but is not in sizes.json")
        else:
            report.warnings.append(f"{p.name} is not part of this shard set (not in sizes.json); ignored")


def _check_shard(job) -> tuple[str, Report, list[str]]:
    """One shard's checks (a worker's job): (name, its partial Report, its keys in tar order)."""
    out, name, digest, listed, n_mels, classes, class_ids = job
    part, keys = Report(), []
    path = out / name
    if not path.is_file():
        part.problems.append(f"{name} is listed in sizes.json but missing")
        return name, part, keys
    hashed: list = []
    part.n_samples = _read_shard(path, part, keys, n_mels, classes, hashed if digest else None, class_ids)
    if digest == "":
        part.problems.insert(0, f"{name} has no sha256 in stats.json: its content cannot be checked")
    elif digest is not None and ((hashed[0] if hashed and hashed[0] else sha256_file(path)) != digest):
        # (a read that stopped early, or was not one forward pass, hashed nothing: the whole file is read for it)
        part.problems.insert(0, f"{name}: sha256 differs from stats.json (the file was changed or damaged)")
    if part.n_samples != listed:
        part.problems.append(f"{name}: {part.n_samples} samples, sizes.json says {listed}")
    if os.path.exists(index_path(path)):
        part.problems += _check_index(path)
    return name, part, keys


def _check_index(path: Path) -> list[str]:
    """A shard's index file against the loader's own walk of the shard's headers: the loader trusts the file's
    table (each member's header is checked as it is read, and a mismatch costs a walk and a warning)."""
    fix = "delete it (the loader then reads the shard's headers), or rebuild the set with make-shards --overwrite"
    try:
        keys, refs, size = walk_file(path)
    except (OSError, ShardError):
        return []  # the shard itself is unreadable: reported by its read
    try:
        got_keys, got_refs = read_index_file(path, size)
    except ShardError as e:
        return [f"{path.name}.idx cannot be used ({e}): {fix}"]
    if got_keys != keys or not np.array_equal(got_refs, refs):
        return [f"{path.name}.idx does not match its shard (another shard's, or an older one's): {fix}"]
    return []


@contextlib.contextmanager
def _shard_checks(jobs: list, workers: int):
    """_check_shard over `jobs`, results in job order: in this process for one worker (or one shard), else in
    `workers` spawned processes (hashing and parsing are CPU-bound; spawn, as make-shards: no fork of a process that
    may hold threads). Ctrl-C is this process's: it ends the workers, which ignore it."""
    workers = max(1, min(workers, len(jobs)))
    if workers == 1:
        yield map(_check_shard, jobs)
        return
    with contextlib.closing(ordered_map(_check_shard, jobs, workers, ahead=4 * workers)) as results:
        yield results  # done, or left early (an error, Ctrl-C): no worker outlives the check


def verify(out_dir: str | Path, check_hashes: bool = True, progress: bool = True, workers: int = 1) -> Report:
    """Check the shard set in `out_dir` (every shard; `workers` processes check shards in parallel)."""
    out = Path(out_dir)
    report = Report()
    if not out.is_dir():
        report.problems.append(f"{out} is not a folder")
        return report
    report.interrupted = _interrupted(out)
    if report.interrupted:
        return report
    report.not_a_set = _not_a_set(out)
    if report.not_a_set:
        return report
    sizes = _check_sizes(_load_json(out / "sizes.json", report), report)
    report.raw_stats = _load_json(out / "stats.json", report)
    stats = report.stats = _clean_stats(report.raw_stats, report)
    if sizes is None:
        return report
    n_mels = int(stats.get("frontend", {}).get("n_mels", 80))
    classes = stats.get("classes")
    hashes = stats.get("shard_sha256", {})
    if check_hashes and sizes and isinstance(report.raw_stats, dict) and "shard_sha256" not in report.raw_stats:
        report.problems.append("stats.json has no shard_sha256, so the shards' contents cannot be checked: rebuild "
                               "the set with make-shards, or pass --no-hash to check the rest")
    unsized = sorted(set(hashes) - set(sizes))
    if unsized:  # make-shards lists each shard in both
        more = f" and {len(unsized) - 1} more" if len(unsized) > 1 else ""
        report.problems.append(f"stats.json lists shard {brief(unsized[0])}{more} that sizes.json does not")
    _other_tars(out, sizes, report)
    from tqdm import tqdm

    # _check_shard's jobs; a shard's expected sha256 is None for no check, "" when stats.json has none for it
    check = check_hashes and "shard_sha256" in stats
    class_ids = stats.get("class_ids")
    if isinstance(classes, list) and isinstance(class_ids, list) and len(class_ids) != len(classes):
        report.problems.append(f"stats.json lists {len(classes)} classes but {len(class_ids)} class_ids")
        class_ids = None
    jobs = [(out, name, hashes.get(name, "") if check else None, sizes[name], n_mels, classes, class_ids)
            for name in sorted(sizes)]
    seen: set[str] = set()
    with _shard_checks(jobs, workers) as results:
        for name, part, keys in tqdm(results, total=len(jobs), desc="verify-shards", unit="shard", file=sys.stderr,
                                     disable=not progress, **bar_settings(sys.stderr)):
            report.n_shards += 1
            report.problems += part.problems
            # a key repeated inside one shard is reported by its check; across shards, here
            report.problems += [f"{name}: key {k!r} appears more than once in the set" for k in keys if k in seen]
            seen.update(keys)
            report.n_samples += part.n_samples
            report.n_frames += part.n_frames
            report.seconds += part.seconds
            report.value_sum += part.value_sum
            report.value_sumsq += part.value_sumsq
            if part.min_clip_frames is not None:
                report.min_clip_frames = min(report.min_clip_frames or part.min_clip_frames, part.min_clip_frames)
            report.labels.update(part.labels)
            report.flags.update(part.flags)
    if stats:
        if "written" in stats and stats["written"] != report.n_samples:  # absent: damaged, reported above
            report.problems.append(
                f"stats.json says {stats.get('written')} clips written, shards hold {report.n_samples}"
            )
        if "n_frames" in stats and stats["n_frames"] != report.n_frames and not report.problems:
            report.problems.append(f"stats.json says {stats.get('n_frames')} frames, shards hold {report.n_frames}")
        if not report.problems:
            report.problems += _stats_differ(stats, report, n_mels)
    if report.n_samples == 0 and not report.problems:
        report.problems.append("the set holds no samples (make-shards wrote nothing; manifest.jsonl says why)")
    return report


def _classes_present(r: Report) -> str:
    n, bare = sum(1 for k in r.labels if k != NO_LABEL), r.labels.get(NO_LABEL, 0)
    return f"{n} classes present" + (f", {bare} sample{'s' * (bare != 1)} without a label" if bare else "")


def classes_without_line(what: str, missing: list[str], classes: list[str]) -> str:
    """'<what>: N of M ('a', 'b', ...)': the classes of stats.json that no written sample has (make-shards' summary
    and this report). A folder's or manifest's classes are read before decoding, so a class all of whose files were
    then skipped stays in the list: the samples hold label indices into it."""
    names = ", ".join(map(repr, missing[:5])) + (" ..." if len(missing) > 5 else "")
    return f"{what}: {len(missing)} of {len(classes)} ({names})"


def format_report(r: Report, stats: dict | None = None, top: int = 15) -> str:
    if r.interrupted:
        return f"INCOMPLETE: {r.interrupted}"
    if r.not_a_set:
        return f"NOT A SHARD SET: {r.not_a_set}"
    lines = [
        f"shards {r.n_shards}  samples {r.n_samples}  frames {r.n_frames}  hours {r.seconds / 3600:.3f}",
    ]
    if stats:
        skipped = stats.get("skipped", {})
        lines.append(
            f"inputs {stats.get('inputs')}  written {stats.get('written')}  skipped {sum(skipped.values())}"
            + (" (" + ", ".join(f"{k} {v}" for k, v in skipped.items()) + ")" if skipped else "")
            + f"  front end {stats.get('frontend', {}).get('name')}  mean {stats.get('mean', 0):.4f}"
            f"  std {stats.get('std', 0):.4f}"
        )
    if r.flags:
        lines.append("flags: " + ", ".join(f"{k} {v}" for k, v in sorted(r.flags.items())))
    if r.labels and top > 0:
        lines.append(f"labels ({_classes_present(r)}; top {min(top, len(r.labels))}):")
        width = max(len(k) for k, _ in r.labels.most_common(top))
        for name, n in r.labels.most_common(top):
            lines.append(f"  {name:<{width}}  {n}")
    elif r.labels:
        lines.append(f"labels: {_classes_present(r)}")
    classes = stats.get("classes") if stats else None
    missing = [c for c in classes if not r.labels.get(c)] if isinstance(classes, list) and r.n_samples else []
    if missing:
        lines.append(classes_without_line("classes without a sample", missing, classes))
    lines += [f"warning: {w}" for w in r.warnings]
    if r.problems:
        lines.append(f"CORRUPT: {len(r.problems)} problem(s)")
        lines += [f"  {p}" for p in r.problems[:MAX_REPORTED]]
        if len(r.problems) > MAX_REPORTED:
            lines.append(f"  ... and {len(r.problems) - MAX_REPORTED} more")
    else:
        lines.append("OK")
    return "\n".join(lines)


def _count(text: str) -> int:
    try:
        n = int(text)
    except ValueError:
        n = -1
    if n < 0:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number >= 0")
    return n


def _workers(text: str) -> int:
    n = _count(text)
    if n < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a worker count: give an integer >= 1")
    return n


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="verify-shards",
        description="Read every sample of a make-shards output folder and check it (sizes.json, sha256, tar "
        "structure, float16 (80, T) finite log-mels, json fields, unique keys, label indices, counts, each shard's "
        "index file against the shard). Prints "
        "counts, total hours and a label histogram; exits 1 on any problem.",
    )
    p.add_argument("dir", type=Path, help="folder written by make-shards")
    p.add_argument(
        "--top", type=_count, default=15, help="labels shown in the histogram, 0 = none (default: %(default)s)"
    )
    p.add_argument("--no-hash", action="store_true", help="skip the sha256 comparison (faster on huge sets)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")
    p.add_argument("--workers", type=_workers, default=usable_cpus(),
                   help="processes checking shards in parallel (default: all usable cores, %(default)s here; 1 = in "
                   "this process); each reads and hashes whole shards, so a slow disk may want fewer")
    args = p.parse_args(argv)
    if not args.dir.is_dir():
        raise SystemExit(f"verify-shards: error: {args.dir} is not a folder; pass the --out folder of make-shards")
    try:
        report = verify(args.dir, check_hashes=not args.no_hash, progress=not args.no_progress, workers=args.workers)
    except KeyboardInterrupt:
        print("verify-shards: interrupted; nothing was changed (the check only reads)", file=sys.stderr)
        return INTERRUPTED
    except WorkerDied as e:  # the out-of-memory killer, kill -9: one line, not a wait for an answer never sent
        fewer = f", with fewer --workers than {args.workers} if memory ran short" if args.workers > 1 else ""
        raise SystemExit(f"verify-shards: error: {e}; nothing was changed: run it again{fewer}") from None
    print(format_report(report, report.stats if is_make_shards_stats(report.stats) else None, args.top))
    return 0 if report.ok else 1


def command() -> NoReturn:
    """The `verify-shards` console script: main(), then the process ends as interrupts.run_main says (after a Ctrl-C,
    by SIGINT, so that a shell script running it stops too)."""
    run_main(main)


if __name__ == "__main__":
    command()
