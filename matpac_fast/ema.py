"""EMA of the teacher from the student, with `_foreach_` ops (one fused kernel launch per dtype group).

Teacher parameters are fp32 shadows (the model is kept in fp32; low precision only inside autocast), so the update
t ← d·t + (1 − d)·s is accumulated in fp32 as the authors' `ema_fp32=True`. Call it after the optimizer step.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


@torch.no_grad()
def ema_update(teacher: Sequence[torch.Tensor], student: Sequence[torch.Tensor], decay: float | torch.Tensor) -> None:
    """In place: teacher_i ← decay·teacher_i + (1 − decay)·student_i. decay ≥ 1 (a float) is a no-op, like the
    authors' `if decay < 1: step()`."""
    teacher, student = list(teacher), list(student)
    if len(teacher) != len(student):
        raise ValueError(f"ema_update: {len(teacher)} teacher tensors vs {len(student)} student tensors")
    if not teacher:
        return
    if not isinstance(decay, torch.Tensor) and decay >= 1.0:
        return
    src = [s.detach().to(t.dtype) if s.dtype != t.dtype else s.detach() for t, s in zip(teacher, student)]
    weight = 1.0 - decay
    if isinstance(weight, torch.Tensor):
        # lerp with a tensor weight needs matching devices; scalars avoid a host sync.
        torch._foreach_mul_(teacher, decay)
        torch._foreach_add_(teacher, torch._foreach_mul(src, weight))
    else:
        torch._foreach_lerp_(teacher, src, weight)
