"""Loader throughput: shards (indexed local, sequential stream, pipe:cat) vs a folder of per-clip float32 .npy files.
"indexed" reads the shards' index files (as make-shards writes them), "walked" the same shards without them (links
in DIR/walked: member tables built from the tar headers, as for a set made before index files).

The question: does the shard loader feed a GPU (~5,400 samples/s per H100 at 50% MFU) with few CPU workers, and by
how much does it beat the authors' design (one float32 .npy per clip, np.load + crop in a map-style Dataset)?

Both loaders run with the same batch size, crop, worker count and a DataLoader; every path gets one untimed
warm-up pass (page cache, imports, first-touch) and then `--passes` timed passes, the paths taking turns (one
pass of each, --passes times), so that a change in the machine's load falls on all of them. samples/s is the steady
rate, from the first batch of a pass to its last; the time to the first batch (worker start-up, index building) is
reported apart as "start-up s" — per epoch, negligible at AudioSet scale, not on this small set. Clips are 80 x
--frames; content is random (it does not change the I/O or the copy cost).

    python benchmarks/loader.py                 # ~1-2 min on 2 cores; last line: RESULT loader ...
    python benchmarks/loader.py --clips 4000 --passes 1 --keep /tmp/loader-bench
    python benchmarks/loader.py --clips 64 --frames 700 --per-shard 16 --batch 8 --workers 1 --passes 1  # CPU, secs
    sudo python benchmarks/loader.py --cold --paths indexed,walked --clips 40000 --frames 608   # from the device
    sudo python benchmarks/loader.py --cold --paths indexed --mode resampled --clips 40000 --frames 608

--keep DIR records the data's settings (clips, frames, clips per shard) in DIR/settings.json and reuses the data only
when they match; otherwise it rewrites DIR/shards and DIR/npy (DIR/walked is made anew each run; its own folders:
nothing else in DIR is touched). A DIR whose settings.json this script did not write, or with shards/ or npy/ but no
settings.json, is refused.

MB/s columns: "read" = clip bytes the loader had to touch per sample (whole stored clip), "out" = batch bytes
delivered (fp16 crops for shards, the float32 crops the npy loader makes). "samples/CPU-s" = samples per second of
CPU time spent by the main process and its workers: a figure that other jobs on the machine barely disturb.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import resource
import shlex
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))  # _common, when imported

import _common  # noqa: E402
from _common import commit, csv_output_problem  # noqa: E402

from matpac_fast.data import DataConfig, ShardSource, SyntheticSource, make_loader  # noqa: E402
from matpac_fast.data_fixtures import write_shard_set  # noqa: E402
from matpac_fast.data_tar import encode_index, index_path, walk_file  # noqa: E402

PATHS = ("indexed", "walked", "stream", "pipe", "npy", "synthetic")
ROW_FIELDS = ["path", "samples", "seconds", "samples_per_s", "read_MB_s", "out_MB_s", "startup_s", "samples_per_cpu_s"]
ENV_FIELDS = ["cpus", "workers", "batch", "crop", "frames", "clips", "cache", "mode", "read_ahead", "torch",
              "python", "commit"]
CSV_FIELDS = ROW_FIELDS + ENV_FIELDS
SETTINGS = "settings.json"  # in a --keep folder: the settings its data was generated with
SETTING_KEYS = ("clips", "frames", "per_shard")  # data_settings()'s keys: what settings.json holds


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--clips", type=int, default=12000, help="clips to generate (default 12000: ~1.9 GB of shards "
                   "+ ~3.8 GB of float32 .npy; both must fit in the page cache)")
    p.add_argument("--frames", type=int, default=1000, help="frames per clip (default 1000 = 10 s)")
    p.add_argument("--per-shard", type=int, default=500, help="clips per shard (default 500, ~80 MB shards)")
    p.add_argument("--batch", type=int, default=256, help="clips per batch, as the trainer's per-device batch "
                   "(default 256)")
    p.add_argument("--crop", type=int, default=608, help="frames per training crop, at most --frames (default 608)")
    p.add_argument("--workers", type=int, default=2, help="DataLoader workers, >= 0 (default 2)")
    p.add_argument("--passes", type=int, default=2, help="timed passes per path after the warm-up (default 2)")
    p.add_argument("--paths", default=",".join(PATHS), help=f"comma list of: {', '.join(PATHS)} (default: all)")
    p.add_argument("--keep", type=Path, default=None,
                   help="generate into (and reuse, when its settings.json matches) this folder instead of a temp")
    p.add_argument("--csv", type=Path, default=None, help="append result rows to this CSV")
    p.add_argument("--read-ahead", type=int, default=DataConfig.read_ahead, help="DataConfig.read_ahead: clips a "
                   f"worker asks for ahead of the one it reads (default {DataConfig.read_ahead}; 0: none)")
    p.add_argument("--mode", choices=("exact", "resampled"), default="exact",
                   help="DataConfig.mode of the shard paths: exact epochs (default) or shards drawn with replacement "
                   "(a pass: as many samples as --clips)")
    p.add_argument("--cold", action="store_true", help="drop the page cache before each timed pass (root, Linux): "
                   "start-up and reads from the device, not memory; the warm-up pass stays warm")
    args = p.parse_args(argv)
    for flag in ("clips", "frames", "per_shard", "batch", "crop", "passes"):
        if getattr(args, flag) < 1:
            p.error(f"--{flag.replace('_', '-')} must be >= 1 (got {getattr(args, flag)})")
    if args.read_ahead < 0:
        p.error(f"--read-ahead must be >= 0 (got {args.read_ahead})")
    if args.workers < 0:
        p.error(f"--workers must be >= 0 (got {args.workers})")
    if args.crop > args.frames:
        p.error(f"--crop {args.crop} is longer than the clips (--frames {args.frames}): lower --crop or raise --frames")
    # Every worker needs a batch, and a pass at least two: the first batch is left out of the timing.
    if args.clips < args.batch * max(2, args.workers):
        p.error(f"--clips must be at least --batch x max(2, --workers) = {args.batch * max(2, args.workers)} (the "
                "first batch of a pass is not timed)")
    args.paths = [x.strip() for x in args.paths.split(",") if x.strip()]
    unknown = set(args.paths) - set(PATHS)
    if unknown or not args.paths:
        p.error(f"unknown --paths entries {sorted(unknown)}; choose from {', '.join(PATHS)}")
    if args.cold and not _common.can_drop_caches():
        p.error(f"--cold needs to write {_common.DROP_CACHES} (root on Linux); run without --cold")
    if args.keep is not None:
        problem = keep_problem(args.keep)
        if problem:
            p.error(problem)
    problem = csv_output_problem(args.csv, "--csv", CSV_FIELDS) if args.csv is not None else None
    if problem:
        p.error(problem)
    return args


def data_settings(args) -> dict:
    """What the generated data depends on: reused from a --keep folder only when these match."""
    return {key: getattr(args, key) for key in SETTING_KEYS}


def keep_problem(keep: Path) -> str | None:
    """Why --keep cannot be used (one line), or None. A folder that holds our data folders but no settings.json was
    made before settings were recorded: its contents are unknown, so it is neither reused nor overwritten."""
    if keep.exists() and not keep.is_dir():
        return f"--keep {keep} is a file; give a folder"
    # A file above it: the folder cannot be made (was a NotADirectoryError traceback once the run began)
    blocker = next((q for q in (keep, *keep.parents) if q.exists()), None)
    if blocker is not None and not blocker.is_dir():
        return f"--keep {keep}: {blocker} is a file, not a folder; give a folder"
    if (keep / SETTINGS).exists():
        try:
            recorded = json.loads((keep / SETTINGS).read_text())
        except (OSError, ValueError) as e:
            return f"--keep {keep}: cannot read {SETTINGS} ({e}); delete {keep} or give a new folder"
        # Another program's settings.json (an editor's, a project's) is not ours: a run would overwrite it and
        # delete the folder's shards/ and npy/.
        if not isinstance(recorded, dict) or set(recorded) != set(SETTING_KEYS):
            return (f"--keep {keep}: its {SETTINGS} was not written by this script (keys {sorted(SETTING_KEYS)} "
                    "expected); give a folder of its own")
        return None
    if (keep / "shards").exists() or (keep / "npy").exists():
        return (f"--keep {keep} holds shards/ or npy/ without {SETTINGS} (data of unknown settings, from an older "
                f"version of this script): delete {keep} or give a new folder")
    return None


# ------------------------------------------------------------------------------------------------------------------
# data


def _pool(frames: int, n: int = 64) -> np.ndarray:
    rng = np.random.default_rng(0)
    return (rng.standard_normal((n, 80, frames), dtype=np.float32) * 4 - 7).astype(np.float16)


def make_data(root: Path, settings: dict, need_npy: bool) -> tuple[Path, Path]:
    """Shards and (when needed) per-clip .npy files under `root`, generated unless `root/settings.json` says they
    were made with the same settings; data from other settings is removed first (never read as this run's)."""
    shards, npy = root / "shards", root / "npy"
    recorded = root / SETTINGS
    if not recorded.exists() or json.loads(recorded.read_text()) != settings:
        for folder in (shards, npy):
            shutil.rmtree(folder, ignore_errors=True)
        root.mkdir(parents=True, exist_ok=True)
        recorded.write_text(json.dumps(settings, sort_keys=True) + "\n")
    clips, frames = settings["clips"], settings["frames"]
    pool = _pool(frames)
    if not (shards / "stats.json").exists():  # absent: never written, or interrupted (stats.json is written last)
        shutil.rmtree(shards, ignore_errors=True)
        gen = ((f"clip{i:07d}", pool[i % len(pool)], [i % 10]) for i in range(clips))
        write_shard_set(shards, tqdm(gen, total=clips, desc="writing shards", unit="clip"),
                        per_shard=settings["per_shard"])
    for tar in sorted(shards.glob("*.tar")):  # index files, as make-shards writes them (kept data of older versions)
        if not os.path.exists(index_path(tar)):
            Path(index_path(tar)).write_bytes(encode_index(*walk_file(tar)))
    if need_npy and not (npy / ".done").exists():
        npy.mkdir(parents=True, exist_ok=True)
        for i in tqdm(range(clips), desc="writing per-clip float32 .npy", unit="clip"):
            np.save(npy / f"clip{i:07d}.npy", pool[i % len(pool)].astype(np.float32))
        (npy / ".done").touch()
    return shards, npy


def walked_view(root: Path, shards: Path) -> Path:
    """The same shards without their index files (links to the tars, with sizes.json and stats.json): the loader
    builds their member tables by walking the tar headers, as for a set made before index files."""
    view = root / "walked"
    shutil.rmtree(view, ignore_errors=True)
    view.mkdir()
    for p in shards.iterdir():
        if p.suffix == ".tar":
            (view / p.name).symlink_to(p.resolve())
        elif p.name in ("sizes.json", "stats.json"):
            shutil.copy(p, view / p.name)
    return view


# ------------------------------------------------------------------------------------------------------------------
# the authors' design: one float32 .npy per clip, map-style Dataset, default collate


class NpyFolder(torch.utils.data.Dataset):
    def __init__(self, folder: Path, crop: int):
        self.files = sorted(str(p) for p in folder.glob("*.npy"))
        self.crop = crop

    def __len__(self):
        return len(self.files)

    def __getitem__(self, i):
        x = np.load(self.files[i], allow_pickle=False)
        s = np.random.randint(0, x.shape[1] - self.crop + 1)
        return torch.from_numpy(np.ascontiguousarray(x[None, :, s : s + self.crop]))


def npy_loader(folder: Path, args):
    return torch.utils.data.DataLoader(NpyFolder(folder, args.crop), batch_size=args.batch, shuffle=True,
                                       drop_last=True, num_workers=args.workers,
                                       prefetch_factor=4 if args.workers else None)


# ------------------------------------------------------------------------------------------------------------------
# timing


def _cpu_seconds() -> float:
    """CPU time of this process + its reaped children (DataLoader workers are joined at the end of a pass, and
    their `cat` children with them): unlike wall time, it barely moves when other jobs share the cores."""
    me, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime


def time_pass(make, label: str) -> tuple[int, float, float, float, float]:
    """(samples after the first batch, seconds from the first batch to the last, start-up seconds = time to the
    first batch, whole-pass seconds, whole-pass CPU seconds)."""
    t0, c0 = time.perf_counter(), _cpu_seconds()
    n, t_first = 0, None
    for batch in tqdm(make(), desc=label, unit="batch", leave=False):
        if t_first is None:
            t_first = time.perf_counter()
        else:
            n += (batch["lms"] if isinstance(batch, dict) else batch).shape[0]
    t1 = time.perf_counter()
    if t_first is None:  # no batch at all: measure() says so
        t_first = t1
    return n, t1 - t_first, t_first - t0, t1 - t0, _cpu_seconds() - c0


class NothingTimed(RuntimeError):
    """A path whose passes gave no timed batch (the first batch of a pass is not timed)."""


def measure(name: str, make, passes: int, read_bytes: int, out_bytes: int, cold: bool = False) -> dict:
    """One path's row (measure_paths for that path alone); NothingTimed when its passes timed nothing."""
    rows, failed = measure_paths({name: (make, read_bytes, out_bytes)}, passes, cold)
    if failed:
        raise NothingTimed(failed[0])
    return rows[0]


def measure_paths(runs: dict, passes: int, cold: bool = False) -> tuple[list[dict], list[str]]:
    """Rows of the paths in `runs` (name: (make, read bytes, out bytes) a sample), and the messages of those that
    timed nothing. Every path's untimed warm-up pass first, then `passes` rounds of one timed pass of each path in
    turn: timed one path after another, a busy spell of the machine (other jobs, a page-cache flush) fell on one
    path's passes only and moved its ratio to the others."""
    for name, (make, _, _) in runs.items():
        time_pass(make, f"{name} warm-up")
    sums = {name: [0.0] * 5 for name in runs}  # samples, seconds, start-up, whole-pass seconds, CPU seconds
    for _ in range(passes):
        for name, (make, _, _) in runs.items():
            if cold:
                _common.drop_caches()
            sums[name] = [a + b for a, b in zip(sums[name], time_pass(make, name))]
    rows, failed = [], []
    for name, (_, read_bytes, out_bytes) in runs.items():
        n, secs, start, _, cpu = sums[name]
        if n == 0:  # the shards' split over workers left a pass with at most one batch: nothing was timed
            failed.append(f"{name}: a pass delivered at most one batch, so nothing was timed; raise --clips or lower "
                          "--batch / --per-shard")
            continue
        rate = n / secs
        rows.append({"path": name, "samples": int(n), "seconds": round(secs, 3), "samples_per_s": round(rate, 1),
                     "read_MB_s": round(rate * read_bytes / 1e6, 1), "out_MB_s": round(rate * out_bytes / 1e6, 1),
                     "startup_s": round(start / passes, 2), "samples_per_cpu_s": round(n / max(cpu, 1e-9), 1)})
    return rows, failed


def main(argv=None):
    args = parse_args(argv)
    paths = args.paths
    root = args.keep or Path(tempfile.mkdtemp(prefix="loader-bench-"))
    try:
        shards, npy = make_data(root, data_settings(args), "npy" in paths)
        source = ShardSource.open(str(shards))
        walked = ShardSource.open(str(walked_view(root, shards))) if "walked" in paths else None
        n = len(source.urls)
        # Quoted, and sizes.json read from the folder itself: a --keep or temp path with a space split the command
        piped = ShardSource.open(f"pipe:cat {shlex.quote(str(shards))}/shards-{{000000..{n - 1:06d}}}.tar",
                                 meta=str(shards))
        clip16, crop16 = 80 * args.frames * 2, 80 * args.crop * 2
        cfg = DataConfig(batch_size=args.batch, crop_frames=args.crop, num_workers=args.workers, pin_memory=False,
                         mode=args.mode, read_ahead=args.read_ahead)
        epoch = iter(range(1000))  # a new epoch per pass: new order and crops, as in training

        runs = {
            "indexed": (lambda: make_loader(cfg, epoch=next(epoch), source=source), clip16, crop16),
            "walked": (lambda: make_loader(cfg, epoch=next(epoch), source=walked), clip16, crop16),
            "stream": (lambda: make_loader(DataConfig(**{**cfg.__dict__, "reader": "stream"}), epoch=next(epoch),
                                           source=source), clip16, crop16),
            "pipe": (lambda: make_loader(cfg, epoch=next(epoch), source=piped), clip16, crop16),
            "npy": (lambda: npy_loader(npy, args), clip16 * 2, crop16 * 2),
            "synthetic": (lambda: make_loader(cfg, epoch=next(epoch), source=SyntheticSource(
                n_clips=args.clips, n_frames=args.frames)), 0, crop16),
        }
        # a path that times nothing is reported; the other paths' rows are kept
        rows, failed = measure_paths({p: runs[p] for p in paths}, args.passes, cold=args.cold)
        for message in failed:
            print(f"error: {message}", file=sys.stderr)
    finally:
        if args.keep is None:
            shutil.rmtree(root, ignore_errors=True)

    env = {"cpus": os.cpu_count(), "workers": args.workers, "batch": args.batch, "crop": args.crop,
           "frames": args.frames, "clips": args.clips, "cache": "cold" if args.cold else "warm",
           "mode": args.mode, "read_ahead": args.read_ahead,
           "torch": torch.__version__, "python": platform.python_version(),
           "commit": commit()}
    load = os.getloadavg()[0]
    print(f"\n{'path':<10} {'samples/s':>10} {'read MB/s':>10} {'out MB/s':>9} {'start-up s':>11} "
          f"{'samples/CPU-s':>14}   (load average {load:.1f} on {os.cpu_count()} cores; {env})")
    for r in rows:
        print(f"{r['path']:<10} {r['samples_per_s']:>10.0f} {r['read_MB_s']:>10.0f} {r['out_MB_s']:>9.0f} "
              f"{r['startup_s']:>11.2f} {r['samples_per_cpu_s']:>14.0f}")
    if args.csv:
        new = not args.csv.exists() or args.csv.stat().st_size == 0
        args.csv.parent.mkdir(parents=True, exist_ok=True)
        with open(args.csv, "a", newline="") as f:
            w = csv.DictWriter(f, fieldnames=CSV_FIELDS)
            if new:
                w.writeheader()
            for r in rows:
                w.writerow(r | env)
    if not rows:  # a RESULT line of nan figures read as a run that measured something
        sys.exit("error: nothing was timed for " + "; ".join(failed))
    by = {r["path"]: r["samples_per_s"] for r in rows}
    main_rate = by.get("indexed", float("nan"))
    npy_rate = by.get("npy", float("nan"))
    print(f"RESULT loader samples_per_s={main_rate:.0f} npy_samples_per_s={npy_rate:.0f} "
          f"ratio={main_rate / npy_rate:.2f} workers={args.workers}")
    if failed:
        sys.exit("error: nothing was timed for " + "; ".join(failed))


if __name__ == "__main__":
    _common.command(main)  # Ctrl-C: one line, no traceback
