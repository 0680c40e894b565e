"""Input discovery: turn a corpus description into a sorted list of `Item`s (one per input file).

Every input file becomes exactly one Item; files that cannot be used are still Items, with `skip` set to the reason,
so the manifest accounts for every one of them. Labels never come from folder names in the AudioSet path: only from
the segment CSVs (the per-label download folders some tools produce only cause duplicates, which are deduplicated).
"""

from __future__ import annotations

import csv
import hashlib
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

# Extensions soundfile (libsndfile) decodes, and those that need FFmpeg through PyAV.
SOUNDFILE_EXTS = {".wav", ".flac", ".ogg", ".oga", ".opus", ".mp3", ".aiff", ".aif", ".au", ".caf", ".w64"}
PYAV_EXTS = {".m4a", ".webm", ".aac", ".mp4", ".mka", ".mkv"}
AUDIO_EXTS = SOUNDFILE_EXTS | PYAV_EXTS
# Download tools leave these behind while (or after failing) writing a file: never decode them.
PARTIAL_SUFFIXES = (".part", ".ytdl", ".temp")

YTID_LEN = 11
_YTID_CHARS = re.compile(r"^[A-Za-z0-9_-]{11}$")
# What may follow the 11-character id in a file stem: nothing, "_<start>", "_<start>-<end>" or "_<start>_<end>".
_SUFFIX = re.compile(r"^(?:_(?P<start>\d+(?:\.\d+)?)(?:[-_](?P<end>\d+(?:\.\d+)?))?)?$")


@dataclass(frozen=True)
class Item:
    """One input file (or one synthetic clip) and everything known about it before decoding."""

    source: str  # path relative to the input root where possible; "synthetic/<seed>/<index>" for synthetic clips
    key: str  # sample key in the shards: no dots, no slashes, unique in the set
    path: str | None = None  # absolute path to decode; None for synthetic clips
    labels: tuple[str, ...] = ()
    label_indices: tuple[int, ...] = ()
    ytid: str | None = None
    start: float | None = None
    end: float | None = None
    name_has_start: bool = False  # the file name says which segment it holds (so never crop it)
    size: int = 0  # bytes on disk; part of the plan hash so a re-downloaded file is noticed
    skip: str | None = None  # reason decided before decoding (partial_download, duplicate, not_in_csv, ...)
    synth: tuple[int, int] | None = None  # (seed, index) for synthetic clips


@dataclass
class Discovery:
    items: list[Item]
    classes: list[str]  # display name by class index
    class_ids: list[str]  # the strings stored in the samples' "labels" by class index (AudioSet mids, else = classes)
    notes: list[str] = field(default_factory=list)  # one-line facts for the user (missing files, ignored files)


# ---------------------------------------------------------------------------------------------------------- helpers
def is_partial(name: str) -> bool:
    low = name.lower()
    return low.endswith(PARTIAL_SUFFIXES) or ".part-frag" in low


def sanitize_key(text: str, max_len: int = 80) -> str:
    """A WebDataset-safe key: letters, digits, '_' and '-' only (the reader splits keys at the first dot)."""
    s = re.sub(r"[^A-Za-z0-9_-]+", "_", text).strip("_")
    return s[:max_len] or "clip"


def path_key(rel: str) -> str:
    """Readable and unique: sanitized relative path without extension + 8 hex digits of its hash."""
    stem = os.path.splitext(rel)[0]
    return f"{sanitize_key(stem)}-{hashlib.sha1(rel.encode()).hexdigest()[:8]}"


def scan_files(root: Path) -> tuple[list[tuple[str, Path, int]], int]:
    """All audio and partial-download files under root, sorted by relative path: [(rel, abs, size)], n_ignored."""
    out, ignored = [], 0
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        dirnames.sort()
        for name in sorted(filenames):
            p = Path(dirpath) / name
            ext = p.suffix.lower()
            if not (ext in AUDIO_EXTS or is_partial(name)):
                ignored += 1
                continue
            try:
                size = p.stat().st_size
            except OSError:  # dangling link: still an input, it will be reported as undecodable
                size = 0
            out.append((p.relative_to(root).as_posix(), p, size))
    out.sort(key=lambda r: r[0])
    return out, ignored


# --------------------------------------------------------------------------------------------------------- AudioSet
@dataclass(frozen=True)
class Segment:
    ytid: str
    start: float
    end: float
    labels: tuple[str, ...]
    split: str


def read_class_index(path: str | Path) -> tuple[list[str], list[str]]:
    """class_labels_indices.csv -> (mids, display names) ordered by index."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"class index CSV not found: {path} (AudioSet's class_labels_indices.csv)")
    rows = {}
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        if not reader.fieldnames or not {"index", "mid", "display_name"} <= set(reader.fieldnames):
            raise ValueError(f"{path}: expected columns index,mid,display_name (got {reader.fieldnames})")
        for row in reader:
            rows[int(row["index"])] = (row["mid"], row["display_name"])
    if sorted(rows) != list(range(len(rows))):
        raise ValueError(f"{path}: class indices are not 0..{len(rows) - 1}")
    return [rows[i][0] for i in range(len(rows))], [rows[i][1] for i in range(len(rows))]


def read_segments(path: str | Path) -> list[Segment]:
    """An AudioSet segments CSV: '#' header lines, then `YTID, start, end, "mid1,mid2"` rows."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"segments CSV not found: {path}")
    split = path.stem.removesuffix("_segments")
    out = []
    with open(path, newline="", encoding="utf-8") as f:
        lines = (line for line in f if line.strip() and not line.startswith("#"))
        for n, row in enumerate(csv.reader(lines, skipinitialspace=True), start=1):
            if len(row) != 4:
                raise ValueError(f"{path}: data row {n} has {len(row)} fields, expected YTID, start, end, labels")
            ytid, start, end, labels = row
            if not _YTID_CHARS.match(ytid):
                raise ValueError(f"{path}: data row {n}: {ytid!r} is not an 11-character YouTube id")
            mids = tuple(m.strip() for m in labels.split(",") if m.strip())
            out.append(Segment(ytid, float(start), float(end), mids, split))
    return out


def parse_audioset_name(stem: str, known: dict[str, list[Segment]]) -> tuple[str, float | None, float | None] | None:
    """File stem -> (ytid, start or None, end or None) for every layout, or None when no reading names a CSV id.

    Ids are exactly 11 characters and may begin with '-' or 'Y' or contain '_', so the name is read as
    [Y]<11 chars><suffix> and the reading whose id is in the CSVs wins (the 'Y' prefix is optional).
    """
    candidates = []
    for offset in (1, 0) if stem.startswith("Y") else (0,):
        ytid, rest = stem[offset : offset + YTID_LEN], stem[offset + YTID_LEN :]
        m = _SUFFIX.match(rest)
        if len(ytid) == YTID_LEN and m:
            start = float(m["start"]) if m["start"] is not None else None
            end = float(m["end"]) if m["end"] is not None else None
            candidates.append((ytid, start, end))
    for c in candidates:
        if c[0] in known:
            return c
    return None


def _match_segment(segs: list[Segment], start: float | None) -> Segment | None:
    if start is None:
        return segs[0] if len(segs) == 1 else None
    for s in segs:
        if abs(s.start - start) < 1e-3:
            return s
    return None


def discover_audioset(
    segments_csvs: list[str | Path], class_index_csv: str | Path, audio_root: str | Path
) -> Discovery:
    mids, names = read_class_index(class_index_csv)
    mid_index = {m: i for i, m in enumerate(mids)}
    known: dict[str, list[Segment]] = {}
    n_segments = 0
    for p in segments_csvs:
        for s in read_segments(p):
            if s.ytid in known and any(abs(o.start - s.start) < 1e-3 for o in known[s.ytid]):
                continue  # the same segment listed twice (e.g. the CSVs given twice): once is enough
            known.setdefault(s.ytid, []).append(s)
            n_segments += 1
    unknown_mids = sorted({m for segs in known.values() for s in segs for m in s.labels if m not in mid_index})
    if unknown_mids:
        raise ValueError(f"labels not in the class index: {unknown_mids[:5]} ... check --class-index")
    root = Path(audio_root)
    if not root.is_dir():
        raise ValueError(f"--audio-root {root} is not a folder")
    files, ignored = scan_files(root)
    items, seen = [], set()
    for rel, path, size in files:
        name = path.name
        if is_partial(name):
            items.append(Item(rel, path_key(rel), str(path), size=size, skip="partial_download"))
            continue
        parsed = parse_audioset_name(path.name[: -len(path.suffix)] if path.suffix else name, known)
        seg = _match_segment(known[parsed[0]], parsed[1]) if parsed else None
        if seg is None:
            items.append(Item(rel, path_key(rel), str(path), size=size, skip="not_in_csv"))
            continue
        key = f"{seg.ytid}_{int(round(seg.start * 1000))}"
        skip = "duplicate" if key in seen else None  # first in path order wins; the others are the same clip
        seen.add(key)
        items.append(
            Item(
                rel,
                key if skip is None else path_key(rel),
                str(path),
                labels=seg.labels,
                label_indices=tuple(mid_index[m] for m in seg.labels),
                ytid=seg.ytid,
                start=seg.start,
                end=seg.end,
                name_has_start=parsed[1] is not None,
                size=size,
                skip=skip,
            )
        )
    notes = [f"segments in CSVs: {n_segments}; with an audio file: {len(seen)}; missing: {n_segments - len(seen)}"]
    if ignored:
        notes.append(f"ignored {ignored} non-audio files under {root}")
    return Discovery(items, names, mids, notes)


# ------------------------------------------------------------------------------------------- folder / manifest / synth
def _classes_from(labels: list[tuple[str, ...]]) -> list[str]:
    return sorted({lab for labs in labels for lab in labs})


def _with_indices(items: list[Item], classes: list[str]) -> list[Item]:
    idx = {c: i for i, c in enumerate(classes)}
    return [
        Item(**{**it.__dict__, "label_indices": tuple(idx[lab] for lab in it.labels)}) if it.labels else it
        for it in items
    ]


def discover_folder(root: str | Path) -> Discovery:
    """Every audio file under root; label = the name of the folder holding it (none for files directly in root)."""
    root = Path(root)
    if not root.is_dir():
        raise ValueError(f"input folder {root} does not exist or is not a folder")
    files, ignored = scan_files(root)
    items = []
    for rel, path, size in files:
        parent = Path(rel).parent.name
        labels = (parent,) if parent else ()
        skip = "partial_download" if is_partial(path.name) else None
        items.append(Item(rel, path_key(rel), str(path), labels=labels, size=size, skip=skip))
    classes = _classes_from([it.labels for it in items])
    notes = [f"ignored {ignored} non-audio files under {root}"] if ignored else []
    return Discovery(_with_indices(items, classes), classes, classes, notes)


def discover_manifest(csv_path: str | Path) -> Discovery:
    """A CSV with a `path` column (relative paths are relative to the CSV's folder) and an optional `label` column
    (several labels separated by ';')."""
    csv_path = Path(csv_path)
    if not csv_path.is_file():
        raise ValueError(f"manifest CSV not found: {csv_path}")
    base = csv_path.resolve().parent
    items, seen = [], set()
    with open(csv_path, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        if not reader.fieldnames or "path" not in reader.fieldnames:
            raise ValueError(f"{csv_path}: needs a 'path' column (and optionally 'label'); got {reader.fieldnames}")
        for row in reader:
            raw = (row["path"] or "").strip()
            if not raw:
                continue
            p = Path(raw) if Path(raw).is_absolute() else base / raw
            labels = tuple(s.strip() for s in (row.get("label") or "").split(";") if s.strip())
            size = p.stat().st_size if p.is_file() else 0
            skip = None
            if raw in seen:
                skip = "duplicate"
            elif is_partial(p.name):
                skip = "partial_download"
            elif not p.is_file():
                skip = "not_found"
            seen.add(raw)
            items.append(Item(raw, path_key(raw), str(p), labels=labels, size=size, skip=skip))
    items.sort(key=lambda it: it.source)
    classes = _classes_from([it.labels for it in items])
    return Discovery(_with_indices(items, classes), classes, classes)


def discover_synthetic(n: int, seed: int = 0) -> Discovery:
    from shard_tools.synthetic import CLASSES

    if n <= 0:
        raise ValueError(f"--n must be a positive number of clips (got {n})")
    items = [
        Item(
            f"synthetic/{seed}/{i}",
            f"synth{seed}_{i:08d}",
            labels=(CLASSES[i % len(CLASSES)],),
            label_indices=(i % len(CLASSES),),
            synth=(seed, i),
        )
        for i in range(n)
    ]
    return Discovery(items, list(CLASSES), list(CLASSES))
