"""Attention backends: a name → function registry, and the module the runner puts into the model's blocks.

Every backend computes softmax(q kᵀ / √d) v over the whole joint sequence (non-causal, no mask) with
q, k, v of shape (B, H, N, d).

- `sdpa` (the default; cuDNN first on the GPU), `sdpa-flash`, `sdpa-math` (the reference): PyTorch's own.
- `triton` (bf16/fp16) and `triton-fp8` (int8 Q·Kᵀ, fp8 P·V): our kernels (cogrt.kernels.attention). The
  engine registers them here; the kernels know nothing of the engine.
- `sage` (the `sageattention` package), `flash-attn` (FlashAttention 2, the `flash_attn` package) and
  `flash-attn-4` (FlashAttention 4, `flash_attn.cute` from the `flash-attn-4` package, Hopper and newer): where
  installed. On the H200 at the 5B shape FlashAttention 4 is the fastest exact kernel we have measured (14.2 ms a
  call against 17.2 for ours and 18.6 for cuDNN), so the modes take it wherever it is installed (engine/modes.py).
- `cudnn-fp8`: cuDNN's fp8 attention through the `cudnn` package (nvidia-cudnn-frontend), where installed.
- `auto`: on a GPU, the fastest of the full-precision backends (sdpa, triton, flash-attn, flash-attn-4) whose output
  stays within 1e-2 of sdpa's, timed once per shape at its first call; elsewhere sdpa. The low-precision
  ones are never picked by `auto`: they are chosen by name, by the fp8 mode.
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

Backend = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
_BACKENDS: dict[str, Backend] = {}


def register(name: str):
    def deco(fn: Backend) -> Backend:
        _BACKENDS[name] = fn
        return fn
    return deco


# backends from other packages, registered when their module is imported at first use: name -> that module
_LAZY = {"sage": "cogrt.engine.attention_external", "flash-attn": "cogrt.engine.attention_external",
         "flash-attn-4": "cogrt.engine.attention_external", "cudnn-fp8": "cogrt.engine.attention_cudnn"}
# the package each optional backend needs
_PACKAGE = {"triton": "triton", "triton-fp8": "triton", "triton-fp8-e4m3": "triton", "sage": "sageattention",
            "flash-attn": "flash_attn.flash_attn_interface", "flash-attn-4": "flash_attn.cute", "cudnn-fp8": "cudnn"}
# FlashAttention 2 and 4 share the `flash_attn` top-level name (4 installs only `flash_attn.cute`), so each is
# recognised by its own module. Both backends need a GPU of at least this compute capability.
_MIN_CAPABILITY = {"cudnn-fp8": (9, 0), "flash-attn-4": (9, 0)}


def get_backend(name: str) -> Backend:
    if name in _PACKAGE and not _installed(name):
        raise ValueError(f"attention backend {name!r} needs the {_PACKAGE[name]!r} module (and cudnn-fp8 and "
                         f"flash-attn-4 a Hopper or newer GPU), which this machine lacks; available: "
                         f"{', '.join(available())}")
    if name not in _BACKENDS and name in _LAZY:
        import importlib
        importlib.import_module(_LAZY[name])  # registers itself
    if name not in _BACKENDS:
        raise ValueError(f"unknown attention backend {name!r}; available: {', '.join(available())}")
    return _BACKENDS[name]


def available() -> list[str]:
    """Registered backends, and the optional ones whose package is installed."""
    return sorted(n for n in set(_BACKENDS) | set(_PACKAGE) if _installed(n))


def has_module(module: str) -> bool:
    """Whether `module` (dotted names too) can be imported, without importing it (only its parents)."""
    from importlib.util import find_spec
    try:
        return find_spec(module) is not None
    except (ImportError, ValueError):  # a parent that is missing, or is not a package
        return False


def _installed(name: str) -> bool:
    need = _MIN_CAPABILITY.get(name)
    if need and not (torch.cuda.is_available() and torch.cuda.get_device_capability() >= need):
        return False
    if name in _PACKAGE:
        return has_module(_PACKAGE[name])
    return name in _BACKENDS


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, backend: str = "sdpa") -> torch.Tensor:
    return get_backend(backend)(q, k, v)


class Attention(nn.Module):
    """What the runner puts in each block's `attend` slot: the named backend."""

    def __init__(self, backend: str = "sdpa"):
        super().__init__()
        self.backend, self.fn = backend, get_backend(backend)  # an unknown name fails now, not mid-request

    def forward(self, q, k, v):
        return self.fn(q, k, v)

    def extra_repr(self) -> str:
        return self.backend


# cuDNN's SDPA is the fastest for CogVideoX's d=64 joint attention on Hopper (bench/RESULTS.md, "Kernels:
# attention, fused norms and the 5B step per backend"); the others stay as fallbacks for other GPUs, dtypes and
# the CPU.
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


# Our Triton kernels; the import happens at the first call, so that nothing loads Triton unless it is asked for.
@register("triton")
def triton_flash(q, k, v):
    from cogrt.kernels.attention import flash_attention
    return flash_attention(q, k, v)


@register("triton-fp8")
def triton_fp8(q, k, v):
    from cogrt.kernels.attention import sage_attention
    return sage_attention(q, k, v)


@register("triton-fp8-e4m3")
def triton_fp8_e4m3(q, k, v):
    """triton-fp8 with Q and K in e4m3 instead of int8: faster on Hopper (14.2 against 16.0 ms a call at 5B in
    bench.kernels), with about twice the error (1.7e-2 against 7.4e-3)."""
    from cogrt.kernels.attention import sage_attention
    return sage_attention(q, k, v, "fp8")

# ---------------------------------------------------------------------------------------------------------
AUTO_CANDIDATES = ("sdpa", "triton", "flash-attn", "flash-attn-4")
LOW_PRECISION = ("triton-fp8", "triton-fp8-e4m3", "sage", "cudnn-fp8")  # quantized inputs: close to the others, not equal
AUTO_TOLERANCE = 1e-2  # relative error against sdpa's output, on the call's own inputs
_auto_choice: dict[tuple, str] = {}


def choose(q, k, v) -> str:
    """The backend `auto` uses for these inputs' shape, dtype and GPU (measured once, then remembered)."""
    if not q.is_cuda:
        return "sdpa"
    key = (q.device, tuple(q.shape), q.dtype)
    if key not in _auto_choice:
        if torch.compiler.is_compiling():  # no timing inside a trace; the first eager call decides
            return "sdpa"
        from cogrt.kernels.measure import cuda_times, rel_err
        ref = sdpa(q, k, v)
        best, best_ms = "sdpa", min(cuda_times(lambda: sdpa(q, k, v)))
        for name in AUTO_CANDIDATES[1:]:
            if not _installed(name):
                continue
            fn = get_backend(name)
            try:
                err = rel_err(fn(q, k, v), ref)
            except Exception:  # a backend that cannot run this shape or dtype is not a candidate
                continue
            if err <= AUTO_TOLERANCE and (ms := min(cuda_times(lambda: fn(q, k, v)))) < best_ms:
                best, best_ms = name, ms
        _auto_choice[key] = best
    return _auto_choice[key]


@register("auto")
def auto(q, k, v):
    return get_backend(choose(q, k, v))(q, k, v)


def set_attention(model, backend: str) -> None:
    """Put the named backend in every block of `model`."""
    for b in model.blocks:
        b.attend = Attention(backend)
