"""Files written and read in folders that someone else may have prepared (a run folder to resume, a shard set,
an --out that already exists): a planted symbolic link must not send a write outside the folder, nor turn a small
metadata read into an endless one.

* `atomic_write` / `write_atomic`: written as `<name>.tmp`, then renamed over `<name>` (os.replace replaces a link
  at `<name>` itself, never its target). The `.tmp` is created anew with O_EXCL | O_NOFOLLOW after removing
  whatever is there (unlink removes a link, not its target): a plain open() followed a planted `<name>.tmp` link
  and overwrote the file it pointed to.
* `read_regular`: the bytes of a regular file, at most `limit`. The type is checked on the open descriptor (a
  size check on st_size let /dev/zero through: a device's st_size is 0) and the file is opened non-blocking (a
  FIFO without a writer hung the open). Anything else is an OSError, which the callers already report in one line.
"""

from __future__ import annotations

import contextlib
import errno
import os
import stat
from pathlib import Path

# The most a small metadata JSON file (sizes.json, stats.json: ~100 bytes a shard; trainer_state.json, config.json:
# a few KB) may hold: a bound on what reading one can cost, far above any real one.
JSON_MAX_BYTES = 64 << 20

_NEW = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC


def create_new(path: str | os.PathLike, mode: int = 0o666) -> int:
    """A descriptor open for writing on a new, empty regular file at `path`: a stale file there (a temporary file
    left by a kill) is removed first, a symbolic link included (the link, never its target)."""
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)
    return os.open(path, _NEW, mode)  # O_EXCL: a link planted between the unlink and here is refused (EEXIST)


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike, mode: str = "w", *, fsync: bool = False, encoding: str | None = None,
                 newline: str | None = None):
    """`with atomic_write(p, "wb") as f: ...` writes `<p>.tmp` and renames it over `p` when the block ends without
    an error (the `.tmp` is removed otherwise). `fsync`: the data reach the disk before the rename."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    fd = create_new(tmp)
    try:
        with os.fdopen(fd, mode, encoding=encoding, newline=newline) as f:
            fd = -1  # owned by f now
            yield f
            if fsync:
                f.flush()
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if fd >= 0:
            os.close(fd)
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def write_atomic(path: str | os.PathLike, data: str | bytes, *, fsync: bool = False,
                 encoding: str | None = None) -> None:
    """`data` (text or bytes) written to `path` through `atomic_write`."""
    with atomic_write(path, "wb" if isinstance(data, bytes) else "w", fsync=fsync, encoding=encoding) as f:
        f.write(data)


class TooLarge(OSError):
    """`read_regular`'s answer for a file over its limit; `size`: its size in bytes (None: grew while read)."""

    def __init__(self, path, size: int | None, limit: int):
        what = f"{size} bytes" if size is not None else "it grew while read"
        super().__init__(errno.EFBIG, f"{what}, more than the {limit} expected", str(path))
        self.size = size


def read_regular(path: str | os.PathLike, limit: int) -> bytes:
    """The bytes of the regular file `path` (a link to one is followed): OSError when it is anything else (a
    device, a FIFO, a folder), `TooLarge` when it is larger than `limit` bytes. At most `limit` + 1 bytes are
    read whatever the file claims, so nothing costs more memory than `limit`."""
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)  # non-blocking: a FIFO's open would wait
    with os.fdopen(fd, "rb") as f:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise OSError(errno.EINVAL, "not a regular file", str(path))
        if st.st_size > limit:
            raise TooLarge(path, st.st_size, limit)
        data = f.read(limit + 1)
    if len(data) > limit:
        raise TooLarge(path, None, limit)
    return data
