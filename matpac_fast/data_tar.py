"""Tar shards read without `tarfile`: a member index over an mmap'd file, and a sequential stream reader.

Why not `tarfile` / WebDataset's iterator: both parse every header through several Python layers and copy every
payload; for 80 x 1000 fp16 clips they manage ~2,500 samples/s per core. Here a local shard is mmap'd once, its
member table is read from the index file make-shards writes beside it (`<shard>.tar.idx`) or built by walking its
512-byte headers (~2 headers per sample, microseconds each when cached, a random read each when not), and a sample is
a zero-copy `np.frombuffer` view of the `.npy` payload inside the mapping; the loader then copies only the time crop.
Remote shards (URLs, `pipe:` commands) cannot be mapped, so the same header parser also runs over a byte stream.

Only two payload kinds are ever decoded: `.npy` (header parsed with `ast.literal_eval`, the data read as raw
float16 — never unpickled) and `.json`. Everything else in a shard is skipped unread.

Supported tar dialects: POSIX ustar (with prefix), GNU long names ('L'), PAX extended headers ('x'; `path` and
`size`), which covers what `tarfile`, GNU tar and WebDataset's TarWriter write.
"""

from __future__ import annotations

import ast
import json
import math
import mmap
import os
import re
import warnings
from collections import OrderedDict
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from matpac_fast.safe_files import TooLarge, read_regular

BLOCK = 512
_ZERO_BLOCK = bytes(BLOCK)
_REGULAR = (b"0", b"\0", b"7")
# WebDataset's rule: the key is the member path up to the first dot of its basename, the rest is the extension.
_KEY_RE = re.compile(r"^((?:.*/|)[^./]+)\.([^/]*)$")
_NPY_MAGIC = b"\x93NUMPY"


class ShardError(Exception):
    """A shard that cannot be read: missing, truncated, bad checksum, bad payload."""


# ---------------------------------------------------------------------------------------------------------------
# headers


def _number(field: bytes) -> int:
    if field[:1] and field[0] & 0x80:  # GNU base-256 for sizes >= 8 GiB
        return int.from_bytes(field[1:], "big")
    text = field.split(b"\0", 1)[0].strip()
    try:
        n = int(text, 8) if text else 0
    except ValueError as e:
        raise ShardError(f"bad number field {field!r} in tar header") from e
    if n < 0:  # a negative size would step the walk backwards: an endless loop over the same headers
        raise ShardError(f"bad number field {field!r} in tar header")
    return n


def parse_header(block: bytes) -> tuple[str, int, bytes]:
    """512-byte header -> (name, size, typeflag); checks the checksum so a corrupt shard is noticed."""
    stored = _number(block[148:156])
    actual = sum(block) - sum(block[148:156]) + 8 * 32  # the checksum field counts as spaces
    if stored != actual:
        raise ShardError("bad tar header checksum (corrupt or not a tar file)")
    name = block[0:100].split(b"\0", 1)[0]
    if block[257:263] == b"ustar\0":  # POSIX: name may be split into prefix/name
        prefix = block[345:500].split(b"\0", 1)[0]
        if prefix:
            name = prefix + b"/" + name
    return name.decode("utf-8", "replace"), _number(block[124:136]), block[156:157]


def _parse_pax(data: bytes) -> dict[str, str]:
    out, pos = {}, 0
    while pos < len(data):
        space = data.find(b" ", pos)
        length = int(data[pos:space]) if data[pos:space].isdigit() else 0
        if space < 0 or length <= space - pos:  # a record longer than its length field: 0 would never advance
            raise ShardError("bad PAX extended header (corrupt shard)")
        key, _, value = data[space + 1 : pos + length - 1].partition(b"=")
        out[key.decode("utf-8", "replace")] = value.decode("utf-8", "replace")
        pos += length
    return out


def split_key(name: str) -> tuple[str, str] | None:
    m = _KEY_RE.match(name)
    return (m.group(1), m.group(2)) if m else None


class _MmapCursor:
    """Cursor over a mapping; `data` returns the payload offset (no copy)."""

    def __init__(self, buf):
        self.buf, self.pos, self.end = buf, 0, len(buf)

    def read(self, n: int) -> bytes:
        out = self.buf[self.pos : self.pos + n]
        self.pos += len(out)
        return out

    def data(self, size: int, padded: int) -> tuple[int, int]:
        if self.pos + size > self.end:
            raise ShardError("truncated tar member")
        off = self.pos
        self.pos = min(self.pos + padded, self.end)
        return off, size

    def skip(self, size: int, padded: int) -> None:
        self.data(size, padded)


class _StreamCursor:
    """Cursor over a byte stream (file, pipe, HTTP); `data` returns the payload bytes."""

    def __init__(self, f):
        self.f = f

    def read(self, n: int) -> bytes:
        return self.f.read(n)

    def data(self, size: int, padded: int) -> bytes:
        out = self.f.read(padded)
        if len(out) < size:
            raise ShardError("truncated tar member")
        return out[:size] if padded != size else out

    def skip(self, size: int, padded: int) -> None:
        while padded > 0:
            got = len(self.f.read(min(padded, 1 << 20)))
            if got == 0:
                # Missing payload bytes are corruption; missing padding is caught by the next header read.
                if size > 0:
                    raise ShardError("truncated tar member")
                return
            padded -= got
            size -= got


def iter_members(cur, want: Callable[[str], bool]) -> Iterator[tuple[str, object]]:
    """Yield (name, payload) for the regular members `want` accepts; payload = (offset, size) (mmap) or bytes."""
    long_name: str | None = None
    pax: dict[str, str] = {}
    while True:
        block = cur.read(BLOCK)
        if len(block) < BLOCK:
            # A complete shard ends with zero blocks; a short read means the file was cut.
            raise ShardError("truncated tar (no end-of-archive marker)")
        if block == _ZERO_BLOCK:
            return
        name, size, typ = parse_header(block)
        if typ in (b"x", b"L"):
            raw = cur.data(size, (size + BLOCK - 1) & ~(BLOCK - 1))
            if isinstance(raw, tuple):
                raw = bytes(cur.buf[raw[0] : raw[0] + size])
            if typ == b"L":
                long_name = raw.split(b"\0", 1)[0].decode("utf-8", "replace")
            else:
                pax = _parse_pax(raw)
            continue
        if "path" in pax:
            name = pax["path"]
        elif long_name is not None:
            name = long_name
        if "size" in pax:
            if not (pax["size"].isascii() and pax["size"].isdigit()):
                raise ShardError(f"bad PAX size {pax['size'][:30]!r} in tar header")
            size = int(pax["size"])
        long_name, pax = None, {}
        padded = (size + BLOCK - 1) & ~(BLOCK - 1)
        if typ in _REGULAR and want(name):
            yield name, cur.data(size, padded)
        else:
            cur.skip(size, padded)


# ---------------------------------------------------------------------------------------------------------------
# npy payloads


@dataclass(frozen=True)
class NpyLayout:
    data_offset: int  # bytes from the start of the payload
    shape: tuple[int, ...]
    count: int  # elements


_HEADER_CACHE: dict[bytes, tuple[str, bool, tuple, int]] = {}
# numpy's own limit (np.load's max_header_size): a float16 2-D header is ~120 bytes, and ast.literal_eval of a
# 10-MB header (a shape of millions of entries) takes ~5 GB and ~20 s.
MAX_NPY_HEADER = 10_000


def npy_layout(buf, offset: int, size: int) -> NpyLayout:
    """Parse an .npy header (versions 1-3) at `offset` without numpy's pickle-capable loader."""
    head = bytes(buf[offset : offset + 12])
    if head[:6] != _NPY_MAGIC:
        raise ShardError("npy member without NUMPY magic")
    if head[6] == 1:
        hlen, start = int.from_bytes(head[8:10], "little"), 10
    elif head[6] in (2, 3):
        hlen, start = int.from_bytes(head[8:12], "little"), 12
    else:
        raise ShardError(f"unsupported npy version {head[6]}")
    if hlen > MAX_NPY_HEADER:
        raise ShardError(f"npy header of {hlen} bytes (at most {MAX_NPY_HEADER})")
    text = bytes(buf[offset + start : offset + start + hlen])
    parsed = _HEADER_CACHE.get(text)
    if parsed is None:
        try:
            d = ast.literal_eval(text.decode("latin1"))  # literals only: cannot run code
            shape = tuple(d["shape"])
            if not all(type(x) is int and x >= 0 for x in shape):  # -1 read the rest of the shard as this clip
                raise ValueError(f"shape {shape}")
            parsed = (d["descr"], bool(d["fortran_order"]), shape, math.prod(shape))  # Python ints: no overflow
        except (ValueError, SyntaxError, KeyError, TypeError, MemoryError, RecursionError) as e:
            raise ShardError(f"bad npy header {text[:60]!r}") from e
        if len(_HEADER_CACHE) < 4096:
            _HEADER_CACHE[text] = parsed
    descr, fortran, shape, count = parsed
    if descr not in ("<f2", "f2") or fortran:
        raise ShardError(f"npy payload is {descr} fortran_order={fortran}; the shard format is C-order float16")
    if start + hlen + 2 * count > size:
        raise ShardError("npy payload shorter than its header says")
    return NpyLayout(start + hlen, shape, count)


def npy_view(buf, offset: int, size: int) -> np.ndarray:
    """Zero-copy float16 view of the .npy payload stored at buf[offset:offset+size]."""
    lay = npy_layout(buf, offset, size)
    return np.frombuffer(buf, dtype="<f2", count=lay.count, offset=offset + lay.data_offset).reshape(lay.shape)


# ---------------------------------------------------------------------------------------------------------------
# indexed local shards


def _plain_members(mm) -> list[tuple[str, tuple[int, int]]] | None:
    """Fast walk of a tar made only of plain ustar/GNU headers (what shard writers produce for short keys).

    Index building costs as much as reading a sample when done header by header in Python (~15 us each, mostly
    the checksum), so here the walk only slices name and size, and all checksums are verified at the end in one
    numpy pass; a bad header anywhere still fails the whole shard. Returns None on an extended header ('x', 'g',
    'L', 'K'): the caller then uses the general walker."""
    end, pos = len(mm), 0
    heads, out = [], []
    while True:
        if pos + BLOCK > end:
            raise ShardError("truncated tar (no end-of-archive marker)")
        block = mm[pos : pos + BLOCK]
        if block == _ZERO_BLOCK:
            break
        typ = block[156:157]
        if typ in (b"x", b"g", b"L", b"K"):
            return None
        size = _number(block[124:136])
        if typ in _REGULAR:
            name = block[0:100].split(b"\0", 1)[0]
            if block[257:263] == b"ustar\0" and block[345] != 0:
                name = block[345:500].split(b"\0", 1)[0] + b"/" + name
            if pos + BLOCK + size > end:
                raise ShardError("truncated tar member")
            if name.endswith((b".npy", b".json")):
                out.append((name.decode("utf-8", "replace"), (pos + BLOCK, size)))
        heads.append(pos)
        pos += BLOCK + ((size + BLOCK - 1) & ~(BLOCK - 1))
    if heads:
        raw = np.frombuffer(mm, np.uint8, count=heads[-1] + BLOCK)
        blocks = raw[np.asarray(heads)[:, None] + np.arange(BLOCK)]
        actual = blocks.sum(axis=1, dtype=np.int64) - blocks[:, 148:156].sum(axis=1, dtype=np.int64) + 8 * 32
        stored = np.array([_number(bytes(blocks[i, 148:156])) for i in range(len(heads))], dtype=np.int64)
        if not np.array_equal(actual, stored):
            raise ShardError("bad tar header checksum (corrupt or not a tar file)")
    return out


def _advise(mm, option: str, start: int = 0, length: int | None = None) -> None:
    """mm.madvise(mmap.<option>) over [start, start + length) (default: to the end), where the platform has it."""
    flag = getattr(mmap, option, None)
    if flag is not None and isinstance(mm, mmap.mmap) and len(mm):
        mm.madvise(flag, start, len(mm) - start if length is None else length)


class TarIndex:
    """mmap of one local shard + the (key, npy, json) member table in tar order."""

    def __init__(self, path: str):
        self.path = path
        self._stamp = self._map()
        self._build()

    def _map(self) -> tuple[int, int]:
        """Map the file into `mm` (`release` sets it to None); returns the file's (size, mtime_ns)."""
        try:
            with open(self.path, "rb") as f:
                st = os.fstat(f.fileno())
                self.mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) if st.st_size else b""
        except OSError as e:
            raise ShardError(f"{e.strerror or e}") from e
        # The index walk touches one header page per member, but a fault's default read-around (up to the device's
        # read-ahead, 8 MiB on this project's CPU machine) read whole shards: a worker read its whole range before
        # its first batch, and a set larger than the page cache was read ~17x over during the epoch (a 31 GiB set,
        # 23 GiB of RAM: first batch after 31.8 GiB read, then 41 GiB for 2.4 GiB of samples, ~1,000 samples/s).
        # Random access, with each sample asking for its own payload (`array`): 1.7 GiB, then 2.3 GiB, ~8,300/s.
        _advise(self.mm, "MADV_RANDOM")
        return st.st_size, st.st_mtime_ns

    def release(self) -> None:
        """Drop the mapping (Python's mmap holds a file descriptor, closed once no array view of it is left) but keep
        the member table: `remap` then costs an open and an mmap instead of a walk over every header of the shard."""
        self.mm = None

    def remap(self) -> None:
        stamp = self._map()
        if stamp != self._stamp:  # replaced or rewritten since it was indexed: its table may be stale
            self._stamp = stamp
            self._build()

    def _build(self) -> None:
        """The member table: from the shard's index file when it has a usable one (one small read instead of a
        random read of every member header), else by walking the headers."""
        self.from_file, self._checked, self._asked = False, -1, set()
        if os.path.exists(index_path(self.path)):
            try:
                self.keys, self._refs = read_index_file(self.path, self._stamp[0])
                self.from_file = True
                return
            except ShardError as e:
                warnings.warn(f"{index_path(self.path)} was not used ({e}); the shard's headers were read instead. "
                              "Check the set with verify-shards", stacklevel=2)
        self.keys, self._refs = walk_table(self.mm)

    def _stale(self, why: str) -> None:
        """A table read from the index file that the tar contradicts: walk the tar instead, from now on."""
        warnings.warn(f"{index_path(self.path)} does not match its shard ({why}); the shard's headers were read "
                      "instead. Check the set with verify-shards", stacklevel=3)
        self.keys, self._refs = walk_table(self.mm)
        self.from_file = False

    def _row(self, i: int) -> list[int]:
        """Sample i's [npy offset, size, json offset or -1, size]. A table read from an index file is first checked
        against the tar headers in front of the payloads (blocks beside the data, read anyway): a shard replaced
        without its index file must not give one sample's key or labels with another's clip."""
        if i >= len(self.keys):
            raise ShardError(f"sample {i} is past the end of the shard ({len(self.keys)} samples)")
        row = self._refs[i].tolist()
        if self.from_file and i != self._checked:
            key = self.keys[i]
            why = _header_mismatch(self.mm, row[0], row[1], f"{key}.npy")
            if why is None and row[2] >= 0:
                why = _header_mismatch(self.mm, row[2], row[3], f"{key}.json")
            if why:
                self._stale(why)
                return self._row(i)
            self._checked = i  # `array` then `json_bytes` of one sample: its headers are checked once
        return row

    def __len__(self) -> int:
        return len(self.keys)

    def array(self, i: int, data: bool = True) -> np.ndarray:
        """Zero-copy view of sample i's clip. `data=False`: its bytes are not asked for, only the .npy header is read
        (to check it and give the shape): for passing over a clip without reading it (a resume inside an epoch)."""
        refs = self._refs
        if i in self._asked:  # the loader's read-ahead asked for its bytes already
            self._asked.discard(i)
            asked = True
        else:
            asked = self.prefetch(i, keep=False) if data else True
        off, size = self._row(i)[:2]
        if not asked or (data and self._refs is not refs):  # a stale index file gave way to a walk: offsets moved
            start = off - off % mmap.PAGESIZE  # madvise wants a page-aligned start
            _advise(self.mm, "MADV_WILLNEED", start, off + size - start)  # one read of the payload, not one per fault
        return npy_view(self.mm, off, size)

    def prefetch(self, i: int, keep: bool = True, data: bool = True) -> bool:
        """Ask for sample i's bytes ahead of `array(i)` (advice only; `keep`: remember it, so that `array` does not
        ask again, a syscall per clip). With a table from an index file: the .npy header, payload and the .json right
        after it in one request, asked before the header check reads the header (cold, that check was a read of its
        own, waited for before the payload's: 5,240 clips/s against 7,312 for a walked table, whose walk had read
        the headers). A walked table: only the payload (its header was read by the walk).
        `data=False`: only the page(s) of the tar and .npy headers, for `array(i, data=False)`; not remembered, so
        that an `array(i)` asks for the payload itself."""
        if i >= len(self.keys):
            return False
        off, size, joff, jsize = self._refs[i].tolist()
        if not data:
            if self.from_file:  # a walked table's headers were read by the walk
                start = off - BLOCK - (off - BLOCK) % mmap.PAGESIZE
                _advise(self.mm, "MADV_WILLNEED", start, min(off + size, off + 2 * BLOCK) - start)
            return False
        if self.from_file:
            end = joff + jsize if 0 <= joff - (off + size) <= 2 * BLOCK else off + size  # make-shards: .json follows
            off -= BLOCK
        elif not keep:
            return False  # array asks for the payload itself
        else:
            end = off + size
        start = off - off % mmap.PAGESIZE
        _advise(self.mm, "MADV_WILLNEED", start, end - start)
        if keep:
            self._asked.add(i)
        return True

    def json_bytes(self, i: int) -> bytes | None:
        off, size = self._row(i)[2:]
        return None if off < 0 else bytes(self.mm[off : off + size]).rstrip(b"\0")


def walk_table(mm) -> tuple[list[str], np.ndarray]:
    """(keys, refs) of a mapped tar by reading its headers: refs is one int64 row per sample (npy offset, size,
    json offset or -1, size), in tar order."""
    keys: list[str] = []
    refs: list[tuple[int, int, int, int]] = []
    members = _plain_members(mm)
    if members is None:  # extended headers (long names): the general walker
        members = iter_members(_MmapCursor(mm), lambda n: n.endswith((".npy", ".json")))
    for key, parts in group_samples(members):
        if "npy" not in parts:
            raise ShardError(f"sample {key!r} has no .npy member")
        keys.append(key)
        refs.append(parts["npy"] + parts.get("json", (-1, 0)))
    # One int64 row per sample: the cache keeps every shard's table for the whole run, and lists of tuples of
    # Python ints made a table with its keys 301 bytes a sample, 116 this way (20,000 AudioSet-like keys; 2 million
    # clips, as a resampled-mode worker indexes: 0.6 -> 0.23 GB).
    return keys, np.array(refs, dtype=np.int64).reshape(-1, 4)


def walk_file(path: str | Path) -> tuple[list[str], np.ndarray, int]:
    """`walk_table` of the tar at `path`, and its size: what an index file of it holds (ShardError or OSError when
    it cannot be read)."""
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) if size else b""
    return (*walk_table(mm), size)


def _header_mismatch(mm, off: int, size: int, name: str) -> str | None:
    """Why the tar header in front of the payload at `off` is not that of member `name` of `size` bytes, or None.
    Its name, size and type fields only, not its checksum: this runs for every clip read (~1 us; with parse_header's
    checksum ~5 us), and a stale table's offset lands on a header of the right name and size only by being right."""
    if off < BLOCK or off % BLOCK:
        return f"{name} at byte {off}, not after a header"
    head = mm[off - BLOCK : off - BLOCK + 157]
    # First what ShardWriter's tarfile writes (the name NUL-terminated, the size as 11 octal digits and a NUL): two
    # byte compares, half the time of parsing the fields, for every clip the loader reads.
    expect = name.encode()
    if head[124:136] == b"%011o\0" % size and head[: len(expect) + 1] == expect + b"\0" and head[156:157] == b"0":
        return None
    try:
        hsize = _number(head[124:136])
    except ShardError:
        hsize = -1
    hname = head[:100].split(b"\0", 1)[0]
    # A long or non-ASCII name is in an extended header further back; its ustar name is a stand-in.
    named = not (name.isascii() and len(name) < 100) or hname == name.encode()
    if head[156:157] not in _REGULAR or hsize != size or not named:
        return f"{name} ({size} bytes) is {hname.decode('utf-8', 'replace')!r} ({hsize} bytes) in the tar"
    return None


# ---------------------------------------------------------------------------------------------------------------
# index files: <shard>.tar.idx, written by make-shards beside each shard

INDEX_FORMAT = "matpac_fast.tar_index"
INDEX_VERSION = 1
# ~60 bytes a clip: AudioSet's 2 million clips in one shard make ~120 MB
INDEX_MAX_BYTES = 256 << 20


def index_path(tar_path: str | Path) -> str:
    return f"{tar_path}.idx"


def encode_index(keys: list[str], refs, tar_bytes: int) -> bytes:
    """The index file of a shard of `tar_bytes` bytes: UTF-8 JSON (data, never code), one line."""
    rows = np.asarray(refs, dtype=np.int64).reshape(-1, 4).tolist()
    obj = {"format": INDEX_FORMAT, "version": INDEX_VERSION, "tar_bytes": tar_bytes, "keys": keys, "refs": rows}
    return (json.dumps(obj, ensure_ascii=False, separators=(",", ":")) + "\n").encode("utf-8")


def read_index_file(tar_path: str | Path, tar_bytes: int) -> tuple[list[str], np.ndarray]:
    """(keys, refs) from a shard's index file, as `walk_table` gives them; ShardError saying why it cannot be used:
    unreadable, not an index of this format, made for a tar of another size, or offsets outside the tar."""
    # ~60 bytes a clip of >= 2 KB in the tar: a larger file is not this shard's index; nor one over INDEX_MAX_BYTES
    # (a sparse file costs nothing on disk, and the tar's own size is no bound on a huge shard's index).
    limit = min(max(tar_bytes, 1 << 20), INDEX_MAX_BYTES)
    try:
        # a regular file only: a link to /dev/zero (st_size 0) was read without end, and a FIFO's open hung
        raw = read_regular(index_path(tar_path), limit)
    except TooLarge as e:
        what = f"{e.size} bytes" if e.size is not None else "it grew while read"
        than = "its shard" if limit < INDEX_MAX_BYTES else f"an index file may be ({limit} bytes)"
        raise ShardError(f"{what}, larger than {than}") from None
    except OSError as e:
        raise ShardError(f"unreadable: {e.strerror or e}") from None
    try:
        obj = json.loads(raw)
    except (ValueError, RecursionError):  # UnicodeDecodeError and JSONDecodeError are ValueErrors
        raise ShardError("not valid JSON") from None
    if not isinstance(obj, dict) or obj.get("format") != INDEX_FORMAT:
        raise ShardError("not a shard index file")
    if obj.get("version") != INDEX_VERSION:
        raise ShardError(f"index version {obj.get('version')!r}; this version reads {INDEX_VERSION}")
    if obj.get("tar_bytes") != tar_bytes:
        raise ShardError(f"made for a tar of {obj.get('tar_bytes')!r} bytes; the shard has {tar_bytes}")
    keys, rows = obj.get("keys"), obj.get("refs")
    if not isinstance(keys, list) or not all(isinstance(k, str) for k in keys):
        raise ShardError("its keys are not a list of strings")
    try:
        refs = np.array(rows if rows else np.zeros((0, 4), np.int64))
    except ValueError:  # ragged rows
        refs = np.zeros(0)
    if refs.dtype.kind != "i" or refs.shape != (len(keys), 4):
        raise ShardError(f"its refs are not {len(keys)} rows of 4 integers")
    refs = refs.astype(np.int64)
    npy_ok = (refs[:, 0] >= BLOCK) & (refs[:, 1] >= 0) & (refs[:, 0] + refs[:, 1] <= tar_bytes)
    json_ok = ((refs[:, 2] == -1) & (refs[:, 3] == 0)) | (
        (refs[:, 2] >= BLOCK) & (refs[:, 3] >= 0) & (refs[:, 2] + refs[:, 3] <= tar_bytes))
    if not (npy_ok & json_ok).all():
        raise ShardError("it has offsets outside the tar")
    return keys, refs


def group_samples(members) -> Iterator[tuple[str, dict[str, object]]]:
    """Consecutive members sharing a key form one sample (the WebDataset convention)."""
    key, parts = None, {}
    for name, payload in members:
        kx = split_key(name)
        if kx is None:
            continue
        k, ext = kx
        if k != key:
            if key is not None:
                yield key, parts
            key, parts = k, {}
        parts[ext] = payload
    if key is not None:
        yield key, parts


class IndexCache:
    """Per-process cache of TarIndex objects: every member table is kept, the mappings (one file descriptor each,
    no memory until read) of the `capacity` most recently used shards only. Tables must outlive their mappings: an
    exact-mode worker draws samples from its whole range in random order, so with more shards than `capacity`
    nearly every sample was a miss, and a miss walked every header of its shard again (a worker with 792 or 1,980
    shards made a batch 50-60x slower than one with 198)."""

    def __init__(self, capacity: int = 256):
        self.capacity = capacity
        self._index: dict[str, TarIndex] = {}
        self._mapped: OrderedDict[str, None] = OrderedDict()  # least recently used first

    def get(self, path: str) -> TarIndex:
        idx = self._index.get(path)
        if idx is None:
            idx = self._index[path] = TarIndex(path)
        elif idx.mm is None:
            try:
                idx.remap()
            except ShardError:
                del self._index[path]  # as a shard that failed its first indexing: tried again on the next get
                raise
        self._mapped[path] = None
        self._mapped.move_to_end(path)
        if len(self._mapped) > self.capacity:
            self._index[self._mapped.popitem(last=False)[0]].release()
        return idx


def iter_stream_samples(f) -> Iterator[tuple[str, dict[str, bytes]]]:
    """Samples (key, {"npy": bytes, "json": bytes}) of a tar byte stream, in tar order."""
    cur = _StreamCursor(f)
    yield from group_samples(iter_members(cur, lambda n: n.endswith((".npy", ".json"))))


def shard_set_subfolder_hint(folder: Path) -> str | None:
    """"its subfolder X is one: pass X" when a direct subfolder of `folder` holds a shard set (sizes.json and
    stats.json), else None: for the one line when `folder` itself is none (`make demo`'s runs/demo, whose set is
    runs/demo/shards). Here, torch-free, so that verify-shards and the loader share it."""
    try:
        with os.scandir(folder) as entries:
            subs = [folder / e.name for e in entries if e.is_dir()]
    except OSError:
        return None
    subs = sorted(p for p in subs if (p / "sizes.json").is_file() and (p / "stats.json").is_file())
    if not subs:
        return None
    if len(subs) == 1:
        return f"its subfolder {subs[0]} is one: pass {subs[0]}"
    shown = ", ".join(map(str, subs[:3])) + (f" and {len(subs) - 3} more" if len(subs) > 3 else "")
    return f"its subfolders {shown} are shard sets: pass one of them"
