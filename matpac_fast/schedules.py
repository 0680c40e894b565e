"""Schedules as pure functions of the optimizer step (METHOD.md §4-§5, §7).

`step` counts completed optimizer updates (0 before the first). The authors' fairseq code:

- lr: fairseq `cosine` with linear warm-up from 0 (warmup_updates = 20 epochs) then half-cosine to 0 at max_update.
- EMA decays: `get_annealed_rate(start, end, num_updates, max_update)`, linear start → end over all updates.
  Their EMA runs inside `forward` at update n with the weights after n updates, skipping n = 0. The matching
  after-the-optimizer-step call is: after step n (0-based) use `ema_decay_at(n + 1, ...)`, which the trainer does
  (`ema_decay_at(n, ...)` would shift the decay by one update, a 1e-10 change). The teacher then goes through the
  same states with the same decays, one step earlier: theirs scores batch n before absorbing the latest weights,
  ours after (METHOD.md §4 allows the after-step order).
- τ_t: linear 0.04 → 0.07 over `warmup_steps` (9827 = 10 epochs in their config), then constant.
- MATPAC++ temperature: T = 0.1·0.99997^step; the loss switches to the hard minimum once T ≤ 1e-4
  (`matpac_fast.losses.mcl_prediction_loss` does the switch; this function returns T clamped at 1e-4).
"""

from __future__ import annotations

import math


def _check(step: int, total: int, name: str) -> None:
    if step < 0:
        raise ValueError(f"{name}: step must be >= 0, got {step}")
    if total < 0:
        raise ValueError(f"{name}: step count must be >= 0, got {total}")


def lr_at(step: int, base_lr: float, warmup_steps: int, total_steps: int, min_lr: float = 0.0) -> float:
    """Linear warm-up 0 → base_lr over `warmup_steps`, then cosine to `min_lr` at `total_steps` (min_lr after)."""
    _check(step, total_steps, "lr_at")
    if step < warmup_steps:
        return base_lr * step / warmup_steps
    span = total_steps - warmup_steps
    if span <= 0 or step >= total_steps:
        return min_lr if step >= total_steps else base_lr
    progress = (step - warmup_steps) / span
    return min_lr + 0.5 * (base_lr - min_lr) * (1 + math.cos(math.pi * progress))


def ema_decay_at(step: int, start: float, end: float, total_steps: int) -> float:
    """Linear start → end over `total_steps` updates, `end` afterwards (the authors' get_annealed_rate)."""
    _check(step, total_steps, "ema_decay_at")
    if total_steps == 0 or step >= total_steps:
        return end
    return start + (end - start) * step / total_steps


def tau_teacher_at(step: int, start: float = 0.04, end: float = 0.07, warmup_steps: int = 9827) -> float:
    """Teacher temperature: linear start → end over `warmup_steps`, then constant."""
    return ema_decay_at(step, start, end, warmup_steps)


def mcl_temperature_at(step: float, start: float = 0.1, decay: float = 0.99997, t_min: float = 1e-4) -> float:
    """MATPAC++ assignment temperature start·decay^step, floored at t_min (where the hard minimum takes over). `step`
    may be fractional: the trainer maps a run's steps onto the authors' 294,816 (ScheduleConfig.mcl_reference_steps)."""
    _check(step, 0, "mcl_temperature_at")
    return max(start * decay**step, t_min)
