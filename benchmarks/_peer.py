"""The `reference-design` peer of train_throughput.py: our MATPAC model trained the way the authors' code trains it.

Their training code is `training_matpac/` of github.com/aurianworld/matpac, run by fairseq with `matpac.yaml`
(`common.fp16: true`, `optimizer: adam`, `clip_norm: 3.0`, `ddp_backend: legacy_ddp`, `criterion: model` with 15
`log_keys`); its `environment.yml` pins torch 2.4.1 and timm 0.4.12 and installs no apex. The architecture, the
losses' values and the schedules stay ours; what changes is how a step is carried out. One step of the peer:

1. fairseq `Trainer.train_step`: `zero_grad()` first (the low-precision grads set to None, the flat fp32 grad
   zeroed); the batch cast to the model's dtype on the device (`_prepare_sample`, `apply_half`).
2. forward, in the model's dtype, no autocast: fairseq `model.half()` puts weights, LayerNorms, the residual stream,
   the positional tables and the centre in fp16 (here the run's dtype: bf16 for `--precision bf16` so that both
   sides of the comparison use one number format; fp16; fp32 for `--precision no`). Attention is timm 0.4.12's
   `Attention.forward`: `attn = (q @ k.transpose(-2, -1)) * self.scale; attn = attn.softmax(dim=-1); x = attn @ v`
   in that dtype (`TimmAttention`; other `--reference-attn` values keep our SDPA call).
3. their metrics, in forward, in autograd mode (`models/model.py` `forward_loss_pred`, `models/cls_head.py`
   `Cls_Loss.forward` and `compute_acc`): `compute_var` of the normalised prediction and target, of the recomputed
   student softmax and of the teacher targets (each a `.float()` copy; with a process group 3 blocking all-reduces
   per call), the perplexity, two argmax, `idx_targ.float().unique().numel()` and
   `(idx_targ == idx_pred).long().sum().item()` (host syncs), `compute_var` of both index vectors.
4. the EMA, still inside forward and before the backward (`do_ema_step`, head then encoder, skipped at update 0):
   fairseq `EMAModule._step_internal` with `ema_fp32=True` — a Python loop over the student's `named_parameters()`
   doing `ema_param.mul_(1 - lr); ema_param.add_(param.data.to(dtype=ema_param.dtype), alpha=lr)` on fp32 shadows —
   then `restore()`: `load_state_dict` of the shadows into the low-precision teacher (a second per-parameter copy).
5. `ModelCriterion.forward`: `coef * p.float().sum()` per loss, `float(net_output[lk])` for every logged tensor and
   `.item()` of each scaled loss (host syncs).
6. `FP16Optimizer.backward`: `(loss * loss_scale).backward()` on the summed loss; then (several processes)
   `_fast_stat_sync_sum` and `LegacyDistributedDataParallel.all_reduce_grads` (per-parameter copies into one flat
   buffer, one all-reduce after the whole backward, copies back); `multiply_grads(1 / sample_size)`.
7. `FP16Optimizer.clip_grad_norm`: a per-parameter loop copying the low-precision grads into the flat fp32 grad,
   the norm, `if grad_norm > max_norm > 0.0` and `DynamicLossScaler.check_overflow` (host syncs), the trainer's
   `if not torch.isfinite(grad_norm).all()` (another); `FP16Optimizer.step`: the flat grad multiplied by the
   unscale/clip factor, fairseq's own (unfused: apex absent) `Adam.step` on the one flat fp32 tensor — decoupled
   weight decay `p -= lr·wd·p` on every parameter, then `p += -lr·sqrt(1-β2^t)/(1-β1^t) · m / (sqrt(v) + eps)` —
   and a per-parameter copy of the fp32 master back into the low-precision weights. An overflow skips the update
   (fairseq's `OverflowError`: logged, grads dropped, `num_updates` not advanced).
8. the centre: their `update_center` all-reduce was started in forward; applied after the step (they apply it at
   the next forward; same values). Then the trainer's logging reads (`torch.isfinite(grad_norm)`, `utils.item` of
   the loss in `reduce_metrics`).

Under `--precision bf16` the step stays the fp16 one the authors ran (loss scaler, flat master, host checks), not
fairseq's own `--bf16` path (no scaler, unflattened master); a scale of 2**7 changes no bf16 value.
"""

from __future__ import annotations

import importlib.util
import math
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F

from matpac_fast.losses import mcl_prediction_loss, standardize_tokens
from matpac_fast.model import MATPAC
from matpac_fast.train_config import TrainConfig
from matpac_fast.trainer import Trainer
from matpac_fast.vit import Attention

# The CSV's `peer` column for reference-design rows: which peer measured them. Rows measured before this peer (SDPA,
# autocast over fp32 weights, fused AdamW, host reads at the end of the step) are marked "earlier" in the committed
# CSVs; change this name whenever the peer's step changes, so rows of different peers are never compared as one.
PEER_VERSION = "fairseq-step"
PEER_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "no": torch.float32}
# fairseq CommonConfig defaults (matpac.yaml sets none of them): fp16_init_scale 2**7, fp16_scale_tolerance 0.0,
# min_loss_scale 1e-4, threshold_loss_scale None; fp16_scale_window None -> 2**14 / world / update_freq.
FP16_INIT_SCALE = 2.0**7
MIN_LOSS_SCALE = 1e-4
LEGACY_DDP_BUFFER = 2**28  # LegacyDistributedDataParallel(buffer_size=2**28): one buffer holds a ViT-B MATPAC
# matpac.yaml criterion.log_keys, in order (ModelCriterion reads each one present in the model's output)
LOG_KEYS = ("ema_decay", "ema_norm", "t_temp", "loss_pred", "loss_cls", "var_z_hat_m", "var_z_m", "var_p_m",
            "var_p_hat_m", "var_idx_targ", "var_idx_pred", "n_diff_target", "count", "correct", "cls_perplexity")



# ------------------------------------------------------------------------------------------------ model pieces
class TimmAttention(Attention):
    """timm 0.4.12 `Attention.forward` (the authors' `Block`): the scale applied to the N×N product, softmax and both
    products in the tensors' dtype. `vit.attention_math` (scale on q, used by our modes) is left alone."""

    scale: float

    def forward(self, x_BND: torch.Tensor) -> torch.Tensor:
        if self.impl != "math":  # --reference-attn sdpa etc.: our call, for comparison
            return super().forward(x_BND)
        b, n, c = x_BND.shape
        qkv = self.qkv(x_BND).reshape(b, n, 3, self.num_heads, c // self.num_heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]
        attn = (q @ k.transpose(-2, -1)) * self.scale
        attn = attn.softmax(dim=-1)
        x = (attn @ v).transpose(1, 2).reshape(b, n, c)
        return self.proj(x)


def compute_var(y: torch.Tensor) -> torch.Tensor:
    """The authors' `compute_var` (models/model.py and models/cls_head.py): a float32 copy, the per-dimension std
    averaged; under a process group 3 blocking all-reduces (count, sum, sum of squares)."""
    y = y.view(-1, y.size(-1)).float()
    if dist.is_available() and dist.is_initialized():
        zc = torch.tensor(y.size(0)).to(y.device)  # theirs: .cuda()
        zs = y.sum(dim=0)
        zss = (y**2).sum(dim=0)
        dist.all_reduce(zc)
        dist.all_reduce(zs)
        dist.all_reduce(zss)
        var = zss / (zc - 1) - (zs**2) / (zc * (zc - 1))
        return torch.sqrt(var + 1e-6).mean()
    return torch.sqrt(y.var(dim=0) + 1e-6).mean()


def compute_acc(pred: torch.Tensor, target: torch.Tensor, result: dict) -> dict:
    """`Cls_Loss.compute_acc`: perplexity of the mean target, argmax agreement read back with `.item()`, the number
    of distinct target prototypes through `unique()` (both host syncs), `compute_var` of both index vectors."""
    result["cls_perplexity"] = torch.exp(
        -torch.sum(target.mean(dim=0) * torch.log(target.mean(dim=0) + 1e-7), dim=-1))
    idx_targ = torch.argmax(target, dim=-1)
    idx_pred = torch.argmax(pred, dim=-1)
    result["n_diff_target"] = idx_targ.float().unique().numel()
    result["correct"] = (idx_targ == idx_pred).long().sum().item()
    result["count"] = idx_targ.numel()
    result["var_idx_targ"] = compute_var(idx_targ.unsqueeze(dim=1))
    result["var_idx_pred"] = compute_var(idx_pred.unsqueeze(dim=1))
    return result


def authors_xent(student: torch.Tensor, teacher: torch.Tensor, center: torch.Tensor, tau_s: float, tau_t: float,
                 center_mode: str = "prob"):
    """The classification loss as `Cls_Loss.softmax_center_teacher` + `Cls_Loss.forward` compute it, in the inputs'
    dtype (no float32 copy). `student`, `teacher`: (..., K) logits; `center`: broadcastable to them.

    -> (loss_M, p_MK, center_sum_K, temp_student_MK): the per-token loss −Σ p·log_softmax(student/τ_s), the teacher
    targets p = softmax((teacher − center)/τ_t), the centre statistic (Σ of p, summed over the batch then over the
    tokens as their `reduce_center_update`; Σ of the teacher logits for center_mode "logit") and student/τ_s, which
    their metrics reuse. Same contract as `losses.centered_softmax_xent_reference` for the first and third."""
    k = student.shape[-1]
    with torch.no_grad():
        p = F.softmax((teacher - center) / tau_t, dim=-1)
        src = p if center_mode == "prob" else teacher
        center_sum = src.sum(dim=0)
        while center_sum.ndim > 1:
            center_sum = center_sum.sum(dim=0)
    temp_student = (student / tau_s).view(-1, k)
    t = p.view(-1, k)
    loss = torch.sum(t * F.log_softmax(temp_student, dim=-1), dim=-1)
    return -loss, t, center_sum, temp_student


@torch.no_grad()
def fairseq_ema_step(teacher: torch.nn.Module, fp32_params: dict, student: torch.nn.Module, decay: float) -> None:
    """fairseq `EMAModule._step_internal` with ema_fp32=True, add_missing_params=False and no norm logging (apex's
    `multi_tensor_l2norm` is absent), then `restore()`: `load_state_dict` of the fp32 shadows into the teacher, which
    lives in the model's dtype — the second per-parameter copy."""
    ema_state_dict = {}
    for key, param in student.named_parameters():
        if key not in fp32_params:
            continue
        ema_param = fp32_params[key]
        if param.shape != ema_param.shape:
            raise ValueError(f"incompatible tensor shapes between model param and ema param {param.shape} vs. "
                             f"{ema_param.shape}")
        lr = 1 - decay
        if not param.requires_grad:
            ema_param.copy_(param.to(dtype=ema_param.dtype).data)
        else:
            ema_param.mul_(1 - lr)
            ema_param.add_(param.data.to(dtype=ema_param.dtype), alpha=lr)
        ema_state_dict[key] = ema_param
    for key, buf in student.named_buffers():
        ema_state_dict[key] = buf
    teacher.load_state_dict(ema_state_dict, strict=False)


@dataclass
class PeerStep:
    """What fairseq's `set_num_updates` gives their forward: the update count and the values scheduled for it."""

    num_updates: int
    tau_t: float
    mcl_temperature: float
    ema_decay: float
    head_ema_decay: float


class ReferenceDesignMATPAC(MATPAC):
    """Our model (same modules, parameters and loss values) with the authors' forward: timm attention, the losses in
    the model's dtype, their metrics and host reads, the EMA inside forward, the centre all-reduce started there.
    `forward(batch, PeerStep)` returns their `result` dict (losses per token, sample_size, logged values)."""

    def __init__(self, cfg):
        super().__init__(cfg)
        for m in self.modules():
            if type(m) is Attention:
                m.__class__ = TimmAttention
                m.scale = m.head_dim**-0.5  # timm: qk_scale or head_dim ** -0.5
        self.ema_fp32: dict[str, dict[str, torch.Tensor]] = {}
        self._center_sum = self._center_handle = None
        self._center_count = 0

    def build_ema_fp32(self) -> None:
        """EMAModule(ema_fp32=True) at model construction: fp32 shadows of the teachers, made before the model is cast
        to low precision (their teacher is cast on its first forward, `teacher_to_device`)."""
        pairs = {"teacher_encoder": self.teacher_encoder, "teacher_head": self.teacher_head}
        self.ema_fp32 = {name: {k: v.detach().float().clone() for k, v in m.state_dict().items()}
                         for name, m in pairs.items() if m is not None}

    def forward(self, batch: dict, step: PeerStep) -> dict:
        cfg = self.cfg
        lms, vis_idx, mask_idx = batch["lms"], batch["vis_idx"], batch["mask_idx"]
        self._check_batch(lms, vis_idx, mask_idx)
        vis_tok, mask_tok = self._tokens(lms, vis_idx, mask_idx)
        result: dict = {"losses": {}, "ema_decay": None}

        z_v = self.student_encoder(self._embed(vis_tok, vis_idx))
        z_hat = self.predictor(z_v, vis_idx, mask_idx)
        with torch.no_grad():
            z_m = self.teacher_encoder(self._embed(mask_tok, mask_idx))[:, 1:]
        loss_pred, z_hat = self._loss_pred(z_m, z_hat, step, result)
        result["t_temp"] = step.tau_t * 100

        loss_cls = None
        if self.student_head is not None:
            p_hat_m = self.student_head(z_hat)
            with torch.no_grad():  # theirs runs outside no_grad, but nothing in it needs a gradient
                p_m = self.teacher_head(z_m)
            loss_cls, t, center_sum, temp_student = authors_xent(p_hat_m, p_m, self.center, cfg.tau_s, step.tau_t,
                                                                 cfg.center_mode)
            self._reduce_center_update(center_sum, t.shape[0])
            student_probs = torch.softmax(temp_student, dim=-1)  # their metric pass: the student softmax recomputed
            result["var_p_hat_m"] = compute_var(student_probs) * 1000
            result["var_p_m"] = compute_var(t) * 1000
            compute_acc(student_probs, t, result)

        # do_ema_step: head, then encoder; nothing at update 0; a decay of 1 is no step (`if get_decay() < 1`).
        if step.num_updates > 0:
            if self.student_head is not None and step.head_ema_decay < 1:
                fairseq_ema_step(self.teacher_head, self.ema_fp32["teacher_head"], self.student_head,
                                 step.head_ema_decay)
            if step.ema_decay < 1:
                fairseq_ema_step(self.teacher_encoder, self.ema_fp32["teacher_encoder"], self.student_encoder,
                                 step.ema_decay)

        if cfg.alpha == 0:
            result["losses"]["loss_cls"] = loss_cls
        elif cfg.alpha == 1 or loss_cls is None:
            result["losses"]["loss_pred"] = loss_pred.view(-1)
        else:
            result["losses"]["loss_cls"] = loss_cls
            result["losses"]["loss_pred"] = loss_pred.view(-1)
        result["sample_size"] = loss_pred.numel()  # theirs: loss_cls.numel(), the same count of masked tokens
        result["ema_decay"] = step.ema_decay * 1000
        return result

    def _loss_pred(self, z_m, z_hat, step: PeerStep, result: dict):
        """`forward_loss_pred` in the model's dtype: L2-normalise target and prediction, `compute_var` of both,
        2 − 2·Σ target·pred. MATPAC++ (r > 1) keeps our float32 multiple-choice loss (their mcl.py is not
        reproduced) and selects the best hypothesis for the head, as our model does."""
        cfg = self.cfg
        mcl_loss = None
        if cfg.mcl_heads > 1:
            mcl_loss, best = mcl_prediction_loss(z_hat, z_m, step.mcl_temperature, cfg.mcl_t_min,
                                                 cfg.target_standardize)
            z_hat = torch.gather(z_hat, 2, best[..., None, None].expand(-1, -1, 1, z_hat.shape[-1])).squeeze(2)
        target = standardize_tokens(z_m) if cfg.target_standardize else z_m
        target = F.normalize(target, dim=-1, p=2)
        pred = F.normalize(z_hat, dim=-1, p=2)
        result["var_z_hat_m"] = compute_var(pred) * 1000
        result["var_z_m"] = compute_var(target) * 1000
        loss = 2 - 2 * (target * pred).sum(dim=-1) if mcl_loss is None else mcl_loss
        return loss, z_hat

    @torch.no_grad()
    def _reduce_center_update(self, center_sum: torch.Tensor, count: int) -> None:
        """`Cls_Loss.reduce_center_update`: the batch statistic, all-reduced asynchronously under a process group."""
        self._center_sum, self._center_count = center_sum, count
        if dist.is_available() and dist.is_initialized():
            self._center_handle = dist.all_reduce(self._center_sum, async_op=True)

    @torch.no_grad()
    def apply_center_update(self) -> None:
        """`Cls_Loss.apply_center_update`: wait, c ← m·c + (1 − m)·sum / (tokens · world), in the model's dtype."""
        if self._center_sum is None:
            return
        world = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
        if self._center_handle is not None:
            self._center_handle.wait()
        self.update_center(self._center_sum / (self._center_count * world))
        self._center_sum = self._center_handle = None


# ------------------------------------------------------------------------------------------------ optimizer
class DynamicLossScaler:
    """fairseq/optim/dynamic_loss_scaler.py. `check_overflow` compares the norm tensor with inf and with itself in
    Python `if`s (host syncs) and raises OverflowError on inf/NaN."""

    def __init__(self, init_scale=2.0**15, scale_factor=2.0, scale_window=2000, tolerance=0.0, threshold=None,
                 min_loss_scale=1e-4):
        self.loss_scale = init_scale
        self.scale_factor = scale_factor
        self.scale_window = scale_window
        self.tolerance = tolerance
        self.threshold = threshold
        self._iter = 0
        self._last_overflow_iter = -1
        self._last_rescale_iter = -1
        self._overflows_since_rescale = 0
        self.min_loss_scale = min_loss_scale

    def scale(self, outputs):
        return self.loss_scale * outputs

    def update(self):
        if (self._iter - self._last_overflow_iter) % self.scale_window == 0:
            self.loss_scale *= self.scale_factor
            self._last_rescale_iter = self._iter
        self._iter += 1

    def _decrease_loss_scale(self):
        self.loss_scale /= self.scale_factor
        if self.threshold is not None:
            self.loss_scale = max(self.loss_scale, self.threshold)

    def check_overflow(self, grad_norm):
        if grad_norm == float("inf") or grad_norm != grad_norm:
            prev_scale = self.loss_scale
            iter_since_rescale = self._iter - self._last_rescale_iter
            if iter_since_rescale == 0:
                iter_since_rescale = 1000
            self._last_overflow_iter = self._iter
            self._overflows_since_rescale += 1
            pct_overflow = self._overflows_since_rescale / float(iter_since_rescale)
            if pct_overflow >= self.tolerance:
                self._decrease_loss_scale()
                self._last_rescale_iter = self._iter
                self._overflows_since_rescale = 0
            if self.loss_scale <= self.min_loss_scale:
                self.loss_scale = prev_scale
                raise FloatingPointError(f"Minimum loss scale reached ({self.min_loss_scale}). Your loss is probably "
                                         "exploding.")
            self._iter += 1
            raise OverflowError("setting loss scale to: " + str(self.loss_scale))


class FlatAdam:
    """fairseq.optim.adam.Adam.step (the non-fused path taken without apex) on its single flat fp32 parameter: the
    `_foreach_` calls on one-element lists, decoupled weight decay on every element, eps added to sqrt(v) before
    the bias correction (torch's Adam/AdamW add it after, so this is written out)."""

    def __init__(self, param: torch.nn.Parameter, betas: tuple[float, float], eps: float, weight_decay: float):
        self.param, self.betas, self.eps, self.weight_decay = param, betas, eps, weight_decay
        self.lr = 0.0
        self.state: dict = {}

    def step(self) -> None:
        p = self.param
        grads, params = [p.grad], [p.data]
        state = self.state
        if not state:
            state["step"] = 0
            state["exp_avg"] = torch.zeros_like(p.data)
            state["exp_avg_sq"] = torch.zeros_like(p.data)
        state["step"] += 1
        exp_avg, exp_avg_sq = [state["exp_avg"]], [state["exp_avg_sq"]]
        beta1, beta2 = self.betas
        torch._foreach_mul_(exp_avg, beta1)
        torch._foreach_add_(exp_avg, grads, alpha=1 - beta1)
        torch._foreach_mul_(exp_avg_sq, beta2)
        torch._foreach_addcmul_(exp_avg_sq, grads, grads, 1 - beta2)
        denom = torch._foreach_add(torch._foreach_sqrt(exp_avg_sq), self.eps)
        bias_correction1 = 1 - beta1 ** state["step"]
        bias_correction2 = 1 - beta2 ** state["step"]
        step_size = [(self.lr * math.sqrt(bias_correction2) / bias_correction1) * -1]
        if self.weight_decay != 0:
            torch._foreach_add_(params, params, alpha=-self.weight_decay * self.lr)
        torch._foreach_addcdiv_(params, exp_avg, denom, step_size)


class FP16Optimizer:
    """fairseq `FP16Optimizer` (`_FP16OptimizerMixin`, flattened, fp16 so with a `DynamicLossScaler`) around
    `FlatAdam`: one flat fp32 master copy of the low-precision parameters and one flat fp32 grad."""

    def __init__(self, params, betas, eps: float, weight_decay: float, world: int = 1, update_freq: int = 1):
        self.fp16_params = list(params)
        total = sum(p.data.numel() for p in self.fp16_params)
        flat = torch.empty(total, dtype=torch.float32, device=self.fp16_params[0].device)
        offset = 0
        for p in self.fp16_params:
            numel = p.data.numel()
            flat[offset:offset + numel].copy_(p.data.view(-1))
            offset += numel
        self.fp32_params = torch.nn.Parameter(flat)
        self.fp32_params.grad = torch.empty_like(flat)
        self.fp32_optimizer = FlatAdam(self.fp32_params, betas, eps, weight_decay)
        self.scaler = DynamicLossScaler(init_scale=FP16_INIT_SCALE, scale_window=int(2**14 / world / update_freq),
                                        tolerance=0.0, threshold=None, min_loss_scale=MIN_LOSS_SCALE)
        self._multiply_factor = 1.0
        self._needs_sync = False

    def set_lr(self, lr: float) -> None:
        self.fp32_optimizer.lr = lr

    def zero_grad(self) -> None:
        for p in self.fp16_params:
            p.grad = None
        self.fp32_params.grad.zero_()
        self._needs_sync = False
        self._multiply_factor = 1.0 / float(self.scaler.loss_scale)

    def backward(self, loss: torch.Tensor) -> None:
        self.scaler.scale(loss).backward()
        self._needs_sync = True

    def _sync_fp16_grads_to_fp32(self) -> None:
        if self._needs_sync:
            offset = 0
            for p in self.fp16_params:
                if not p.requires_grad:
                    continue
                grad_data = p.grad.data if p.grad is not None else p.data.new_zeros(p.data.shape)
                numel = grad_data.numel()
                self.fp32_params.grad.data[offset:offset + numel].copy_(grad_data.view(-1))
                offset += numel
            self._needs_sync = False

    def _sync_fp32_params_to_fp16(self) -> None:
        offset = 0
        for p in self.fp16_params:
            numel = p.data.numel()
            p.data.copy_(self.fp32_params.data[offset:offset + numel].view_as(p.data))
            offset += numel

    def multiply_grads(self, c) -> None:
        self._multiply_factor *= c

    def _unscale_grads(self) -> None:
        self._sync_fp16_grads_to_fp32()
        # fairseq's own test, which leaves a tensor factor (set by clipping) unread on the host: comparing it with
        # 1.0 would be a device-to-host copy the authors' code does not make
        if torch.is_tensor(self._multiply_factor) or self._multiply_factor != 1.0:
            c = self._multiply_factor
            grad = self.fp32_params.grad
            grad.data.mul_(c.to(grad.device) if torch.is_tensor(c) else c)  # FairseqOptimizer.multiply_grads
            self._multiply_factor = 1.0

    def clip_grad_norm(self, max_norm: float) -> torch.Tensor:
        """`clip_grad_norm(max_norm)`: the grad copy loop, `utils.clip_grad_norm_(params, 0)` (the norm of the one flat
        grad), the clip factor decided on the host, the scaler's overflow check."""
        self._sync_fp16_grads_to_fp32()
        grad_norm = self._multiply_factor * torch.norm(self.fp32_params.grad.detach(), p=2, dtype=torch.float32)
        if grad_norm > max_norm > 0.0:
            self._multiply_factor *= max_norm / grad_norm
        self.scaler.check_overflow(grad_norm)
        return grad_norm

    def step(self) -> None:
        self._sync_fp16_grads_to_fp32()
        self._unscale_grads()
        self.fp32_optimizer.step()
        self.scaler.update()
        self._sync_fp32_params_to_fp16()


# ------------------------------------------------------------------------------------------------ trainer pieces
def model_criterion(model, batch: dict, step: PeerStep, loss_weights: dict, nsentences: int):
    """fairseq `ModelCriterion.forward` -> (loss, sample_size, logging_output)."""
    net_output = model(batch, step)
    scaled_losses = {}
    for lk, p in net_output["losses"].items():
        coef = loss_weights[lk]
        if coef != 0 and p is not None:
            scaled_losses[lk] = coef * p.float().sum()
    loss = sum(scaled_losses.values())
    sample_size = net_output["sample_size"]
    logging_output = {"loss": loss.data, "ntokens": sample_size, "nsentences": nsentences,
                      "sample_size": sample_size, "_world_size": 1}
    return loss, sample_size, criterion_logging(net_output, scaled_losses, logging_output)


def criterion_logging(net_output: dict, scaled_losses: dict, logging_output: dict) -> dict:
    """The host reads of `ModelCriterion.forward`: `float()` of every logged value, `.item()` of each scaled loss."""
    with warnings.catch_warnings():  # float() of a metric that keeps its graph: recent torch warns, 2.4 did not
        warnings.simplefilter("ignore", UserWarning)
        for lk in LOG_KEYS:
            if lk in net_output and net_output[lk] is not None:
                logging_output[lk] = float(net_output[lk])
    if len(scaled_losses) > 1:
        for lk, loss in scaled_losses.items():
            logging_output[f"loss_{lk}"] = loss.item()
    return logging_output


def fast_stat_sync_sum(logging_output: dict, sample_size: int, device) -> torch.Tensor:
    """Trainer._fast_stat_sync_sum -> distributed_utils.all_reduce_dict (several processes): the host values in one
    float64 tensor and the device ones (the loss) in another, each all-reduced; returns the summed sample size, a
    device tensor."""
    host = [float(sample_size), 0.0, 0.0] + [float(v) for v in logging_output.values() if not torch.is_tensor(v)]
    host_buf = torch.tensor(host, dtype=torch.double).to(device)
    dist.all_reduce(host_buf)
    dev_buf = torch.cat([v.detach().double().view(-1) for v in logging_output.values() if torch.is_tensor(v)])
    dist.all_reduce(dev_buf)
    return host_buf[0]


def legacy_ddp_all_reduce_grads(params, buffer, world: int):
    """LegacyDistributedDataParallel.all_reduce_grads: after the whole backward, each grad copied into one flat buffer
    of the model's dtype, the buffer divided by the world size and all-reduced, each grad copied back. Returns the
    buffer (allocated on first use, `buffer_size = min(2**28, numel)`)."""
    params = [p for p in params if p.requires_grad]
    if buffer is None:
        buffer = params[0].new_empty(min(LEGACY_DDP_BUFFER, sum(p.numel() for p in params)))
    offset = 0
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
        sz = p.numel()
        buffer[offset:offset + sz].copy_(p.grad.data.view(-1))
        offset += sz
    buffer.div_(world)
    dist.all_reduce(buffer)
    offset = 0
    for p in params:
        sz = p.numel()
        p.grad.data.copy_(buffer[offset:offset + sz].view_as(p))
        offset += sz
    return buffer


def check_grad_norms(grad_norm: torch.Tensor, rank: int, world: int) -> None:
    """Trainer._check_grad_norms (several processes): every rank's norm all-reduced into a float64 buffer, consistency
    checked in a Python `if` (a host sync)."""
    buf = torch.zeros(world, dtype=torch.double, device=grad_norm.device)
    buf[rank] = grad_norm
    dist.all_reduce(buf)
    max_abs_diff = torch.max(torch.abs(buf - buf[0]))
    if not (torch.isfinite(buf).all() and (max_abs_diff / (buf[0] + 1e-6) < 1e-6).all()):
        raise FloatingPointError(f"Fatal error: gradients are inconsistent between workers: {buf.tolist()}")


def reduce_and_log_stats(logging_output: dict, grad_norm) -> float:
    """Trainer._reduce_and_log_stats after an update: `if grad_norm is not None and (not torch.is_tensor(grad_norm)
    or torch.isfinite(grad_norm))` before logging the norm, then ModelCriterion.reduce_metrics, whose
    `utils.item(sum(log.get("loss", 0) ...))` reads the loss back: two host syncs. -> the summed loss."""
    kept = {}
    if grad_norm is not None and (not torch.is_tensor(grad_norm) or torch.isfinite(grad_norm)):
        kept["gnorm"] = grad_norm  # metrics.log_scalar keeps the tensor: no read
    loss = logging_output["loss"]
    return loss.item() if torch.is_tensor(loss) else float(loss)


def _loader_module():
    """benchmarks/loader.py (its NpyFolder is the per-clip .npy Dataset we measure against there too)."""
    spec = importlib.util.spec_from_file_location("_bench_loader", Path(__file__).with_name("loader.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class NpyTrainData:
    """The trainer's data interface over a folder of per-clip float32 .npy files: np.load per sample in a map-style
    Dataset, shuffled by a DistributedSampler when there are several ranks, default collate (the authors' design)."""

    def __init__(self, folder: Path, batch_size: int, rank: int, world: int, workers: int, pin: bool, seed: int):
        self.dataset = _loader_module().NpyFolder(folder, crop=608)
        if len(self.dataset) < batch_size * world:
            raise ValueError(f"{folder} holds {len(self.dataset)} clips, fewer than one global batch "
                             f"({batch_size * world}): add clips or lower the batch size")
        self.batch_size, self.rank, self.world, self.workers, self.pin, self.seed = (
            batch_size, rank, world, workers, pin, seed)
        self.batches_per_epoch = len(self.dataset) // (batch_size * world)
        self.stats = None

    def epoch(self, epoch: int, skip: int = 0):
        sampler = torch.utils.data.DistributedSampler(self.dataset, num_replicas=self.world, rank=self.rank,
                                                      shuffle=True, seed=self.seed, drop_last=True)
        sampler.set_epoch(epoch)
        loader = torch.utils.data.DataLoader(self.dataset, batch_size=self.batch_size, sampler=sampler,
                                             drop_last=True, num_workers=self.workers, pin_memory=self.pin,
                                             prefetch_factor=4 if self.workers else None)
        for i, lms in enumerate(loader):
            if i >= skip:
                yield {"lms": lms}

    def set_crop(self, frames: int) -> None:
        """The trainer sets the crop to the model's input length (TrainData's interface)."""
        self.dataset.crop = frames

    def skipped_shards(self) -> int:
        return 0


class ReferenceDesignTrainer(Trainer):
    """Our trainer's set-up (data interface, model config, schedules, masks) with the step of fairseq's trainer as
    the authors run it (module docstring). `--precision` sets the dtype of the weights; no autocast."""

    def __init__(self, cfg: TrainConfig, npy_dir: Path, workers: int):
        if cfg.optim.grad_accum != 1:
            raise ValueError("reference-design takes one batch per update (the authors' update_freq 1)")
        self._npy_dir, self._npy_workers = npy_dir, workers
        self.dtype = PEER_DTYPES[cfg.run.precision]
        self.logged: dict = {}
        self.overflow_steps = 0  # updates skipped by the loss scaler
        # The low precision is in the weights themselves (fairseq model.half()): the model is never passed through
        # `accelerator.prepare` (whose forward wrapper would autocast) and the step never enters autocast.
        super().__init__(cfg)

    def _open_data(self):
        acc = self.accelerator
        return NpyTrainData(self._npy_dir, self.cfg.data.batch_size, acc.process_index, acc.num_processes,
                            self._npy_workers, pin=self.device.type == "cuda", seed=self.cfg.run.seed)

    def _make_model(self):
        model = ReferenceDesignMATPAC(self.model_cfg).to(self.device)
        model.build_ema_fp32()
        return model.to(self.dtype)

    def _build_model(self):
        acc = self.accelerator
        # No DDP wrapper: matpac.yaml's ddp_backend is legacy_ddp, which reduces gradients after the backward
        # (legacy_ddp_all_reduce_grads). Identical initial weights on every rank come from the shared seed.
        acc.prepare = lambda *objs: objs
        try:
            super()._build_model()  # schedules and sizes; its AdamW is never stepped
        finally:
            del acc.prepare
        self.optimizer = self.inner_optimizer = None
        o = self.cfg.optim
        self.fp16_optimizer = FP16Optimizer(self.raw_model.student_parameters(), betas=(o.beta1, o.beta2), eps=o.eps,
                                            weight_decay=o.weight_decay, world=acc.num_processes)
        self.loss_weights = {"loss_cls": 1 - self.model_cfg.alpha, "loss_pred": self.model_cfg.alpha}
        self._legacy_ddp_buffer = None

    def peer_step_state(self) -> PeerStep:
        i = min(self.step, self.total_steps)
        return PeerStep(num_updates=self.step, tau_t=self.sched["tau_t"][i], mcl_temperature=self.sched["mcl_t"][i],
                        ema_decay=self.sched["ema"][i], head_ema_decay=self.sched["head_ema"][i])

    def micro_step(self, lms: torch.Tensor):
        """One fairseq `Trainer.train_step` (module docstring, steps 1-8). Returns (mean loss, logging_output)."""
        acc, model, opt = self.accelerator, self.raw_model, self.fp16_optimizer
        world = acc.num_processes
        opt.zero_grad()
        lms = lms.to(self.dtype)
        vis, mask = self._masks(lms.shape[0], 0)
        loss, sample_size, logging_output = model_criterion(
            model, {"lms": lms, "vis_idx": vis, "mask_idx": mask}, self.peer_step_state(), self.loss_weights,
            lms.shape[0])
        opt.backward(loss)
        del loss
        local_sample_size, numer = sample_size, 1
        if world > 1:
            sample_size, numer = fast_stat_sync_sum(logging_output, sample_size, self.device), world
        overflow = False
        try:
            if world > 1:
                self._legacy_ddp_buffer = legacy_ddp_all_reduce_grads(model.student_parameters(),
                                                                      self._legacy_ddp_buffer, world)
            opt.multiply_grads(numer / (sample_size or 1.0))
            grad_norm = opt.clip_grad_norm(self.cfg.optim.clip_grad)
            if world > 1:
                check_grad_norms(grad_norm, acc.process_index, world)
            if not torch.isfinite(grad_norm).all():
                raise FloatingPointError("gradients are Nan/Inf")
            opt.set_lr(self.sched["lr"][min(self.step, self.total_steps)])
            opt.step()
        except OverflowError:
            overflow = True
            self.overflow_steps += 1
            grad_norm = torch.tensor(0.0, device=self.device)
            opt.zero_grad()
        model.apply_center_update()
        if overflow:
            loss_sum = float(logging_output["loss"])
        else:
            self.step += 1
            loss_sum = reduce_and_log_stats(logging_output, grad_norm)
        self.logged = logging_output
        return torch.tensor(loss_sum / local_sample_size), logging_output
