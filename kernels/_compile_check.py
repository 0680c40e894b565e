"""Compile every kernel ahead of time for an NVIDIA target, without a GPU: `python -m matpac_kernels._compile_check`.

The interpreter tests check the numerics but not that the kernels pass Triton's compiler (types across branches,
register pressure); this does, with the ptxas that ships in the triton wheel, and prints registers and spills
(cuobjdump's STACK: ptxas puts spilled registers in the stack frame). A spill is a warning on stderr and exit 1; so
is a variant that does not compile (each kernel is also compiled with its float scalars typed fp64, as
torch.compile passes them), and one whose code computes in fp64 (any fp64 instruction but the conversion of an fp64
scalar to fp32: a scalar the kernel does not cast first makes the arithmetic it touches fp64, which compiles).
It must run in a process where TRITON_INTERPRET is unset (interpreted kernels cannot be compiled).
"""

import argparse
import contextlib
import multiprocessing
import os
import re
import subprocess
import sys
import tempfile
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from .attention import (
    _DELTA_BLOCK_M,
    _attn_bwd_dkdv_kernel,
    _attn_bwd_dq_kernel,
    _attn_delta_kernel,
    _attn_fwd_kernel,
    _configs,
)
from .centered_xent import _num_warps, _xent_bwd_kernel, _xent_fwd_kernel
from .patchify_gather import NUM_WARPS, TOKENS_PER_PROGRAM, _patchify_gather_kernel

F32, I32 = "*fp32", "i32"


def _xent_fwd(dtype, block_k, prob_center):
    ptrs = ["s_ptr", "t_ptr"]
    sig = {p: f"*{dtype}" for p in ptrs}
    sig |= {p: F32 for p in ("c_ptr", "loss_ptr", "ent_ptr", "maxp_ptr", "logsum_s_ptr", "logsum_t_ptr", "colsum_ptr")}
    sig |= {"M": I32, "K": I32, "s_row_stride": I32, "t_row_stride": I32, "tau_ptr": F32}
    sig |= {"BLOCK_K": "constexpr", "ROWS": "constexpr", "PROB_CENTER": "constexpr"}
    return _xent_fwd_kernel, sig, {"BLOCK_K": block_k, "ROWS": 17, "PROB_CENTER": prob_center}, _num_warps(block_k)


def _xent_bwd(dtype, block_k):
    sig = {"g_ptr": F32, "s_ptr": f"*{dtype}", "t_ptr": f"*{dtype}", "c_ptr": F32, "logsum_s_ptr": F32,
           "logsum_t_ptr": F32, "ds_ptr": f"*{dtype}", "K": I32, "s_row_stride": I32, "t_row_stride": I32,
           "ds_row_stride": I32, "tau_ptr": F32, "BLOCK_K": "constexpr"}
    return _xent_bwd_kernel, sig, {"BLOCK_K": block_k}, _num_warps(block_k)


def _gather(in_dtype, out_dtype, scalar="fp32"):
    sig = {"lms_ptr": f"*{in_dtype}", "vis_idx_ptr": "*i64", "mask_idx_ptr": "*i64", "vis_out_ptr": f"*{out_dtype}",
           "mask_out_ptr": f"*{out_dtype}", "ok_ptr": "*i32", "mean": scalar, "std": scalar}
    sig |= {n: I32 for n in ("n_vis", "n_mask", "n_t", "n_patches", "s_lb", "s_lf", "s_lt", "s_vb", "s_vn", "s_mb",
                             "s_mn")}
    sig |= {"PATCH": "constexpr", "TOK": "constexpr"}
    return _patchify_gather_kernel, sig, {"PATCH": 16, "TOK": TOKENS_PER_PROGRAM}, NUM_WARPS


def _attention(kernel, dtype, hd, config, scalar="fp32"):
    """A variant of an attention kernel as a real launch specialises it: pointers and the 16-divisible strides of
    the model's tensors carry triton's divisibility hint (without it the compiler emits different, unpipelined
    code), with the configuration's warps and stages; the float scalars typed `scalar`. Returns (kernel,
    signature, constexprs, options, attrs)."""
    bm, bn, warps, stages = config
    ptr_dtypes = {"lse_ptr": "fp32", "delta_ptr": "fp32"}
    sig, hinted = {}, []
    for name in kernel.arg_names:
        if name.endswith("_ptr"):
            sig[name] = f"*{ptr_dtypes.get(name, dtype)}"
            hinted.append(name)
        elif name.startswith("s_"):  # strides: multiples of 3·D or D, 16-divisible at the model's widths
            sig[name] = I32
            hinted.append(name)
        elif name in ("N", "H"):
            sig[name] = I32
        elif name in ("qk_scale", "sm_scale"):
            sig[name] = scalar
        else:
            sig[name] = "constexpr"
    consts = {"DM": 12 * hd, "HD": hd, "BLOCK_M": bm, "BLOCK_N": bn, "IEEE": dtype == "fp32"}
    consts = {k: v for k, v in consts.items() if k in kernel.arg_names}
    attrs = {(kernel.arg_names.index(n),): [["tt.divisibility", 16]] for n in hinted}
    return kernel, sig, consts, {"num_warps": warps, "num_stages": stages}, attrs


def variants(quick: bool = False):
    for dtype in ("fp32", "bf16"):
        for block_k in (128, 2048, 8192):
            for prob_center in (True, False):
                yield f"xent_fwd {dtype} BLOCK_K={block_k} prob={prob_center}", _xent_fwd(dtype, block_k, prob_center)
            yield f"xent_bwd {dtype} BLOCK_K={block_k}", _xent_bwd(dtype, block_k)
    for in_dtype, out_dtype in (("fp32", "fp32"), ("fp16", "bf16")):
        yield f"patchify_gather {in_dtype}->{out_dtype}", _gather(in_dtype, out_dtype)
    kernels = {"attn_fwd": _attn_fwd_kernel, "attn_dkdv": _attn_bwd_dkdv_kernel, "attn_dq": _attn_bwd_dq_kernel}
    # Each autotuning configuration at each head width the op takes, 16-bit and fp32 inputs (`--quick`: the first
    # configuration of each; the rest differ in block sizes, not in code paths).
    for dtype in ("bf16", "fp32"):
        for hd in (16, 32, 64, 128):
            for name, kernel in kernels.items():
                configs = _configs(kernel, hd, ieee=dtype == "fp32")
                for config in configs[:1] if quick else configs:
                    tag = f"{name} {dtype} hd={hd} {config[0]}x{config[1]}"
                    yield tag, _attention(kernel, dtype, hd, config)
            delta_config = (_DELTA_BLOCK_M, 0, 4, 1)  # launched with triton's defaults: 4 warps
            yield f"attn_delta {dtype} hd={hd}", _attention(_attn_delta_kernel, dtype, hd, delta_config)
    # An eager launch types a Python float fp32, torch.compile (Inductor's call of a user kernel) fp64: a kernel must
    # compile both ways (the attention kernels did not, until they cast their scales to fp32 on entry). The type
    # does not depend on the tile, so one configuration per kernel and input precision.
    for in_dtype, out_dtype in (("fp32", "fp32"), ("fp16", "bf16")):
        yield f"patchify_gather {in_dtype}->{out_dtype} fp64 scalars", _gather(in_dtype, out_dtype, "fp64")
    for dtype in ("bf16", "fp32"):
        for name, kernel in kernels.items():
            config = _configs(kernel, 64, ieee=dtype == "fp32")[0]
            yield f"{name} {dtype} hd=64 fp64 scalars", _attention(kernel, dtype, 64, config, "fp64")


def resource_usage(cubin: bytes) -> str:
    tool = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        out = subprocess.run([str(tool), "--dump-resource-usage", f.name], capture_output=True, text=True).stdout
    line = next((s for s in out.splitlines() if "REG:" in s), "")
    return " ".join(w for w in line.split() if w.split(":")[0] in ("REG", "STACK", "LOCAL", "SHARED"))


def compile_variant(variant, arch: int = 90) -> str:
    """Compile one variant (as `variants` yields them) for sm_<arch>; its resource usage, e.g.
    "REG:124 STACK:0 SHARED:1024 LOCAL:0 DYN_SHARED:40960", then " F64:<instructions>" if it computes in fp64."""
    kernel, sig, consts, options = variant[:4]
    options = options if isinstance(options, dict) else {"num_warps": options}
    attrs = variant[4] if len(variant) > 4 else None
    compiled = triton.compile(ASTSource(fn=kernel, signature=sig, constexprs=consts, attrs=attrs),
                              target=GPUTarget("cuda", arch, 32), options=options)
    ops = f64_ops(compiled.asm["ptx"])
    f64 = f" F64:{','.join(ops)}" if ops else ""
    return f"{resource_usage(compiled.asm['cubin'])} DYN_SHARED:{compiled.metadata.shared}{f64}"


def f64_ops(ptx: str) -> list[str]:
    """The fp64 instructions in `ptx` other than `cvt.rn.f32.f64` (an fp64 scalar argument cast to fp32 on entry).
    Without that cast, torch.compile's fp64 scalars made 5702997's attention backward compute exp2 and the rest in
    fp64, and patchify's normalisation: both compiled, so only the instructions show it."""
    return sorted(set(re.findall(r"\b[a-z]+(?:\.[a-z0-9]+)*\.f64\b", ptx)) - {"cvt.rn.f32.f64"})


def spills(usage: str) -> bool:
    # ptxas puts spilled registers in the stack frame (STACK); LOCAL counts only static local arrays (an earlier
    # check read LOCAL alone and passed attention kernels that spilled kilobytes per thread).
    return not {"STACK:0", "LOCAL:0"} <= set(usage.split())


_TODO: list = []  # (variant, arch) per variant, set by main before the workers fork


def _compile_one(i: int) -> tuple[str | None, str | None]:
    """Variant i of _TODO compiled: (resource usage, None), or (None, the error in one line)."""
    variant, arch = _TODO[i]
    try:
        return compile_variant(variant, arch), None
    except Exception as e:  # a type clash (CompilationError), ptxas (PTXASError), an MLIR pass (RuntimeError)
        last = (str(e).strip().splitlines() or [""])[-1]
        return None, f"{type(e).__name__}: {last}"


def _result(future) -> tuple[str | None, str | None]:
    """A pooled variant's (usage, error). A compiling process killed by a crash (an LLVM assertion aborts) breaks the
    pool: that variant and the ones not done yet fail in one line each (multiprocessing.Pool waited for ever)."""
    try:
        return future.result()
    except BrokenProcessPool:
        return None, "a compiling process died (a crash in Triton or ptxas); --jobs 1 names the variant"


def _report(todo, results, arch: int) -> tuple[list[str], list[str], list[str]]:
    """Print one line per variant (as `results` come, in order); the names that spilled, failed and compute in fp64."""
    spilled, failed, fp64 = [], [], []
    for (name, variant), (usage, error) in zip(todo, results):
        if error is not None:
            print(f"FAIL sm_{arch}  {name}: {error}", file=sys.stderr)
            failed.append(name)
            continue
        warps = variant[3]["num_warps"] if isinstance(variant[3], dict) else variant[3]
        print(f"ok  sm_{arch}  {name:42s} warps={warps:2d}  {usage}", flush=True)
        if spills(usage):
            print(f"    warning: {name} spills registers to local memory", file=sys.stderr)
            spilled.append(name)
        if " F64:" in usage:
            print(f"    warning: {name} computes in fp64 ({usage.split(' F64:')[1]})", file=sys.stderr)
            fp64.append(name)
    return spilled, failed, fp64


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--arch", type=int, default=90, help="CUDA compute capability x10 (default 90 = H100)")
    p.add_argument("--quick", action="store_true", help="attention: the first autotuning configuration only")
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    p.add_argument("--jobs", type=int, default=usable,
                   help="variants compiled at once, one process each (default: the CPUs this process may use)")
    args = p.parse_args(argv)
    if not hasattr(_xent_fwd_kernel, "fn") or type(_xent_fwd_kernel).__name__ != "JITFunction":
        sys.exit("the kernels are interpreted in this process: unset TRITON_INTERPRET and run again")
    global _TODO
    todo = list(variants(args.quick))
    _TODO = [(variant, args.arch) for _, variant in todo]
    # Each variant compiles on its own (Triton's frontend, ptxas, cuobjdump: ~1 s each, 92 of them): one process per
    # core. Forked, so a worker sees this process's variants (kernels defined at run time included) as they are.
    jobs = min(args.jobs, len(_TODO)) if args.jobs > 0 else 1
    with contextlib.ExitStack() as stack:
        if jobs > 1:
            pool = stack.enter_context(ProcessPoolExecutor(jobs, mp_context=multiprocessing.get_context("fork")))
            futures = [pool.submit(_compile_one, i) for i in range(len(_TODO))]
            results = map(_result, futures)  # in order, each line as soon as it is known
        else:
            results = map(_compile_one, range(len(_TODO)))
        spilled, failed, fp64 = _report(todo, results, args.arch)
    if spilled:
        print(f"{len(spilled)} variant(s) spill registers: {', '.join(spilled)}", file=sys.stderr)
    if failed:
        print(f"{len(failed)} variant(s) do not compile: {', '.join(failed)}", file=sys.stderr)
    if fp64:
        print(f"{len(fp64)} variant(s) compute in fp64: {', '.join(fp64)}", file=sys.stderr)
    return 1 if spilled or failed or fp64 else 0


if __name__ == "__main__":
    sys.exit(main())
