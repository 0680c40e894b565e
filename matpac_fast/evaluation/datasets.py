"""Labelled audio sets for evaluation: a folder, a CSV, or a known layout (FSDD, ESC-50, UrbanSound8K, GTZAN).

Everything a probe needs is resolved here, once, with one-line errors that name the offending row: the file list,
the label vocabulary, whether the task is multi-label, which column the "official" protocol uses, and the natural
grouping column (e.g. FSDD speaker). Audio is not read here (see `embed.py`).

Generic CSV: columns `path` (or file/filename; `path` first, as in make-shards), `label` (or labels/category/class);
optional `fold` or `split` (train/valid/test); any other column can name groups (`--folds group:COLUMN`). Paths are
relative to the CSV's folder (for a symlinked CSV, that of the file it points to, as in make-shards). Several labels
in one cell are separated by ';' as in make-shards' manifests ("dog;bark"), or by ',' in a quoted cell ("dog,bark");
any such cell makes the whole task multi-label (metric: mAP). Dataset names come from the resolved path, so one
dataset has one name however `--data` is typed.
"""

from __future__ import annotations

import csv
import hashlib
import json
import os
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from shard_tools.discover import AUDIO_EXTS  # make-shards' formats: soundfile's, and PyAV's containers

# 'path' first, as make-shards' manifest reader takes it: a CSV with both 'path' and 'file' was made into shards from
# one column and evaluated from the other.
FILE_COLUMNS = ("path", "file", "filename", "file_name", "slice_file_name")
LABEL_COLUMNS = ("label", "labels", "category", "class")
GTZAN_GENRES = ("blues", "classical", "country", "disco", "hiphop", "jazz", "metal", "pop", "reggae", "rock")
US8K_CLASSES = (
    "air_conditioner", "car_horn", "children_playing", "dog_bark", "drilling",
    "engine_idling", "gun_shot", "jackhammer", "siren", "street_music",
)  # fmt: skip
FSDD_CLASSES = tuple(str(d) for d in range(10))
FSDD_COLUMNS = {"filename", "label", "speaker", "take", "split"}  # the columns of FSDD's own labels.csv


@dataclass
class Clip:
    """One labelled file. `row` is the 1-based data row of the CSV it came from (None for folder layouts)."""

    path: str
    labels: tuple[str, ...]
    meta: dict[str, str] = field(default_factory=dict)
    row: int | None = None


@dataclass
class LabelledSet:
    name: str  # default task name
    root: str
    layout: str  # fsdd | esc50 | us8k | gtzan | folder | csv
    clips: list[Clip]
    classes: list[str]
    multilabel: bool
    source: str  # the CSV (or folder) rows refer to, for error messages
    official: str | None = None  # column that defines the official protocol: "split" or "fold"
    default_group: str | None = None  # e.g. "speaker" (FSDD)
    default_clip_seconds: float | None = None

    def __len__(self) -> int:
        return len(self.clips)

    def where(self, i: int) -> str:
        c = self.clips[i]
        return f"{self.source}: row {c.row} (line {c.row + 1})" if c.row is not None else f"{c.path}"

    def targets(self) -> np.ndarray:
        """Single-label: int64 (n,) class indices. Multi-label: float32 (n, C) in {0, 1}."""
        index = {c: i for i, c in enumerate(self.classes)}
        if not self.multilabel:
            return np.array([index[c.labels[0]] for c in self.clips], dtype=np.int64)
        Y = np.zeros((len(self.clips), len(self.classes)), dtype=np.float32)
        for i, c in enumerate(self.clips):
            Y[i, [index[lab] for lab in c.labels]] = 1.0
        return Y

    def column(self, name: str) -> list[str]:
        missing = [i for i, c in enumerate(self.clips) if name not in c.meta]
        if missing:
            have = sorted(self.clips[missing[0]].meta)
            raise ValueError(f"{self.where(missing[0])} has no column {name!r}; columns there: {have}")
        return [c.meta[name] for c in self.clips]

    def digest(self) -> str:
        """Identity of the file list + labels (part of the embedding cache key: a changed dataset misses)."""
        h = hashlib.sha256()
        for c in self.clips:
            st = os.stat(c.path)
            # os.fsencode: a file name that is not valid UTF-8 (make-shards reads those too) holds surrogates, which
            # str.encode() refuses; for every other name the bytes, and so the cache keys, are the same
            # nanosecond times: a file rewritten with as many bytes within the same second (whole seconds before)
            # kept its key, and the cache served the old file's embeddings; ctime also changes when a tool sets the
            # modification time back (touch -r, cp -p over it) or a file is renamed over another
            h.update(os.fsencode(c.path) + f"\0{st.st_size}\0{st.st_mtime_ns}\0{st.st_ctime_ns}\n".encode())
        return h.hexdigest()


# ---------------------------------------------------------------------------------------------------------------
def load_dataset(data: str | os.PathLike, classes: list[str] | None = None) -> LabelledSet:
    """Resolve `data` (folder, CSV, or known layout root) into a LabelledSet; one-line ValueError on mistakes.

    `classes` (optional, any layout) keeps only those labels: see `select_classes`."""
    ds = _load_any(data)
    return ds if classes is None else select_classes(ds, classes)


def _load_any(data: str | os.PathLike) -> LabelledSet:
    p = Path(data).expanduser()
    if not p.exists():
        raise ValueError(f"--data {data}: no such file or folder")
    if p.is_file():
        if p.suffix.lower() != ".csv":
            raise ValueError(f"--data {data}: expected a folder or a .csv file")
        return _from_csv_file(p)
    if (p / "labels.csv").is_file() and _is_fsdd_csv(p / "labels.csv"):
        return load_fsdd(p)
    if (p / "meta" / "esc50.csv").is_file():
        return load_esc50(p)
    for cand in (p / "metadata" / "UrbanSound8K.csv", p / "UrbanSound8K" / "metadata" / "UrbanSound8K.csv"):
        if cand.is_file():
            return load_us8k(cand.parent.parent)
    g = _gtzan_root(p)
    if g is not None:
        return load_gtzan(g)
    for name in ("labels.csv", "meta.csv", "metadata.csv"):
        if (p / name).is_file():
            return load_csv(p / name)
    recordings = _fsdd_recordings(p)
    if recordings is not None:
        return load_fsdd_recordings(recordings)
    return load_folder(p)


class UnknownLabels(ValueError):
    """--classes names labels the data does not have; the message lists the known ones."""

    def __init__(self, bad: list[str], source: str, known: list[str]):
        self.bad, self.known = bad, known
        self.known_hint = f"known labels: {_short(known, 50)}"
        s = "s" if len(bad) > 1 else ""
        super().__init__(f"--classes: unknown label{s} {', '.join(map(repr, bad[:5]))} in {source} ({self.known_hint})")


def select_classes(ds: LabelledSet, wanted: list[str]) -> LabelledSet:
    """Keep the clips of the `wanted` labels (in place, returns `ds`). Multi-label clips keep their wanted labels
    and are dropped when none is left. A wanted label the data does not have is a ValueError listing the known ones.
    The class order stays the dataset's (so FSDD "2,0,1" and "0,1,2" give the same task)."""
    wanted = list(dict.fromkeys(w.strip() for w in wanted if w.strip()))
    if not wanted:
        raise ValueError("--classes: no label given; pass comma-separated labels or a file with one per line")
    present = {lab for c in ds.clips for lab in c.labels}
    known = [c for c in ds.classes if c in present] + _sorted_labels(present - set(ds.classes))
    bad = [w for w in wanted if w not in present]
    if bad:
        raise UnknownLabels(bad, ds.source, known)
    keep = set(wanted)
    clips = []
    for c in ds.clips:
        labels = tuple(lab for lab in c.labels if lab in keep)
        if labels:
            c.labels = labels
            clips.append(c)
    ds.clips, ds.classes = clips, [c for c in known if c in keep]
    return ds


def _from_csv_file(p: Path) -> LabelledSet:
    # Known layouts are recognised by folder names, so by the resolved path: `--data esc50.csv` typed in meta/ has
    # no 'meta' in it. Their root stays as typed when the typed path names the CSV's folder (as it always did).
    real = p.resolve()
    root = p.parent.parent if p.parent.name not in ("", "..") else real.parent.parent
    if real.name == "esc50.csv" and real.parent.name == "meta":
        return load_esc50(root)
    if real.name == "UrbanSound8K.csv":
        return load_us8k(root)
    if real.name == "labels.csv" and _is_fsdd_csv(p):  # FSDD's own file; any other CSV is read as itself
        return load_fsdd(p.parent)
    return load_csv(p)


def _read_rows(path: Path) -> tuple[list[str], list[dict[str, str]]]:
    try:  # utf-8-sig: a byte-order mark (Excel's "CSV UTF-8") is not part of the first column's name
        with open(path, newline="", encoding="utf-8-sig") as f:
            reader = csv.DictReader(f)
            if not reader.fieldnames:
                raise ValueError(f"{path}: empty CSV (expected a header line such as 'file,label')")
            fields = [h.strip() for h in reader.fieldnames]
            rows = []
            for n, r in enumerate(reader, start=1):
                extra = [c.strip() for c in r.pop(None, None) or () if c.strip()]  # cells past the header's columns
                if extra:  # an unquoted comma inside a label: reading on would cut the label silently
                    raise ValueError(
                        f"{path}: row {n} (line {reader.line_num}) has {len(fields) + len(extra)} cells, the header "
                        f"{len(fields)} (extra: {extra[0]!r}); quote a path that holds a comma; put several labels "
                        "in one cell separated by ';' (a ',' separates labels too, also in a quoted cell, so "
                        "\"Male speech, man speaking\" is two labels here: rename such a label)")
                rows.append({(k or "").strip(): (v or "").strip() for k, v in r.items()})  # empty extras: dropped
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}: not UTF-8 text (byte 0x{e.object[e.start]:02x} at offset {e.start}); save the "
                         "CSV as UTF-8") from None
    except csv.Error as e:  # e.g. a quote left open swallowing 128 KiB of rows: "field larger than field limit"
        raise ValueError(f"{path}: line {reader.line_num}: {e} (a quote left open?); check the quoting") from None
    return fields, rows


def _pick(fields: list[str], wanted: tuple[str, ...], what: str, path: Path) -> str:
    lower = {f.lower(): f for f in fields}
    for w in wanted:
        if w in lower:
            return lower[w]
    raise ValueError(f"{path}: no {what} column (looked for {', '.join(wanted)}; header is {','.join(fields)})")


def _split_labels(cell: str) -> tuple[str, ...]:
    """A label cell -> its labels. make-shards' manifest rule (shard_tools/discover.py, discover_manifest): labels are
    separated by ';', each piece stripped of whitespace, empty pieces dropped; a ',' (in a quoted cell such as
    "dog,cat", this reader's older documented separator) separates labels too."""
    # a label repeated in one cell counts once: 'dog;dog' is one label, not a multi-label row
    return tuple(dict.fromkeys(s.strip() for s in re.split(r"[;,]", cell) if s.strip()))


def _csv_name(path: Path) -> str:
    """A generic CSV's dataset name: its folder's, plus the file's stem unless that is a conventional one, so that
    two CSVs in one folder (e.g. two subsets) never share a task name and replace each other's results. Built from
    the resolved path, so `ev.csv`, `./ev.csv` and `/abs/dir/ev.csv` are one task (and `.`/`..` never leak in)."""
    path = path.resolve()
    folder = path.parent.name
    if path.stem in ("labels", "meta", "metadata"):
        return folder or path.stem
    return f"{folder}-{path.stem}" if folder else path.stem


def load_csv(
    path: str | os.PathLike,
    classes: list[str] | None = None,
    *,
    file_column: str | None = None,
    label_column: str | None = None,
    audio_dir: str | os.PathLike | None = None,
    layout: str = "csv",
    name: str | None = None,
) -> LabelledSet:
    """Generic labelled CSV. `classes` (optional) is the allowed vocabulary: any other label is an error (the known
    layouts use it for their fixed vocabularies; `--classes` filters instead, see `select_classes`)."""
    path = Path(path)
    fields, rows = _read_rows(path)
    fcol = file_column or _pick(fields, FILE_COLUMNS, "file", path)
    lcol = label_column or _pick(fields, LABEL_COLUMNS, "label", path)
    base = Path(audio_dir) if audio_dir is not None else path.parent
    if audio_dir is None and layout == "csv" and path.is_symlink():
        # make-shards' rule (discover_manifest): relative paths start at the folder of the file the link points to;
        # a manifest made into shards through a link found none of its files here
        base = path.resolve().parent
    allowed = set(classes) if classes is not None else None
    clips = []
    for n, r in enumerate(rows, start=1):
        where = f"{path}: row {n} (line {n + 1})"
        if not r.get(fcol):
            raise ValueError(f"{where}: empty {fcol!r} cell; every row needs an audio file")
        f = Path(r[fcol])
        f = f if f.is_absolute() else base / f
        if not f.is_file():
            raise ValueError(f"{where}: file {r[fcol]!r} not found (looked at {f}); fix the path or drop the row")
        labels = _split_labels(r.get(lcol, ""))
        if not labels:
            raise ValueError(f"{where}: empty {lcol!r} cell; every row needs a label")
        bad = [lab for lab in labels if allowed is not None and lab not in allowed]
        if bad:
            raise ValueError(f"{where}: unknown label {bad[0]!r} (known labels: {_short(sorted(allowed))})")
        meta = {k: v for k, v in r.items() if k not in (fcol, lcol)}
        clips.append(Clip(str(f), labels, meta, row=n))
    if not clips:
        raise ValueError(f"{path}: no rows")
    _warn_repeated_files(path, clips)
    _warn_comma_labels(path, rows, lcol, clips)
    multilabel = any(len(c.labels) > 1 for c in clips)
    vocab = list(classes) if classes is not None else _sorted_labels({lab for c in clips for lab in c.labels})
    # any case, as the file and label columns: 'Split' is the split column. Its cells are also kept under the name as
    # written, so that --folds group:Fold still finds the column.
    lower = {f.lower(): f for f in fields}
    official = "split" if "split" in lower else ("fold" if "fold" in lower else None)
    if official is not None and lower[official] != official:
        for c in clips:
            c.meta.setdefault(official, c.meta.get(lower[official], ""))
    return LabelledSet(
        name=name or _csv_name(path),
        root=str(path.parent),
        layout=layout,
        clips=clips,
        classes=vocab,
        multilabel=multilabel,
        source=str(path),
        official=official,
    )


def _warn_repeated_files(path: Path, clips: list[Clip]) -> None:
    """A file listed twice can land on both sides of a split (its test score is then a training score): say so.
    Not an error: a multi-split protocol may list a file once per split on purpose."""
    first: dict[str, int] = {}
    repeats = []
    for c in clips:
        real = os.path.realpath(c.path)
        if real in first:
            repeats.append((c.row, first[real], c.path))
        else:
            first[real] = c.row
    if repeats:
        row, was, f = repeats[0]
        print(f"matpac-eval: warning: {path}: {len(repeats)} row(s) repeat a file of an earlier row (e.g. row {row} "
              f"repeats row {was}: {f}); a file on both the training and the test side inflates the score: list "
              "each file once", file=sys.stderr, flush=True)


def _warn_comma_labels(path: Path, rows: list[dict[str, str]], lcol: str, clips: list[Clip]) -> None:
    """A quoted label cell holding a ',' (AudioSet's "Male speech, man speaking") is several labels here, one label to
    make-shards: it made the task multi-label (mAP) with made-up classes without a word (and the error for an
    unquoted one advised quoting it). Say so, once."""
    split = [(c, r[lcol]) for c, r in zip(clips, rows) if "," in r.get(lcol, "") and len(c.labels) > 1]
    if split:
        c, cell = split[0]
        print(f"matpac-eval: warning: {path}: {len(split)} row(s) have a ',' in their label cell (e.g. row {c.row}: "
              f"{cell!r} read as the labels {', '.join(map(repr, c.labels))}); matpac-eval separates labels by ',' "
              "and ';', so these rows are multi-label (make-shards reads such a cell as one label); rename a label "
              "that holds a comma", file=sys.stderr, flush=True)


def _synthetic_set(root: Path) -> bool:
    """Whether a shard set's manifest says it was made by `make-shards synthetic` (sources "synthetic/<seed>/<i>")."""
    try:
        with open(root / "manifest.jsonl", encoding="utf-8") as f:
            first = json.loads(f.readline() or "{}")
    except (OSError, ValueError):
        return False
    return isinstance(first, dict) and str(first.get("source", "")).startswith("synthetic/")


def _short(items: list[str], n: int = 12) -> str:
    return ", ".join(items[:n]) + (f", ... ({len(items)} in all)" if len(items) > n else "")


def _sorted_labels(labels: set[str]) -> list[str]:
    """Numeric labels sort numerically ("2" < "10"), others alphabetically. Labels of one value ("1", "01") sort by
    their text: the order of a set's strings changes with PYTHONHASHSEED, and with it the class indices (and so the
    probe's seeded initial weights per class and the scores of one command)."""
    if all(lab.lstrip("-").isdigit() for lab in labels):
        return sorted(labels, key=lambda lab: (int(lab), lab))
    return sorted(labels)


def load_folder(root: str | os.PathLike, classes: list[str] | None = None, layout: str = "folder") -> LabelledSet:
    """label = first-level subfolder of `root`; audio files found recursively below it. (make-shards' folder rule is
    the folder directly holding each file: the two differ for files in nested subfolders, which gets one warning.)"""
    root = Path(root)
    clips, nested = [], []
    for sub in sorted(d for d in root.iterdir() if d.is_dir() and not d.name.startswith(".")):
        for f in sorted(sub.rglob("*")):
            if f.suffix.lower() in AUDIO_EXTS and f.is_file():
                if classes is not None and sub.name not in classes:
                    raise ValueError(f"{f}: unknown label {sub.name!r} (known labels: {_short(list(classes))})")
                clips.append(Clip(str(f), (sub.name,), {"folder": sub.name}))
                if f.parent.name != sub.name:  # make-shards' rule (the folder holding it) gives another label
                    nested.append(f)
    if not clips:
        if (root / "sizes.json").is_file() and (root / "stats.json").is_file():
            # a make-shards output is the natural next thing to point at; its clips are log-mel, not audio
            if _synthetic_set(root):  # made from no files: there is no folder to name
                raise ValueError(f"--data {root} is a make-shards synthetic set (log-mel of generated sounds): "
                                 "matpac-eval reads audio files, and this corpus has none; the demo probes an encoder "
                                 "on a held-out synthetic split (python -m matpac_fast.demo), or give a folder or CSV "
                                 "of audio")
            raise ValueError(f"--data {root} is a make-shards shard set (log-mel): matpac-eval reads audio; pass the "
                             "folder or CSV the shards were made from")
        raise ValueError(
            f"--data {root}: no audio files in label subfolders (expected {root}/<label>/*.wav) and no labels CSV"
        )
    if nested:
        _warn_nested(root, nested, len(clips))
    vocab = list(classes) if classes is not None else _sorted_labels({c.labels[0] for c in clips})
    return LabelledSet(
        name=root.resolve().name or "root", root=str(root), layout=layout, clips=clips, classes=vocab,
        multilabel=False, source=str(root),
    )


def _warn_nested(root: Path, nested: list[Path], n: int) -> None:
    """One warning line: files below a class folder's own subfolders get the first-level folder as their label here,
    the folder directly holding them in `make-shards folder`."""
    rel = nested[0].relative_to(root)
    print(
        f"matpac-eval: warning: --data {root}: {len(nested)} of {n} audio files are in subfolders of their class "
        f"folder (e.g. {rel.as_posix()}); matpac-eval labels every file by its first-level folder under --data "
        f"({rel.parts[0]!r} here), while 'make-shards folder' labels it by the folder directly holding it "
        f"({rel.parent.name!r}); for other labels pass --data a CSV manifest (path,label)",
        file=sys.stderr,
        flush=True,
    )


# --- known layouts ------------------------------------------------------------------------------------------------
def _is_fsdd_csv(path: Path) -> bool:
    """FSDD's labels.csv: all of its columns (then a label other than a digit is FSDD's error, "unknown label"), or
    filename,label,speaker with only the digits 0-9 as labels (a labels.csv of other classes with those three
    columns is a generic CSV, not FSDD with unknown labels)."""
    try:
        fields, rows = _read_rows(path)
    except ValueError:
        return False  # load_csv reports it
    if FSDD_COLUMNS <= set(fields):
        return True
    return {"filename", "label", "speaker"} <= set(fields) and all(r.get("label") in FSDD_CLASSES for r in rows)


def load_fsdd(root: str | os.PathLike) -> LabelledSet:
    """Free Spoken Digit Dataset: labels.csv (filename,label,speaker,take,split,...); official = split column."""
    root = Path(root)
    ds = load_csv(root / "labels.csv", classes=list(FSDD_CLASSES), layout="fsdd", name="fsdd")
    ds.official, ds.default_group, ds.default_clip_seconds = "split", "speaker", 1.0
    return ds


FSDD_NAME = re.compile(r"([0-9])_([A-Za-z]+)_([0-9]+)\.wav")  # {digit}_{speaker}_{take}.wav


def _fsdd_recordings(p: Path) -> Path | None:
    """FSDD as its repository ships it, without a labels.csv: `p/recordings` (or `p`) holding only files named
    {digit}_{speaker}_{take}.wav. Read as a folder, it was one class, 'recordings', or no labelled subfolder."""
    for d in (p / "recordings", p):
        if d.is_dir() and d != p and _other_class_folders(p, d):
            continue  # `p` is a folder of classes, one of them named 'recordings': read as a folder, not as FSDD
        if d.is_dir():
            names = [f.name for f in d.iterdir() if not f.name.startswith(".")]
            if names and all(FSDD_NAME.fullmatch(n) for n in names):
                return d
    return None


def _other_class_folders(p: Path, recordings: Path) -> bool:
    """Whether `p` has a first-level subfolder other than `recordings` holding audio files (a label folder)."""
    return any(sub != recordings and sub.is_dir() and not sub.name.startswith(".")
               and any(f.suffix.lower() in AUDIO_EXTS and f.is_file() for f in sub.rglob("*"))
               for sub in p.iterdir())


def load_fsdd_recordings(folder: str | os.PathLike) -> LabelledSet:
    """FSDD from its file names (`_fsdd_recordings`): label, speaker and take, and its README's official split
    (takes 0-4 test, 5-49 train), in the order of the labels.csv that copies of it carry (digit, speaker, take)."""
    folder = Path(folder)
    found = sorted(((int(m[1]), m[2], int(m[3])), f) for f in folder.iterdir()
                   if (m := FSDD_NAME.fullmatch(f.name)))
    clips = [Clip(str(f), (str(d),), {"speaker": spk, "take": str(take), "split": "test" if take < 5 else "train"})
             for (d, spk, take), f in found]
    root = folder.parent if folder.name == "recordings" else folder
    return LabelledSet(name="fsdd", root=str(root), layout="fsdd", clips=clips, classes=list(FSDD_CLASSES),
                       multilabel=False, source=str(folder), official="split", default_group="speaker",
                       default_clip_seconds=1.0)


def load_esc50(root: str | os.PathLike) -> LabelledSet:
    """ESC-50: meta/esc50.csv (filename, fold, target, category, ...), audio/ holds the files; 5-fold CV."""
    root = Path(root)
    ds = load_csv(
        root / "meta" / "esc50.csv", file_column="filename", label_column="category",
        audio_dir=root / "audio", layout="esc50", name="esc50",
    )  # fmt: skip
    ds.root, ds.official, ds.default_clip_seconds = str(root), "fold", 5.0
    ds.default_group = "src_file"  # clips cut from one recording must not straddle train and test
    return ds


def load_us8k(root: str | os.PathLike) -> LabelledSet:
    """UrbanSound8K: metadata/UrbanSound8K.csv (slice_file_name, fsID, ..., fold, classID, class); audio/foldN/."""
    root = Path(root)
    csv_path = root / "metadata" / "UrbanSound8K.csv"
    fields, rows = _read_rows(csv_path)
    for col in ("slice_file_name", "fold", "class"):
        if col not in fields:
            raise ValueError(f"{csv_path}: missing column {col!r} (header is {','.join(fields)})")
    clips = []
    for n, r in enumerate(rows, start=1):
        f = root / "audio" / f"fold{r['fold']}" / r["slice_file_name"]
        where = f"{csv_path}: row {n} (line {n + 1})"
        if not f.is_file():
            raise ValueError(f"{where}: file {f} not found; fix the path or drop the row")
        if r["class"] not in US8K_CLASSES:
            raise ValueError(f"{where}: unknown label {r['class']!r} (known labels: {', '.join(US8K_CLASSES)})")
        meta = {k: v for k, v in r.items() if k not in ("slice_file_name", "class")}
        clips.append(Clip(str(f), (r["class"],), meta, row=n))
    return LabelledSet(
        name="us8k", root=str(root), layout="us8k", clips=clips, classes=list(US8K_CLASSES), multilabel=False,
        source=str(csv_path), official="fold", default_group="fsID", default_clip_seconds=4.0,
    )  # fmt: skip


def _gtzan_root(p: Path) -> Path | None:
    for cand in (p, p / "genres", p / "genres_original", p / "Data" / "genres_original"):
        if cand.is_dir() and {d.name for d in cand.iterdir() if d.is_dir()} >= set(GTZAN_GENRES):
            return cand
    return None


def load_gtzan(genres_dir: str | os.PathLike) -> LabelledSet:
    """GTZAN genre folders. Official protocol = the fault-filtered split lists (train/valid/test_filtered.txt,
    as used by EVAR) when they sit in the genre folder or its parent; otherwise use --folds kfold:10."""
    g = Path(genres_dir)
    ds = load_folder(g, classes=list(GTZAN_GENRES), layout="gtzan")
    ds.name, ds.default_clip_seconds = "gtzan", 30.0
    for d in (g, g.parent):
        lists = {s: d / f"{s}_filtered.txt" for s in ("train", "valid", "test")}
        if all(f.is_file() for f in lists.values()):
            split_of = {}
            for s, f in lists.items():
                for line in f.read_text().split():
                    split_of[Path(line).name] = s
            kept = [c for c in ds.clips if Path(c.path).name in split_of]
            for c in kept:
                c.meta["split"] = split_of[Path(c.path).name]
            ds.clips, ds.official = kept, "split"
            break
    return ds
