"""Output allocation for every kernel launcher, in one place so that tests can poison it."""
from __future__ import annotations

import torch


def empty(shape, like: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """An uninitialised output on `like`'s device, in `dtype` (default: like's). Tests swap in a NaN-filled
    one, so that an element a kernel fails to write shows."""
    return torch.empty(shape, device=like.device, dtype=dtype or like.dtype)
