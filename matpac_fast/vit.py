"""Pre-LN ViT blocks with timm parameter names (`blocks.N.norm1`, `attn.qkv`, `attn.proj`, `norm2`, `mlp.fc1`,
`mlp.fc2`, final `norm`), so the authors' checkpoints load by name (METHOD.md §3, §6).

Attention runs through `F.scaled_dot_product_attention` ("sdpa", PyTorch picks the backend, or one backend pinned:
"flash", "efficient", "cudnn"); "math" is the explicit reference softmax(q·kᵀ/√d)·v, one flag away and tested to
agree; "triton" is `matpac_kernels.packed_attention`, which reads the fused qkv output as it is and writes the `proj`
input directly (no q/k/v copies; Triton on CUDA, the math reference elsewhere). Initialisation follows the authors'
`_init_weights` (xavier-uniform Linear weights, zero biases, LayerNorm 1/0); GELU is the exact (erf) form as in timm.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

SDPA_BACKENDS = {
    "flash": SDPBackend.FLASH_ATTENTION,
    "efficient": SDPBackend.EFFICIENT_ATTENTION,
    "cudnn": SDPBackend.CUDNN_ATTENTION,
}

LN_EPS = 1e-6


def to_stream(x: torch.Tensor, stream_dtype: str) -> torch.Tensor:
    """The residual stream's dtype (`ModelConfig.stream_dtype`): "amp" casts to the autocast dtype when autocast is
    on for x's device; "fp32", or no autocast, leaves x as it is."""
    device = x.device.type
    if stream_dtype == "amp" and torch.is_autocast_enabled(device):
        return x.to(torch.get_autocast_dtype(device))
    return x


class Attention(nn.Module):
    def __init__(self, dim: int, num_heads: int, impl: str = "sdpa"):
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.impl = impl
        self.qkv = nn.Linear(dim, 3 * dim, bias=True)
        self.proj = nn.Linear(dim, dim)
        self._packed = _packed_attention() if impl == "triton" else None

    def forward(self, x_BND: torch.Tensor) -> torch.Tensor:
        b, n, d = x_BND.shape
        if self._packed is not None:
            return self.proj(self._packed(self.qkv(x_BND), self.num_heads))
        # timm layout of the fused weight: rows [q; k; v], each split into heads.
        q, k, v = self.qkv(x_BND).reshape(b, n, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        if self.impl == "math":
            o = attention_math(q, k, v)
        elif self.impl == "sdpa":
            o = F.scaled_dot_product_attention(q, k, v)
        else:  # one SDPA backend, pinned: an unsupported backend raises instead of silently falling back
            with sdpa_kernel([SDPA_BACKENDS[self.impl]]):
                o = F.scaled_dot_product_attention(q, k, v)
        return self.proj(o.transpose(1, 2).reshape(b, n, d))


def _packed_attention():
    try:
        from matpac_kernels import packed_attention
    except ImportError as e:
        raise ValueError(
            "attn_impl='triton' needs the project's Triton kernels (import name matpac_kernels): `pip install -e .` "
            "in the repository, or use attn_impl=sdpa"
        ) from e
    return packed_attention


def attention_math(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Reference attention on (B, H, N, hd) tensors."""
    attn = (q * q.shape[-1] ** -0.5) @ k.transpose(-2, -1)
    return attn.softmax(dim=-1) @ v


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class Block(nn.Module):
    """timm `Block` without drop-path/layer-scale (identities in the authors' configuration)."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4.0, impl: str = "sdpa"):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=LN_EPS)
        self.attn = Attention(dim, num_heads, impl)
        self.norm2 = nn.LayerNorm(dim, eps=LN_EPS)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class ViTEncoder(nn.Module):
    """`blocks` + final `norm`: the authors' `encoder_layers` (student and teacher)."""

    def __init__(self, dim: int, depth: int, num_heads: int, mlp_ratio: float = 4.0, impl: str = "sdpa"):
        super().__init__()
        self.blocks = nn.ModuleList([Block(dim, num_heads, mlp_ratio, impl) for _ in range(depth)])
        self.norm = nn.LayerNorm(dim, eps=LN_EPS)
        self.apply(init_weights)

    def forward(self, x_BND: torch.Tensor) -> torch.Tensor:
        for blk in self.blocks:
            x_BND = blk(x_BND)
        return self.norm(x_BND)


def init_weights(m: nn.Module) -> None:
    """The authors' (MAE's) `_init_weights`."""
    if isinstance(m, nn.Linear):
        nn.init.xavier_uniform_(m.weight)
        if m.bias is not None:
            nn.init.zeros_(m.bias)
    elif isinstance(m, nn.LayerNorm):
        nn.init.ones_(m.weight)
        nn.init.zeros_(m.bias)


class PatchEmbed(nn.Module):
    """Conv2d(1, D, p, stride p) under the authors' name `patch_embed.proj`; weight initialised like a Linear
    (xavier on the (D, p²) view), bias keeps the Conv2d default, as in their `initialize_weights`."""

    def __init__(self, dim: int, patch: int = 16):
        super().__init__()
        self.patch = patch
        self.proj = nn.Conv2d(1, dim, kernel_size=patch, stride=patch)
        w = self.proj.weight.data
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))

    def linear_weight(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(D, p²) weight and (D,) bias: the Conv2d as a Linear on patchified tokens."""
        return self.proj.weight.reshape(self.proj.out_channels, -1), self.proj.bias

    def embed_tokens(self, tokens_BNP: torch.Tensor) -> torch.Tensor:
        w, b = self.linear_weight()
        return F.linear(tokens_BNP.to(w.dtype), w, b)

    def forward(self, x_B1FT: torch.Tensor) -> torch.Tensor:
        """(B, 1, F, T) -> (B, n_f·n_t, D), frequency-major."""
        return self.proj(x_B1FT).flatten(2).transpose(1, 2)
