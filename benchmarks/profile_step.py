"""Where a training step's time goes: torch.profiler over a few full trainer steps, summarised by kernel class.

The throughput benchmark says how fast; this says why. It builds the same trainer as
`benchmarks/train_throughput.py` (same modes, synthetic data by default so the loader is out of the picture), warms
up (compilation happens there), then profiles --steps optimizer steps and prints:
  - wall time per step and GPU busy time per step (sum of kernel durations; busy / wall < 1 means the GPU waited
    on the host: launch overhead or synchronisation),
  - time by kernel class (GEMM, attention, Triton/inductor, optimizer and EMA, other elementwise, copies),
  - the --top kernels by total GPU time, and the --top host-side ops by self CPU time.

    python benchmarks/profile_step.py                                   # matpac, B 256, compiled+kernels
    python benchmarks/profile_step.py --mode eager --batch 64 --steps 3
    python benchmarks/profile_step.py --preset tiny --device cpu --precision no --batch 4 --steps 1 --warmup 1

On CPU there are no GPU figures (the RESULT line's GPU fields are nan); it still runs (the CI smoke test uses
that).
"""

from __future__ import annotations

import argparse
import os
import re
import sys
import time
from collections import defaultdict
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _common  # noqa: E402
import train_throughput as tt  # noqa: E402

# First match wins; names are CUDA kernel names as the profiler reports them.
CLASSES = [
    # attention before gemm: cuDNN's SDPA kernels are named like GEMMs (sm90_..._wgmma); `_attn_*` are
    # matpac_kernels.packed_attention's (attn_impl=triton), which would otherwise count as triton/inductor
    ("attention", re.compile(r"flash|fmha|attention|sdpa|^_attn_", re.I)),
    ("gemm", re.compile(r"gemm|cutlass|nvjet|xmma|cublas|sm90_|matmul", re.I)),
    ("optimizer+ema", re.compile(r"multi_tensor|foreach|adam|lerp|fused_adam", re.I)),
    ("triton/inductor", re.compile(r"^triton_|_kernel$|^_xent|^_patchify", re.I)),
    ("copy/memset", re.compile(r"memcpy|memset|copy_|CatArrayBatched", re.I)),
    ("reduction", re.compile(r"reduce|norm|softmax", re.I)),
    ("elementwise", re.compile(r"elementwise|vectorized|unrolled", re.I)),
]


def classify(name: str) -> str:
    for cls, pattern in CLASSES:
        if pattern.search(name):
            return cls
    return "other"


def _first_attr(obj, names: tuple[str, ...]) -> float:
    """The first of `names` that `obj` has (profiler attributes were renamed cuda_* -> device_* across versions)."""
    for attr in names:
        v = getattr(obj, attr, None)
        if v is not None:
            return float(v)
    return 0.0


def _device_time_us(evt) -> float:
    return _first_attr(evt, ("device_time", "cuda_time"))


def _self_device_total(avg) -> float:
    return _first_attr(avg, ("self_device_time_total", "self_cuda_time_total"))


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="matpac", choices=list(tt.PRESETS), help="model preset (default matpac)")
    p.add_argument("--mode", default="compiled+kernels", choices=[m for m in tt.MODES if m != "reference-design"])
    p.add_argument("--compile-mode", default="default", choices=tt.COMPILE_MODES,
                   help="torch.compile mode (see train_throughput.py --help)")
    p.add_argument("--compile-scope", default="step", choices=("step", "block"))
    p.add_argument("--inductor", action="append", default=[], metavar="KEY=VALUE",
                   help="a torch.compile Inductor option added to --compile-mode's (repeatable; see "
                        "train_throughput.py --help)")
    p.add_argument("--attn-impl", default="sdpa", choices=tt.ATTN_IMPLS,
                   help="attention: sdpa (PyTorch picks the backend), one SDPA backend pinned, math, or triton "
                        "(matpac_kernels.packed_attention)")
    p.add_argument("--stream-dtype", default="fp32", choices=tt.STREAM_DTYPES,
                   help="residual stream under autocast: fp32 (default) or amp (bf16)")
    p.add_argument("--batch", type=int, default=256, help="per-device batch (default 256)")
    p.add_argument("--steps", type=int, default=5, help="profiled optimizer steps (default 5)")
    p.add_argument("--warmup", type=int, default=5, help="steps before profiling; compilation happens here")
    p.add_argument("--precision", default="bf16", choices=("bf16", "no"))
    p.add_argument("--device", default="auto", choices=("auto", "cuda", "cpu"))
    p.add_argument("--data", default="synthetic", help="'synthetic' (default) or a shard set")
    p.add_argument("--top", type=int, default=20, help="rows in the kernel and host-op tables (default 20)")
    p.add_argument("--trace", type=Path, default=None,
                   help="also write a Chrome trace here (a .json or .json.gz path; an existing file is replaced)")
    args = p.parse_args(argv)
    try:
        args.inductor = tt.parse_inductor_options(args.inductor)
    except ValueError as e:
        p.error(str(e))
    if args.batch < 1 or args.steps < 1 or args.warmup < 0 or args.top < 0:
        p.error("--batch and --steps must be >= 1, --warmup and --top >= 0")
    if args.warmup < 1 and args.mode != "eager":  # as train_throughput.py: the first step compiles
        p.error(f"--warmup 0 with {args.mode} would profile the compilation itself: give --warmup 1 or more")
    problem = tt.data_problem(args.data, args.batch)
    if problem:
        p.error(problem)
    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda but torch sees no CUDA device")
    if args.device == "cpu" and args.attn_impl in tt.CUDA_ONLY_ATTN:
        p.error(f"--attn-impl {args.attn_impl} needs a CUDA GPU (that SDPA backend has no CPU kernel); use sdpa or "
                "math")
    if args.trace is not None:  # last: no folder is made for a run that another check refuses
        # A JSON path only (.json, or .json.gz: gzipped by the profiler): the trace is written over the path, so a
        # slip such as `--trace README.md` replaced that file with a trace, as plot_results.py --out wants a .png.
        if not args.trace.name.lower().endswith((".json", ".json.gz")):
            p.error(f"--trace {args.trace}: give a .json (or .json.gz) path; the trace is written over it")
        if args.trace.is_dir():
            p.error(f"--trace {args.trace} is a folder; give a file path such as {args.trace / 'trace.json'}")
        try:  # now, not after the profiled steps: a path that cannot be written is reported before any work
            args.trace.parent.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            p.error(f"--trace {args.trace}: cannot create its folder ({e.strerror or e})")
        if not os.access(args.trace.parent, os.W_OK):
            p.error(f"--trace {args.trace}: its folder {args.trace.parent} is not writable")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    # The throughput script's config builder, fed the fields it reads.
    ns = argparse.Namespace(preset=args.preset, precision=args.precision, compile_scope=args.compile_scope,
                            compile_mode=args.compile_mode, inductor=args.inductor, attn_impl=args.attn_impl,
                            reference_attn="math",
                            stream_dtype=args.stream_dtype, device=args.device,
                            peak_tflops=0.0, seed=0, warmup=args.warmup, steps=args.steps)
    data = args.data if args.data != "synthetic" else f"synthetic:{(args.warmup + args.steps + 1) * args.batch}"
    workers = 0 if args.device == "cpu" else 4
    cfg = tt.train_config(ns, tt.MODES[args.mode], args.batch, data, workers)
    trainer = tt.Trainer(cfg)
    device = trainer.device
    batches = tt._batches(trainer)
    for _ in range(args.warmup):
        trainer.micro_step(next(batches)["lms"].to(device, non_blocking=True))
    tt._sync(device)

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        t0 = time.perf_counter()
        for _ in range(args.steps):
            trainer.micro_step(next(batches)["lms"].to(device, non_blocking=True))
        tt._sync(device)
        wall = (time.perf_counter() - t0) / args.steps
    batches.close()

    kernels = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    busy = sum(_device_time_us(e) for e in kernels) / 1e3 / args.steps  # ms per step
    by_class: dict[str, float] = defaultdict(float)
    by_name: dict[str, list[float]] = defaultdict(lambda: [0.0, 0])
    for e in kernels:
        t = _device_time_us(e) / 1e3 / args.steps
        by_class[classify(e.name)] += t
        by_name[e.name][0] += t
        by_name[e.name][1] += 1

    sps = args.batch / wall
    print(f"{args.preset} · {args.mode} · compile mode {args.compile_mode}{tt._inductor_words(args)} · attention "
          f"{args.attn_impl} · "
          f"stream {args.stream_dtype} · "
          f"B={args.batch} · {args.precision} · "
          f"{tt.environment(args.device)['device']} · torch {torch.__version__}")
    if device.type == "cuda":
        print(f"wall {wall * 1e3:.2f} ms/step ({sps:.0f} samples/s, under the profiler) · GPU busy {busy:.2f} ms/step "
              f"({busy / (wall * 1e3):.1%} of wall) · {len(kernels) / args.steps:.0f} kernels/step")
    else:  # "GPU busy 0.00 ms/step (0.0% of wall)" read as a measured idle GPU
        print(f"wall {wall * 1e3:.2f} ms/step ({sps:.0f} samples/s, under the profiler) · no GPU in this run: "
              "host ops only")
    if kernels:
        flops = trainer.flops_per_sample * args.batch
        print(f"model TFLOP/s over GPU busy time: {flops / (busy / 1e3) / 1e12:.0f} · over wall: "
              f"{flops / wall / 1e12:.0f}")
        print("\nGPU time by kernel class (ms/step, share of busy):")
        for cls, t in sorted(by_class.items(), key=lambda kv: -kv[1]):
            print(f"  {cls:<16} {t:8.2f}  {t / busy:6.1%}")
        print(f"\ntop {args.top} kernels by GPU time (ms/step, launches/step, class):")
        for name, (t, n) in sorted(by_name.items(), key=lambda kv: -kv[1][0])[: args.top]:
            print(f"  {t:8.3f} {n / args.steps:6.0f}  {classify(name):<16} {name[:110]}")
    print(f"\ntop {args.top} host ops by self CPU time (ms/step):")
    avgs = sorted(prof.key_averages(), key=lambda a: -a.self_cpu_time_total)[: args.top]
    for a in avgs:
        print(f"  {a.self_cpu_time_total / 1e3 / args.steps:8.3f}  x{a.count / args.steps:<6.0f} {a.key[:100]}"
              + (f"  (GPU self {_self_device_total(a) / 1e3 / args.steps:.2f})" if kernels else ""))
    rc = 0
    if args.trace:
        prof.export_chrome_trace(str(args.trace))
        if args.trace.is_file() and args.trace.stat().st_size > 0:  # the profiler may only log a failed write
            print(f"\nwrote {args.trace} ({args.trace.stat().st_size / 1e6:.1f} MB)")
        else:
            print(f"error: the profiler did not write --trace {args.trace} (see its messages above)", file=sys.stderr)
            rc = 1
    gpu = {"gpu_busy_ms": busy, "gemm_ms": by_class.get("gemm", 0.0), "attention_ms": by_class.get("attention", 0.0)}
    gpu_words = " ".join(f"{k}={v:.2f}" if device.type == "cuda" else f"{k}=nan" for k, v in gpu.items())
    print(f"RESULT profile wall_ms={wall * 1e3:.2f} {gpu_words}")
    return rc


if __name__ == "__main__":
    _common.command(main)  # Ctrl-C: one line, no traceback
