"""make-shards' writer loop alone: its ceiling in clips/s, however many workers decode.

The main process of make-shards receives each clip's finished members from the workers and writes them: tar
headers and payloads, the shard's sha256, the journal, a 1 GB shard's fsync. With enough workers this loop, not
the decoding, sets the pace. Here it is fed precomputed results (the workers' part replaced by a list; the pipe
transfer from the workers is not included), so the figure is the loop's own cost per clip.

    python benchmarks/shard_writer.py            # 12,000 clips of 80 x 1000 fp16 (1.9 GB) in 250 MB shards, 3 repeats
    python benchmarks/shard_writer.py --clips 200 --repeats 1   # seconds

Written under --tmp (default: the system's temporary folder) and deleted after each repeat.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))  # _common, when imported

import _common  # noqa: E402
from _common import commit  # noqa: E402

import shard_tools.pipeline as pipeline  # noqa: E402
from shard_tools.discover import discover_synthetic  # noqa: E402
from shard_tools.writer import encode_json, encode_npy  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--clips", type=int, default=12000, help="clips per repeat (default 12000)")
    p.add_argument("--frames", type=int, default=1000, help="frames per clip (default 1000: 160 KB of fp16)")
    p.add_argument("--shard-size", default="250MB", help="make-shards --shard-size (default 250MB: 8 shards, so that "
                   "closing one overlaps writing the next as in a long run; make-shards' own default is 1GB)")
    p.add_argument("--repeats", type=int, default=3, help="timed repeats (default 3)")
    p.add_argument("--tmp", type=Path, default=None, help="folder for the shards (default: the system's temp)")
    args = p.parse_args(argv)
    for name in ("clips", "frames", "repeats"):
        if getattr(args, name) < 1:
            p.error(f"--{name} must be >= 1 (got {getattr(args, name)})")
    try:
        pipeline.parse_shard_size(args.shard_size)
    except ValueError as e:
        p.error(str(e))
    if args.tmp is not None and not args.tmp.is_dir():
        p.error(f"--tmp {args.tmp} is not a folder")
    return args


def results_for(items, frames: int) -> list:
    """One finished result per item, as a worker sends it; 8 distinct arrays (their content does not matter)."""
    rng = np.random.default_rng(0)
    arrays = [encode_npy(rng.standard_normal((80, frames)).astype(np.float16)) for _ in range(8)]
    return [pipeline.Result(source=it.source, key=it.key, members={"npy": arrays[i % 8],
                                                                   "json": encode_json({"key": it.key})},
                            n_frames=frames, value_sum=1.0, value_sumsq=2.0, seconds=frames / 100)
            for i, it in enumerate(items)]


def time_once(items, results, args) -> tuple[float, float]:
    """(wall s, CPU s of this process, all threads) for one run of the writer loop over `results`."""
    out = Path(tempfile.mkdtemp(prefix="shard-writer-", dir=args.tmp))
    try:
        cfg = pipeline.MakeConfig(out=out, shard_size=args.shard_size, progress=False)
        real = pipeline.ordered_results
        pipeline.ordered_results = lambda order, cfg: iter(results[: len(order)])
        try:
            t, c = time.perf_counter(), time.process_time()
            pipeline._run_segments(items, 0, 0, cfg, out / "journal.jsonl")
            wall, cpu = time.perf_counter() - t, time.process_time() - c
        finally:
            pipeline.ordered_results = real
        written = sum(e["count"] for e in pipeline.iter_journal(out / "journal.jsonl"))
        shards = len(list(out.glob("*.tar")))
        if written != len(results) or shards < 1:  # a figure for work not done would be worse than none
            raise SystemExit(f"error: the writer wrote {written} of {len(results)} clips in {shards} shards")
        return wall, cpu
    finally:
        shutil.rmtree(out, ignore_errors=True)


def main(argv=None):
    args = parse_args(argv)
    items = discover_synthetic(args.clips).items
    results = results_for(items, args.frames)
    mb = sum(len(r.members["npy"]) for r in results) / 1e6
    rates = []
    for i in range(args.repeats):
        wall, cpu = time_once(items, results, args)
        rates.append(args.clips / wall)
        print(f"repeat {i + 1}: {args.clips} clips ({mb:,.0f} MB) in {wall:.2f} s: {rates[-1]:,.0f} clips/s, "
              f"{wall / args.clips * 1e6:.0f} us a clip, CPU {cpu / args.clips * 1e6:.0f} us a clip (all threads)")
    print(f"RESULT shard_writer clips_per_s={statistics.median(rates):.0f} best={max(rates):.0f} "
          f"frames={args.frames} clips={args.clips} commit={commit()}")


if __name__ == "__main__":
    _common.command(main)  # Ctrl-C: one line, no traceback
