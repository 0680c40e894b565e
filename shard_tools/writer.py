"""Deterministic WebDataset tar shards: fixed member metadata, written as `.tar.tmp` and renamed when complete.

Every byte of a shard is a function of its samples: members carry mtime 0, uid/gid 0, empty owner names and mode
0644, so two runs (any worker count, any machine) give byte-identical files.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import queue
import re
import tarfile
import threading
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from matpac_fast.data_tar import encode_index, index_path
from matpac_fast.safe_files import create_new, write_atomic

_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]?B)?\s*$", re.IGNORECASE)
_UNITS = {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12}


@dataclass(frozen=True)
class ShardLimit:
    """A shard is closed once it holds `max_bytes` bytes or `max_samples` samples (whichever is set)."""

    max_bytes: int | None = None
    max_samples: int | None = None

    def full(self, n_bytes: int, n_samples: int) -> bool:
        if self.max_samples is not None:
            return n_samples >= self.max_samples
        return n_bytes >= (self.max_bytes or 0)


def parse_shard_size(text: str | int) -> ShardLimit:
    """'1GB', '200MB', '512KB' -> a byte limit; a bare integer such as '1000' -> a sample count."""
    if isinstance(text, int):
        text = str(text)
    m = _SIZE.match(text)
    if not m:
        raise ValueError(f"--shard-size {text!r}: use a size such as 1GB, 200MB, 512KB or a sample count such as 1000")
    number, unit = m.groups()
    if unit is None:
        if "." in number or int(number) < 1:
            raise ValueError(f"--shard-size {text!r}: a sample count must be a whole number >= 1")
        return ShardLimit(max_samples=int(number))
    n = int(float(number) * _UNITS[unit.upper()])
    if n < 1:
        raise ValueError(f"--shard-size {text!r} is too small")
    return ShardLimit(max_bytes=n)


def encode_npy(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(array), allow_pickle=False)
    return buf.getvalue()


def encode_json(obj: dict) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode("utf-8")


def shard_name(name: str, index: int) -> str:
    return f"{name}-{index:06d}.tar"


def _tarinfo(member: str, size: int) -> tarfile.TarInfo:
    info = tarfile.TarInfo(member)
    info.size = size
    info.mtime = 0
    info.mode = 0o644
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    info.type = tarfile.REGTYPE
    return info


class ShardWriter:
    """Writes one shard: add(key, {ext: bytes}) ..., then close() -> (final path, n_bytes, sha256). Beside the shard,
    close() writes its index file (`<shard>.tar.idx`, matpac_fast.data_tar): where each sample's members lie, so
    the loader reads one small file instead of every member header of the shard (a random read each)."""

    def __init__(self, out_dir: str | Path, name: str, index: int):
        self.final = Path(out_dir) / shard_name(name, index)
        self.tmp = self.final.with_name(self.final.name + ".tmp")
        self._file = _HashingFile(os.fdopen(create_new(self.tmp), "wb"))  # never through a link planted there
        # copybufsize: a payload goes to the file (and the hash) in one write, not in 16 KiB pieces
        self._tar = tarfile.open(fileobj=self._file, mode="w", format=tarfile.PAX_FORMAT, copybufsize=1 << 22)
        self.count = 0
        self._keys: list[str] = []
        self._refs: list[list[int]] = []  # per sample: npy offset, size, json offset (-1: none), size

    @property
    def n_bytes(self) -> int:
        return self._file.tell()

    def add(self, key: str, members: dict[str, bytes]) -> None:
        if "." in key or "/" in key:
            raise ValueError(f"sample key {key!r} must not contain '.' or '/'")
        row = [-1, 0, -1, 0]
        for ext, payload in members.items():
            self._tar.addfile(_tarinfo(f"{key}.{ext}", len(payload)), io.BytesIO(payload))
            if ext in ("npy", "json"):  # addfile leaves the file at the end of the payload's last block
                col = 0 if ext == "npy" else 2
                row[col : col + 2] = [self._file.tell() - (len(payload) + 511) // 512 * 512, len(payload)]
        if "npy" in members:
            self._keys.append(key)
            self._refs.append(row)
        self.count += 1

    def close(self) -> tuple[Path, int, str]:
        self._tar.close()
        digest, size = self._file.hexdigest(), self._file.tell()
        self._file.f.flush()
        os.fsync(self._file.f.fileno())
        self._file.f.close()
        os.replace(self.tmp, self.final)  # atomic: a shard under its final name is always complete
        # After the shard: an index file always describes a complete shard. One lost to a crash here only costs
        # the loader a walk of the shard's headers (as for sets made before index files).
        write_index(self.final, self._keys, self._refs, size)
        return self.final, size, digest

    def abort(self) -> None:
        try:
            self._file.stop()
            self._tar.close()
            self._file.f.close()
        finally:
            self.tmp.unlink(missing_ok=True)


class _HashingFile:
    """The shard's file, hashed as tarfile writes it: in mode "w" tarfile only appends (write, tell), so the sha256
    of the bytes written is the file's, and close() need not read the whole shard back. The hashing runs in a thread
    (hashlib releases the GIL): in the writer's loop it took 30 % of the time, and that loop is make-shards' ceiling
    however many workers decode (benchmarks/shard_writer.py, 6,000 clips in one 1 GB shard: 2,750 clips/s before,
    4,700 with this and one write per payload)."""

    def __init__(self, f):
        self.f, self._h = f, hashlib.sha256()
        self._batch, self._batch_bytes = [], 0
        self._queue: queue.Queue = queue.Queue(maxsize=16)  # at most ~16 MiB written but not yet hashed
        self._thread = threading.Thread(target=self._hash_batches, name="shard-sha256", daemon=True)
        self._thread.start()

    def _hash_batches(self) -> None:
        while (batch := self._queue.get()) is not None:
            for data in batch:
                self._h.update(data)

    def write(self, data) -> int:
        self._batch.append(bytes(data) if not isinstance(data, bytes) else data)  # bytes: immutable until hashed
        self._batch_bytes += len(data)
        if self._batch_bytes >= 1 << 20:
            self._queue.put(self._batch)
            self._batch, self._batch_bytes = [], 0
        return self.f.write(data)

    def tell(self) -> int:
        return self.f.tell()

    def hexdigest(self) -> str:
        self.stop()
        return self._h.hexdigest()

    def stop(self) -> None:
        """Hash what is left and end the thread (once)."""
        if self._thread.is_alive():
            self._queue.put(self._batch)
            self._queue.put(None)
            self._thread.join()


def write_index(tar: Path, keys: list[str], refs, tar_bytes: int) -> None:
    """The index file of shard `tar`, written as .tmp and renamed: under its final name it is always whole."""
    idx = Path(index_path(tar))
    write_atomic(idx, encode_index(keys, refs, tar_bytes), fsync=True)


def sha256_file(path: str | Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()
