"""Attention backends: a name → function registry that the model's blocks call through.

Every backend computes softmax(q kᵀ / √d) v over the whole joint sequence (non-causal, no mask) with
q, k, v of shape (B, H, N, d). `sdpa` is the default; the kernels package registers its Triton backends here.
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

Backend = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
_BACKENDS: dict[str, Backend] = {}


def register(name: str):
    def deco(fn: Backend) -> Backend:
        _BACKENDS[name] = fn
        return fn
    return deco


# backends that live in kernels/, imported the first time they are asked for: name -> (module, needed package)
_LAZY = {"triton": ("kernels.attention", "triton")}


def get_backend(name: str) -> Backend:
    if name not in _BACKENDS and name in _LAZY:
        import importlib
        importlib.import_module(_LAZY[name][0])  # registers itself
    if name not in _BACKENDS:
        raise ValueError(f"unknown attention backend {name!r}; available: {', '.join(sorted(_BACKENDS))}")
    return _BACKENDS[name]


def available() -> list[str]:
    """Registered backends, and those in kernels/ whose package is installed."""
    from importlib.util import find_spec
    return sorted(set(_BACKENDS) | {n for n, (_, pkg) in _LAZY.items() if find_spec(pkg) is not None})


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, backend: str = "sdpa") -> torch.Tensor:
    return get_backend(backend)(q, k, v)


# cuDNN is the fastest SDPA kernel for CogVideoX's d=64 joint attention on Hopper (18.3 ms vs 24.0 ms for
# flash at the 5B shape, ANCHORS.md); the others stay as fallbacks for other GPUs, dtypes and the CPU.
_SDPA_ORDER = [SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION,
               SDPBackend.MATH]


@register("sdpa")
def sdpa(q, k, v):
    if q.is_cuda:
        with sdpa_kernel(_SDPA_ORDER, set_priority=True):
            return F.scaled_dot_product_attention(q, k, v)
    return F.scaled_dot_product_attention(q, k, v)


@register("sdpa-flash")
def sdpa_flash(q, k, v):
    with sdpa_kernel([SDPBackend.FLASH_ATTENTION]):
        return F.scaled_dot_product_attention(q, k, v)


@register("sdpa-math")
def sdpa_math(q, k, v):
    """Plain PyTorch math, the reference the fast backends are tested against."""
    with sdpa_kernel([SDPBackend.MATH]):
        return F.scaled_dot_product_attention(q, k, v)
