"""DINO-style classification heads and the predictor (METHOD.md §3, §7).

Head: Linear(D→H), GELU, Linear(H→H), GELU, Linear(H→256), L2-normalise, weight-normed Linear(256→K, no bias) with
the gain `weight_g` initialised to 1 and **trained** (the authors do not freeze it, unlike DINO's norm_last_layer).
The weight norm is written out (w = g·v/‖v‖ per prototype) instead of `torch.nn.utils.weight_norm`, keeping the
authors' parameter names `last_layer.weight_g` (K, 1) and `last_layer.weight_v` (K, 256).

Initialisation, as in the authors' code (`Cls_Head` + `GeneralModel.initialize_weights`): the head MLP is created
with trunc-normal(0.02) weights, the teacher head is copied from it, and then the model-wide xavier init re-draws the
**student** MLP only (the teacher lives in fairseq's EMAModule, outside `model.apply`); `last_layer.weight_v` keeps
the Linear default (kaiming-uniform) in both, identical. So at step 0 the two heads' MLPs differ. That is the
default (`teacher_head_init="authors"`); `"copy"` makes the teacher an exact copy of the student (DINO's choice).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from matpac_fast.masking import gather_tokens
from matpac_fast.pos_embed import sincos_2d
from matpac_fast.vit import Block, init_weights, to_stream


class WeightNormLinear(nn.Module):
    def __init__(self, in_dim: int, out_dim: int):
        super().__init__()
        v = torch.empty(out_dim, in_dim)
        nn.init.kaiming_uniform_(v, a=5**0.5)  # nn.Linear's default init
        self.weight_v = nn.Parameter(v)
        self.weight_g = nn.Parameter(torch.ones(out_dim, 1))

    def weight(self) -> torch.Tensor:
        return self.weight_v * (self.weight_g / self.weight_v.norm(dim=1, keepdim=True))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight())


class DINOHead(nn.Module):
    def __init__(self, in_dim: int, out_dim: int, hidden_dim: int = 2048, bottleneck_dim: int = 256):
        super().__init__()
        self.mlp = nn.Sequential(
            nn.Linear(in_dim, hidden_dim),
            nn.GELU(),
            nn.Linear(hidden_dim, hidden_dim),
            nn.GELU(),
            nn.Linear(hidden_dim, bottleneck_dim),
        )
        for m in self.mlp:
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)
        self.last_layer = WeightNormLinear(bottleneck_dim, out_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.mlp(x)
        x = F.normalize(x, dim=-1, p=2, eps=1e-6 if x.dtype == torch.float16 else 1e-12)
        return self.last_layer(x)


def make_heads(in_dim: int, k: int, hidden: int, bottleneck: int, teacher_init: str) -> tuple[DINOHead, DINOHead]:
    """(student, teacher) heads initialised as described in the module docstring."""
    student = DINOHead(in_dim, k, hidden, bottleneck)
    teacher = DINOHead(in_dim, k, hidden, bottleneck)
    teacher.load_state_dict(student.state_dict())
    student.mlp.apply(init_weights)  # the authors' model-wide xavier pass reaches the student MLP only
    if teacher_init == "copy":
        teacher.load_state_dict(student.state_dict())
    teacher.requires_grad_(False)
    return student, teacher


class Predictor(nn.Module):
    """g_υ: Linear D→Dp, learned mask token, unshuffle to all positions (+ CLS), own sin-cos table, blocks,
    LayerNorm, keep the masked positions, Linear Dp→D (or r parallel heads for MATPAC++).

    Parameter names follow the M2D/MATPAC decoder (`decoder_embed`, `mask_token`, `decoder_blocks`,
    `decoder_norm`, `decoder_pred`); the MATPAC++ heads are `mcl_heads.N`.
    """

    def __init__(self, dim: int, pred_dim: int, depth: int, heads: int, grid: tuple[int, int], mlp_ratio: float,
                 mcl_heads: int = 1, impl: str = "sdpa", stream_dtype: str = "fp32"):
        super().__init__()
        self.stream_dtype = stream_dtype
        self.decoder_embed = nn.Linear(dim, pred_dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, pred_dim))
        self.register_buffer("decoder_pos_embed", sincos_2d(pred_dim, *grid, cls_token=True))
        self.decoder_blocks = nn.ModuleList([Block(pred_dim, heads, mlp_ratio, impl) for _ in range(depth)])
        self.decoder_norm = nn.LayerNorm(pred_dim, eps=1e-6)
        self.r = mcl_heads
        if mcl_heads == 1:
            self.decoder_pred = nn.Linear(pred_dim, dim)
        else:
            self.mcl_heads = nn.ModuleList([nn.Linear(pred_dim, dim) for _ in range(mcl_heads)])
        self.apply(init_weights)
        nn.init.normal_(self.mask_token, std=0.02)

    def forward(self, z_v_BVD: torch.Tensor, vis_idx: torch.Tensor, mask_idx: torch.Tensor) -> torch.Tensor:
        """z_v: student output [CLS; visible] (B, 1+Nv, D) -> (B, Nm, D), or (B, Nm, r, D) when r > 1, ordered as
        `mask_idx`."""
        x = self.decoder_embed(z_v_BVD)
        b, _, dp = x.shape
        n = self.decoder_pos_embed.shape[1] - 1
        full = self.mask_token.to(x.dtype).expand(b, n, dp)
        full = full.scatter(1, vis_idx.unsqueeze(-1).expand(-1, -1, dp), x[:, 1:])
        x = to_stream(torch.cat([x[:, :1], full], dim=1) + self.decoder_pos_embed, self.stream_dtype)
        for blk in self.decoder_blocks:
            x = blk(x)
        y = gather_tokens(self.decoder_norm(x)[:, 1:], mask_idx)
        if self.r == 1:
            return self.decoder_pred(y)
        return torch.stack([h(y) for h in self.mcl_heads], dim=2)
