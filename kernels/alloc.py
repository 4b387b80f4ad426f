"""Output allocation for every kernel launcher, in one place so that tests can poison it."""
from __future__ import annotations

import torch


def empty(shape, like: torch.Tensor) -> torch.Tensor:
    """An uninitialised output with `like`'s device and dtype. Tests swap in a NaN-filled one, so that an
    element a kernel fails to write shows."""
    return torch.empty(shape, device=like.device, dtype=like.dtype)
