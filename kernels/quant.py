"""Row-wise fp8 (e4m3) quantization of activations in one pass, optionally after a GELU (tanh form).

`quant_rows(y, gelu)`: for each row of `y` (..., K), `a = gelu(y)` (or `y`), `scale = max|a| / 448` and
`q = round_e4m3(a / scale)`, the scales as torch._scaled_mm's per-row `scale_a` (M, 1). It is what torchao's
dynamic row-wise activation quantization computes, in one read of `y` and one write of `q`, where Inductor's
kernels for the FF's `gelu → quantize` read the 12,288-wide rows twice (bench/RESULTS.md, issue 19's profile).
A row fits in one program (up to 16K columns), so its max is taken in registers.

A row of zeros gets the scale 1e-12/448 rather than 0 (torchao divides by 0 there and writes NaN).

`e4m3` is the cast every quantizing kernel here uses (the attention's too). Under TRITON_INTERPRET=1 the
interpreter's float32 → e4m3 conversion misrounds values just below a power of two (127.3 becomes 64), so there it
rounds to the e4m3 grid by hand first.
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from . import alloc

E4M3_MAX = 448.0
MIN_AMAX = 1e-12
MAX_COLS = 16384
INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"


@triton.jit
def e4m3(x, EXACT: tl.constexpr):
    """x -> e4m3. The interpreter's conversion halves values whose mantissa rounds up into the next power of
    two, so there (EXACT) x is first rounded to the e4m3 grid by hand; the GPU's conversion is correct."""
    if EXACT:
        step = tl.exp2(tl.floor(tl.log2(tl.maximum(tl.abs(x), 0.015625))) - 3.0)  # 2^-6: the subnormal floor
        x = tl.floor(x / step + 0.5) * step
    return x.to(tl.float8e4nv)


@triton.jit
def gelu_tanh(v):
    # 0.5·v·(1 + tanh(u)) = v·sigmoid(2u) = v / (1 + 2^(-2u·log2 e)), u = √(2/π)·(v + 0.044715·v³). The division is
    # the hardware's fast one (2 ulp): e4m3 keeps 3 bits, and the IEEE division took most of this kernel's time.
    z = -2.0 * 0.7978845608028654 * 1.4426950408889634 * (v + 0.044715 * v * v * v)
    return v * tl.math.fdiv(1.0, 1.0 + tl.math.exp2(z), ieee_rounding=False)


@triton.jit
def _fp8_rows_kernel(y_ptr, q_ptr, s_ptr, K, GELU: tl.constexpr, EXACT: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    m = cols < K
    v = tl.load(y_ptr + row * K + cols, mask=m, other=0.0).to(tl.float32)
    if GELU:
        v = gelu_tanh(v)
    amax = tl.maximum(tl.max(tl.abs(v), axis=0), 1e-12)
    tl.store(s_ptr + row, amax / 448.0)
    q = tl.clamp(v * (448.0 / amax), -448.0, 448.0)  # one division a row, not one a value
    tl.store(q_ptr + row * K + cols, e4m3(q, EXACT), mask=m)


@torch.library.custom_op("cogrt::quant_rows", mutates_args=())
def quant_rows(y: torch.Tensor, gelu: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """y (..., K) -> (q (..., K) e4m3, scale (M, 1) float32), M the number of rows."""
    if not y.is_contiguous():
        raise ValueError("quant_rows needs a contiguous input")
    K = y.shape[-1]
    if K > MAX_COLS:
        raise ValueError(f"quant_rows takes rows of up to {MAX_COLS} values, got {K}")
    M = y.numel() // K
    q, s = alloc.empty(y.shape, y, torch.float8_e4m3fn), alloc.empty((M, 1), y, torch.float32)
    BLOCK = triton.next_power_of_2(K)
    _fp8_rows_kernel[(M,)](y, q, s, K, GELU=gelu, EXACT=INTERPRET, BLOCK=BLOCK,
                           num_warps=min(8, max(4, BLOCK // 2048)))
    return q, s


@quant_rows.register_fake
def _(y, gelu):
    return y.new_empty(y.shape, dtype=torch.float8_e4m3fn), y.new_empty((y.numel() // y.shape[-1], 1),
                                                                         dtype=torch.float32)


# ----------------------------------------------------------------------------------------------------
# Native reference: torchao's row-wise dynamic quantization of F.gelu(y, approximate="tanh") (or of y)

def quant_rows_reference(y: torch.Tensor, gelu: bool) -> tuple[torch.Tensor, torch.Tensor]:
    a = y.float()
    if gelu:
        a = torch.nn.functional.gelu(a, approximate="tanh")
    a = a.reshape(-1, y.shape[-1])  # (M, K)
    scale = a.abs().amax(dim=1, keepdim=True).clamp(min=MIN_AMAX) / E4M3_MAX
    q = (a / scale).clamp(-E4M3_MAX, E4M3_MAX).to(torch.float8_e4m3fn)
    return q.reshape(y.shape), scale
