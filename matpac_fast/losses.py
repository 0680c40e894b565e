"""The two pretext losses (METHOD.md §4, §7), per token, in float32.

- `prediction_loss`: 2 − 2·cos(pred, target) = ‖l2n(pred) − l2n(target)‖², with M2D's optional per-token target
  standardisation ((t − mean) / sqrt(var_unbiased + 1e-6) over the feature dims, as M2D's `norm_pix_loss`).
- `mcl_prediction_loss`: MATPAC++ multiple-choice loss over r hypotheses: Σ_i w_i·ℓ_i with w = softmax(−ℓ/T)
  detached while T > T_min, the hard minimum once T ≤ T_min; also returns the best hypothesis index per token.
- `centered_softmax_xent_reference`: the specification of `matpac_kernels.centered_softmax_xent`: teacher
  centring + sharpening, soft-target cross-entropy, the centre statistic, teacher entropy and max probability.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def standardize_tokens(t: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """M2D target standardisation over the last dim (unbiased variance, as torch.var / M2D)."""
    mean = t.mean(dim=-1, keepdim=True)
    var = t.var(dim=-1, keepdim=True)
    return (t - mean) / (var + eps) ** 0.5


def prediction_loss(pred: torch.Tensor, target: torch.Tensor, standardize: bool = False) -> torch.Tensor:
    """(..., D), (..., D) -> (...) float32, 2 − 2·cos; `target` is treated as a constant."""
    target = target.detach().float()
    if standardize:
        target = standardize_tokens(target)
    p = F.normalize(pred.float(), dim=-1)
    t = F.normalize(target, dim=-1)
    return 2 - 2 * (p * t).sum(dim=-1)


def mcl_prediction_loss(
    pred_BMrD: torch.Tensor,
    target_BMD: torch.Tensor,
    temperature: float | torch.Tensor,
    t_min: float = 1e-4,
    standardize: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """-> (loss (B, M), best (B, M) int64). Annealed winner-takes-all as the authors' `forward_loss_pred`."""
    per_head = prediction_loss(pred_BMrD, target_BMD.unsqueeze(2), standardize)  # (B, M, r)
    best = per_head.detach().argmin(dim=-1)
    temperature = torch.as_tensor(temperature, dtype=per_head.dtype, device=per_head.device)
    soft = torch.softmax(-per_head.detach() / temperature.clamp_min(t_min), dim=-1)
    hard = F.one_hot(best, per_head.shape[-1]).to(per_head.dtype)
    w = torch.where(temperature > t_min, soft, hard)  # tensor-valued switch: no recompiles as T anneals
    return (w * per_head).sum(dim=-1), best


def centered_softmax_xent_reference(
    student_MK: torch.Tensor,
    teacher_MK: torch.Tensor,
    center_K: torch.Tensor,
    tau_s: float | torch.Tensor,
    tau_t: float | torch.Tensor,
    center_mode: str = "prob",
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """-> (loss_M, center_sum_K, entropy_M, max_prob_M), all float32; gradient flows to `student_MK` (and a
    `tau_s` tensor that requires grad) only.

    p = softmax((teacher − center) / tau_t); loss = −Σ_k p·log_softmax(student / tau_s);
    center_sum = Σ_m p ("prob", the authors') or Σ_m teacher ("logit", DINO);
    entropy = −Σ_k p·log p; max_prob = max_k p.
    """
    if center_mode not in ("prob", "logit"):
        raise ValueError(f"center_mode={center_mode!r}: use 'prob' or 'logit'")
    # one-element tau tensors as 0-dim fp32: a (1,) float64 tau made every output float64
    tau_s, tau_t = (x.reshape(()).float() if isinstance(x, torch.Tensor) else x for x in (tau_s, tau_t))
    with torch.no_grad():
        t = teacher_MK.detach().float()
        logp_t = torch.log_softmax((t - center_K.float()) / tau_t, dim=-1)
        p = logp_t.exp()
        center_sum = p.sum(0) if center_mode == "prob" else t.sum(0)
        entropy = -(p * logp_t).sum(-1)
        max_prob = p.max(-1).values
    loss = -(p * torch.log_softmax(student_MK.float() / tau_s, dim=-1)).sum(-1)
    return loss, center_sum, entropy, max_prob
