"""Mechanism test: centring + sharpening keep the teacher's classification away from the two collapse modes.

A tiny model trains on log-mels of the synthetic corpus (a few hundred CPU steps in total, over three runs) with a
small loop written here (AdamW, `ema_update`, `update_center`). Fast EMAs (0.99 encoder, 0.9 head) stand in for the
paper's slow ones so that the teacher moves within the budget. The two failure signatures (METHOD.md §4):

- one dimension near 1: every token's teacher distribution picks the same prototype, so the batch-mean distribution
  is one-hot (its entropy → 0) and the per-token max probability → 1. Happens without centring.
- uniform: per-token entropy → ln K. Happens with centring but without sharpening (τ_t = τ_s).

Healthy (centring + sharpening, the method): tokens are sharp (per-token entropy well below ln K) but spread over
several prototypes (batch-mean entropy well above 0). Entropies here are in nats, K = 64: ln K = 4.16.
"""

import math

import numpy as np
import pytest
import torch

from matpac_fast.config import get_model_config
from matpac_fast.ema import ema_update
from matpac_fast.masking import make_masks
from matpac_fast.model import MATPAC, StepState

STEPS = 150
BATCH = 16
CROP = 304  # 5 x 19 patches: half the default grid, to keep the three runs within about a minute


@pytest.fixture(scope="module")
def corpus_lms():
    from matpac_fast.frontend import LogMelSpec
    from shard_tools.synthetic import synth_clip

    waves = np.stack([synth_clip(i, seed=0, seconds=4.0)[0] for i in range(30)])
    return LogMelSpec("matpac")(torch.from_numpy(waves))  # (30, 80, 398)


def _train(lms, center: bool, tau_t: float, seed: int = 0) -> dict[str, float]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        torch.manual_seed(seed)
        cfg = get_model_config("tiny", crop_frames=CROP)
        model = MATPAC(cfg)
        opt = torch.optim.AdamW(model.student_parameters(), lr=1e-3, betas=(0.9, 0.95), weight_decay=0.05)
        g = torch.Generator().manual_seed(seed)
        tail = []
        for step in range(STEPS):
            idx = torch.randint(0, len(lms), (BATCH,), generator=g)
            off = int(torch.randint(0, lms.shape[-1] - CROP + 1, (1,), generator=g))
            vis, mask = make_masks(BATCH, cfg.n_patches, cfg.n_visible, generator=g)
            batch = {"lms": lms[idx, None, :, off : off + CROP], "vis_idx": vis, "mask_idx": mask}
            loss, stats = model(batch, StepState(tau_t=tau_t))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            (te, se), (th, sh) = model.ema_pairs()
            ema_update(te, se, 0.99)
            ema_update(th, sh, 0.9)
            if center:
                model.update_center(stats["center_batch"])
            if step >= STEPS - 10:
                p_mean = stats["center_batch"]  # prob mode: the batch-mean teacher distribution
                tail.append([
                    stats["teacher_entropy"].item(),
                    stats["teacher_max_prob"].item(),
                    -(p_mean * p_mean.clamp_min(1e-12).log()).sum().item(),
                    p_mean.max().item(),
                ])
        ent, pmax, batch_ent, batch_max = np.mean(tail, axis=0).tolist()
        return {"entropy": ent, "max_prob": pmax, "batch_entropy": batch_ent, "batch_max": batch_max}
    finally:
        torch.set_num_threads(threads)


@pytest.mark.slow
def test_centring_and_sharpening_prevent_both_collapses(corpus_lms):
    ln_k = math.log(64)
    healthy = _train(corpus_lms, center=True, tau_t=0.04)
    no_centre = _train(corpus_lms, center=False, tau_t=0.04)
    no_sharpening = _train(corpus_lms, center=True, tau_t=0.1)  # τ_t = τ_s
    report = {"healthy": healthy, "no_centre": no_centre, "no_sharpening": no_sharpening}
    print({k: {kk: round(vv, 3) for kk, vv in v.items()} for k, v in report.items()}, flush=True)
    # the method: sharp but not one-hot tokens, several prototypes in use
    assert 0.15 < healthy["entropy"] < 0.5 * ln_k and healthy["max_prob"] < 0.9, report
    assert healthy["batch_entropy"] > 1.0 and healthy["batch_max"] < 0.6, report
    # without centring: every token one-hot, and one dimension takes over the batch
    assert no_centre["max_prob"] > 0.95 and no_centre["entropy"] < 0.1, report
    assert no_centre["batch_max"] > 0.6 and no_centre["batch_entropy"] < 0.5 * healthy["batch_entropy"], report
    # without sharpening: towards uniform
    assert no_sharpening["entropy"] > 0.8 * ln_k and no_sharpening["max_prob"] < 0.2, report
