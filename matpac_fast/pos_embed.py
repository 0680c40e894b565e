"""Fixed 2-D sin-cos positional tables in the MAE/M2D layout (METHOD.md §2).

Layout (as the authors' `get_2d_sincos_pos_embed`): rows are patches in frequency-major order (index f·n_t + t);
the first half of the channels encodes the **time** index, the second half the **frequency** index; each half is
[sin(pos·ω) ; cos(pos·ω)] with ω_i = 1 / 10000^(i / (D/4)). With ``cls_token=True`` a zero row is prepended.
Computed in float64 (as numpy does there) and returned as float32.
"""

from __future__ import annotations

import torch


def sincos_1d(dim: int, pos: torch.Tensor) -> torch.Tensor:
    """(M,) positions -> (M, dim) float64: [sin(pos·ω), cos(pos·ω)]."""
    if dim % 2:
        raise ValueError(f"sin-cos dim must be even, got {dim}")
    omega = torch.arange(dim // 2, dtype=torch.float64) / (dim / 2.0)
    omega = 1.0 / 10000**omega
    out = pos.to(torch.float64).reshape(-1, 1) * omega.reshape(1, -1)
    return torch.cat([out.sin(), out.cos()], dim=1)


def sincos_2d(dim: int, n_f: int, n_t: int, cls_token: bool = True) -> torch.Tensor:
    """(1, [1 +] n_f·n_t, dim) float32 table for a frequency-major grid of n_f × n_t patches."""
    if dim % 4:
        raise ValueError(f"2-D sin-cos dim must be a multiple of 4, got {dim}")
    t_idx = torch.arange(n_t).repeat(n_f)  # patch f*n_t + t -> t
    f_idx = torch.arange(n_f).repeat_interleave(n_t)  # -> f
    table = torch.cat([sincos_1d(dim // 2, t_idx), sincos_1d(dim // 2, f_idx)], dim=1)
    if cls_token:
        table = torch.cat([torch.zeros(1, dim, dtype=table.dtype), table], dim=0)
    return table.float().unsqueeze(0)


def truncate_time(table_1ND: torch.Tensor, n_f: int, n_t_new: int) -> torch.Tensor:
    """Patch rows of a table without CLS row, (1, n_f·n_t, D) -> (1, n_f·n_t_new, D) keeping the first n_t_new time
    columns of every frequency row (the authors' treatment of inputs shorter than the training crop)."""
    _, n, d = table_1ND.shape
    n_t = n // n_f
    if n_t_new > n_t:
        raise ValueError(f"input has {n_t_new} time patches but the positional table only {n_t}")
    return table_1ND.reshape(1, n_f, n_t, d)[:, :, :n_t_new].reshape(1, n_f * n_t_new, d)
