"""MATPAC in plain PyTorch: student, EMA teacher, predictor, classification heads, centre (METHOD.md §2-§7).

`MATPAC.forward(batch, step)` is pure: it reads the centre and the teacher but changes neither, calls no `.item()`,
moves nothing between devices and runs no collective. The trainer calls, after the optimizer step,
`ema_update(*pairs)` for each of `model.ema_pairs()` and `model.update_center(mean_K)` with the (all-reduced)
`stats["center_batch"]`. This ordering is equivalent to the authors' lazy centre update (applied at the start of
the next forward). With `ema_decay_at(step + 1)` the teacher goes through the same states with the same decays as
their in-forward EMA, but one step fresher: batch n is scored by a teacher that has also absorbed the weights of
update n (see `schedules.py`; METHOD.md §4 allows it).

Deviations from the authors' code, all numerically neutral unless stated:
- Patch embedding is applied as a Linear on patchified, gathered tokens (the Conv2d weight reshaped), which is the
  same arithmetic as their Conv2d on the full image followed by a gather.
- The teacher's tokens are embedded under no_grad (theirs come from the same graph but are only consumed under
  no_grad); the gradient is identical.
- Visible/masked indices come sorted (`masking.make_masks`), theirs shuffled: only the token order differs.
- The positional tables are buffers (theirs: frozen Parameters); the state-dict keys are the same.
- α = 1 builds no classification heads (theirs builds and runs them, then drops the loss): no effect on training.
  Its loss is 1·L_pred (METHOD.md §8). Their α only chooses which losses are summed, with the yaml's loss weights
  (0.5 each in both public configs): if their α = 1 run kept those, its loss was 0.5·L_pred. Adam cancels a
  constant scale except through eps and the 3.0 gradient clip; the config of that run is not public. (The `m2d`
  preset's weight of 1 is M2D's own.)
- The EMA and centre updates run outside forward, after the optimizer step (METHOD.md §4.9 allows it).
- MATPAC++: the prediction loss keeps its gradient. (The authors' latest public `model.py` computes it inside a
  `torch.no_grad()` block, which would leave only the classification path training the predictor; METHOD.md §7
  describes L_pred as a training loss, which we follow. That block covers plain MATPAC (`use_mcl=False`) in the
  latest file as well; the earlier one, of the same commit as `matpac.yaml`, computes it with its gradient, as here.)
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from matpac_fast.config import ModelConfig
from matpac_fast.heads import Predictor, make_heads
from matpac_fast.losses import centered_softmax_xent_reference, mcl_prediction_loss, prediction_loss
from matpac_fast.masking import gather_tokens, patchify_gather_reference
from matpac_fast.pos_embed import sincos_2d
from matpac_fast.vit import PatchEmbed, ViTEncoder, to_stream


@dataclass
class StepState:
    """Step-dependent scalars (floats or 0-d tensors; tensors avoid recompiles under torch.compile)."""

    tau_t: float | torch.Tensor = 0.04
    mcl_temperature: float | torch.Tensor = 0.1

    @classmethod
    def at(cls, cfg: ModelConfig, step: int, tau_warmup_steps: int) -> StepState:
        from matpac_fast import schedules as S

        return cls(
            tau_t=S.tau_teacher_at(step, cfg.tau_t_start, cfg.tau_t_end, tau_warmup_steps),
            mcl_temperature=S.mcl_temperature_at(step, cfg.mcl_t_start, cfg.mcl_t_decay, cfg.mcl_t_min),
        )


def _kernels():
    try:
        import matpac_kernels
    except ImportError as e:
        raise ValueError(
            "use_kernels=True needs the project's Triton kernels (import name matpac_kernels): "
            "`pip install -e .` in the repository, or set use_kernels=False"
        ) from e
    return matpac_kernels


class MATPAC(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        n_f, n_t = cfg.grid
        impl = cfg.attn_impl
        # Shared by student and teacher (teacher: under no_grad), the authors' names.
        self.patch_embed = PatchEmbed(cfg.dim, cfg.patch)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, cfg.dim))
        nn.init.normal_(self.cls_token, std=0.02)
        self.register_buffer("pos_embed", sincos_2d(cfg.dim, n_f, n_t, cls_token=True))  # (1, 1+N, D), CLS row 0
        self.student_encoder = ViTEncoder(cfg.dim, cfg.depth, cfg.heads, cfg.mlp_ratio, impl)
        self.teacher_encoder = ViTEncoder(cfg.dim, cfg.depth, cfg.heads, cfg.mlp_ratio, impl)  # independent init
        self.teacher_encoder.requires_grad_(False)
        self.predictor = Predictor(
            cfg.dim, cfg.pred_dim, cfg.pred_depth, cfg.pred_heads, cfg.grid, cfg.mlp_ratio, cfg.mcl_heads, impl,
            cfg.stream_dtype,
        )
        if cfg.use_heads:
            self.student_head, self.teacher_head = make_heads(
                cfg.dim, cfg.n_prototypes, cfg.head_hidden, cfg.head_bottleneck, cfg.teacher_head_init
            )
        else:
            self.student_head = self.teacher_head = None
        self.register_buffer("center", torch.zeros(1, cfg.n_prototypes))

    # ------------------------------------------------------------------------------------------ parameters / state
    def student_parameters(self) -> list[nn.Parameter]:
        """What the optimizer trains: patch embed, CLS, student encoder, predictor, student head."""
        mods = [self.patch_embed, self.student_encoder, self.predictor]
        if self.student_head is not None:
            mods.append(self.student_head)
        params = [self.cls_token]
        for m in mods:
            params.extend(m.parameters())
        return params

    def ema_pairs(self):
        """((teacher_encoder_params, student_encoder_params), (teacher_head_params, student_head_params))."""
        enc = (list(self.teacher_encoder.parameters()), list(self.student_encoder.parameters()))
        if self.student_head is None:
            return enc, ([], [])
        return enc, (list(self.teacher_head.parameters()), list(self.student_head.parameters()))

    @torch.no_grad()
    def update_center(self, mean_K: torch.Tensor) -> None:
        """c ← m·c + (1 − m)·mean (mean of the global batch, K values)."""
        m = self.cfg.center_momentum
        self.center.mul_(m).add_(mean_K.reshape(self.center.shape).to(self.center.dtype), alpha=1 - m)

    # ------------------------------------------------------------------------------------------ pieces
    def _tokens(self, lms: torch.Tensor, vis_idx: torch.Tensor, mask_idx: torch.Tensor):
        cfg = self.cfg
        args = (lms, cfg.norm_mean, cfg.norm_std, vis_idx, mask_idx)
        if cfg.use_kernels:
            return _kernels().patchify_gather(*args, patch=cfg.patch, out_dtype=torch.float32)
        return patchify_gather_reference(*args, patch=cfg.patch, out_dtype=torch.float32)

    def _xent(self, student_MK, teacher_MK, tau_t):
        cfg = self.cfg
        args = (student_MK, teacher_MK, self.center[0], cfg.tau_s, tau_t)
        if cfg.use_kernels:
            return _kernels().centered_softmax_xent(*args, center_mode=cfg.center_mode)
        return centered_softmax_xent_reference(*args, center_mode=cfg.center_mode)

    def _embed(self, tokens_BNP: torch.Tensor, idx_BN: torch.Tensor) -> torch.Tensor:
        """Patch embedding + positional rows of `idx`, prefixed by the CLS token (its table row is zero)."""
        x = self.patch_embed.embed_tokens(tokens_BNP) + gather_tokens(self.pos_embed[:, 1:].expand(len(idx_BN), -1, -1),
                                                                      idx_BN)
        cls = (self.cls_token + self.pos_embed[:, :1]).expand(len(x), -1, -1)
        return to_stream(torch.cat([cls, x], dim=1), self.cfg.stream_dtype)

    def _check_batch(self, lms, vis_idx, mask_idx) -> None:
        cfg = self.cfg
        want = (cfg.n_mels, cfg.crop_frames)
        if lms.ndim != 4 or lms.shape[1] != 1:
            raise ValueError(f"batch['lms'] must be (B, 1, {want[0]}, {want[1]}), got {tuple(lms.shape)}")
        mels, frames = lms.shape[2:]
        if mels != cfg.n_mels:
            raise ValueError(
                f"batch['lms'] has {mels} mel bins but the model takes n_mels={cfg.n_mels}: build it with "
                f"n_mels={mels} to match the data (matpac-train: drop --model n_mels or pass n_mels={mels}; "
                f"make-shards writes 80-mel log-mels)"
            )
        if frames != cfg.crop_frames:
            raise ValueError(
                f"batch['lms'] has {frames} frames but the model takes crop_frames={cfg.crop_frames}: crop the batches "
                f"to {cfg.crop_frames} frames (DataConfig.crop_frames) or build the model with crop_frames={frames} "
                f"(matpac-train: --model crop_frames={frames})"
            )
        if vis_idx.shape != (lms.shape[0], cfg.n_visible) or mask_idx.shape != (lms.shape[0], cfg.n_masked):
            raise ValueError(
                f"masks must be (B, {cfg.n_visible}) and (B, {cfg.n_masked}), got {tuple(vis_idx.shape)} and "
                f"{tuple(mask_idx.shape)}: make them with make_masks(B, cfg.n_patches, cfg.n_visible)"
            )

    # ------------------------------------------------------------------------------------------ forward
    def forward(self, batch: dict, step: StepState) -> tuple[torch.Tensor, dict]:
        """-> (loss, stats). loss = α·mean(L_pred) + (1 − α)·mean(L_cls) over the masked tokens of this batch."""
        cfg = self.cfg
        lms, vis_idx, mask_idx = batch["lms"], batch["vis_idx"], batch["mask_idx"]
        self._check_batch(lms, vis_idx, mask_idx)
        vis_tok, mask_tok = self._tokens(lms, vis_idx, mask_idx)

        z_v = self.student_encoder(self._embed(vis_tok, vis_idx))  # (B, 1+Nv, D)
        z_hat = self.predictor(z_v, vis_idx, mask_idx)  # (B, Nm, D) or (B, Nm, r, D)
        with torch.no_grad():
            z_m = self.teacher_encoder(self._embed(mask_tok, mask_idx))[:, 1:]  # (B, Nm, D)

        if cfg.mcl_heads > 1:
            l_pred, best = mcl_prediction_loss(z_hat, z_m, step.mcl_temperature, cfg.mcl_t_min, cfg.target_standardize)
            z_hat = torch.gather(z_hat, 2, best[..., None, None].expand(-1, -1, 1, z_hat.shape[-1])).squeeze(2)
        else:
            l_pred = prediction_loss(z_hat, z_m, cfg.target_standardize)
        loss_pred = l_pred.mean()
        stats = {"loss_pred": loss_pred.detach()}

        if self.student_head is None:
            zero = loss_pred.new_zeros(())
            stats.update(loss_cls=zero, teacher_entropy=zero, teacher_max_prob=zero,
                         center_norm=self.center.norm().float(), center_batch=self.center[0].float().clone())
            return loss_pred, stats

        student_logits = self.student_head(z_hat).flatten(0, 1)  # (M, K)
        with torch.no_grad():
            teacher_logits = self.teacher_head(z_m).flatten(0, 1)
        l_cls, center_sum, entropy, max_prob = self._xent(student_logits, teacher_logits, step.tau_t)
        loss_cls = l_cls.mean()
        loss = cfg.alpha * loss_pred + (1 - cfg.alpha) * loss_cls
        stats.update(
            loss_cls=loss_cls.detach(),
            teacher_entropy=entropy.mean().detach(),
            teacher_max_prob=max_prob.mean().detach(),
            center_norm=self.center.norm().float(),
            center_batch=(center_sum / l_cls.shape[0]).detach(),
        )
        return loss, stats
