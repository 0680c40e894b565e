"""Files written and read in folders that someone else may have prepared (a run folder to resume, a shard set,
an --out that already exists): a planted symbolic link must not send a write outside the folder.

* `atomic_write` / `write_atomic`: written as `<name>.tmp`, then renamed over `<name>` (os.replace replaces a link
  at `<name>` itself, never its target). The `.tmp` is created anew with O_EXCL | O_NOFOLLOW after removing
  whatever is there (unlink removes a link, not its target): a plain open() followed a planted `<name>.tmp` link
  and overwrote the file it pointed to.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

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
