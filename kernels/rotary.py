"""Rotary position embedding (rotate-half, partial): the cos/sin tables and the plain-PyTorch form.

Convention (GPT-NeoX / transformers `rotate_half`): with r = rotary_dims and h = r // 2, for i < h
    x_rot[i]     = x[i] * cos[p, i] - x[i + h] * sin[p, i]
    x_rot[i + h] = x[i + h] * cos[p, i] + x[i] * sin[p, i]
and dims r..head_dim-1 pass through. Tables hold only the h distinct frequencies per position.
"""

from __future__ import annotations

import torch
from torch import Tensor


def rotary_tables(
    rotary_dims: int, max_positions: int, base: float, device: torch.device | str
) -> tuple[Tensor, Tensor]:
    """cos, sin: float32 [max_positions, rotary_dims // 2]; cos[p, i] = cos(p * inv_freq[i]).

    inv_freq[i] = 1 / base ** (2i / rotary_dims), computed exactly as transformers does in float32, so that
    fp32 rotary matches transformers bit for bit.
    """
    if not isinstance(rotary_dims, int) or rotary_dims < 0 or rotary_dims % 2:
        raise ValueError(f"rotary_dims must be a non-negative even integer, got {rotary_dims!r}")
    if not isinstance(max_positions, int) or max_positions <= 0:
        raise ValueError(f"max_positions must be a positive integer, got {max_positions!r}")
    if not base > 0:
        raise ValueError(f"base must be > 0, got {base!r}")
    if rotary_dims == 0:
        empty = torch.empty(max_positions, 0, dtype=torch.float32, device=device)
        return empty, empty.clone()
    # inv_freq on the CPU first, as transformers builds it, then moved: same bits on every device.
    inv_freq = (1.0 / (base ** (torch.arange(0, rotary_dims, 2, dtype=torch.float32) / rotary_dims))).to(device)
    # freqs: [max_positions, rotary_dims // 2]
    freqs = torch.arange(max_positions, device=device).float()[:, None] * inv_freq[None, :]
    return freqs.cos().contiguous(), freqs.sin().contiguous()


def apply_rotary_ref(x: Tensor, cos_p: Tensor, sin_p: Tensor) -> Tensor:
    """Rotate the first 2 * cos_p.shape[-1] dims of x; computed in float32, rounded to x.dtype once.

    x: [..., head_dim]; cos_p, sin_p: [..., rotary_dims // 2] (the table rows of each token's position),
    broadcastable against x[..., :rotary_dims // 2] — e.g. x [T, H, D] with cos_p [T, 1, r/2].
    """
    half = cos_p.shape[-1]
    if cos_p.shape != sin_p.shape:
        raise ValueError(f"cos_p {tuple(cos_p.shape)} and sin_p {tuple(sin_p.shape)} must have the same shape")
    if 2 * half > x.shape[-1]:
        raise ValueError(f"rotary_dims {2 * half} exceeds head_dim {x.shape[-1]} of x")
    xf = x.float()
    x1, x2, rest = xf[..., :half], xf[..., half:2 * half], xf[..., 2 * half:]
    cos_p, sin_p = cos_p.float(), sin_p.float()
    rotated = torch.cat((x1 * cos_p - x2 * sin_p, x2 * cos_p + x1 * sin_p, rest), dim=-1)
    return rotated.to(x.dtype)
