"""Input discovery: turn a corpus description into a sorted list of `Item`s (one per input file).

Every input file becomes exactly one Item; files that cannot be used are still Items, with `skip` set to the reason,
so the manifest accounts for every one of them. Labels never come from folder names in the AudioSet path: only from
the segment CSVs (the per-label download folders some tools produce only cause duplicates, which are deduplicated).
"""

from __future__ import annotations

import csv
import dataclasses
import difflib
import hashlib
import io
import math
import numbers
import os
import re
import stat
import sys
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path, PurePath

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


# slots (no instance dict): ~60 bytes less per Item, each kept for the whole run (2 million at AudioSet's size)
@dataclass(frozen=True, slots=True)
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
    detail: str = ""  # why, in words, when `skip` is set (e.g. which file this one duplicates)
    synth: tuple[int, int] | None = None  # (seed, index) for synthetic clips
    mtime_ns: int = 0  # modification time (0: not read); in the plan hash with the size: a file edited in place


@dataclass
class Discovery:
    items: list[Item]
    classes: list[str]  # display name by class index
    class_ids: list[str]  # the strings stored in the samples' "labels" by class index (AudioSet mids, else = classes)
    notes: list[str] = field(default_factory=list)  # one-line facts for the user (missing files, ignored files)
    extra: dict = field(default_factory=dict)  # source-specific counts stored in stats.json (AudioSet: "segments")


# ---------------------------------------------------------------------------------------------------------- helpers
def is_partial(name: str) -> bool:
    low = name.lower()
    return low.endswith(PARTIAL_SUFFIXES) or ".part-frag" in low


def is_ytdlp_temp(name: str) -> bool:
    """yt-dlp's post-processors write "<name>.temp.<ext>" (e.g. Y<id>.temp.wav) and rename it when done. Only an
    AudioSet download holds such files for sure: in a plain folder or a manifest, `x.temp.wav` may be the user's own
    (and sets of earlier versions decoded it), so there it is read like any file."""
    return os.path.splitext(name.lower())[0].endswith(".temp")


def printable(text: str) -> str:
    """`text` as valid Unicode: the bytes of a non-UTF-8 file name (which Python holds as lone surrogates) are
    shown as backslash escapes, e.g. b'\\xff.wav' -> '\\\\xff.wav'. Used for everything written to json."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return os.fsencode(text).decode("utf-8", "backslashreplace")
    return text


def sanitize_key(text: str, max_len: int = 80) -> str:
    """A WebDataset-safe key: letters, digits, '_' and '-' only (the reader splits keys at the first dot)."""
    s = re.sub(r"[^A-Za-z0-9_-]+", "_", text).strip("_")
    return s[:max_len] or "clip"


def path_key(rel: str) -> str:
    """Readable and unique: sanitized relative path without extension + 8 hex digits of the hash of its bytes
    (os.fsencode: a non-UTF-8 file name hashes its raw bytes, a UTF-8 one its UTF-8 encoding)."""
    stem = os.path.splitext(rel)[0]
    return f"{sanitize_key(stem)}-{hashlib.sha1(os.fsencode(rel)).hexdigest()[:8]}"


def unique_keys(items: list[Item]) -> list[Item]:
    """Items whose keys are unique. A path key keeps 80 characters of the path and 32 bits of its hash, so two long
    paths with one beginning can share a key (likely somewhere in a few hundred thousand files); a shared key gets
    64 more bits of hash (of the file's path) and, should that still be shared, the item's position. Items are in
    discovery order, so the result is deterministic; a set without a shared key keeps every key as it was."""
    counts = Counter(it.key for it in items)
    if len(counts) == len(items):
        return items
    out, taken = [], set(counts)
    for i, it in enumerate(items):
        if counts[it.key] == 1:
            out.append(it)
            continue
        ident = os.fsencode(it.path) if it.path else it.source.encode("utf-8", "surrogateescape")
        key = f"{it.key}-{hashlib.sha256(ident).hexdigest()[:16]}"
        if key in taken:
            key = f"{key}-{i}"
        taken.add(key)
        out.append(dataclasses.replace(it, key=key))
    return out


@dataclass(frozen=True, slots=True)
class Found:
    """One candidate input file found by `scan_files`."""

    rel: str  # path relative to the root, '/'-separated, as the OS gave it (may hold surrogates)
    # str(Path), the string the Item keeps: a Path per file held ~300 bytes more (its parts list and name strings)
    path: str
    size: int
    skip: str | None = None  # not_found (broken link), duplicate (same real file as an earlier one), undecodable
    detail: str = ""
    mtime_ns: int = 0  # modification time: with the size, how a file changed in place is noticed

    @property
    def name(self) -> str:
        return os.path.basename(self.path)

    @property
    def suffix(self) -> str:
        return PurePath(self.path).suffix


@dataclass
class Scan:
    files: list[Found]
    ignored: int = 0  # non-audio files
    pruned: int = 0  # symlinked folders not entered (a loop, or a second name for a folder already scanned)
    unreadable_errors: list[OSError] = field(default_factory=list)  # folders os.walk could not list
    # a `duplicate` file's rel -> the rel of the name kept (few: only a file reached under several names has one)
    kept_as: dict[str, str] = field(default_factory=dict)

    def notes(self, root: Path) -> list[str]:
        notes = []
        if self.ignored:
            notes.append(f"ignored {self.ignored} non-audio files under {root}")
        if self.pruned:
            notes.append(
                f"did not enter {self.pruned} symlinked folder(s) whose target is scanned anyway (a symlink loop, "
                "or a second name for a folder)"
            )
        if self.unreadable_errors:
            names = [f"{printable(str(e.filename))} ({e.strerror})" for e in self.unreadable_errors]
            notes.append(
                f"warning: could not list {len(names)} folder(s), their files are not inputs: "
                + ", ".join(names[:3]) + (" ..." if len(names) > 3 else "")
            )
        return notes


# A scan that takes longer than this shows a file counter on stderr (2 million files on a network share take
# minutes, and nothing else is printed before discovery ends); a shorter one prints nothing.
SCAN_PROGRESS_DELAY_S = 2.0


def scan_files(root: Path, progress: bool = False, hard_links: bool = True) -> Scan:
    """All audio and partial-download files under root, sorted by relative path. `progress`: a counter of the files
    found on stderr once the scan has taken SCAN_PROGRESS_DELAY_S. `hard_links`: see below.

    Symlinks are followed, but every real folder is scanned once: the tree itself first, then each symlinked folder
    whose target lies outside everything scanned so far (a loop such as `ln -s .. loop`, or a second name for a
    folder of the tree, is not entered). A file reached under two names is kept once: a file symlink's target
    under its real name and, with `hard_links`, a hard-linked file (two real names of one inode) under its first
    name in path order; the other names are `duplicate`s. A broken symlink is `not_found`.
    """
    from tqdm import tqdm

    from matpac_fast.cli_args import bar_settings

    scan = Scan([])
    found: list[tuple[Found, str | None, bool, tuple | None]] = []
    visited: set[str] = set()
    pending = [root]
    bar = tqdm(desc=f"scanning {printable(str(root))}", unit=" audio files", file=sys.stderr, disable=not progress,
               delay=SCAN_PROGRESS_DELAY_S, dynamic_ncols=True, **bar_settings(sys.stderr))
    with bar:
        while pending:
            top = pending.pop(0)
            real_top = os.path.realpath(top)
            if real_top in visited:
                scan.pruned += 1
                continue
            links = _scan_tree(root, top, real_top, visited, found, scan, bar)
            pending += links
    # Sorted once, in place: a second sorted copy (and its sort keys) held ~50 bytes per file more at the peak.
    found.sort(key=lambda f: os.fsencode(f[0].rel))
    scan.files = [f for f, _, _, _ in found]
    first: dict[str | tuple, str] = {}  # the file (its real path, or its inode) -> the relative path that keeps it
    for links in (False, True):  # real names before symlinks, each in path order
        for i, (f, real, link, inode) in enumerate(found):
            if link != links or f.skip is not None:
                continue
            ident = inode if hard_links and inode else real
            if ident in first:
                # two real names of one file can only be hard links (a folder is scanned once)
                how = " (hard link)" if not link and ident is inode else ""
                scan.files[i] = Found(f.rel, f.path, f.size, "duplicate",
                                      f"same file as {printable(first[ident])}{how}")
                scan.kept_as[f.rel] = first[ident]
            else:
                first[ident] = f.rel
    return scan


def _scan_tree(root: Path, top: Path, real_top: str, visited: set[str], found: list, scan: Scan, bar) -> list[Path]:
    """Walk `top` without following symlinks; returns the symlinked folders met on the way (for `scan_files`).
    `bar` (tqdm) counts the audio and partial-download files found."""
    links = []
    for dirpath, dirnames, filenames in os.walk(top, onerror=scan.unreadable_errors.append):
        rel_dir = os.path.relpath(dirpath, top)
        real_dir = os.path.normpath(os.path.join(real_top, rel_dir))  # below `top` no component is a symlink
        visited.add(real_dir)
        keep = []
        for d in sorted(dirnames):
            if os.path.islink(os.path.join(dirpath, d)):
                links.append(Path(dirpath) / d)  # os.walk does not enter it; scan_files may, later
            elif os.path.join(real_dir, d) in visited:  # scanned already through a symlink to it
                scan.pruned += 1
            else:
                keep.append(d)
        dirnames[:] = keep
        for name in sorted(filenames):
            p = Path(dirpath) / name  # not kept: see Found.path
            if not (p.suffix.lower() in AUDIO_EXTS or is_partial(name)):
                scan.ignored += 1
                continue
            found.append(_stat_file(str(p), p.relative_to(root).as_posix(), os.path.join(real_dir, name)))
            bar.update(1)
    return links


def _stat_file(p: str, rel: str, real_if_not_link: str) -> tuple[Found, str | None, bool, tuple | None]:
    """(Found, real path, is a symlink, inode) with one lstat for a plain file; a symlink is followed to its target.
    The inode, (st_dev, st_ino), only for a file with several hard links, whose names have different real paths
    (each was decoded and written: the same audio twice in the shards); None for any other file, so that other
    files are never told apart by inode (an inode number of 0, as some network and FUSE file systems give, is not
    trusted either)."""
    try:
        st = os.lstat(p)
    except OSError as e:
        return Found(rel, p, 0, "undecodable", f"cannot read the file: {e.strerror}"), None, False, None
    link = stat.S_ISLNK(st.st_mode)
    real = real_if_not_link
    try:
        if link:
            st = os.stat(p)
            real = os.path.realpath(p)
    except FileNotFoundError:
        return Found(rel, p, 0, "not_found", "broken symbolic link: its target does not exist"), None, link, None
    except OSError as e:
        return Found(rel, p, 0, "undecodable", f"cannot read the file: {e.strerror}"), None, link, None
    if not stat.S_ISREG(st.st_mode):
        return Found(rel, p, 0, "undecodable", "not a regular file"), None, link, None
    real = p if real == p else real  # usually so (an absolute root without symlinks): one string per file less
    inode = (st.st_dev, st.st_ino) if st.st_nlink > 1 and st.st_ino else None
    return Found(rel, p, st.st_size, mtime_ns=st.st_mtime_ns), real, link, inode


def _rows_checked(path: Path, reader: csv.DictReader):
    """The rows of a manifest. A row running over several lines (a quote left open swallows every row
    after it into one path) and a cell over the csv module's size limit are one-line errors naming the line."""
    line = 1
    try:
        for row in reader:
            first, line = line + 1, reader.line_num
            if line > first and any("\n" in (v or "") for v in row.values() if isinstance(v, str)):
                raise ValueError(f"{path}: line {first}: a quoted cell runs over {line - first + 1} lines (a quote "
                                 "left open?); close the quote, or quote a path that holds a comma as \"a, b.wav\"")
            yield row
    except csv.Error as e:
        raise ValueError(f"{path}: line {reader.line_num}: {e} (a quote left open?); check the quoting") from None


def read_csv_text(path: Path, what: str) -> str:
    """A CSV's text: UTF-8 with or without a byte-order mark; any other encoding is a one-line error naming the
    file and line."""
    if not path.is_file():
        raise ValueError(f"{what} not found: {path}")
    data = path.read_bytes()
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = data[: e.start].count(b"\n") + 1
        raise ValueError(
            f"{path}: line {line} is not UTF-8 (byte {data[e.start : e.start + 1]!r}); save the file as UTF-8"
        ) from None


# --------------------------------------------------------------------------------------------------------- AudioSet
# Every row of the CSVs (2 million for AudioSet) is held while the files are matched: slots, and the row's place as
# the CSV's name (one string per CSV) and a line number, saved ~110 bytes a row (a "<csv>: line N" string each).
@dataclass(frozen=True, slots=True)
class Segment:
    ytid: str
    start: float
    end: float
    labels: tuple[str, ...]
    split: str
    csv_path: str = field(default="", compare=False)  # the CSV that lists it, as given
    line: int = field(default=0, compare=False)  # its line there

    @property
    def where(self) -> str:
        """"<csv>: line N": for messages about this row."""
        return f"{self.csv_path}: line {self.line}"


def read_class_index(path: str | Path) -> tuple[list[str], list[str]]:
    """class_labels_indices.csv -> (mids, display names) ordered by index."""
    path = Path(path)
    text = read_csv_text(path, "class index CSV (AudioSet's class_labels_indices.csv)")
    rows = {}
    reader = csv.DictReader(io.StringIO(text, newline=""))
    if not reader.fieldnames or not {"index", "mid", "display_name"} <= set(reader.fieldnames):
        raise ValueError(f"{path}: expected columns index,mid,display_name (got {reader.fieldnames})")
    for row in reader:
        where = f"{path}: line {reader.line_num}"
        index, mid = (row["index"] or "").strip(), (row["mid"] or "").strip()
        if not index.isdigit():
            raise ValueError(f"{where}: index {row['index']!r} is not a whole number >= 0")
        if not mid:
            raise ValueError(f"{where}: empty mid")
        if int(index) in rows:
            raise ValueError(f"{where}: index {index} appears twice")
        rows[int(index)] = (mid, row["display_name"] or mid)
    if not rows:
        raise ValueError(f"{path}: no classes (expected AudioSet's class_labels_indices.csv)")
    if sorted(rows) != list(range(len(rows))):
        raise ValueError(f"{path}: class indices are not 0..{len(rows) - 1}")
    return [rows[i][0] for i in range(len(rows))], [rows[i][1] for i in range(len(rows))]


def _seconds(text: str, what: str, where: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise ValueError(f"{where}: {what} {text!r} is not a number of seconds") from None
    if not math.isfinite(value) or value < 0:
        raise ValueError(f"{where}: {what} {text!r} is not a number of seconds >= 0")
    return value


def read_segments(path: str | Path) -> list[Segment]:
    """An AudioSet segments CSV: '#' header lines (or one plain `YTID,start_seconds,...` header row), then
    `YTID, start, end, "mid1,mid2"` rows."""
    path = Path(path)
    text = read_csv_text(path, "segments CSV")
    split, csv_path = path.stem.removesuffix("_segments"), str(path)
    out = []
    # One tuple per distinct label set, shared by its rows (balanced_train: 5,561 sets in 22,160 rows): each row's own
    # tuple of mid strings took ~150 bytes per input file more, kept for the run by the Items that use it.
    label_sets: dict[tuple[str, ...], tuple[str, ...]] = {}
    # Likewise one float per distinct time (AudioSet's CSVs hold a few hundred): 48 bytes a row.
    times: dict[str, float] = {}

    def seconds(text: str, what: str, where: str) -> float:
        if text not in times:
            times[text] = _seconds(text, what, where)
        return times[text]

    numbered = [(i, line) for i, line in enumerate(text.splitlines(), 1) if line.strip() and not line.startswith("#")]
    reader = csv.reader((line for _, line in numbered), skipinitialspace=True)
    n = 0
    for row in reader:
        if n == 0 and row and row[0].strip().upper() == "YTID":
            continue  # a plain header row instead of AudioSet's '#' lines
        n += 1
        line = numbered[reader.line_num - 1][0]
        where = f"{path}: line {line} (data row {n})"
        if len(row) != 4:
            raise ValueError(f"{where} has {len(row)} fields, expected YTID, start, end, labels")
        ytid, start, end, labels = row
        if not _YTID_CHARS.match(ytid):
            raise ValueError(f"{where}: {ytid!r} is not an 11-character YouTube id")
        t0, t1 = seconds(start, "start", where), seconds(end, "end", where)
        if t1 <= t0:
            raise ValueError(f"{where}: end {end} is not after start {start}")
        mids = tuple(dict.fromkeys(m.strip() for m in labels.split(",") if m.strip()))  # a repeat counts once
        mids = label_sets.setdefault(mids, mids)
        out.append(Segment(ytid, t0, t1, mids, split, csv_path, line))
    return out


def parse_audioset_name(
    stem: str, known: dict[str, tuple[Segment, ...]]
) -> tuple[str, float | None, float | None] | None:
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


def _match_segment(segs: tuple[Segment, ...], start: float | None) -> Segment | None:
    """The segment a file of this id holds: the id's only one (no start in the name), or the one whose start the
    name gives: in seconds (`<id>_30.000`), else in whole milliseconds (audiosetdl's `<id>_30000_40000.flac`)."""
    if start is None:
        return segs[0] if len(segs) == 1 else None
    for s in segs:
        if abs(s.start - start) < 1e-3:
            return s
    if start.is_integer():
        for s in segs:
            if abs(s.start * 1000 - start) < 0.5:
                return s
    return None


def discover_audioset(
    segments_csvs: list[str | Path], class_index_csv: str | Path, audio_root: str | Path, progress: bool = False
) -> Discovery:
    mids, names = read_class_index(class_index_csv)
    mid_index = {m: i for i, m in enumerate(mids)}
    known, relabelled = _read_all_segments(segments_csvs, mid_index, class_index_csv)
    n_segments = sum(len(segs) for segs in known.values())
    root = Path(audio_root)
    if not root.is_dir():
        raise ValueError(f"--audio-root {root} is not a folder")
    # Hard links are left to the segment matching (a downloader's per-label folders may hard-link one clip): it
    # keeps one file per segment already, and so the plan (hash) of an interrupted or complete set stays the same.
    scan = scan_files(root, progress, hard_links=False)
    if not scan.files:
        raise ValueError(_no_audio(root, scan, "--audio-root"))
    items: list[Item | None] = []
    claims: dict[str, list[tuple[int, Found, Segment, bool]]] = {}  # segment key -> its files (several: duplicates)
    for f in scan.files:
        rel, path, name, suffix, source = f.rel, f.path, f.name, f.suffix, printable(f.rel)
        if f.skip is None and (is_partial(name) or is_ytdlp_temp(name)):
            f = Found(rel, path, f.size, "partial_download")
        if f.skip:
            items.append(Item(source, path_key(rel), path, size=f.size, skip=f.skip, detail=f.detail))
            continue
        parsed = parse_audioset_name(name[: -len(suffix)] if suffix else name, known)
        seg = _match_segment(known[parsed[0]], parsed[1]) if parsed else None
        if seg is None:
            detail = _not_in_csv_detail(parsed, known)
            items.append(Item(source, path_key(rel), path, size=f.size, skip="not_in_csv", detail=detail))
            continue
        key = f"{seg.ytid}_{int(round(seg.start * 1000))}"
        claims.setdefault(key, []).append((len(items), f, seg, parsed[1] is not None))
        items.append(None)  # filled below, once every file of the segment is known
    indices: dict[tuple[str, ...], tuple[int, ...]] = {}  # shared as the label tuples are (~50 bytes per file)
    for key, files in claims.items():
        chosen = min(files, key=lambda c: _segment_file_rank(c[1]))[1]
        for i, f, seg, name_has_start in files:
            dup = f is not chosen
            items[i] = Item(
                printable(f.rel),
                path_key(f.rel) if dup else key,
                f.path,
                labels=seg.labels,
                label_indices=indices.setdefault(seg.labels, tuple(mid_index[m] for m in seg.labels)),
                ytid=seg.ytid,
                start=seg.start,
                end=seg.end,
                name_has_start=name_has_start,
                size=f.size,
                mtime_ns=f.mtime_ns,
                skip="duplicate" if dup else None,
                detail=_duplicate_detail(f, chosen) if dup else "",
            )
    segments = {"in_csvs": n_segments, "with_file": len(claims), "missing": n_segments - len(claims)}
    notes = [segments_line(segments)] + relabelled + scan.notes(root)
    return Discovery(items, names, mids, notes, extra={"segments": segments})


# One string shared by every such file (a download root of AS-2M given with the balanced CSV alone: ~2 million).
NO_CSV_ID = ("the file name holds no YouTube id of the --segments CSVs (names: Y<ytid>.<ext>, <ytid>.<ext>, "
             "<ytid>_<start>.<ext>, ...)")


def _not_in_csv_detail(parsed: tuple | None, known: dict[str, tuple[Segment, ...]]) -> str:
    """Why a file whose name is read as an AudioSet id matches no CSV segment: no id of the CSVs in its name, a start
    that none of its id's segments has, or no start in the name of an id with several segments."""
    if parsed is None:
        return NO_CSV_ID
    ytid, start, _ = parsed
    starts = ", ".join(f"{s.start:g}" for s in known[ytid][:5]) + (" ..." if len(known[ytid]) > 5 else "")
    if start is None:
        return (f"{ytid} has {len(known[ytid])} segments in the CSVs (starting at {starts} s) and the file name does "
                "not say which: name it <ytid>_<start>.<ext>")
    return f"{ytid} is in the CSVs, but none of its segments starts at {start:g} (s or ms); they start at {starts} s"


def _needs_pyav(f: Found) -> bool:
    """The file can only be decoded with the optional PyAV (decode.read_audio picks the decoder by extension)."""
    return f.suffix.lower() in PYAV_EXTS


def _segment_file_rank(f: Found) -> tuple:
    """Sort key (best first) among the files of one AudioSet segment (e.g. A/<id>_30.wav and B/<id>_30.wav, or
    <id>.wav and Y<id>.wav): non-empty before empty (a 0-byte file is a failed download), soundfile formats before
    those that need PyAV (whether or not it is installed, so that the choice and thus the shards do not depend on
    it), then the larger file (a truncated or damaged copy is usually smaller), then path order. Decided before
    decoding, from names and sizes only: a corrupt non-empty file that is larger than a good copy still wins, and
    the segment is then skipped as undecodable while the good copy is reported as its duplicate."""
    return (f.size == 0, _needs_pyav(f), -f.size, os.fsencode(f.rel))


def _duplicate_detail(f: Found, chosen: Found) -> str:
    why = ""
    if f.size == 0:
        why = "this file is empty"
    elif _needs_pyav(f) and not _needs_pyav(chosen):
        why = f"this file needs PyAV ({f.suffix.lower()}), that one does not"
    elif f.size < chosen.size:
        why = f"this file is smaller ({f.size} < {chosen.size} bytes)"
    return f"same segment as {printable(chosen.rel)}" + (f", which is used instead: {why}" if why else "")


def _read_all_segments(
    segments_csvs: list[str | Path], mid_index: dict[str, int], class_index_csv: str | Path
) -> tuple[dict[str, tuple[Segment, ...]], list[str]]:
    """ytid -> its segments, from every CSV in order, and a warning (a list of at most one note) when a segment is
    listed again with other labels. A segment (ytid, start) listed twice keeps its first listing: with the same
    labels that is harmless (e.g. a CSV given twice); with other labels the later ones are dropped, and said so."""
    known: dict[str, tuple[Segment, ...]] = {}  # tuples: most ids have one segment, and a list took ~40 bytes more
    unknown: dict[str, str] = {}  # mid -> the first row that uses it
    relabelled: list[tuple[Segment, Segment]] = []
    for p in segments_csvs:
        for s in read_segments(p):
            for m in s.labels:
                if m not in mid_index:
                    unknown.setdefault(m, s.where)
            kept = next((o for o in known.get(s.ytid, ()) if abs(o.start - s.start) < 1e-3), None)
            if kept is None:
                known[s.ytid] = known.get(s.ytid, ()) + (s,)
            elif set(kept.labels) != set(s.labels):
                relabelled.append((s, kept))
    if unknown:
        (mid, where), *others = unknown.items()
        more = f" (nor are {len(others)} other label(s): {', '.join(repr(m) for m, _ in others[:5])}" + (
            " ...)" if len(others) > 5 else ")"
        )
        raise ValueError(
            f"{where}: label {mid!r} is not in the class index {class_index_csv}{more if others else ''}; check "
            "--class-index (AudioSet's class_labels_indices.csv) and the segment CSVs"
        )
    notes = []
    if relabelled:
        again, kept = relabelled[0]
        notes.append(
            f"warning: {len(relabelled)} segment(s) listed again with other labels; the first listing's labels are "
            f"used (e.g. {again.where} lists {again.ytid} at {again.start:g} s, already in {kept.where})"
        )
    return known, notes


def segments_line(segments: dict) -> str:
    """The AudioSet coverage line, printed before the run and again in the final summary."""
    return (
        f"segments in CSVs: {segments['in_csvs']}; with an audio file: {segments['with_file']}; "
        f"missing: {segments['missing']}"
    )


def _no_audio(root: Path, scan: Scan, what: str) -> str:
    exts = " ".join(sorted(AUDIO_EXTS))
    ignored = f"; {scan.ignored} other files were ignored" if scan.ignored else ""
    return f"no audio files under {what} {root} (looked for {exts}{ignored}); check the folder"


# ------------------------------------------------------------------------------------------- folder / manifest / synth
def _classes_from(labels: list[tuple[str, ...]]) -> list[str]:
    return sorted({lab for labs in labels for lab in labs})


def _with_indices(items: list[Item], classes: list[str]) -> list[Item]:
    """`items`, each given its label indices in place (a new list held every Item twice for a moment), with one
    tuple per label set shared by its items (as the label tuples are): ~50 bytes per input kept for the run."""
    idx = {c: i for i, c in enumerate(classes)}
    indices: dict[tuple[str, ...], tuple[int, ...]] = {}
    for i, it in enumerate(items):
        if it.labels:
            if it.labels not in indices:
                indices[it.labels] = tuple(idx[lab] for lab in it.labels)
            items[i] = dataclasses.replace(it, label_indices=indices[it.labels])
    return items


def _folder_labels(rel: str, label_sets: dict[str, tuple[str, ...]]) -> tuple[str, ...]:
    """A file's labels in folder mode: the name of the folder holding it (none for a file directly in the root),
    one tuple per folder name, shared through `label_sets` (~100 bytes per file less)."""
    parent = printable(Path(rel).parent.name)
    return label_sets.setdefault(parent, (parent,) if parent else ())


def discover_folder(root: str | Path, progress: bool = False) -> Discovery:
    """Every audio file under root; label = the name of the folder holding it (none for files directly in root).
    `progress`: a file counter on stderr while a long scan runs (see `scan_files`). A file reached under several
    names (see `scan_files`) has the label of the name kept; a duplicate name in another folder gets a warning."""
    root = Path(root)
    if not root.is_dir():
        raise ValueError(f"input folder {root} does not exist or is not a folder")
    scan = scan_files(root, progress)
    if not scan.files:
        raise ValueError(_no_audio(root, scan, "input folder"))
    items = []
    label_sets: dict[str, tuple[str, ...]] = {}  # folder name -> its files' labels: one tuple shared (~100 bytes each)
    relabelled = []
    for f in scan.files:
        labels = _folder_labels(f.rel, label_sets)
        skip, detail = f.skip, f.detail
        if skip is None and is_partial(f.name):
            skip = "partial_download"
        kept = scan.kept_as.get(f.rel)
        kept_labels = labels if kept is None else _folder_labels(kept, label_sets)
        if kept_labels != labels:
            # the kept name's folder gives the file its label (so the plans of existing sets stay), with a word
            detail += _labels_differ(kept_labels, labels, "that name's")
            relabelled.append(f"{printable(f.rel)} labelled {_label_text(labels)}, kept {printable(kept)} labelled "
                              f"{_label_text(kept_labels)}")
        items.append(
            Item(printable(f.rel), path_key(f.rel), f.path, labels=labels, size=f.size, skip=skip, detail=detail,
                 mtime_ns=f.mtime_ns)
        )
    classes = _classes_from([it.labels for it in items])
    notes = scan.notes(root)
    if relabelled:
        notes.append(_relabelled_note(str(root), relabelled, "duplicate name(s) (hard links, symlinks)", "kept name"))
    if len(classes) == 1 and all(it.labels for it in items):
        # e.g. FSDD's recordings/: the folder name becomes every file's only label, which a probe on these shards
        # would then score as a one-class task. Pre-training does not need labels, so this is a note, not an error.
        notes.append(
            f"every audio file is in one folder ({classes[0]!r}), so all get that one label; for per-class labels "
            "put each class in its own subfolder, or list path,label in a CSV for 'make-shards manifest'"
        )
    return Discovery(_with_indices(items, classes), classes, classes, notes)


MANIFEST_COLUMNS = ("path", "label")
# Other tools' names for the path column (FSDD's labels.csv, matpac-eval's CSVs), used when there is no 'path'.
PATH_ALIASES = ("file", "filename")


def _manifest_columns(csv_path: Path, fieldnames: list[str] | None) -> tuple[list[str], list[str]]:
    """Header -> (normalized column names, notes). Names are matched ignoring case and spaces; a near miss of an
    accepted name ('labels', 'Path ') with the accepted one absent is an error, other columns are ignored."""
    accepted = f"path (or {', '.join(PATH_ALIASES)}), label"
    if not fieldnames:
        raise ValueError(f"{csv_path}: empty file; expected a header row with columns {accepted}")
    seps = {";": "semicolon", "\t": "tab", "|": "pipe"}
    sep = next((c for c in seps if len(fieldnames) == 1 and c in (fieldnames[0] or "")), None)
    if sep:  # a spreadsheet's export in another locale: one column named 'path;label'
        raise ValueError(f"{csv_path}: the header {fieldnames[0]!r} is a single column: the file looks "
                         f"{seps[sep]}-separated; make-shards reads comma-separated CSV: save it with commas (columns "
                         f"{accepted})")
    names = [(f or "").strip().lower() for f in fieldnames]
    aliases = [n for n in names if n in PATH_ALIASES]
    if "path" not in names and len(aliases) == 1:
        names = ["path" if n == aliases[0] else n for n in names]
    elif "path" not in names and aliases:  # was "needs a 'path' column", with both of its other names there
        raise ValueError(f"{csv_path}: columns {' and '.join(map(repr, aliases))} could each be the path column; "
                         "rename the one that holds the audio paths to 'path'")
    unknown = [n for n in names if n not in MANIFEST_COLUMNS]
    for want in MANIFEST_COLUMNS:
        if want in names:
            continue
        wanted = (want, *PATH_ALIASES) if want == "path" else (want,)
        close = [(n, m[0]) for n in unknown if (m := difflib.get_close_matches(n, wanted, n=1, cutoff=0.7))]
        if close:
            raise ValueError(
                f"{csv_path}: unknown column {close[0][0]!r} (did you mean {close[0][1]!r}?); accepted columns: "
                f"{accepted}"
            )
        if want == "path":
            raise ValueError(f"{csv_path}: no path column: name the column of audio paths 'path' (or "
                             f"{' or '.join(map(repr, PATH_ALIASES))}); 'label' is optional; got {fieldnames}")
    notes = []
    if unknown:
        notes.append(
            f"{csv_path}: ignored column(s) {', '.join(map(repr, unknown))} (accepted: {accepted})"
            + ("; there is no 'label' column, so every clip is unlabelled" if "label" not in names else "")
        )
    return names, notes


def _label_text(labels: tuple[str, ...]) -> str:
    return repr(";".join(labels)) if labels else "(none)"


def _labels_differ(kept: tuple[str, ...], labels: tuple[str, ...], whose: str) -> str:
    """What a duplicate's detail adds when the file kept has other labels (`whose`: "that row's" in a manifest)."""
    return f"; labels differ: {whose} {_label_text(kept)} are used, not {_label_text(labels)}"


def _relabelled_note(where: str, relabelled: list[str], what: str, first: str) -> str:
    """The one warning for the duplicates that give a file other labels than the one kept: their count and the
    first as an example (`relabelled`: one line per such duplicate; `what` they are, `first` the one kept)."""
    return (f"warning: {where}: {len(relabelled)} {what} give a file other labels than its {first}; the {first}'s "
            f"labels are used (e.g. {relabelled[0]})")


def _under(base: Path, raw: str) -> Path:
    """A manifest path: absolute, or relative to the CSV's folder `base`."""
    return Path(raw) if Path(raw).is_absolute() else base / raw


def _manifest_path(cell: str, base: Path) -> str:
    """The path a manifest cell names: the cell as written when a file (or link) of that exact name exists, else the
    cell without its leading and trailing spaces. Stripping alone read ' a.wav' as a.wav (another file) and reported
    'b.wav ' missing; never stripping would miss the files of a hand-written 'x.wav , dog'. '' for a blank cell."""
    stripped = cell.strip()
    if stripped and cell != stripped and os.path.lexists(_under(base, cell)):
        return cell
    return stripped


def discover_manifest(csv_path: str | Path) -> Discovery:
    """A CSV with a `path` column (or, without one, a `file` or `filename` column; relative paths are relative to the
    CSV's folder) and an optional `label` column
    (several labels separated by ';'). A file listed twice (also as `./x.wav` and `/abs/x.wav`) is written once.
    A path cell with leading or trailing spaces names that exact file when it exists, else the stripped name."""
    csv_path = Path(csv_path)
    text = read_csv_text(csv_path, "manifest CSV")
    base = csv_path.resolve().parent
    reader = csv.DictReader(io.StringIO(text, newline=""))
    try:
        header = reader.fieldnames
    except csv.Error as e:  # a quote left open in the header line itself
        raise ValueError(f"{csv_path}: line 1 (the header): {e} (a quote left open?); check the quoting") from None
    names, notes = _manifest_columns(csv_path, header)
    reader.fieldnames = names
    items, first, empty, relabelled, commas = [], {}, [], [], []
    label_sets: dict[tuple[str, ...], tuple[str, ...]] = {}
    for row in _rows_checked(csv_path, reader):
        extra = [v for v in row.get(None) or [] if v.strip()]  # DictReader keeps fields past the header under None
        if extra:
            # an unquoted ',' in a path or a label (AudioSet's "Male speech, man speaking"): the rest of the row was
            # dropped without a word, so the label was cut short or the path became another file's
            raise ValueError(
                f"{csv_path}: line {reader.line_num} has {len(names) + len(row[None])} fields but the header has "
                f"{len(names)} (extra: {', '.join(map(repr, extra[:3]))}); quote a path or label that holds a ',' "
                '(e.g. "Male speech, man speaking"), or add a header name for each column'
            )
        raw = _manifest_path(row.get("path") or "", base)
        if not raw:
            empty.append(reader.line_num)
            continue
        p = _under(base, raw)
        labels = tuple(dict.fromkeys(s.strip() for s in (row.get("label") or "").split(";") if s.strip()))
        labels = label_sets.setdefault(labels, labels)  # one tuple per label set, shared (~100 bytes per row)
        if any("," in label for label in labels):
            commas.append(f"line {reader.line_num}: {_label_text(labels)}")
        real = os.path.realpath(p)
        real = str(p) if real == str(p) else real  # one string per file less (kept in `first`)
        skip, detail, size, mtime_ns = None, "", 0, 0
        # Missing or partial files first: a missing file listed twice is not_found twice, not once "duplicate".
        if is_partial(p.name):
            skip = "partial_download"
        elif not p.exists():
            skip, detail = "not_found", f"line {reader.line_num}: no such file (relative to the CSV's folder)"
        elif not p.is_file():
            skip, detail = "not_found", f"line {reader.line_num}: not a file"
        elif real in first:
            where, kept = first[real]
            skip, detail = "duplicate", f"line {reader.line_num}: same file as {where}"
            if set(kept) != set(labels):
                detail += _labels_differ(kept, labels, "that row's")
                relabelled.append(f"line {reader.line_num}: {raw!r} labelled {_label_text(labels)}, first {where} "
                                  f"labelled {_label_text(kept)}")
        else:
            st = p.stat()
            size, mtime_ns = st.st_size, st.st_mtime_ns
            first[real] = (f"{raw!r} (line {reader.line_num})", labels)
        items.append(Item(raw, path_key(raw), str(p), labels=labels, size=size, skip=skip, detail=detail,
                          mtime_ns=mtime_ns))
    if empty:
        lines = ", ".join(map(str, empty[:10])) + (" ..." if len(empty) > 10 else "")
        notes.append(f"{csv_path}: ignored {len(empty)} row(s) with an empty path (line {lines})")
    if commas:
        # A quoted "dog,cat" is one label here but two to matpac-eval (whose older rule splits on ','): say so, since
        # one manifest then gives the two tools different classes. AudioSet display names hold commas, hence one.
        notes.append(
            f"warning: {csv_path}: {len(commas)} row(s) have a label with a ',' (e.g. {commas[0]}); make-shards "
            f"separates labels by ';' only, so each is one label; write dog;cat for several (matpac-eval reads a "
            f"quoted dog,cat as two)"
        )
    if relabelled:
        notes.append(_relabelled_note(str(csv_path), relabelled, "duplicate row(s)", "first row"))
    if not items:
        path_header = next((f or "").strip() for f, n in zip(header, names) if n == "path")  # as the file spells it
        raise ValueError(f"{csv_path}: no rows with a path; add one row per audio file under the {path_header!r} "
                         "header")
    items.sort(key=lambda it: it.source)
    classes = _classes_from([it.labels for it in items])
    return Discovery(_with_indices(items, classes), classes, classes, notes)


def discover_synthetic(n: int, seed: int = 0) -> Discovery:
    from shard_tools.synthetic import CLASSES

    if isinstance(n, bool) or not isinstance(n, numbers.Integral):  # 4.5 was a TypeError from range()
        raise ValueError(f"--n must be a whole number of clips (got {n!r})")
    n = int(n)
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
