"""Model configuration: one small dataclass and the presets as code (METHOD.md §2-§7).

The defaults are the authors' MATPAC recipe (ViT-B encoder, 512-d 8-block predictor, K = 2048 prototypes, α = 0.5,
probability centring). Presets:

- ``matpac``          the paper's model (default values below).
- ``matpac_plusplus`` MATPAC++: r = 5 predictor output heads, annealed winner-takes-all (METHOD.md §7).
- ``m2d``             M2D: α = 1 (no classification heads are built), per-token target standardisation, and M2D's
                      fallback normalisation pair (-7.1, 4.2).
- ``tiny``            CPU-sized (dim 64, 2 blocks, predictor 32-d/1 block, K = 64) on the same 80×608 grid, for
                      tests and the demo. Not a published model.

Schedule end-points that belong to the method (EMA decays, τ_t) live here too; the step-dependent values come from
the pure functions in `matpac_fast.schedules`.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

ATTN_IMPLS = ("sdpa", "flash", "efficient", "cudnn", "math", "triton")
CUDA_ONLY_ATTN = ("efficient", "cudnn")  # SDPA backends without a CPU kernel ("No viable backend" there)
# Head widths the Triton attention kernel takes (matpac_kernels.attention.HEAD_DIMS; a test checks they agree).
TRITON_HEAD_DIMS = (16, 32, 64, 128)
STREAM_DTYPES = ("fp32", "amp")


@dataclass
class ModelConfig:
    name: str = "matpac"
    # --- grid (METHOD.md §2)
    n_mels: int = 80
    crop_frames: int = 608
    patch: int = 16
    mask_ratio: float = 0.7  # fraction masked; visible count = int(n_patches * (1 - mask_ratio)) as the authors
    # --- encoder (student and teacher share the architecture)
    dim: int = 768
    depth: int = 12
    heads: int = 12
    mlp_ratio: float = 4.0
    # --- predictor
    pred_dim: int = 512
    pred_depth: int = 8
    pred_heads: int = 16
    mcl_heads: int = 1  # r: 1 = MATPAC's single Linear 512->768; >1 = MATPAC++ multiple-choice heads
    mcl_t_start: float = 0.1
    mcl_t_decay: float = 0.99997
    mcl_t_min: float = 1e-4  # at or below this temperature the hard minimum is used
    # --- classification heads (DINO style)
    n_prototypes: int = 2048  # K
    head_hidden: int = 2048
    head_bottleneck: int = 256
    teacher_head_init: str = "authors"  # "authors": as their code (see heads.py); "copy": exact copy of the student
    tau_s: float = 0.1
    tau_t_start: float = 0.04
    tau_t_end: float = 0.07
    center_mode: str = "prob"  # "prob": the authors' (mean of teacher probabilities); "logit": DINO's
    center_momentum: float = 0.9
    # --- objective
    alpha: float = 0.5  # total = α·L_pred + (1-α)·L_cls; α = 1 is M2D (heads are not built)
    target_standardize: bool = False  # M2D: standardise each target token over its dims before the cosine
    # --- EMA end-points (linear over all updates, METHOD.md §4.9)
    ema_start: float = 0.99995
    ema_end: float = 0.99999
    head_ema_start: float = 0.998
    head_ema_end: float = 1.0
    # --- front-end normalisation applied inside forward, in float32
    norm_mean: float = -7.056
    norm_std: float = 4.193
    # --- implementation switches (must not change the numbers beyond float rounding)
    use_kernels: bool = False  # use matpac_kernels.patchify_gather / centered_softmax_xent
    # "sdpa": F.scaled_dot_product_attention, PyTorch picks the backend; "flash" | "efficient" | "cudnn": SDPA
    # pinned to that backend (benchmarks/attention.py times them on our short sequences); "math": explicit reference;
    # "triton": matpac_kernels.packed_attention on the fused qkv output (CUDA; the math reference elsewhere)
    attn_impl: str = "sdpa"
    # The residual stream's dtype under autocast. "fp32": token embeddings (+ float32 positional tables) stay float32,
    # so every residual add, LayerNorm input and their gradients are float32 (autocast's default). "amp": the stream is
    # cast to the autocast dtype (bf16/fp16) once after embedding, as in the authors' fp16 run (fairseq calls
    # `model.half()`); LayerNorm still computes in float32. Halves the bytes of the element-wise kernels around the
    # GEMMs (about 30 % of GPU time at batch 256, benchmarks/RESULTS.md). No effect without autocast.
    stream_dtype: str = "fp32"

    def __post_init__(self) -> None:
        # Sizes first: the divisibility checks below would divide by a zero.
        sizes = ("n_mels", "crop_frames", "patch", "dim", "depth", "heads", "pred_dim", "pred_depth", "pred_heads",
                 "n_prototypes", "head_hidden", "head_bottleneck")
        for name in sizes:
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ValueError(f"ModelConfig: {name}={v!r} must be a positive integer")
        for name in ("mlp_ratio", "tau_s", "tau_t_start", "tau_t_end", "mcl_t_start"):
            v = getattr(self, name)
            if not (math.isfinite(v) and v > 0):
                raise ValueError(f"ModelConfig: {name}={v!r} must be > 0")
        for name in ("center_momentum", "mcl_t_decay", "ema_start", "ema_end", "head_ema_start", "head_ema_end"):
            v = getattr(self, name)
            if not 0.0 <= v <= 1.0:
                raise ValueError(f"ModelConfig: {name}={v!r} must be in [0, 1]")
        checks = [
            (self.n_mels % self.patch == 0, f"n_mels={self.n_mels} must be a multiple of patch={self.patch}"),
            (self.crop_frames % self.patch == 0, f"crop_frames={self.crop_frames} must be a multiple of patch"),
            (self.dim % self.heads == 0, f"dim={self.dim} must be divisible by heads={self.heads}"),
            (self.pred_dim % self.pred_heads == 0, f"pred_dim={self.pred_dim} not divisible by {self.pred_heads}"),
            (self.dim % 4 == 0 and self.pred_dim % 4 == 0, "dim and pred_dim must be multiples of 4 (2-D sin-cos)"),
            (0.0 < self.mask_ratio < 1.0, f"mask_ratio={self.mask_ratio} must be in (0, 1)"),
            (0.0 <= self.alpha <= 1.0, f"alpha={self.alpha} must be in [0, 1]"),
            (self.center_mode in ("prob", "logit"), f"center_mode={self.center_mode!r}: use 'prob' or 'logit'"),
            (self.attn_impl in ATTN_IMPLS, f"attn_impl={self.attn_impl!r}: use one of {', '.join(ATTN_IMPLS)}"),
            (self.stream_dtype in STREAM_DTYPES,
             f"stream_dtype={self.stream_dtype!r}: use one of {', '.join(STREAM_DTYPES)}"),
            (self.teacher_head_init in ("authors", "copy"), "teacher_head_init must be 'authors' or 'copy'"),
            (self.mcl_heads >= 1, f"mcl_heads={self.mcl_heads} must be >= 1"),
            (0 < self.norm_std < math.inf, f"norm_std={self.norm_std} must be > 0 and finite"),
            (0 <= self.mcl_t_min < math.inf, f"mcl_t_min={self.mcl_t_min} must be >= 0 and finite"),
            (int(min(self.dim, self.pred_dim) * self.mlp_ratio) >= 1,  # a 0-wide MLP: weights safetensors cannot save
             f"mlp_ratio={self.mlp_ratio} gives an MLP of {int(min(self.dim, self.pred_dim) * self.mlp_ratio)} units: "
             "raise it"),
            (math.isfinite(self.norm_mean), f"norm_mean={self.norm_mean} must be finite"),
        ]
        for ok, msg in checks:
            if not ok:
                raise ValueError(f"ModelConfig: {msg}")
        if self.attn_impl == "triton":  # refused here, not run silently as the reference where the kernel cannot go
            for where, dim, heads in (("", self.dim, self.heads), ("pred_", self.pred_dim, self.pred_heads)):
                if dim // heads not in TRITON_HEAD_DIMS:
                    raise ValueError(
                        f"ModelConfig: attn_impl='triton' takes heads {', '.join(map(str, TRITON_HEAD_DIMS))} wide, "
                        f"but {where}dim={dim} / {where}heads={heads} = {dim // heads}: change {where}heads or use "
                        "attn_impl=sdpa"
                    )
        if not 1 <= self.n_visible < self.n_patches:
            raise ValueError(f"ModelConfig: mask_ratio={self.mask_ratio} leaves {self.n_visible} visible patches")

    # --- derived sizes
    @property
    def grid(self) -> tuple[int, int]:
        """(frequency patches, time patches), e.g. (5, 38)."""
        return self.n_mels // self.patch, self.crop_frames // self.patch

    @property
    def n_patches(self) -> int:
        return self.grid[0] * self.grid[1]

    @property
    def n_visible(self) -> int:
        # Same expression as the authors' random_unstructured_mask: int(L * (1 - mask_ratio)) -> 57 of 190.
        return int(self.n_patches * (1 - self.mask_ratio))

    @property
    def n_masked(self) -> int:
        return self.n_patches - self.n_visible

    @property
    def use_heads(self) -> bool:
        """α = 1 (M2D) trains no classification branch, so none is built (no unused parameters under DDP)."""
        return self.alpha < 1.0

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


PRESETS: dict[str, dict] = {
    "matpac": {},
    "matpac_plusplus": {"name": "matpac_plusplus", "mcl_heads": 5},
    "m2d": {"name": "m2d", "alpha": 1.0, "target_standardize": True, "norm_mean": -7.1, "norm_std": 4.2},
    "tiny": {
        "name": "tiny",
        "dim": 64,
        "depth": 2,
        "heads": 4,
        "pred_dim": 32,
        "pred_depth": 1,
        "pred_heads": 4,
        "n_prototypes": 64,
        "head_hidden": 128,
        "head_bottleneck": 32,
    },
}


def get_model_config(name: str = "matpac", **overrides) -> ModelConfig:
    """A preset with optional field overrides, e.g. ``get_model_config("tiny", alpha=1.0)``."""
    if name not in PRESETS:
        raise ValueError(f"unknown model preset {name!r}: choose one of {sorted(PRESETS)}")
    fields = {f.name for f in dataclasses.fields(ModelConfig)}
    unknown = sorted(set(overrides) - fields)
    if unknown:
        raise ValueError(f"unknown model config field(s) {unknown}; valid fields: {sorted(fields)}")
    return ModelConfig(**{**PRESETS[name], **overrides})


def config_from_dict(d: dict) -> ModelConfig:
    """Rebuild a config saved with `to_dict()` (unknown keys are an error, so stale files are noticed)."""
    fields = {f.name for f in dataclasses.fields(ModelConfig)}
    unknown = sorted(set(d) - fields)
    if unknown:
        raise ValueError(f"model config has unknown field(s) {unknown}")
    return ModelConfig(**d)
