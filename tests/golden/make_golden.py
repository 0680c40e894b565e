"""Regenerate the golden per-step loss traces: `python tests/golden/make_golden.py`.

A seeded tiny run (random log-mel input, seeded masks, AdamW, EMA, centre updates, τ_t warm-up) for MATPAC and
MATPAC++. `tests/test_model_golden.py` reruns `trace()` and compares with the stored numbers, so any change to the
numerics (init order, loss, EMA, centring, masking) is visible. Regenerate only for an intended change, and say why
in the commit message.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
GOLDEN = HERE / "loss_trace.json"
STEPS = 6
KEYS = ("loss", "loss_pred", "loss_cls", "teacher_entropy", "center_norm")


def trace(preset_overrides: dict, steps: int = STEPS, seed: int = 0) -> dict[str, list[float]]:
    from matpac_fast import schedules as S
    from matpac_fast.config import get_model_config
    from matpac_fast.ema import ema_update
    from matpac_fast.masking import make_masks
    from matpac_fast.model import MATPAC, StepState

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # one thread: the same reduction order on every machine
    try:
        torch.manual_seed(seed)
        cfg = get_model_config("tiny", **preset_overrides)
        model = MATPAC(cfg)
        opt = torch.optim.AdamW(model.student_parameters(), lr=1e-3, betas=(0.9, 0.95), eps=1e-6, weight_decay=0.05)
        g = torch.Generator().manual_seed(seed)
        lms = torch.randn(4, 1, cfg.n_mels, cfg.crop_frames, generator=g) * 4.0 - 7.0
        out: dict[str, list[float]] = {k: [] for k in KEYS}
        for step in range(steps):
            vis, mask = make_masks(4, cfg.n_patches, cfg.n_visible, generator=g)
            state = StepState(tau_t=S.tau_teacher_at(step, warmup_steps=steps),
                              mcl_temperature=S.mcl_temperature_at(step * 50_000))
            loss, stats = model({"lms": lms, "vis_idx": vis, "mask_idx": mask}, state)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            (te, se), (th, sh) = model.ema_pairs()
            ema_update(te, se, S.ema_decay_at(step + 1, 0.9, 0.99, steps))  # fast EMA so the teacher moves
            ema_update(th, sh, S.ema_decay_at(step + 1, 0.5, 0.9, steps))
            model.update_center(stats["center_batch"])
            out["loss"].append(loss.item())
            for k in KEYS[1:]:
                out[k].append(stats[k].item())
        return out
    finally:
        torch.set_num_threads(threads)


RUNS = {"matpac_tiny": {}, "matpac_plusplus_tiny": {"mcl_heads": 5}, "logit_centre_tiny": {"center_mode": "logit"}}


def main() -> None:
    sys.path.insert(0, str(HERE.parents[1]))
    data = {"torch": torch.__version__, "steps": STEPS, "runs": {n: trace(o) for n, o in RUNS.items()}}
    GOLDEN.write_text(json.dumps(data, indent=1) + "\n")
    print(f"wrote {GOLDEN}")


if __name__ == "__main__":
    main()
