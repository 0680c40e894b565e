"""Training throughput: full MATPAC steps per second, MFU, data wait, peak memory, and the authors' design as peer.

The question: how many samples/s does one accelerator train at (forward, backward, clipping, fused AdamW, EMA of
teacher encoder and head, centre update — the trainer's own `Trainer.micro_step`), what fraction of its peak is that
(MFU from `matpac_fast.flops.flops_per_sample` and the peak table in `matpac_fast.metrics`), and how does it compare,
on the same card in the same run, with the authors' design choices applied to the same model?

Modes (comma list --modes):
  eager             the trainer as is, no torch.compile, PyTorch reference loss and gather
  compiled          torch.compile of the whole forward (--compile-scope step) or of each transformer block (block)
  compiled+kernels  compiled + the Triton kernels (fused patchify-gather, centred softmax cross-entropy)
  reference-design  our model trained the way the authors' fairseq code trains it (benchmarks/_peer.py: each step
                    with their file and function): weights, LayerNorms and residual stream in the run's dtype with
                    no autocast (fairseq `model.half()`; bf16 for --precision bf16 so both sides share one number
                    format), timm 0.4.12 attention written out as (q·kᵀ)·scale, softmax, ·v in that dtype
                    (--reference-attn math; sdpa etc. for comparison), their loss and metrics in that dtype with
                    their host reads (`.item()`, `unique()`, `float()` of the logged values), the EMA as fairseq's
                    per-parameter loop on fp32 shadows plus a `load_state_dict` into the teacher, inside forward
                    before the backward, and fairseq's FP16Optimizer: loss scaling, per-parameter grad copies into
                    one flat fp32 buffer, host-side clip and overflow checks, its unfused Adam on the flat buffer,
                    per-parameter copies back. With several processes: their per-call all-reduces of the metric
                    statistics, legacy_ddp (gradients reduced after the backward), fairseq's stat sync. Data: one
                    float32 .npy per clip read by np.load in a map-style DataLoader. Schedules, masks and model
                    are ours; --stream-dtype does not apply (its stream is its weights' dtype).

Timing: --warmup untimed steps (compilation happens there), then --steps timed steps between two
torch.cuda.synchronize() calls (the only ones the measurement adds; reference-design syncs within its steps, as
the authors' code does). "data wait" is host time blocked in the loader's next() — an upper
bound on the stall, since the device may still be busy with queued work then; "compute" is the rest of the step.
Peak memory: torch.cuda.max_memory_allocated on CUDA; on CPU the process's peak RSS (monotone over the runs).
Under `accelerate launch --num_processes N` (or torchrun) every rank trains and the table reports per-device and
aggregate samples/s; scaling efficiency = aggregate / (N x one-process samples/s), the latter from
--single-process-sps or looked up in --baseline-csv (a CSV from a one-process run of this script).

    python benchmarks/train_throughput.py                                  # H100: matpac, B 64,256, all modes
    python benchmarks/train_throughput.py --data /data/shards --batch-sizes 256 --modes compiled+kernels
    python benchmarks/train_throughput.py --preset tiny --device cpu --batch-sizes 8 --steps 3 --warmup 1 \\
        --modes eager,reference-design --precision no                     # CPU smoke test, seconds
    python benchmarks/train_throughput.py --batch-sizes 256 --modes compiled+kernels --compile-mode reduce-overhead \\
        --steps 30 --warmup 5 --stream-dtype amp       # as docs/performance.md's H100 B 256 bf16-stream row
    benchmarks/gpu_suite.sh OUT .whl     # suite: eager, compiled+kernels, reference-design, B 256,64, shards
    accelerate launch --num_processes 8 benchmarks/train_throughput.py --baseline-csv one_gpu.csv

Rows are appended to --csv and, as a table headed by device, driver, versions and commit, to --results-md.
Last line: RESULT train samples_per_s=... mfu=... speedup_vs_reference_design=... device=...
(the fastest non-reference row; the speedup is against reference-design at that row's batch size; "n/a" when a
figure cannot be computed, e.g. MFU on a CPU without --peak-tflops; all three "n/a" when no non-reference row was
measured: reference-design is never reported as the winner). Exit status 1 when any run failed (the other runs'
rows are kept); "every run failed" is an error with no RESULT line. Ctrl-C: exit status 130, the finished runs' rows
kept in --csv (--results-md and the RESULT line are not written), the temporary .npy folder removed.
--csv: a CSV from an older version of this script (fewer columns, same order) is rewritten with the current header
first, old rows keeping their values and the new columns empty; a CSV with other columns is refused before any run.
"""

from __future__ import annotations

import argparse
import csv
import gc
import math
import os
import platform
import resource
import shutil
import subprocess
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from tqdm import tqdm

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))  # _common, when imported

from _common import commit, csv_header, output_problem  # noqa: E402
from _peer import PEER_VERSION, ReferenceDesignTrainer  # noqa: E402

from matpac_fast.config import ATTN_IMPLS, CUDA_ONLY_ATTN, PRESETS, STREAM_DTYPES, get_model_config  # noqa: E402
from matpac_fast.data import ShardSource, is_local  # noqa: E402
from matpac_fast.interrupts import INTERRUPTED, run_main  # noqa: E402
from matpac_fast.metrics import mfu  # noqa: E402
from matpac_fast.safe_files import create_new  # noqa: E402
from matpac_fast.train_config import (  # noqa: E402
    COMPILE_MODES,
    DataConfig,
    OptimConfig,
    RunConfig,
    ScheduleConfig,
    TrainConfig,
    inductor_text,
    parse_inductor_options,
)
from matpac_fast.trainer import Trainer  # noqa: E402


@dataclass(frozen=True)
class Mode:
    compile: bool
    kernels: bool
    reference: bool


MODES = {
    "eager": Mode(compile=False, kernels=False, reference=False),
    "compiled": Mode(compile=True, kernels=False, reference=False),
    "compiled+kernels": Mode(compile=True, kernels=True, reference=False),
    "reference-design": Mode(compile=False, kernels=False, reference=True),
}
# peak_mem_MB holds MiB (2**20 bytes): the column keeps its name so that the committed CSVs still match.
CSV_FIELDS = [
    "time_utc", "device", "world", "preset", "mode", "batch", "precision", "data", "steps", "warmup",
    "samples_per_s", "samples_per_s_per_device", "step_ms", "data_wait_ms", "compute_ms", "data_wait_frac", "mfu",
    "peak_mem_MB", "mem_kind", "gflops_per_sample", "peak_tflops", "scaling_eff", "final_loss", "driver", "torch",
    "triton", "commit", "compile_mode", "attn_impl", "stream_dtype", "peer", "inductor",
]
# The first version's columns: every CSV this script ever wrote starts with them (later columns were appended).
FIRST_CSV_FIELDS = CSV_FIELDS[:CSV_FIELDS.index("commit") + 1]
NPY_FRAMES = 1000  # 10 s clips, as AudioSet's


# ------------------------------------------------------------------------------------------------ command line
def _int_list(text: str, flag: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise SystemExit(f"error: {flag} must be a comma list of integers, got {text!r}") from None
    if not values or min(values) < 1:
        raise SystemExit(f"error: {flag} needs positive integers, got {text!r}")
    return values


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="matpac", help=f"model preset: {' | '.join(PRESETS)} (default matpac)")
    p.add_argument("--batch-sizes", default="64,256", help="comma list of per-device batch sizes (default 64,256)")
    p.add_argument("--modes", default=",".join(MODES), help=f"comma list of: {', '.join(MODES)} (default: all)")
    p.add_argument("--data", default="synthetic",
                   help="'synthetic' (random clips generated in memory, no I/O) or a shard set (make-shards "
                        "directory or pattern); reference-design always reads per-clip .npy files")
    p.add_argument("--steps", type=int, default=30, help="timed optimizer steps per run (default 30)")
    p.add_argument("--warmup", type=int, default=5, help="untimed steps first; compilation happens here (default 5)")
    p.add_argument("--precision", default="bf16", choices=("bf16", "fp16", "no"),
                   help="our modes: autocast dtype; reference-design: the dtype of its weights, no autocast, fp32 "
                        "master weights as fairseq's FP16Optimizer (default bf16; fp16 needs a GPU)")
    p.add_argument("--device", default="auto", choices=("auto", "cuda", "cpu"), help="auto: cuda when available")
    p.add_argument("--peak-tflops", type=float, default=0.0,
                   help="peak dense TFLOP/s of one device for MFU (default: look the GPU up in the table)")
    p.add_argument("--compile-scope", default="step", choices=("step", "block"),
                   help="compiled modes: torch.compile the whole forward (step) or each transformer block")
    p.add_argument("--compile-mode", default="default", choices=COMPILE_MODES,
                   help="torch.compile mode of the compiled modes (reduce-overhead: CUDA graphs; gemm-autotune: "
                        "CUDA graphs plus inductor's GEMM autotuning, see matpac_fast.train_config)")
    p.add_argument("--inductor", action="append", default=[], metavar="KEY=VALUE",
                   help="compiled modes: a torch.compile Inductor option added to --compile-mode's (repeatable; names "
                        "as in torch._inductor.config), e.g. --inductor coordinate_descent_tuning=true; the "
                        "CSV's inductor column records them")
    p.add_argument("--attn-impl", default="sdpa", choices=ATTN_IMPLS,
                   help="attention of the non-reference modes: sdpa (PyTorch picks the backend), one SDPA backend "
                        "pinned, math, or triton (matpac_kernels.packed_attention on the fused qkv output; the math "
                        "reference where Triton cannot run; with it, the compiled mode runs a Triton kernel too, so "
                        "compiled vs compiled+kernels no longer isolates the --kernels ops' share)")
    p.add_argument("--reference-attn", default="math", choices=ATTN_IMPLS,
                   help="attention of reference-design (default math: the explicit softmax(q·kᵀ)·v of the authors' "
                        "timm 0.4.12 Block); sdpa gives the peer our SDPA call (the H200 runs of RESULTS.md used "
                        "it, with the earlier peer)")
    p.add_argument("--stream-dtype", default="fp32", choices=STREAM_DTYPES,
                   help="residual stream under autocast, our modes (ModelConfig.stream_dtype; reference-design's "
                        "stream is its weights' dtype): fp32 (default) or amp (bf16, as the authors' fp16 run "
                        "carries it)")
    p.add_argument("--workers", type=int, default=None,
                   help="loader workers per process (default: 0 on CPU, min(8, cores / processes) on CUDA)")
    p.add_argument("--npy-dir", type=Path, default=None,
                   help="reference-design: an existing folder of per-clip float32 (80, T) .npy files (default: "
                        "write enough clips into a temporary folder, deleted at the end)")
    p.add_argument("--tmp-dir", type=Path, default=None, help="where the temporary .npy folder goes")
    p.add_argument("--single-process-sps", type=float, default=0.0,
                   help="one-process samples/s for the scaling efficiency of a multi-process run")
    p.add_argument("--baseline-csv", type=Path, default=None,
                   help="look the one-process samples/s up in this CSV (a world-1 row with the same device, preset, "
                        "mode, batch, precision, data kind, compile mode, attention, stream and peer)")
    p.add_argument("--csv", type=Path, default=None, help="append one row per run to this CSV")
    p.add_argument("--results-md", type=Path, default=None, help="append a markdown table of this run's rows here")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    try:
        args.inductor = parse_inductor_options(args.inductor)
    except ValueError as e:
        p.error(str(e))
    args.batch_sizes = _int_list(args.batch_sizes, "--batch-sizes")
    args.modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    unknown = [m for m in args.modes if m not in MODES]
    if unknown or not args.modes:
        p.error(f"unknown --modes entries {unknown}; choose from {', '.join(MODES)}")
    if args.preset not in PRESETS:
        p.error(f"unknown --preset {args.preset!r}; choose from {', '.join(PRESETS)}")
    if args.steps < 1 or args.warmup < 0:
        p.error("--steps must be >= 1 and --warmup >= 0")
    compiled = [m for m in args.modes if m.startswith("compiled")]
    if compiled and args.warmup < 1:  # the first step compiles: timed, it gave 0.6 samples/s for 221 (tiny, CPU)
        p.error(f"--warmup 0 with {compiled[0]} would time the compilation itself: give --warmup 1 or more")
    if args.baseline_csv is not None and not args.baseline_csv.is_file():
        p.error(f"--baseline-csv {args.baseline_csv}: no such file; give the --csv of a one-process run")
    if args.modes != ["reference-design"]:
        try:  # e.g. --attn-impl triton on a preset whose heads the kernel does not take: one line, not per-run
            get_model_config(args.preset, attn_impl=args.attn_impl, stream_dtype=args.stream_dtype)
        except ValueError as e:
            p.error(str(e))
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda but torch sees no CUDA device: use --device cpu or check the driver / torch build")
    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.precision == "fp16" and args.device == "cpu":
        p.error("--precision fp16 needs a GPU (Accelerate's fp16 autocast); use bf16 or no on the CPU")
    if args.workers is not None and args.workers < 0:
        p.error(f"--workers must be >= 0 (got {args.workers})")
    if args.peak_tflops < 0 or args.single_process_sps < 0:
        p.error("--peak-tflops and --single-process-sps must be >= 0 (0: not given)")
    global_batch = max(args.batch_sizes) * _dist_env()[1]
    if args.device == "cpu":
        for flag, impl, used in (("--attn-impl", args.attn_impl, args.modes != ["reference-design"]),
                                 ("--reference-attn", args.reference_attn, "reference-design" in args.modes)):
            if used and impl in CUDA_ONLY_ATTN:
                p.error(f"{flag} {impl} needs a CUDA GPU (that SDPA backend has no CPU kernel); use sdpa or math")
    if args.tmp_dir is not None and args.npy_dir is None and "reference-design" in args.modes:
        # checked now: the .npy folder's mkdir under a file was a traceback
        blocker = next((q for q in (args.tmp_dir, *args.tmp_dir.parents) if q.exists()), None)
        if blocker is not None and not blocker.is_dir():
            p.error(f"--tmp-dir {args.tmp_dir}: {blocker} is a file, not a folder; give a folder")
    if args.npy_dir is not None and "reference-design" in args.modes:
        problem = npy_dir_problem(args.npy_dir, global_batch, get_model_config(args.preset))
        if problem:
            p.error(problem)
    problem = data_problem(args.data, global_batch) if args.modes != ["reference-design"] else None  # it reads .npy
    if problem:
        p.error(problem)
    for flag, path in (("--csv", args.csv), ("--results-md", args.results_md)):
        problem = output_problem(path, flag) if path is not None else None
        if problem:
            p.error(problem)
    if args.csv is not None:
        try:
            if csv_header_status(args.csv) == "upgrade":
                check_rows(args.csv)  # refused now, not at the first row's append after a measured run
        except ValueError as e:
            p.error(str(e))
    md = args.results_md
    if md is not None:  # a markdown table appended to a CSV of this script broke it (its later rows, the chart)
        if args.csv is not None and md.resolve() == args.csv.resolve():
            p.error(f"--results-md {md} is the --csv file too; give them different paths")
        try:
            is_csv = md.exists() and csv_header_status(md) in ("same", "upgrade")
        except ValueError:  # not a CSV of this script: markdown (or anything else) is appended to as before
            is_csv = False
        if is_csv:
            p.error(f"--results-md {md} is a CSV of this script (--csv's format), not a markdown file; give the "
                    "markdown file, e.g. benchmarks/RESULTS.md")
    return args


def npy_dir_problem(folder: Path, global_batch: int, cfg) -> str | None:
    """Why --npy-dir cannot feed reference-design (one line), or None: enough clips for one global batch, and the
    first clip (by name, as the Dataset sorts them) a (n_mels, T >= crop) array."""
    files = sorted(folder.glob("*.npy"))
    if not files:
        return f"--npy-dir {folder}: no .npy files there"
    if len(files) < global_batch:
        return (f"--npy-dir {folder} holds {len(files)} clips, fewer than one global batch ({global_batch}): add "
                "clips or lower --batch-sizes")
    try:
        shape = np.load(files[0], mmap_mode="r", allow_pickle=False).shape
    except (OSError, ValueError, EOFError) as e:  # EOFError: an empty file (a killed writer)
        return f"--npy-dir {folder}: cannot read {files[0].name} as a .npy array ({type(e).__name__}: {e})"
    if len(shape) != 2 or shape[0] != cfg.n_mels or shape[1] < cfg.crop_frames:
        return (f"--npy-dir {folder}: {files[0].name} is {shape}; preset {cfg.name} needs ({cfg.n_mels}, T) log-mel "
                f"clips with T >= {cfg.crop_frames} frames")
    return None


def data_problem(data: str, global_batch: int) -> str | None:
    """Why --data cannot feed a run (one line), or None. A local shard set (directory or brace pattern) is opened
    the way the trainer opens it (sizes.json, stats.json); URLs and pipe: commands are left to the run."""
    if data == "synthetic":
        return None
    if data.startswith("synthetic:"):
        n = data.split(":", 1)[1]
        if not (n.isdigit() and int(n) >= 1):
            return f"--data {data}: give synthetic:N with N >= 1 clips"
        if int(n) < global_batch:
            return (f"--data {data} holds {n} clips, fewer than one global batch ({global_batch}): raise N or lower "
                    "--batch-sizes")
        return None
    if not is_local(data):
        return None
    if "{" not in data and not Path(data).exists():
        return f"--data {data}: no such shard set; give a make-shards directory or 'synthetic'"
    try:
        source = ShardSource.open(data)
    except ValueError as e:
        return f"--data {data}: not a usable shard set: {e}"
    if source.total < global_batch:
        return (f"--data {data} holds {source.total} clips, fewer than one global batch ({global_batch}): "
                "add clips or lower --batch-sizes")
    return None


# ------------------------------------------------------------------------------------------------ per-clip files
def _dist_env() -> tuple[int, int]:
    """(local rank, world size) from the launcher's environment, before any process group exists."""
    return int(os.environ.get("LOCAL_RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


def write_npy_clips(folder: Path, n: int, frames: int = NPY_FRAMES, seed: int = 0, progress: bool = True) -> Path:
    """`n` float32 (80, frames) log-mel-like clips, one .npy each (content random: it does not change the cost)."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    pool = (rng.standard_normal((16, 80, frames), dtype=np.float32) * 4 - 7).astype(np.float32)
    for i in tqdm(range(n), desc="writing per-clip .npy", unit="clip", disable=not progress, leave=False):
        np.save(folder / f"clip{i:07d}.npy", pool[i % len(pool)])
    (folder / ".done").touch()
    return folder


def npy_folder(args, n_clips: int) -> tuple[Path, bool]:
    """(folder, is_temporary): --npy-dir, or a temporary folder named by the launcher's process (one per node)."""
    if args.npy_dir is not None:
        return args.npy_dir, False
    base = args.tmp_dir or Path(tempfile.gettempdir())
    return base / f"matpac-npy-{os.getppid() if 'LOCAL_RANK' in os.environ else os.getpid()}-{n_clips}", True


def fill_npy_folder(folder: Path, n_clips: int, seed: int) -> None:
    """One writer per node (local rank 0); the other ranks wait for its `.done`."""
    if _dist_env()[0] == 0:
        write_npy_clips(folder, n_clips, seed=seed)
        return
    t0 = time.time()
    while not (folder / ".done").exists():
        if time.time() - t0 > 1800:
            raise SystemExit(f"error: timed out waiting for local rank 0 to write {folder}")
        time.sleep(0.5)


# ------------------------------------------------------------------------------------------------ measuring
def _attn(args, mode: Mode) -> str:
    return args.reference_attn if mode.reference else args.attn_impl


def _stream(args, mode: Mode) -> str:
    """The CSV's stream_dtype: --stream-dtype for our modes; the peer's stream is its weights' dtype."""
    return {"no": "fp32", "bf16": "bf16", "fp16": "fp16"}[args.precision] if mode.reference else args.stream_dtype


def train_config(args, mode: Mode, batch: int, data: str, workers: int) -> TrainConfig:
    return TrainConfig(
        run=RunConfig(out=str(Path(tempfile.gettempdir()) / "matpac-throughput"), preset=args.preset,
                      precision=args.precision, compile=args.compile_scope if mode.compile else "off",
                      compile_mode=args.compile_mode,
                      kernels=mode.kernels, cpu=args.device == "cpu", progress=False, log_every=10**9, ckpt_every=0,
                      peak_tflops=args.peak_tflops, seed=args.seed),
        data=DataConfig(shards=data, batch_size=batch, workers=workers, epoch_mode="exact"),
        model={"attn_impl": _attn(args, mode), "stream_dtype": args.stream_dtype},
        inductor=dict(args.inductor) if mode.compile else {},
        optim=OptimConfig(warmup_epochs=0.1),
        # Schedules only need to exist: one nominal epoch keeps their precomputation trivial.
        schedule=ScheduleConfig(epochs=1.0, tau_t_warmup_epochs=0.1),
    )


def _batches(trainer):
    """Batches forever: epochs follow each other as in training."""
    epoch = 0
    while True:
        n = 0
        for batch in trainer.data.epoch(epoch):
            n += 1
            yield batch
        if n == 0:
            raise ValueError("the data source yields no batch: add data or lower the batch size")
        epoch += 1


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(trainer, steps: int, warmup: int, label: str, show: bool) -> dict:
    """Warm-up, then `steps` timed optimizer steps. Returns this rank's figures."""
    device = trainer.device
    batches = _batches(trainer)
    for _ in tqdm(range(warmup), desc=f"{label} warm-up", unit="step", disable=not show, leave=False):
        trainer.micro_step(next(batches)["lms"].to(device, non_blocking=True))
    _sync(device)
    wait = 0.0
    t0 = time.perf_counter()
    for _ in tqdm(range(steps), desc=label, unit="step", disable=not show, leave=False):
        t = time.perf_counter()
        batch = next(batches)
        wait += time.perf_counter() - t
        loss, _ = trainer.micro_step(batch["lms"].to(device, non_blocking=True))
    _sync(device)
    elapsed = time.perf_counter() - t0
    batches.close()
    return {"elapsed": elapsed, "wait": wait, "samples": steps * trainer.cfg.data.batch_size,
            "final_loss": float(loss.detach().float())}


def _peak_memory_mb(device: torch.device) -> tuple[float, str]:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20, "cuda_max_allocated"
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "process_peak_rss"  # Linux: KiB


def _reduce(values: list[float], device, op) -> list[float]:
    """One collective at the measurement boundary (no-op on one process)."""
    if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
        return values
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t, op=op)
    return t.tolist()


def run_one(args, name: str, batch: int, npy_dir: Path | None, workers: int) -> dict:
    mode = MODES[name]
    if args.device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    # Each (mode, batch) gets its own static-shape graphs (no dynamic-shape recompile of the last run's).
    torch._dynamo.reset()
    data = args.data if args.data != "synthetic" else f"synthetic:{_clips_needed(args, batch)}"
    cfg = train_config(args, mode, batch, data, workers)
    trainer = ReferenceDesignTrainer(cfg, npy_dir, workers) if mode.reference else Trainer(cfg)
    acc = trainer.accelerator
    r = measure(trainer, args.steps, args.warmup, f"{name} B={batch}", show=acc.is_main_process)
    if mode.reference and trainer.overflow_steps and acc.is_main_process:
        print(f"note: reference-design B={batch}: {trainer.overflow_steps} of its {args.warmup + args.steps} steps "
              "overflowed the loss scale and skipped the update (fairseq's dynamic loss scaling, as theirs)",
              flush=True)
    mem, mem_kind = _peak_memory_mb(trainer.device)
    world = acc.num_processes
    sps_rank = r["samples"] / r["elapsed"]
    sps_sum, wait_sum, elapsed_sum, loss_sum = _reduce(
        [sps_rank, r["wait"], r["elapsed"], r["final_loss"]], trainer.device, dist.ReduceOp.SUM)
    (mem,) = _reduce([mem], trainer.device, dist.ReduceOp.MAX)
    per_device = sps_sum / world
    step_ms = 1e3 * elapsed_sum / world / args.steps
    wait_ms = 1e3 * wait_sum / world / args.steps
    u = mfu(per_device, trainer.flops_per_sample, trainer.peak)
    row = {
        "world": world, "preset": args.preset, "mode": name, "batch": batch, "precision": args.precision,
        "data": "per-clip npy" if mode.reference else ("synthetic" if data.startswith("synthetic:") else "shards"),
        "steps": args.steps, "warmup": args.warmup, "samples_per_s": sps_sum, "samples_per_s_per_device": per_device,
        "step_ms": step_ms, "data_wait_ms": wait_ms, "compute_ms": step_ms - wait_ms,
        "data_wait_frac": wait_ms / step_ms, "mfu": u, "peak_mem_MB": mem, "mem_kind": mem_kind,
        "gflops_per_sample": trainer.flops_per_sample / 1e9, "peak_tflops": trainer.peak,
        "final_loss": loss_sum / world,
        "compile_mode": args.compile_mode if mode.compile else "",
        "attn_impl": _attn(args, mode),
        "stream_dtype": _stream(args, mode),
        "peer": PEER_VERSION if mode.reference else "",
        "inductor": " ".join(inductor_text(args.inductor)) if mode.compile else "",
    }
    del trainer, acc
    torch._dynamo.reset()  # compiled graphs hold the model: free it before the next run's memory is measured
    gc.collect()
    if args.device == "cuda":
        torch.cuda.empty_cache()
    return row


def _clips_needed(args, batch: int) -> int:
    """Clips for warm-up + timed steps in one epoch on every rank, plus one spare batch (no epoch restart)."""
    return (args.warmup + args.steps + 1) * batch * _dist_env()[1]


# ------------------------------------------------------------------------------------------------ environment
def _run(cmd: list[str]) -> str:
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=20, cwd=ROOT)
    except (OSError, subprocess.TimeoutExpired):
        return ""
    return out.stdout.strip() if out.returncode == 0 else ""


def environment(device: str) -> dict:
    if device == "cuda":
        name = torch.cuda.get_device_name(0)
        driver = _run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"]).splitlines()
        driver = driver[0] if driver else "n/a"
    else:
        model = [line.split(":", 1)[1].strip() for line in _read("/proc/cpuinfo").splitlines()
                 if line.startswith("model name")]
        name = f"CPU {model[0] if model else platform.processor() or platform.machine()} ({os.cpu_count()} cores)"
        driver = "n/a"
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = "n/a"
    return {"device": name, "driver": driver, "torch": torch.__version__, "triton": triton_version,
            "commit": commit(), "python": platform.python_version()}


def _read(path: str) -> str:
    try:
        return Path(path).read_text()
    except OSError:
        return ""


def baseline_sps(args, env: dict, row: dict) -> float | None:
    """One-process samples/s for this row: --single-process-sps, else the matching world=1 row of --baseline-csv."""
    if args.single_process_sps > 0:
        return args.single_process_sps
    if args.baseline_csv is None or not args.baseline_csv.exists():
        return None
    # Every setting that changes the figure must match: a synthetic-data run used to take a shards row (or another
    # compile mode's, attention's, stream's or peer's) as its one-process baseline, whichever came last. A cell of a
    # column added later is empty in older (and upgraded) CSVs: it says nothing, so it does not exclude the row.
    same = ("preset", "mode", "batch", "precision")
    # `inductor` matches exactly: an empty cell is a run without options, which every CSV before the column was.
    later = ("data", "compile_mode", "attn_impl", "stream_dtype", "peer")
    with open(args.baseline_csv, newline="") as f:
        for r in reversed(list(csv.DictReader(f))):
            if (r.get("world") == "1" and r.get("device") == env["device"]
                    and all(r.get(k) == str(row.get(k, "")) for k in same)
                    and all((r.get(k) or "") in ("", str(row.get(k, ""))) for k in later)
                    and (r.get("inductor") or "") == str(row.get("inductor") or "")):
                return float(r["samples_per_s"])
    return None


# ------------------------------------------------------------------------------------------------ output
def _fmt(value, digits: int = 1) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "n/a"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def _sig(value) -> str:
    """At most 4 significant digits, never in exponent form (989 -> "989", 91.8449 -> "91.84", 0.14625 ->
    "0.1463", 0.5 -> "0.5")."""
    if value is None or not math.isfinite(value):
        return "n/a"
    if value == 0:
        return "0"
    decimals = max(0, 3 - math.floor(math.log10(abs(value))))
    text = f"{value:.{decimals}f}"
    return text.rstrip("0").rstrip(".") if "." in text else text


def csv_row(row: dict, env: dict) -> dict:
    out = {**row, **env, "time_utc": datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")}
    for key in ("samples_per_s", "samples_per_s_per_device", "peak_mem_MB"):
        out[key] = _fmt(out[key], 1)
    for key in ("step_ms", "data_wait_ms", "compute_ms"):
        out[key] = _fmt(out[key], 2)
    for key in ("data_wait_frac", "mfu", "scaling_eff", "final_loss"):
        out[key] = _fmt(out.get(key), 4)
    for key in ("gflops_per_sample", "peak_tflops"):  # 4 significant digits: mfu recomputes from them (tiny: 0.1463)
        out[key] = _sig(out[key])
    return {k: out.get(k, "") for k in CSV_FIELDS}


def _is_subsequence(header: list[str], fields: list[str]) -> bool:
    it = iter(fields)
    return all(any(h == f for f in it) for h in header)


def csv_header_status(path: Path) -> str:
    """"new" (absent or empty), "same" (this script's header) or "upgrade" (an older header of this script: the
    first version's columns, then some of those added since, in the same order). Raises ValueError for any other
    file: a CSV of a few of these columns (e.g. someone's own `mode,batch,samples_per_s` summary) is not this
    script's, and used to be rewritten in place with the 32-column header."""
    if not path.exists() or path.stat().st_size == 0:
        return "new"
    if path.is_dir():
        raise ValueError(f"--csv {path} is a folder; give a .csv file path")
    header = csv_header(path, "--csv")
    if header == CSV_FIELDS:
        return "same"
    if (header[:len(FIRST_CSV_FIELDS)] == FIRST_CSV_FIELDS and len(set(header)) == len(header)
            and _is_subsequence(header, CSV_FIELDS)):
        return "upgrade"
    raise ValueError(f"{path} has other columns than this script writes (not an older train_throughput.py CSV); "
                     "give a new --csv path")


def check_rows(path: Path) -> list[dict]:
    """The rows of an older CSV of this script; ValueError naming the first row whose field count differs from its
    header (an upgrade could not carry it over)."""
    with open(path, newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    for i, r in enumerate(rows, start=2):
        if None in r or None in r.values():
            raise ValueError(f"{path} line {i} has a different number of fields than its header; fix or move the "
                             "file and give a new --csv path")
    return rows


def upgrade_csv(path: Path) -> None:
    """Rewrite an older CSV of this script with the current header: every old row keeps its values, the columns
    added since are empty. Written to a temporary file beside it, then renamed over it (never half-written)."""
    rows = check_rows(path)
    tmp = path.with_name(path.name + ".upgrade.tmp")
    with os.fdopen(create_new(tmp), "w", newline="") as f:  # never through a link planted under that name
        w = csv.DictWriter(f, fieldnames=CSV_FIELDS)
        w.writeheader()
        for r in rows:
            w.writerow({k: r.get(k, "") for k in CSV_FIELDS})
    os.replace(tmp, path)


def append_csv(path: Path, row: dict) -> None:
    try:
        status = csv_header_status(path)
        if status == "upgrade":
            upgrade_csv(path)
    except ValueError as e:
        raise SystemExit(f"error: {e}") from None
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a", newline="") as f:
        w = csv.DictWriter(f, fieldnames=CSV_FIELDS)
        if status == "new":
            w.writeheader()
        w.writerow(row)


MD_COLUMNS = [("mode", "mode"), ("batch", "batch/dev"), ("world", "procs"), ("data", "data"),
              ("samples_per_s", "samples/s"), ("samples_per_s_per_device", "samples/s/dev"), ("mfu", "MFU"),
              ("step_ms", "step ms"), ("data_wait_ms", "data wait ms"), ("compute_ms", "compute ms"),
              ("peak_mem_MB", "peak mem MiB"), ("scaling_eff", "scaling eff")]


def _inductor_words(args) -> str:
    return f" with inductor options {' '.join(inductor_text(args.inductor))}" if args.inductor else ""


def markdown_block(rows: list[dict], env: dict, args) -> str:
    """A heading with the environment, then one table row per (formatted) row."""
    first = rows[0]
    # Only a compiled row was compiled: a table of eager / reference-design rows used to be headed with the unused
    # --compile-mode and --inductor options, as if its rows had run with them (their CSV cells are empty).
    compiled = any(r["mode"] in ("compiled", "compiled+kernels") for r in rows)
    compile_words = f"compile mode {args.compile_mode}{_inductor_words(args)}" if compiled else "no compiled mode"
    head = (f"### {env['device']} — preset `{args.preset}`, precision {args.precision}, {args.steps} timed steps after "
            f"{args.warmup} warm-up, {compile_words}, attention "
            f"{args.attn_impl} "
            f"(reference-design: {args.reference_attn}), residual stream {args.stream_dtype} (reference-design: "
            f"its weights' dtype, no autocast), reference-design peer {PEER_VERSION}\n\n"
            f"{first['time_utc']} · driver {env['driver']} · torch {env['torch']} · triton {env['triton']} · "
            f"python {env['python']} · commit `{env['commit']}` · memory: {first['mem_kind']} · "
            f"{first['gflops_per_sample']} GFLOP/sample · peak {first['peak_tflops']} TFLOP/s\n\n")
    lines = ["| " + " | ".join(title for _, title in MD_COLUMNS) + " |",
             "|" + "|".join("---" for _ in MD_COLUMNS) + "|"]
    for r in rows:
        lines.append("| " + " | ".join(str(r.get(key, "")) or "—" for key, _ in MD_COLUMNS) + " |")
    return head + "\n".join(lines) + "\n"


def append_markdown(path: Path, block: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        f.write("\n" + block)


def best_row(rows: list[dict]) -> dict | None:
    """The fastest non-reference row; None when no such row exists (reference-design is the peer, never the
    winner)."""
    candidates = [r for r in rows if r["mode"] != "reference-design"]
    return max(candidates, key=lambda r: r["samples_per_s"]) if candidates else None


def result_line(rows: list[dict], device: str) -> str:
    """RESULT line from the raw (unformatted) rows: the fastest non-reference row vs reference at its batch; every
    figure "n/a" when no non-reference row exists."""
    best = best_row(rows)
    if best is None:
        sps_text = mfu_text = speedup_text = "n/a"
    else:
        ref = [r for r in rows if r["mode"] == "reference-design" and r["batch"] == best["batch"]]
        speedup = best["samples_per_s"] / ref[0]["samples_per_s"] if ref else None
        sps_text = f"{best['samples_per_s']:.1f}"
        mfu_text = f"{best['mfu']:.4g}" if best["mfu"] is not None else "n/a"
        speedup_text = _fmt(speedup, 2)
    return (f"RESULT train samples_per_s={sps_text} mfu={mfu_text} "
            f"speedup_vs_reference_design={speedup_text} device={device.replace(' ', '_')}")


def print_table(rows: list[dict]) -> None:
    cols = ["mode", "batch", "world", "data", "samples_per_s", "samples_per_s_per_device", "mfu", "step_ms",
            "data_wait_ms", "compute_ms", "peak_mem_MB", "scaling_eff"]
    widths = [max(len(c), *(len(str(r[c])) for r in rows)) for c in cols]
    print("  ".join(c.rjust(w) for c, w in zip(cols, widths)))
    for r in rows:
        print("  ".join(str(r[c]).rjust(w) for c, w in zip(cols, widths)))


def interrupted_line(formatted: list[dict], args) -> str:
    """What a Ctrl-C left: the finished runs' rows (already in --csv), and what was not written."""
    kept = f"; their rows are in {args.csv}" if args.csv and formatted else ""
    md = f"; {args.results_md} was not written" if args.results_md else ""
    return (f"interrupted: {len(formatted)} of {len(args.modes) * len(args.batch_sizes)} runs finished{kept}{md}; no "
            "RESULT line")


# ------------------------------------------------------------------------------------------------ main
def main(argv=None) -> int:
    args = parse_args(argv)
    local_rank, world = _dist_env()
    workers = args.workers if args.workers is not None else (
        0 if args.device == "cpu" else max(1, min(8, (os.cpu_count() or 2) // world)))
    is_main = int(os.environ.get("RANK", 0)) == 0
    env = environment(args.device)
    npy_dir, temporary = None, False
    raw_rows, formatted, failed = [], [], []
    interrupted = False
    try:
        if "reference-design" in args.modes:  # inside the try: a write cut short by Ctrl-C is removed too
            n_clips = _clips_needed(args, max(args.batch_sizes))
            npy_dir, temporary = npy_folder(args, n_clips)
            if temporary:
                fill_npy_folder(npy_dir, n_clips, args.seed)
        for batch in args.batch_sizes:
            for name in args.modes:
                try:
                    row = run_one(args, name, batch, npy_dir, workers)
                except Exception as e:  # noqa: BLE001 - one broken mode must not cost the other modes' figures
                    if world > 1:
                        raise  # the other ranks would wait in a collective forever
                    traceback.print_exc()
                    failed.append(f"{name} B={batch}: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")
                    print(f"{name:>16} B={batch:<4} FAILED ({failed[-1]}); going on with the other runs", flush=True)
                    torch._dynamo.reset()
                    gc.collect()
                    if args.device == "cuda":
                        torch.cuda.empty_cache()
                    continue
                if row["world"] > 1:
                    base = baseline_sps(args, env, row)
                    row["scaling_eff"] = row["samples_per_s"] / (row["world"] * base) if base else None
                    if base is None and args.baseline_csv is not None and is_main:  # not a silent n/a
                        print(f"note: --baseline-csv {args.baseline_csv} has no one-process row like {name} B={batch} "
                              "(same device, preset, batch, precision, data, compile mode, attention, stream, "
                              "inductor options): "
                              "scaling efficiency n/a", flush=True)
                raw_rows.append(row)
                formatted.append(csv_row(row, env))
                if is_main:
                    if args.csv:  # appended as we go: a run killed by a timeout keeps its finished rows
                        append_csv(args.csv, formatted[-1])
                    f = formatted[-1]
                    print(f"{name:>16} B={batch:<4} {f['samples_per_s']:>9} samples/s  MFU {f['mfu']}  step "
                          f"{f['step_ms']} ms (data wait {f['data_wait_ms']} ms)  peak {f['peak_mem_MB']} MiB "
                          f"({f['mem_kind']})  loss {f['final_loss']}", flush=True)
    except KeyboardInterrupt:
        interrupted = True  # Ctrl-C reaches every rank: no barrier to wait in
    finally:
        if not interrupted and dist.is_available() and dist.is_initialized():
            dist.barrier()
        if temporary and local_rank == 0:
            shutil.rmtree(npy_dir, ignore_errors=True)
    if interrupted:
        if is_main:
            print(interrupted_line(formatted, args), file=sys.stderr)
            if formatted:
                print_table(formatted)
        return INTERRUPTED
    if not raw_rows:
        print("error: every run failed:\n  " + "\n  ".join(failed), file=sys.stderr)
        return 1
    if is_main:
        print(f"\n{env['device']} · driver {env['driver']} · torch {env['torch']} · triton {env['triton']} · "
              f"commit {env['commit']}")
        print_table(formatted)
        if args.results_md:
            append_markdown(args.results_md, markdown_block(formatted, env, args))
        best = best_row(raw_rows)
        if best is None:
            print("best: none (no non-reference mode measured; the RESULT figures are n/a)")
        else:
            print(f"best: {best['mode']} at batch {best['batch']} per device")
        if failed:
            print("failed runs (traceback above):\n  " + "\n  ".join(failed))
        print(result_line(raw_rows, env["device"]))
    return 1 if failed else 0


if __name__ == "__main__":
    run_main(main)  # after a Ctrl-C the process ends by SIGINT: a script running the benchmark stops too
