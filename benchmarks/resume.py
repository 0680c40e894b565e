"""Resume inside an epoch: time to the first batch the resumed run trains on, with the loader passing over the
epoch's first batches (make_loader's `skip`: each clip's headers read, not its data; what train.py does) against
reading them and dropping them (what train.py did before). Both get the same batch; the script checks that.

A run resumed near the end of an AudioSet epoch (2M clips, ~320 GB of 10-s fp16 log-mel) waited for most of that
epoch's clips to be read again before its next step: minutes from a local disk, more from a network file system.

    python benchmarks/resume.py                # ~1 min on 2 cores, page cache warm; last line: RESULT resume ...
    sudo python benchmarks/resume.py --cold    # each timing starts from an empty page cache (the device)
    python benchmarks/resume.py --clips 400 --batch 16 --workers 1   # seconds

"read MB" is what the whole machine read from its devices meanwhile (/proc/vmstat pgpgin): with --cold, the
loader's reads (and the pages of the libraries its workers run, ~250 MB here); warm (after an untimed pass of each
epoch), ~0. Clips are 80 x --frames fp16 of random content (as benchmarks/loader.py makes them).
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import _common  # noqa: E402
from _common import commit  # noqa: E402
from loader import keep_problem, make_data  # noqa: E402

from matpac_fast.data import DataConfig, ShardSource, make_loader  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--clips", type=int, default=6000, help="clips to generate (default 6000: ~1 GB of shards)")
    p.add_argument("--frames", type=int, default=1000, help="frames per clip (default 1000 = 10 s)")
    p.add_argument("--per-shard", type=int, default=500, help="clips per shard (default 500)")
    p.add_argument("--batch", type=int, default=64, help="batch size (default 64)")
    p.add_argument("--crop", type=int, default=608, help="crop frames (default 608, the recipe's)")
    p.add_argument("--workers", type=int, default=2, help="loader workers (default 2)")
    p.add_argument("--at", type=float, default=0.9,
                   help="where in the epoch the run resumes, as a fraction of its batches (default 0.9)")
    p.add_argument("--cold", action="store_true", help="empty the page cache before each timing (needs root)")
    p.add_argument("--keep", type=Path, help="generate the data in DIR and reuse it when the settings match "
                   "(as benchmarks/loader.py --keep; the two can share one DIR)")
    args = p.parse_args(argv)
    if not 0 < args.at < 1:
        p.error(f"--at {args.at}: give a fraction of the epoch between 0 and 1")
    if min(args.clips, args.frames, args.per_shard, args.batch, args.crop) < 1 or args.workers < 0:
        p.error("--clips, --frames, --per-shard, --batch and --crop must be >= 1, --workers >= 0")
    if args.clips // args.batch < 2:  # a resume needs a batch passed over and one after it
        p.error(f"--clips {args.clips} gives {args.clips // args.batch} batch(es) of --batch {args.batch}; it needs "
                "at least 2")
    if args.crop > args.frames:
        p.error(f"--crop {args.crop} is longer than the clips (--frames {args.frames})")
    if args.cold and not _common.can_drop_caches():
        p.error("--cold empties the page cache through /proc/sys/vm/drop_caches, which needs root: run with sudo")
    # loader.py's checks: unchecked, a folder with another program's settings.json had that file overwritten and
    # its shards/ and npy/ deleted
    problem = keep_problem(args.keep) if args.keep is not None else None
    if problem:
        p.error(problem)
    return args


def _paged_in_mb() -> float:
    """Machine-wide KiB read from block devices since boot (/proc/vmstat pgpgin), in MB; nan where absent."""
    try:
        with open("/proc/vmstat") as f:
            for line in f:
                if line.startswith("pgpgin "):
                    return int(line.split()[1]) * 1024 / 1e6
    except OSError:
        pass
    return float("nan")


def first_batch(cfg: DataConfig, source, epoch: int, k: int, passing: bool) -> tuple[float, float, list[str]]:
    """Seconds and MB read until batch k of the epoch arrives, passing over the first k or reading and dropping
    them; and that batch's keys."""
    mb0, t0 = _paged_in_mb(), time.perf_counter()
    it = iter(make_loader(cfg, epoch=epoch, source=source, skip=k if passing else 0))
    try:
        for _ in range(0 if passing else k):
            next(it)
        keys = next(it)["key"]
    finally:
        it.close()
    return time.perf_counter() - t0, _paged_in_mb() - mb0, keys


def main(argv=None) -> int:
    args = parse_args(argv)
    root = args.keep or Path(tempfile.mkdtemp(prefix="resume-bench-"))
    settings = {"clips": args.clips, "frames": args.frames, "per_shard": args.per_shard}
    try:
        shards, _ = make_data(root, settings, need_npy=False)
        source = ShardSource.open(str(shards))
        cfg = DataConfig(batch_size=args.batch, crop_frames=args.crop, num_workers=args.workers, pin_memory=False)
        n = len(make_loader(cfg, source=source))
        k = min(n - 1, max(1, round(args.at * n)))
        rows = []
        if not args.cold:  # untimed: the pages the timings touch are in the cache, as "warm" says
            first_batch(cfg, source, 0, k, False)
            first_batch(cfg, source, 1, k, False)
        for i, passing in enumerate((False, True, False, True)):  # each twice, alternating: drift shows
            if args.cold:
                _common.drop_caches()
            secs, mb, keys = first_batch(cfg, source, i // 2, k, passing)  # a pair per epoch: the same batch k
            rows.append(("passed over" if passing else "read, dropped", secs, mb, keys))
    finally:
        if args.keep is None:
            shutil.rmtree(root, ignore_errors=True)
    if rows[0][3] != rows[1][3] or rows[2][3] != rows[3][3]:
        sys.exit("error: the two ways gave different batches: the skip is not exact")
    cache = "cold" if args.cold else "warm"
    print(f"\nresume at batch {k} of {n} (batch {args.batch}, {args.workers} workers, {args.clips} clips of "
          f"{args.frames} frames, page cache {cache}; torch {torch.__version__}, python {platform.python_version()}, "
          f"{os.cpu_count()} cores, load average {os.getloadavg()[0]:.1f}, commit {commit()})")
    print(f"{'first batches':<15} {'s to batch k':>13} {'read MB':>9}")
    for name, secs, mb, _ in rows:
        print(f"{name:<15} {secs:>13.2f} {mb:>9.0f}")
    old = (rows[0][1] + rows[2][1]) / 2
    new = (rows[1][1] + rows[3][1]) / 2
    print(f"RESULT resume batch={k}/{n} cache={cache} read_and_drop_s={old:.2f} skip_s={new:.2f} "
          f"speedup={old / new:.1f}")
    return 0


if __name__ == "__main__":
    _common.command(main)  # Ctrl-C: one line, no traceback
