"""Attention backends: a name → function registry that the model's blocks call through.

Every backend computes softmax(q kᵀ / √d) v over the whole joint sequence (non-causal, no mask) with
q, k, v of shape (B, H, N, d).

- `sdpa` (the default; cuDNN first on the GPU), `sdpa-flash`, `sdpa-math` (the reference): PyTorch's own.
- `triton` (bf16/fp16) and `triton-fp8` (int8 Q·Kᵀ, fp8 P·V): ours, in kernels/attention.py, imported
  the first time they are asked for.
- `sage` (the `sageattention` package) and `flash-attn` (the `flash_attn` package): where installed.
- `cudnn-fp8`: cuDNN's fp8 attention through the `cudnn` package (nvidia-cudnn-frontend), where installed.
- `auto`: on a GPU, the fastest of the full-precision backends (sdpa, triton, flash-attn) whose output
  stays within 1e-2 of sdpa's, timed once per shape at its first call; elsewhere sdpa. The low-precision
  ones are never picked by `auto`: they are chosen by name, by the fp8 mode.
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


# backends registered on first use: name -> (module that registers it, package it needs)
_LAZY = {"triton": ("kernels.attention", "triton"), "triton-fp8": ("kernels.attention", "triton"),
         "sage": ("engine.attention_external", "sageattention"),
         "flash-attn": ("engine.attention_external", "flash_attn"),
         "cudnn-fp8": ("engine.attention_cudnn", "cudnn")}


def get_backend(name: str) -> Backend:
    if name not in _BACKENDS and name in _LAZY:
        module, package = _LAZY[name]
        if not _installed(name):
            raise ValueError(f"attention backend {name!r} needs the {package!r} package, which is not installed; "
                             f"available: {', '.join(available())}")
        import importlib
        importlib.import_module(module)  # registers itself
    if name not in _BACKENDS:
        raise ValueError(f"unknown attention backend {name!r}; available: {', '.join(available())}")
    return _BACKENDS[name]


def available() -> list[str]:
    """Registered backends, and those in kernels/ whose package is installed."""
    return sorted(n for n in set(_BACKENDS) | set(_LAZY) if _installed(n))


def _installed(name: str) -> bool:
    from importlib.util import find_spec
    if name == "cudnn-fp8" and not (torch.cuda.is_available() and torch.cuda.get_device_capability() >= (9, 0)):
        return False  # cuDNN's fp8 attention runs on Hopper and newer only
    return name in _BACKENDS or (name in _LAZY and find_spec(_LAZY[name][1]) is not None)


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, backend: str = "sdpa") -> torch.Tensor:
    return get_backend(backend)(q, k, v)


# Backends that also take q already quantized to int8 by the fused QK prologue (kernels.qk.qk_norm_rope_q8), with
# one scale per row: name -> fn(q8, q_scale, k, v). That saves the attention's own pass over q (the attention
# alone: 15.74 against 16.01 ms at 5B on the H200), but the prologue pays it back: the eager 5B step took 1229 ms
# with it and 1227 ms without (bench/RESULTS.md). So it is off.
FUSE_Q_QUANT = False
_Q8: dict[str, Callable] = {}


def register_q8(name: str):
    def deco(fn):
        _Q8[name] = fn
        return fn
    return deco


def q8_backend(name: str):
    """The backend's prequantized-q form where it has one and FUSE_Q_QUANT is on, else None."""
    if not FUSE_Q_QUANT:
        return None
    get_backend(name)  # imports the module that registers both forms
    return _Q8.get(name)


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


# ---------------------------------------------------------------------------------------------------------
AUTO_CANDIDATES = ("sdpa", "triton", "flash-attn")
LOW_PRECISION = ("triton-fp8", "sage", "cudnn-fp8")  # quantized inputs: close to the others, not equal
AUTO_TOLERANCE = 1e-2  # relative error against sdpa's output, on the call's own inputs
_auto_choice: dict[tuple, str] = {}


def _time_ms(fn, reps: int = 3) -> float:
    fn()  # compile and warm up
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(reps):
        fn()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / reps


def choose(q, k, v) -> str:
    """The backend `auto` uses for these inputs' shape, dtype and GPU (measured once, then remembered)."""
    if not q.is_cuda:
        return "sdpa"
    key = (q.device, tuple(q.shape), q.dtype)
    if key not in _auto_choice:
        if torch.compiler.is_compiling():  # no timing inside a trace; the first eager call decides
            return "sdpa"
        ref = sdpa(q, k, v).float()
        best, best_ms = "sdpa", _time_ms(lambda: sdpa(q, k, v))
        for name in AUTO_CANDIDATES[1:]:
            if not _installed(name):
                continue
            fn = get_backend(name)
            try:
                err = ((fn(q, k, v).float() - ref).norm() / ref.norm()).item()
            except Exception:  # a backend that cannot run this shape or dtype is not a candidate
                continue
            if err <= AUTO_TOLERANCE and (ms := _time_ms(lambda: fn(q, k, v))) < best_ms:
                best, best_ms = name, ms
        _auto_choice[key] = best
    return _auto_choice[key]


@register("auto")
def auto(q, k, v):
    return get_backend(choose(q, k, v))(q, k, v)
