"""Shard member tables: read from the index file make-shards writes beside each shard, or walked from the tar.

Before a loader worker reads a sample of a local shard it builds the shard's member table (where each clip's .npy
and .json lie); in exact mode a worker builds every table of its range before its first batch, every epoch (the
workers restart). Walking the tar reads one 512-byte header per member: on a cold page cache, a random read each
(the mapping is advised random access, so a fault reads one page, not the device's read-ahead). The index file is
one small sequential read. Both are timed here side by side on the same shards, exactly as `TarIndex` builds a
table (map + MADV_RANDOM + walk, or the index file), warm (page cache) and, with --cold, cold.

    python benchmarks/shard_index.py                    # 8,000 clips of 608 frames (~1 GB), ~1 min on 2 cores
    sudo python benchmarks/shard_index.py --cold        # also cold: drops the page cache before each timed pass

--cold needs root on Linux (it writes /proc/sys/vm/drop_caches, which empties the whole machine's page cache).
The data is written to a temporary folder (under --tmp) and deleted at the end.
"""

from __future__ import annotations

import argparse
import mmap
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))  # _common, when imported

import _common  # noqa: E402
from _common import commit, drop_caches  # noqa: E402

from matpac_fast.data_fixtures import npy_bytes  # noqa: E402
from matpac_fast.data_tar import _advise, read_index_file, walk_table  # noqa: E402
from shard_tools.writer import ShardWriter, encode_json  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--clips", type=int, default=8000, help="clips to write (default 8000)")
    p.add_argument("--frames", type=int, default=608, help="frames per clip (default 608: 97 KB a clip)")
    p.add_argument("--per-shard", type=int, default=500, help="clips per shard (default 500)")
    p.add_argument("--passes", type=int, default=3, help="timed passes per way and cache state (default 3)")
    p.add_argument("--cold", action="store_true", help="also time each way on a cold page cache (root, Linux)")
    p.add_argument("--tmp", type=Path, default=None, help="folder for the temporary data (default: the system's)")
    args = p.parse_args(argv)
    for name in ("clips", "frames", "per_shard", "passes"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1")
    if args.tmp is not None and not args.tmp.is_dir():
        p.error(f"--tmp {args.tmp} is not a folder")
    if args.cold and not _common.can_drop_caches():
        p.error(f"--cold needs to write {_common.DROP_CACHES} (root on Linux); run without --cold for the warm figures")
    return args


def write_shards(folder: Path, args) -> list[str]:
    """Shards as make-shards writes them (ShardWriter: tar + index file), AudioSet-like keys and json."""
    rng = np.random.default_rng(0)
    pool = [npy_bytes(rng.standard_normal((80, args.frames), dtype=np.float32).astype(np.float16)) for _ in range(16)]
    paths, writer = [], None
    for i in tqdm(range(args.clips), desc="writing shards", unit="clip", file=sys.stderr):
        if writer is None:
            writer = ShardWriter(folder, "shards", len(paths))
        key = f"Y{i:011d}_30000"
        meta = {"key": key, "labels": ["/m/09x0r"], "label_indices": [i % 527], "n_frames": args.frames}
        writer.add(key, {"npy": pool[i % len(pool)], "json": encode_json(meta)})
        if writer.count == args.per_shard or i == args.clips - 1:
            paths.append(str(writer.close()[0]))
            writer = None
    return paths


def walk(path: str) -> int:
    """TarIndex's table without an index file: map, advise random access, walk the headers."""
    with open(path, "rb") as f:
        mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    _advise(mm, "MADV_RANDOM")
    return len(walk_table(mm)[0])


def from_file(path: str) -> int:
    """TarIndex's table from the shard's index file (the shard is only stat'ed)."""
    return len(read_index_file(path, os.path.getsize(path))[0])


def timed(fn, paths: list[str], cold: bool, clips: int) -> float:
    if cold:
        drop_caches()
    t = time.perf_counter()
    n = sum(fn(p) for p in paths)
    elapsed = time.perf_counter() - t
    if n != clips:  # both ways must find every clip written
        raise RuntimeError(f"{fn.__name__}: {n} samples indexed, {clips} written")
    return elapsed


def main(argv=None) -> int:
    args = parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="shard-index-bench-", dir=args.tmp) as tmp:
        paths = write_shards(Path(tmp), args)
        data_gb = sum(os.path.getsize(p) for p in paths) / 1e9
        idx_mb = sum(os.path.getsize(p + ".idx") for p in paths) / 1e6
        print(f"{args.clips} clips of 80 x {args.frames} in {len(paths)} shards: {data_gb:.2f} GB of tar, "
              f"{idx_mb:.2f} MB of index files; {args.passes} passes each, the two ways alternating", flush=True)
        states = ["warm", "cold"] if args.cold else ["warm"]
        ways = {"walk": walk, "index file": from_file}
        for fn in ways.values():  # warm-up: imports, first touch, the page cache for the warm passes
            timed(fn, paths, False, args.clips)
        times = {(s, w): [] for s in states for w in ways}
        for state in states:  # every warm pass first: a cold pass leaves a cache that is neither
            for _ in range(args.passes):
                for way, fn in ways.items():
                    times[state, way].append(timed(fn, paths, state == "cold", args.clips))
        print(f"{'cache':<6} {'table from':<11} {'best s':>8} {'median s':>9} {'us/sample':>10} {'ms/shard':>9}")
        best = {}
        for (state, way), ts in times.items():
            best[state, way] = min(ts)
            print(f"{state:<6} {way:<11} {min(ts):>8.4f} {float(np.median(ts)):>9.4f} "
                  f"{1e6 * min(ts) / args.clips:>10.2f} {1e3 * min(ts) / len(paths):>9.3f}")
        ratios = "  ".join(f"{s} walk/file {best[s, 'walk'] / best[s, 'index file']:.1f}x" for s in states)
        print(f"RESULT shard_index clips={args.clips} shards={len(paths)} {ratios} commit={commit()}")
    return 0


if __name__ == "__main__":
    _common.command(main)  # Ctrl-C: one line, no traceback
