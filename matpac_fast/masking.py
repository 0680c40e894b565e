"""Masking with fixed counts and the patchify + gather step (METHOD.md §2).

`make_masks` follows the authors' `random_unstructured_mask`: per sample, uniform noise, argsort, the first
`n_visible` indices are visible and the rest masked; every sample has the same counts so all gathers are
rectangular. Deviation (harmless): we return each part **sorted**, whereas the authors keep the shuffled order;
attention is permutation-equivariant once positions are added and both losses are means over tokens, so only the
order of per-token outputs differs.

`patchify_gather_reference` is the specification of `matpac_kernels.patchify_gather`.
"""

from __future__ import annotations

import torch


def make_masks(
    batch_size: int,
    n_patches: int,
    n_visible: int,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """-> (vis_idx (B, n_visible), mask_idx (B, n_patches - n_visible)) int64, each row sorted ascending.

    Reproducible from `generator` (its device decides where the noise is drawn; the result is moved to `device`).
    """
    if not 0 < n_visible < n_patches:
        raise ValueError(f"n_visible={n_visible} must be in [1, n_patches={n_patches})")
    gen_device = generator.device if generator is not None else (device or "cpu")
    noise = torch.rand(batch_size, n_patches, generator=generator, device=gen_device)
    ids = noise.argsort(dim=1)
    vis = ids[:, :n_visible].sort(dim=1).values
    mask = ids[:, n_visible:].sort(dim=1).values
    if device is not None:
        vis, mask = vis.to(device), mask.to(device)
    return vis, mask


def patchify(x_B1FT: torch.Tensor, patch: int = 16) -> torch.Tensor:
    """(B, 1, F, T) -> (B, n_f·n_t, patch²): patch index f_idx·n_t + t_idx (frequency-major), pixels (f, t) row-major
    inside the patch, so `tokens @ conv.weight.reshape(D, patch²).T + bias` equals Conv2d(1, D, patch, stride=patch).
    A remainder that does not fill a patch is dropped, as the strided convolution does."""
    b, c, f, t = x_B1FT.shape
    if c != 1:
        raise ValueError(f"expected one input channel, got shape {tuple(x_B1FT.shape)}")
    n_f, n_t = f // patch, t // patch
    x = x_B1FT[:, 0, : n_f * patch, : n_t * patch]
    x = x.reshape(b, n_f, patch, n_t, patch).permute(0, 1, 3, 2, 4)
    return x.reshape(b, n_f * n_t, patch * patch)


def gather_tokens(x_BND: torch.Tensor, idx_BM: torch.Tensor) -> torch.Tensor:
    """Rows `idx` of each sample: (B, N, D), (B, M) -> (B, M, D)."""
    return torch.gather(x_BND, 1, idx_BM.unsqueeze(-1).expand(-1, -1, x_BND.shape[-1]))


def patchify_gather_reference(
    lms_B1FT: torch.Tensor,
    mean: float | torch.Tensor,
    std: float | torch.Tensor,
    vis_idx_BNv: torch.Tensor,
    mask_idx_BNm: torch.Tensor,
    patch: int = 16,
    out_dtype: torch.dtype = torch.float32,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Normalise in float32, patchify, gather visible and masked tokens -> ((B, Nv, P), (B, Nm, P)) in out_dtype."""
    x = (lms_B1FT.float() - mean) / std
    tokens = patchify(x, patch)
    return gather_tokens(tokens, vis_idx_BNv).to(out_dtype), gather_tokens(tokens, mask_idx_BNm).to(out_dtype)
