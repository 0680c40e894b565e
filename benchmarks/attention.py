"""Attention backends on MATPAC's short sequences: which SDPA backend should the model pin (`--model attn_impl=...`)?

The profile of a compiled ViT-B step on an H200 (benchmarks/profile_step.py) put ~14% of GPU time in cuDNN's flash
attention kernels for ~3% of the model FLOPs: the sequences are short (student 58, teacher 134, predictor 191 tokens)
and the predictor's heads are 32 wide. This times one attention call, forward + backward (teacher: forward only, as
in training), for each shape and each implementation, and sums them over the layers of one training step:
  sdpa       F.scaled_dot_product_attention, PyTorch's own backend choice (the model's default)
  flash      SDPA pinned to FLASH_ATTENTION          efficient  SDPA pinned to EFFICIENT_ATTENTION
  cudnn      SDPA pinned to CUDNN_ATTENTION          math       the explicit softmax(q·kᵀ/√d)·v, torch.compile'd
  triton     matpac_kernels.packed_attention (`attn_impl=triton`): reads the fused (B, N, 3·D) qkv tensor and
             writes (B, N, D), so its column also includes what the SDPA columns leave out of the model's step:
             the q/k/v and output layout copies (free here for SDPA, whose inputs are contiguous (B, H, N, hd))
An implementation that cannot run a shape (e.g. cuDNN on CPU, Triton on CPU without TRITON_INTERPRET=1) is reported
as n/a.

On CUDA each call is timed as an eager call by default (`triton.testing.do_bench`), the host's launch cost included:
the Triton kernel's call goes through Python, its autotuner and five launches, so where a call is short that cost
can dominate. `--graphs` times calls replayed from a CUDA graph (`triton.testing.do_bench_cudagraph`), as the
compiled training step runs them (CUDA graphs), which leaves only the GPU's time; it also differs in not flushing
the L2 cache between calls (`do_bench` does), so where a call's inputs fit in L2 they stay there. (On an H200 at
a27f55a the eager timing put the Triton kernel at 18.9 ms per step against SDPA's 11.0, while the training step with
it was 5.4 ms shorter; benchmarks/RESULTS.md.)

    python benchmarks/attention.py                     # CUDA: matpac preset, B 256, bf16, eager calls
    python benchmarks/attention.py --graphs            # CUDA: the same, each call replayed from a CUDA graph
    python benchmarks/attention.py --batch 4 --reps 2  # CPU: a smoke run of the script (fp32, tiny batch)

Last line: RESULT attention default_ms=... best=... best_ms=... speedup=...   (ms per training step, all layers)
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.nn.attention import sdpa_kernel

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))  # _common

import _common  # noqa: E402

from matpac_fast.config import PRESETS, get_model_config  # noqa: E402
from matpac_fast.vit import SDPA_BACKENDS, attention_math  # noqa: E402

CUDA = torch.cuda.is_available()
IMPLS = ("sdpa", "flash", "efficient", "cudnn", "math", "triton")


def shapes(preset: str, batch: int) -> list[tuple[str, tuple[int, int, int, int], int, bool]]:
    """(name, (B, H, N, hd), layers per step, backward?) for the student, teacher and predictor."""
    c = get_model_config(preset)
    return [
        ("student", (batch, c.heads, 1 + c.n_visible, c.dim // c.heads), c.depth, True),
        ("teacher", (batch, c.heads, 1 + c.n_masked, c.dim // c.heads), c.depth, False),
        ("predictor", (batch, c.pred_heads, 1 + c.n_patches, c.pred_dim // c.pred_heads), c.pred_depth, True),
    ]


def make_fn(impl: str):
    if impl == "triton":
        return None  # see make_packed_call
    if impl == "math":
        return torch.compile(attention_math, dynamic=False)
    if impl == "sdpa":
        return F.scaled_dot_product_attention

    def pinned(q, k, v):
        with sdpa_kernel([SDPA_BACKENDS[impl]]):
            return F.scaled_dot_product_attention(q, k, v)

    return pinned


def make_call(fn, q, k, v, grad, backward: bool):
    """One attention call as training runs it: forward + backward, or (teacher) forward under no_grad."""
    if fn is None:  # triton: the same values, packed as the model's qkv Linear writes them
        return make_packed_call(q, k, v, grad, backward)

    def call():
        if backward:
            q.grad = k.grad = v.grad = None
            fn(q, k, v).backward(grad)
        else:
            with torch.no_grad():
                fn(q, k, v)

    return call


def make_packed_call(q, k, v, grad, backward: bool):
    import matpac_kernels as mk

    B, H, N, hd = q.shape
    qkv = torch.stack([q, k, v], dim=2).detach().transpose(1, 3).reshape(B, N, 3 * H * hd).requires_grad_(backward)
    grad_packed = grad.transpose(1, 2).reshape(B, N, H * hd)

    def call():
        with mk.use_backend("triton"):  # refuses (n/a) rather than timing the reference where Triton cannot run
            if backward:
                qkv.grad = None
                mk.packed_attention(qkv, H).backward(grad_packed)
            else:
                with torch.no_grad():
                    mk.packed_attention(qkv, H)

    return call


def time_ms(fn, reps: int, graphs: bool = False) -> float:
    if CUDA:
        import triton.testing

        if graphs:  # warms up (autotuning included) on a side stream, then captures and replays ~40 ms of calls
            return float(triton.testing.do_bench_cudagraph(fn, rep=40))
        return float(triton.testing.do_bench(fn, warmup=10, rep=40))
    fn()
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t) * 1e3)
    return statistics.median(times)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="matpac", choices=sorted(PRESETS))
    p.add_argument("--batch", type=int, default=256 if CUDA else 4, help="per-device batch (default 256; 4 on CPU)")
    p.add_argument("--reps", type=int, default=3, help="timed calls on CPU (CUDA uses do_bench)")
    p.add_argument("--graphs", action="store_true",
                   help="CUDA: time calls replayed from a CUDA graph, without the host's launch cost, as the compiled "
                        "training step runs them (default: eager calls)")
    args = p.parse_args(argv)
    if args.batch < 1 or args.reps < 1:
        p.error("--batch and --reps must be >= 1")
    if args.graphs and not CUDA:
        p.error("--graphs needs a CUDA GPU (CUDA graphs); on CPU leave it out")
    device = "cuda" if CUDA else "cpu"
    dtype = torch.bfloat16 if CUDA else torch.float32
    gen = torch.Generator(device=device).manual_seed(0)
    per_step = {impl: 0.0 for impl in IMPLS}
    print(f"{'shape':<10} {'B,H,N,hd':<18} {'layers':>6}  " + "  ".join(f"{i:>9}" for i in IMPLS) + "   (ms per call)")
    for name, shape, layers, backward in shapes(args.preset, args.batch):
        q, k, v = (torch.randn(shape, generator=gen, device=device, dtype=dtype, requires_grad=backward)
                   for _ in range(3))
        grad = torch.randn(shape, generator=gen, device=device, dtype=dtype)
        row = []
        for impl in IMPLS:
            try:
                t = time_ms(make_call(make_fn(impl), q, k, v, grad, backward), args.reps, args.graphs)
            except (RuntimeError, ValueError) as e:  # the backend cannot run this shape / device / dtype
                print(f"  {impl} on {name}: n/a ({str(e).splitlines()[0][:100]})", file=sys.stderr)
                t = math.nan
            row.append(t)
            per_step[impl] += layers * t
        print(f"{name:<10} {','.join(map(str, shape)):<18} {layers:>6}  " + "  ".join(f"{t:9.3f}" for t in row))
    print(f"{'per step':<10} {'(all layers)':<18} {'':>6}  " + "  ".join(f"{per_step[i]:9.3f}" for i in IMPLS))
    default = per_step["sdpa"]
    ok = {i: t for i, t in per_step.items() if math.isfinite(t)}
    best = min(ok, key=ok.get)
    timing = "CUDA graphs" if args.graphs else "eager calls" if CUDA else "wall clock"
    print(f"device {torch.cuda.get_device_name(0) if CUDA else 'cpu'} · torch {torch.__version__} · {dtype} · "
          f"timing: {timing}")
    print(f"RESULT attention default_ms={default:.3f} best={best} best_ms={ok[best]:.3f} "
          f"speedup={default / ok[best]:.2f}")
    return 0


if __name__ == "__main__":
    _common.command(main)  # Ctrl-C: one line, no traceback
