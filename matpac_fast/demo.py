"""`python -m matpac_fast.demo --out DIR [--n N]`: the embedded default end to end.

First version: synthetic corpus -> log-mel shards (shard_tools' Python API, no subprocess) -> verify-shards summary.
Later stages (pre-training, linear probe) append their steps to `main`.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
from pathlib import Path


def shards_step(out_dir: Path, n: int, seed: int = 0, workers: int | None = None, n_shards: int = 8) -> dict:
    """Synthetic corpus -> shards in out_dir/shards; several shards so that loader workers can split them."""
    from shard_tools.api import format_summary, make_synthetic_shards

    print(f"[demo] 1/2 synthetic corpus ({n} clips) -> shards in {out_dir}", flush=True)
    summary = make_synthetic_shards(
        out_dir,
        n=n,
        seed=seed,
        workers=os.cpu_count() or 1 if workers is None else workers,
        shard_size=str(max(1, math.ceil(n / n_shards))),
    )
    print(format_summary(summary), flush=True)
    return summary


def verify_step(out_dir: Path) -> dict:
    from shard_tools.verify import format_report, verify

    print(f"[demo] 2/2 verify-shards {out_dir}", flush=True)
    report = verify(out_dir, progress=False)
    print(format_report(report, top=10), flush=True)
    if not report.ok:
        raise SystemExit(f"demo: the shards in {out_dir} failed verification (see above)")
    return report.to_dict()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m matpac_fast.demo",
        description="The embedded default: a deterministic labelled synthetic corpus -> log-mel shards -> verify.",
    )
    p.add_argument("--out", type=Path, default=Path("runs/demo"), help="run folder (default: %(default)s)")
    p.add_argument("--n", type=int, default=1000, help="synthetic clips, 6.5 s each (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="corpus and shuffle seed (default: %(default)s)")
    p.add_argument("--workers", type=int, default=None, help="make-shards processes (default: all cores)")
    args = p.parse_args(argv)
    if args.n < 1:
        raise SystemExit("demo: --n must be >= 1")
    shard_dir = args.out / "shards"
    try:
        shards_step(shard_dir, args.n, args.seed, args.workers)
    except ValueError as e:
        raise SystemExit(f"demo: {e}") from None
    verify_step(shard_dir)
    print(f"[demo] shards: {shard_dir.resolve()}  (stats.json, sizes.json, manifest.jsonl beside them)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
