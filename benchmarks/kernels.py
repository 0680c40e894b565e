"""Triton kernels vs their PyTorch references: speed (median, p20, p80) and peak memory.

The questions: is the fused centred-softmax cross-entropy (forward + backward) faster and leaner than the eager
reference and than `torch.compile(reference)`, and is the fused patchify-gather faster than the eager gather path?

    xent:   M = B x 133 masked tokens, K = 2048 prototypes, bf16 logits (fp32 centre), tau_s 0.1, tau_t 0.04, centre
            mode "prob"; modes fwd (forward with grad enabled, as in training), bwd (backward alone, graph retained),
            full (forward + backward); implementations eager / compiled / triton.
    gather: raw fp16 log-mel (B, 1, 80, 608) -> bf16 visible (B, 57, 256) and masked (B, 133, 256) tokens; eager /
            compiled reference / triton.

Speed: `triton.testing.do_bench` (L2 flushed, median and p20/p80 in ms) on CUDA. Peak memory: the extra CUDA memory
one call needs above its inputs (`torch.cuda.max_memory_allocated` after `reset_peak_memory_stats`).
On a machine without CUDA the script runs the kernels in Triton's interpreter (fp32) on tiny shapes with a
wall-clock timer, only to prove that it works: those numbers say nothing about GPU speed, memory is "nan".

    python benchmarks/kernels.py                       # CUDA: B in 64,256,512; CPU: B=2, 8 tokens, K=256
    python benchmarks/kernels.py --out benchmarks/kernels.csv

Last line:
  RESULT kernels xent_speedup_vs_eager=... xent_speedup_vs_compiled=... xent_mem_ratio=... gather_speedup=... at_B=...
(full fwd+bwd medians and peak memories at the largest B measured, named by at_B; the ratios depend on B, so read
the table for the others; gather = eager median / triton median).
"""

import argparse
import csv
import math
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

# Triton's interpreter must be chosen before triton is first imported (see matpac_kernels._runtime).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from tqdm import tqdm  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))  # _common, when imported

import _common  # noqa: E402
import matpac_kernels as mk  # noqa: E402
from _common import commit, csv_output_problem  # noqa: E402

CUDA = torch.cuda.is_available()
N_VIS, N_MASK = 57, 133  # the paper's 5 x 38 grid at mask ratio 0.7
TAU_S, TAU_T = 0.1, 0.04
CSV_FIELDS = ["op", "impl", "mode", "B", "M", "K", "dtype", "median_ms", "p20_ms", "p80_ms", "peak_mb", "device",
              "torch", "triton", "commit"]


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batches", default="64,256,512" if CUDA else "2",
                   help="comma list of batch sizes B (default 64,256,512 on CUDA, 2 on CPU)")
    p.add_argument("--tokens", type=int, default=N_MASK if CUDA else 8,
                   help="masked tokens per sample for the cross-entropy, M = B x tokens (default 133; 8 on CPU)")
    p.add_argument("--k", type=int, default=2048 if CUDA else 256,
                   help="prototypes K (default 2048; 256 on CPU), at most 8192")
    p.add_argument("--reps", type=int, default=3, help="timed calls per case on CPU (CUDA uses do_bench's own)")
    p.add_argument("--ops", default="xent,gather", help="comma list of: xent, gather")
    p.add_argument("--out", type=Path, default=None, help="append one row per case to this CSV")
    args = p.parse_args(argv)
    try:
        args.batches = [int(b) for b in args.batches.split(",")]
    except ValueError:
        p.error(f"--batches must be a comma list of integers, got {args.batches!r}")
    if min(args.batches) < 1 or args.tokens < 1 or args.reps < 1:
        p.error("--batches, --tokens and --reps must be positive")
    if not 2 <= args.k <= 8192:
        p.error(f"--k must be in [2, 8192] (the kernel's one-row-per-program limit), got {args.k}")
    args.ops = [op.strip() for op in args.ops.split(",") if op.strip()]
    if not args.ops or set(args.ops) - {"xent", "gather"}:
        p.error(f"unknown --ops entries {sorted(set(args.ops) - {'xent', 'gather'})}; choose from xent, gather")
    problem = csv_output_problem(args.out, "--out", CSV_FIELDS) if args.out is not None else None
    if problem:
        p.error(problem)
    return args


# ------------------------------------------------------------------------------------------------ measuring
def _clear_grads(tensors):
    for t in tensors:
        t.grad = None


def time_ms(fn, grad_to_none=(), reps=3):
    """(median, p20, p80) in ms."""
    if CUDA:
        import triton.testing

        return tuple(triton.testing.do_bench(fn, grad_to_none=list(grad_to_none), quantiles=[0.5, 0.2, 0.8]))
    fn()  # warm-up (first-call compilation, caches)
    times = []
    for _ in range(reps):
        _clear_grads(grad_to_none)
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    if len(times) == 1:
        return times[0], times[0], times[0]
    q = statistics.quantiles(times, n=10, method="inclusive")
    return statistics.median(times), q[1], q[7]


def peak_mb(fn, grad_to_none=()):
    """Extra CUDA memory one call of `fn` needs above what is allocated before it (nan without CUDA)."""
    if not CUDA:
        return math.nan
    _clear_grads(grad_to_none)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - base
    _clear_grads(grad_to_none)
    return peak / 2**20


# ------------------------------------------------------------------------------------------------ cases
def xent_impls():
    ref = mk.reference_centered_softmax_xent
    # dynamic=False: one specialised graph per batch size, the compiled reference's best case
    return {"eager": ref, "compiled": torch.compile(ref, dynamic=False), "triton": mk.centered_softmax_xent}


def xent_cases(B, args, device, dtype, impls):
    """Yield (impl, mode, fn, grad_to_none) for one batch size."""
    M, K = B * args.tokens, args.k
    gen = torch.Generator().manual_seed(B)
    student = (torch.randn(M, K, generator=gen) * 2).to(device, dtype).requires_grad_()
    teacher = (torch.randn(M, K, generator=gen) * 2).to(device, dtype)
    center = (torch.randn(K, generator=gen) * 0.3).to(device)
    grad = torch.rand(M, generator=gen).to(device)
    xs = (student, teacher, center, TAU_S, TAU_T, "prob")
    for name, impl in impls.items():

        def fwd(impl=impl):
            return impl(*xs)

        def full(impl=impl):
            impl(*xs)[0].backward(grad)

        yield name, "fwd", fwd, ()
        out = impl(*xs)

        def bwd(out=out):
            out[0].backward(grad, retain_graph=True)

        yield name, "bwd", bwd, (student,)
        del out
        yield name, "full", full, (student,)


def gather_cases(B, device, dtype):
    gen = torch.Generator().manual_seed(B)
    lms = (torch.randn(B, 1, 80, 608, generator=gen) * 4.2 - 7.1).to(device, torch.float16 if CUDA else torch.float32)
    perm = torch.rand(B, 190, generator=gen).argsort(1)
    vis, mask = perm[:, :N_VIS].sort(1).values.to(device), perm[:, N_VIS:].sort(1).values.to(device)
    xs = (lms, -7.056, 4.193, vis, mask)
    ref = mk.reference_patchify_gather
    impls = {"eager": ref, "compiled": torch.compile(ref, dynamic=False), "triton": mk.patchify_gather}
    for name, impl in impls.items():
        yield name, "fwd", (lambda impl=impl: impl(*xs, out_dtype=dtype)), ()


def environment() -> dict:
    import triton

    cpu = platform.processor() or platform.machine()
    device = torch.cuda.get_device_name() if CUDA else f"cpu ({cpu}, interpreter)"
    return {"device": device, "torch": torch.__version__, "triton": triton.__version__, "commit": commit()}


# ------------------------------------------------------------------------------------------------ main
def run(args) -> list[dict]:
    device = "cuda" if CUDA else "cpu"
    dtype = torch.bfloat16 if CUDA else torch.float32  # the interpreter has no bf16 arithmetic
    env = environment()
    rows = []
    plan = [(op, B) for B in args.batches for op in args.ops]
    xent = xent_impls() if "xent" in args.ops else None
    for op, B in tqdm(plan, desc="benchmark", unit="case-group"):
        if op == "xent":
            cases, M, K = xent_cases(B, args, device, dtype, xent), B * args.tokens, args.k
        else:
            cases, M, K = gather_cases(B, device, dtype), B * (N_VIS + N_MASK), 256
        for impl, mode, fn, grads in cases:
            fn()  # warm-up: compile / autotune outside the measurements
            med, p20, p80 = time_ms(fn, grads, args.reps)
            rows.append({"op": op, "impl": impl, "mode": mode, "B": B, "M": M, "K": K, "dtype": str(dtype)[6:],
                         "median_ms": med, "p20_ms": p20, "p80_ms": p80, "peak_mb": peak_mb(fn, grads), **env})
            if CUDA:
                torch.cuda.empty_cache()
    return rows


def print_table(rows):
    print(f"\n{'op':7s} {'impl':9s} {'mode':5s} {'B':>4s} {'M':>7s} {'K':>5s} {'median ms':>10s} {'p20':>9s} "
          f"{'p80':>9s} {'peak MiB':>9s}")
    for r in rows:
        print(f"{r['op']:7s} {r['impl']:9s} {r['mode']:5s} {r['B']:4d} {r['M']:7d} {r['K']:5d} {r['median_ms']:10.3f} "
              f"{r['p20_ms']:9.3f} {r['p80_ms']:9.3f} {r['peak_mb']:9.1f}")


def write_csv(path: Path, rows):
    path.parent.mkdir(parents=True, exist_ok=True)
    new = not path.exists() or path.stat().st_size == 0
    with path.open("a", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=CSV_FIELDS)
        if new:
            writer.writeheader()
        writer.writerows(rows)


def summary(rows) -> str:
    def pick(op, impl, mode, key):
        B = max(r["B"] for r in rows if r["op"] == op)
        return next(r[key] for r in rows if (r["op"], r["impl"], r["mode"], r["B"]) == (op, impl, mode, B))

    def ratio(a, b):
        return a / b if b and not math.isnan(a) and not math.isnan(b) else math.nan

    parts = {"xent_speedup_vs_eager": math.nan, "xent_speedup_vs_compiled": math.nan, "xent_mem_ratio": math.nan,
             "gather_speedup": math.nan}
    if any(r["op"] == "xent" for r in rows):
        t_triton = pick("xent", "triton", "full", "median_ms")
        parts["xent_speedup_vs_eager"] = ratio(pick("xent", "eager", "full", "median_ms"), t_triton)
        parts["xent_speedup_vs_compiled"] = ratio(pick("xent", "compiled", "full", "median_ms"), t_triton)
        parts["xent_mem_ratio"] = ratio(pick("xent", "eager", "full", "peak_mb"), pick("xent", "triton", "full",
                                                                                         "peak_mb"))
    if any(r["op"] == "gather" for r in rows):
        parts["gather_speedup"] = ratio(pick("gather", "eager", "fwd", "median_ms"),
                                        pick("gather", "triton", "fwd", "median_ms"))
    at_b = max((r["B"] for r in rows), default=0)  # the batch the ratios are taken at (smaller ones: see the table)
    return "RESULT kernels " + " ".join(f"{k}={v:.3f}" for k, v in parts.items()) + f" at_B={at_b}"


def main(argv=None) -> None:
    args = parse_args(argv)
    if not CUDA:
        print("no CUDA device: running the Triton interpreter on tiny shapes (proves the script, not the speed)")
    if not CUDA and not mk.interpreter_active():
        sys.exit("triton was imported before TRITON_INTERPRET=1 could be set; run with TRITON_INTERPRET=1")
    mk.set_backend("triton")  # the public functions must run the kernels (never fall back) in this script
    rows = run(args)
    print_table(rows)
    env = rows[0]
    print(f"\ndevice {env['device']}, torch {env['torch']}, triton {env['triton']}, commit {env['commit']}")
    if args.out:
        write_csv(args.out, rows)
        print(f"wrote {len(rows)} rows to {args.out}")
    print(summary(rows))


if __name__ == "__main__":
    _common.command(main)  # Ctrl-C: one line, no traceback
