"""make-shards versus the authors' per-file approach, on the same generated corpus and the same worker count.

Per-file approach (M2D/MATPAC `wav_to_lms` style): each worker decodes a file, resamples, computes the log-mel and
`np.save`s one float32 .npy per clip; then a manifest pass re-opens every .npy to read its shape (the authors build
their training list that way). make-shards: the same front end, written as float16 into tar shards with
sizes/stats/manifest and sha256 hashes, in one pass.

CPU check in seconds: `python benchmarks/make_shards.py --n 8 --seconds 7 --workers 1 --repeats 1`. Clips shorter
than make-shards' 608-frame minimum (~6.1 s) are refused up front unless `--short pad`.

Both run in `--workers` spawned processes with one torch thread each (`--workers 1`: both in this process, as
make-shards runs a single worker), on a warm page cache, and include process start-up.
Last line: RESULT make_shards clips_per_s=... per_file_clips_per_s=... ratio=... clips_per_s_per_core=...
"""

from __future__ import annotations

import argparse
import math
import multiprocessing as mp
import os
import platform
import resource
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))  # _common, when imported

import _common  # noqa: E402
from _common import commit  # noqa: E402


def make_corpus(root: Path, n: int, seconds: float, sr: int) -> list[Path]:
    import soundfile as sf
    from tqdm import tqdm

    from shard_tools.synthetic import CLASSES, synth_clip

    paths = []
    for i in tqdm(range(n), desc="corpus", unit="file", file=sys.stderr):
        wave, label = synth_clip(i, seed=123, sample_rate=sr, seconds=seconds)
        p = root / label / f"clip{i:06d}.wav"
        p.parent.mkdir(parents=True, exist_ok=True)
        sf.write(p, wave, sr, subtype="PCM_16")
        paths.append(p)
    assert len({p.parent.name for p in paths}) == min(n, len(CLASSES))
    return paths


# ------------------------------------------------------------------------------------- the authors' approach
_W: dict = {}


def _init_per_file(frontend: str) -> None:
    import torch

    from matpac_fast.frontend import LogMelSpec, get_spec

    torch.set_num_threads(1)
    _W["spec"] = get_spec(frontend)
    _W["mel"] = LogMelSpec(_W["spec"])


def _per_file_one(job: tuple[str, str]) -> str:
    import soundfile as sf
    import torch

    from matpac_fast.frontend import resample, to_mono

    src, dst = job
    data, sr = sf.read(src, dtype="float32", always_2d=True)
    wave = resample(torch.from_numpy(to_mono(data)), sr, _W["spec"])
    lms = _W["mel"](wave[None])[0].numpy()
    np.save(dst, lms)  # float32, one file per clip
    return dst


def per_file_approach(paths: list[Path], out: Path, workers: int, frontend: str) -> int:
    jobs = []
    for p in paths:
        dst = out / p.parent.name / (p.stem + ".npy")
        dst.parent.mkdir(parents=True, exist_ok=True)
        jobs.append((str(p), str(dst)))
    if workers <= 1:  # as make-shards runs one worker (pipeline.ordered_results): in this process, not spawned
        import torch

        threads = torch.get_num_threads()
        _init_per_file(frontend)
        try:
            written = [_per_file_one(job) for job in jobs]
        finally:
            torch.set_num_threads(threads)
    else:
        with mp.get_context("spawn").Pool(workers, _init_per_file, (frontend,)) as pool:
            written = list(pool.imap(_per_file_one, jobs, chunksize=2))
    # manifest pass: re-open every file to learn its length
    rows = []
    for f in written:
        rows.append(f"{f},{np.load(f, allow_pickle=False).shape[-1]}\n")
    (out / "files.csv").write_text("file_name,length\n" + "".join(rows))
    return len(rows)


def make_shards_approach(root: Path, out: Path, workers: int, frontend: str, short: str) -> int:
    from shard_tools.api import make_folder_shards

    s = make_folder_shards(out, root, workers=workers, frontend=frontend, short=short, progress=False)
    return s["written"]


def clip_problem(seconds: float, frontend: str, short: str) -> str | None:
    """Why clips of `seconds` would all be skipped by make-shards (one line), or None."""
    from matpac_fast.frontend import get_spec
    from shard_tools.pipeline import MakeConfig

    spec = get_spec(frontend)
    frames = spec.num_frames(int(seconds * spec.sample_rate))
    need = MakeConfig.min_frames if short == "drop" else 1
    if frames >= need:
        return None
    least = ((need - 1) * spec.hop_length + spec.n_fft) / spec.sample_rate
    if short == "drop":
        return (f"--seconds {seconds:g} gives {frames} log-mel frames, fewer than make-shards' --min-frames {need}: "
                f"give --seconds {math.ceil(least * 10) / 10:g} or more, or --short pad (short clips kept, padded)")
    return f"--seconds {seconds:g} gives no log-mel frame: give --seconds {least:g} or more"


def cpu_seconds() -> float:
    """User+system CPU of this process and its finished children (the pool workers, once joined): unlike wall
    time, it does not depend on what else the machine is running."""
    total = 0.0
    for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN):
        r = resource.getrusage(who)
        total += r.ru_utime + r.ru_stime
    return total


def dir_bytes(d: Path) -> tuple[int, int]:
    files = [p for p in d.rglob("*") if p.is_file()]
    return sum(p.stat().st_size for p in files), len(files)


def warm_up(clip: Path, folder: Path, args) -> None:
    """Both approaches once, untimed, on one clip (a copy in its own corpus folder), then the folder removed."""
    corpus = folder / "corpus" / clip.parent.name
    corpus.mkdir(parents=True)
    shutil.copy(clip, corpus / clip.name)
    (folder / "per_file").mkdir()
    per_file_approach([corpus / clip.name], folder / "per_file", 1, args.frontend)
    make_shards_approach(folder / "corpus", folder / "make_shards", 1, args.frontend, args.short)
    shutil.rmtree(folder)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=400, help="clips in the generated corpus (default: %(default)s)")
    p.add_argument("--seconds", type=float, default=10.0, help="clip length (default: %(default)s)")
    p.add_argument("--sr", type=int, default=44100, help="corpus sample rate; AudioSet downloads are mostly 44.1k/48k")
    p.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="processes for both (default: all cores)")
    p.add_argument("--repeats", type=int, default=2, help="timed runs of each approach; best is kept")
    p.add_argument("--frontend", default="matpac", choices=["matpac", "m2d"])
    p.add_argument("--short", default="drop", choices=["drop", "pad"],
                   help="make-shards' --short: drop (default here for both front ends, as MATPAC's authors; "
                        "make-shards' own default for m2d is pad) skips clips under 608 frames (~6.1 s); pad keeps "
                        "them")
    p.add_argument("--work", type=Path, default=None,
                   help="parent of the scratch folder (default: the system temp folder); the scratch folder is removed")
    args = p.parse_args(argv)
    if args.n < 1 or args.workers < 1 or args.repeats < 1:
        p.error("--n, --workers and --repeats must be >= 1")
    if not args.seconds > 0 or not math.isfinite(args.seconds):
        p.error(f"--seconds must be > 0 (got {args.seconds:g})")
    if args.sr < 8000:
        p.error(f"--sr must be >= 8000 Hz (got {args.sr})")
    problem = clip_problem(args.seconds, args.frontend, args.short)
    if problem:
        p.error(problem)
    if args.work is not None and not args.work.is_dir():
        p.error(f"--work {args.work}: no such folder; create it or leave --work out")
    return args


def main(argv=None) -> None:
    args = parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="bench_shards_", dir=args.work))
    keep = False
    try:
        corpus = work / "corpus"
        paths = make_corpus(corpus, args.n, args.seconds, args.sr)
        for path in paths:  # warm the page cache so that neither approach pays the first read
            path.read_bytes()
        if args.workers == 1:  # both in this process: first calls (imports, filter banks: ~0.7 s) would be timed
            warm_up(paths[0], work / "warm-up", args)  # in whichever approach ran first; untimed here for both
        times = {"per_file": [], "make_shards": []}
        cpu = {"per_file": [], "make_shards": []}
        sizes = {}
        for r in range(args.repeats):
            for name in ("per_file", "make_shards"):  # alternate, so drifting machine load hits both
                out = work / f"{name}_{r}"
                out.mkdir()
                t0, c0 = time.perf_counter(), cpu_seconds()
                if name == "per_file":
                    n_done = per_file_approach(paths, out, args.workers, args.frontend)
                else:
                    try:
                        n_done = make_shards_approach(corpus, out, args.workers, args.frontend, args.short)
                    except ValueError as e:  # its message may name a file in `work`: keep that folder
                        keep = True
                        raise SystemExit(f"error: make-shards failed: {e} (scratch folder {work} kept for "
                                         "inspection; delete it when done)") from None
                times[name].append(time.perf_counter() - t0)
                cpu[name].append(cpu_seconds() - c0)
                assert n_done == args.n, (name, n_done)
                sizes[name] = dir_bytes(out)
                print(f"  run {r} {name:<11} {times[name][-1]:7.2f} s wall {cpu[name][-1]:7.2f} s CPU", file=sys.stderr)
                shutil.rmtree(out)
    finally:
        if not keep:
            shutil.rmtree(work, ignore_errors=True)

    t_pf, t_ms = min(times["per_file"]), min(times["make_shards"])
    cps, pf_cps = args.n / t_ms, args.n / t_pf
    import torch

    print(f"corpus: {args.n} clips x {args.seconds:g} s wav at {args.sr} Hz; front end {args.frontend}; "
          f"{args.workers} workers; best of {args.repeats}")
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores; torch {torch.__version__}; "
          f"commit {commit()}")
    print()
    print("| approach | wall s (best) | clips/s | CPU s (best) | CPU ms/clip | output files | output MB |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for name, label, t in (("per_file", "per-file .npy + manifest pass", t_pf), ("make_shards", "make-shards", t_ms)):
        b, f = sizes[name]
        c = min(cpu[name])
        print(f"| {label} | {t:.2f} | {args.n / t:.1f} | {c:.2f} | {1000 * c / args.n:.1f} | {f} | {b / 1e6:.1f} |")
    print(f"CPU-time ratio (per-file / make-shards): {min(cpu['per_file']) / min(cpu['make_shards']):.3f}")
    print()
    print(f"RESULT make_shards clips_per_s={cps:.2f} per_file_clips_per_s={pf_cps:.2f} ratio={t_pf / t_ms:.3f} "
          f"clips_per_s_per_core={cps / args.workers:.2f}")


if __name__ == "__main__":
    _common.command(main)  # Ctrl-C: one line, no traceback
