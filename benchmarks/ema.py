"""Teacher EMA update: time per update of the plain fp32 EMA, the compensated (Kahan) one eager, and the compensated
one through torch.compile (what the trainer runs when it compiles the model), side by side on one model's weights.

The compensated update (matpac_fast/ema.py) keeps the teacher's small updates that fp32 rounding would drop; eager it
makes six passes over the teacher, the student and the residual, where the plain EMA makes one. Compiled, inductor
fuses them into one read and one write of each tensor. This script measures what that costs and saves, and checks
that the compiled update gives the eager update's result.

    python benchmarks/ema.py                          # ViT-B (the recipe's, 91.9 M teacher weights) on the GPU if any
    python benchmarks/ema.py --preset tiny --repeats 5   # seconds on a CPU

Last line: RESULT ema plain_ms=... eager_ms=... compiled_ms=... eager_over_compiled=... device=...
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import _common  # noqa: E402
from _common import commit  # noqa: E402

from matpac_fast.config import PRESETS, get_model_config  # noqa: E402
from matpac_fast.ema import _compensated, ema_update  # noqa: E402
from matpac_fast.model import MATPAC  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="matpac", choices=sorted(PRESETS),
                   help="model whose teacher encoder + head weights are updated (default matpac: ViT-B)")
    p.add_argument("--device", default="auto", help="cuda, cpu or auto (default: cuda when available)")
    p.add_argument("--repeats", type=int, default=20, help="timed updates per variant (default 20)")
    args = p.parse_args(argv)
    if args.repeats < 1:
        p.error(f"--repeats {args.repeats}: give 1 or more")
    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.device not in ("cpu", "cuda"):
        p.error(f"--device {args.device}: give cuda, cpu or auto")
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: torch sees no CUDA device; give --device cpu")
    return args


def _weights(preset: str, device: str):
    """The model's teacher (encoder + head) weights, a student 0.1 % away from them, and zero residuals."""
    torch.manual_seed(0)
    (te, se), (th, sh) = MATPAC(get_model_config(preset)).ema_pairs()
    teacher = [p.detach().to(device) for p in te + th]
    student = [(p.detach() * 1.001 + 1e-4).to(device) for p in se + sh]
    return teacher, student, [torch.zeros_like(t) for t in teacher]


def _time_ms(fns: dict, repeats: int, device: str) -> dict[str, list[float]]:
    """Milliseconds of each of `repeats` calls of each function, after one untimed call of each; the functions take
    turns (one call of each per round), so that a change in the machine's load falls on all of them (timed one after
    another, a busy spell could fall on one variant only); synchronised around each call on a GPU."""
    for fn in fns.values():
        fn()
    out = {label: [] for label in fns}
    for _ in range(repeats):
        for label, fn in fns.items():
            if device == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            fn()
            if device == "cuda":
                torch.cuda.synchronize()
            out[label].append((time.perf_counter() - t0) * 1e3)
    return out


def main(argv=None) -> int:
    args = parse_args(argv)
    teacher, student, residual = _weights(args.preset, args.device)
    n = sum(t.numel() for t in teacher)
    name = torch.cuda.get_device_name(0) if args.device == "cuda" else f"cpu ({torch.get_num_threads()} threads)"
    print(f"{args.preset}: {n / 1e6:.1f} M teacher weights in {len(teacher)} tensors · {name} · torch "
          f"{torch.__version__} · commit {commit()}")
    decay = 1 - 1.25e-6  # the recipe's start decay at one GPU's batch 256 (0.99995 ** (256 / 2048) ~ 1 - 6.25e-6 / 8)

    # The compiled update against the eager one with the same (0-d tensor) weight: they must agree.
    t_eager, r_eager = [t.clone() for t in teacher], [torch.randn_like(t) * 1e-9 for t in teacher]
    t_comp, r_comp = [t.clone() for t in t_eager], [r.clone() for r in r_eager]
    _compensated(t_eager, student, r_eager, torch.full((), 1 - decay, device=args.device))  # as compiled=True calls it
    t0 = time.perf_counter()
    ema_update(t_comp, student, decay, r_comp, compiled=True)
    if args.device == "cuda":
        torch.cuda.synchronize()
    compile_s = time.perf_counter() - t0
    worst = max(max((a - b).abs().max().item() for a, b in zip(t_eager, t_comp)),
                max((a - b).abs().max().item() for a, b in zip(r_eager, r_comp)))
    print(f"first compiled call (compiles): {compile_s:.1f} s; largest difference from eager: {worst:.3g}")

    rows = {}
    times = _time_ms({"plain": lambda: ema_update(teacher, student, decay),
                      "eager": lambda: ema_update(teacher, student, decay, residual),
                      "compiled": lambda: ema_update(teacher, student, decay, residual, compiled=True)},
                     args.repeats, args.device)
    for label, ms in times.items():
        rows[label] = statistics.median(ms)
        gbs = n * 4 * (3 if label == "plain" else 5) / (rows[label] / 1e3) / 1e9  # the bytes a fused update moves
        print(f"{label:>9}: median {rows[label]:8.3f} ms  (min {min(ms):.3f}, max {max(ms):.3f}; "
              f"{gbs:6.1f} GB/s at the fused update's bytes)")
    print(f"RESULT ema plain_ms={rows['plain']:.3f} eager_ms={rows['eager']:.3f} compiled_ms={rows['compiled']:.3f} "
          f"eager_over_compiled={rows['eager'] / rows['compiled']:.2f} compile_s={compile_s:.1f} max_diff={worst:.3g} "
          f"device={name.replace(' ', '_')}")
    return 0


if __name__ == "__main__":
    _common.command(main)  # Ctrl-C: one line, no traceback
