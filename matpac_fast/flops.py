"""Model FLOPs per training sample (METHOD.md §8), for MFU.

Counts matmul FLOPs only (2 per multiply-add): Linear layers, the patch embedding and attention's two N×N
products. Trained parts (student encoder, predictor, student head) count forward + backward = 3 × forward; the
patch embedding counts its forward plus its weight gradient (its input is data, so there is no input gradient); the
teacher encoder and teacher head count forward only. Element-wise work (LayerNorm, GELU, softmax)
is ignored, as usual for MFU. For `matpac` this gives ≈ 92 GFLOP per 80×608 sample.
"""

from __future__ import annotations

from matpac_fast.config import ModelConfig


def vit_forward_flops(n_tokens: int, dim: int, depth: int, mlp_ratio: float = 4.0) -> float:
    """Forward FLOPs of `depth` pre-LN blocks on `n_tokens` tokens."""
    hidden = int(dim * mlp_ratio)
    linear = 2 * n_tokens * (3 * dim * dim + dim * dim + 2 * dim * hidden)  # qkv, proj, fc1, fc2
    attention = 2 * 2 * n_tokens * n_tokens * dim  # q·kᵀ and attn·v
    return depth * float(linear + attention)


def head_forward_flops(n_tokens: int, cfg: ModelConfig) -> float:
    h, bn = cfg.head_hidden, cfg.head_bottleneck
    return 2.0 * n_tokens * (cfg.dim * h + h * h + h * bn + bn * cfg.n_prototypes)


def flops_breakdown(cfg: ModelConfig) -> dict[str, float]:
    """FLOPs per sample by part (keys: patch_embed, student, teacher, predictor, heads)."""
    nv, nm, n = cfg.n_visible, cfg.n_masked, cfg.n_patches
    p2 = cfg.patch * cfg.patch
    # forward on all tokens, weight gradient on the visible ones only: the input is data (no input gradient) and
    # the teacher's tokens are embedded under no_grad
    patch = 2.0 * n * p2 * cfg.dim + 2.0 * nv * p2 * cfg.dim
    student = 3 * vit_forward_flops(1 + nv, cfg.dim, cfg.depth, cfg.mlp_ratio)
    teacher = vit_forward_flops(1 + nm, cfg.dim, cfg.depth, cfg.mlp_ratio)
    pred_fwd = (
        2.0 * (1 + nv) * cfg.dim * cfg.pred_dim  # decoder_embed
        + vit_forward_flops(1 + n, cfg.pred_dim, cfg.pred_depth, cfg.mlp_ratio)
        + 2.0 * nm * cfg.pred_dim * cfg.dim * cfg.mcl_heads  # output projection(s)
    )
    heads = 3 * head_forward_flops(nm, cfg) + head_forward_flops(nm, cfg) if cfg.use_heads else 0.0
    return {"patch_embed": patch, "student": student, "teacher": teacher, "predictor": 3 * pred_fwd, "heads": heads}


def flops_per_sample(cfg: ModelConfig) -> float:
    """Training FLOPs per sample (forward + backward of the trained parts, forward of the teacher)."""
    return sum(flops_breakdown(cfg).values())
