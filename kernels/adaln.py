"""Fused adaLN for the CogVideoX block, with native references beside the kernels.

`adaln_modulate`: LayerNorm over both streams, then `norm(x)·(1 + scale) + shift` with each stream's own
modulation, written straight into the joint [text; video] sequence. The native path makes ~8 passes over
the 17,776 × 3,072 activations (two norms, two multiplies, two adds, a cat); this is one read and one write.

`gated_residual`: `x + gate·a[:, n_text:]` and `c + c_gate·a[:, :n_text]` in one launch.

Both read the adaLN projection `mod` (B, 6·D) directly, at the column offsets where the native code's
`chunk(6)` would find shift, scale and gate, so no chunk is copied. They are forward-only (inference):
training keeps the native path, which autograd differentiates.
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from . import alloc, quant
from .quant import e4m3


# rows per program and warps for adaln_modulate. A program takes ROWS consecutive rows of one stream of one
# batch row, so it loads that stream's shift, scale and LayerNorm affine once for all of them, not once a row
# (per row those are 4 extra reads of D values, twice the row's own traffic, served by L2). ROWS = 2 with 4
# warps won bench.kernels --sweep-fused (bench/RESULTS.md, "adaLN row tiles, the prologue-quantized q, and
# cuDNN's own fp8 attention").
ROWS = 4 if os.environ.get("TRITON_INTERPRET") == "1" else 2
NUM_WARPS = 4
# the same for the fp8 variant (adaln_modulate_fp8), which also takes each row's max and casts: swept apart
# (bench.kernels --sweep-fused), since its work per value differs
FP8_ROWS, FP8_NUM_WARPS = 4, 8  # 163 us a 5B call against 175 at (2, 4) (bench.kernels --sweep-fused, H200)


@triton.jit
def _adaln_modulate_kernel(x_ptr, c_ptr, w_ptr, b_ptr, mod_ptr, out_ptr, s_ptr, Nv, n_text, D, text_tiles, eps,
                           HAS_AFFINE: tl.constexpr, QUANT: tl.constexpr, EXACT: tl.constexpr, ROWS: tl.constexpr,
                           BLOCK: tl.constexpr):
    t = tl.program_id(0)  # tiles [0, text_tiles) hold text rows, the rest video rows
    b = tl.program_id(1)
    is_text = t < text_tiles
    first = tl.where(is_text, t, t - text_tiles) * ROWS
    n_rows = tl.where(is_text, n_text, Nv)
    r = first + tl.arange(0, ROWS)  # row within this stream of batch row b
    cols = tl.arange(0, BLOCK)
    m = (r < n_rows)[:, None] & (cols < D)[None, :]  # (ROWS, BLOCK)
    src = tl.where(is_text, c_ptr + (b * n_text + r) * D, x_ptr + (b * Nv + r) * D)  # (ROWS,) row starts
    v = tl.load(src[:, None] + cols[None, :], mask=m, other=0.0).to(tl.float32)
    mean = tl.sum(v, axis=1) / D
    diff = tl.where(m, v - mean[:, None], 0.0)
    rstd = 1.0 / tl.sqrt(tl.sum(diff * diff, axis=1) / D + eps)
    y = diff * rstd[:, None]
    cm = cols < D
    if HAS_AFFINE:
        y = y * tl.load(w_ptr + cols, mask=cm, other=0.0).to(tl.float32)[None, :] \
            + tl.load(b_ptr + cols, mask=cm, other=0.0).to(tl.float32)[None, :]
    # mod row b holds [shift, scale, gate, c_shift, c_scale, c_gate], D columns each
    base = mod_ptr + b * 6 * D + tl.where(is_text, 3 * D, 0)
    shift = tl.load(base + cols, mask=cm, other=0.0).to(tl.float32)
    scale = tl.load(base + D + cols, mask=cm, other=0.0).to(tl.float32)
    y = y * (1.0 + scale[None, :]) + shift[None, :]
    at = b * (n_text + Nv) + tl.where(is_text, 0, n_text) + r  # row in the joint [text; video] output
    if QUANT:  # row-wise e4m3 with its scale, as kernels/quant.py (the whole row is in this program)
        amax = tl.maximum(tl.max(tl.abs(tl.where(m, y, 0.0)), axis=1), 1e-12)  # (ROWS,)
        tl.store(s_ptr + at, amax / 448.0, mask=r < n_rows)
        # one division a row, not one a value: the per-value IEEE division made this kernel compute-bound
        q = tl.clamp(y * (448.0 / amax)[:, None], -448.0, 448.0)
        tl.store(out_ptr + at[:, None] * D + cols[None, :], e4m3(q, EXACT), mask=m)
    else:
        tl.store(out_ptr + at[:, None] * D + cols[None, :], y.to(out_ptr.dtype.element_ty), mask=m)


@triton.jit
def _gated_residual_kernel(x_ptr, c_ptr, a_ptr, mod_ptr, x_out, c_out, N, n_text, D, BLOCK: tl.constexpr):
    row = tl.program_id(0)
    b = row // N
    n = row % N
    is_text = n < n_text
    cols = tl.arange(0, BLOCK)
    m = cols < D
    at = tl.where(is_text, (b * n_text + n) * D, (b * (N - n_text) + n - n_text) * D)  # row offset in x or c
    src = tl.where(is_text, c_ptr, x_ptr) + at
    dst = tl.where(is_text, c_out, x_out) + at
    gate = tl.load(mod_ptr + b * 6 * D + tl.where(is_text, 5 * D, 2 * D) + cols, mask=m, other=0.0).to(tl.float32)
    a = tl.load(a_ptr + row * D + cols, mask=m, other=0.0).to(tl.float32)
    x = tl.load(src + cols, mask=m, other=0.0).to(tl.float32)
    tl.store(dst + cols, (x + gate * a).to(dst.dtype.element_ty), mask=m)


def _check(x, c, mod):
    if not (x.is_contiguous() and c.is_contiguous() and mod.is_contiguous()):
        raise ValueError("adaln kernels need contiguous x, c and mod")
    if x.shape[0] != c.shape[0] or x.shape[-1] != c.shape[-1] or mod.shape != (x.shape[0], 6 * x.shape[-1]):
        raise ValueError(f"shapes do not fit: x {tuple(x.shape)}, c {tuple(c.shape)}, mod {tuple(mod.shape)}")


@torch.library.custom_op("cogrt::adaln_modulate", mutates_args=())
def adaln_modulate(x: torch.Tensor, c: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None,
                   mod: torch.Tensor, eps: float) -> torch.Tensor:
    """x (B, Nv, D) video, c (B, Nt, D) text, mod (B, 6D) -> h (B, Nt + Nv, D), in x's dtype."""
    return launch_modulate(x, c, weight, bias, mod, eps)


def launch_modulate(x, c, weight, bias, mod, eps, rows: int | None = None, num_warps: int | None = None,
                    fp8: bool = False):
    """adaln_modulate with its launch settings given (bench/kernels.py sweeps them); `fp8`: also quantize
    (returns the e4m3 rows and their scales)."""
    _check(x, c, mod)
    rows = rows or (FP8_ROWS if fp8 else ROWS)
    num_warps = num_warps or (FP8_NUM_WARPS if fp8 else NUM_WARPS)
    B, Nv, D = x.shape
    Nt = c.shape[1]
    out = alloc.empty((B, Nt + Nv, D), x, torch.float8_e4m3fn if fp8 else None)
    scales = alloc.empty((B * (Nt + Nv), 1), x, torch.float32) if fp8 else out
    affine = weight is not None
    text_tiles = triton.cdiv(Nt, rows)
    _adaln_modulate_kernel[(text_tiles + triton.cdiv(Nv, rows), B)](
        x, c, weight if affine else x, bias if affine else x, mod, out, scales, Nv, Nt, D, text_tiles, eps,
        HAS_AFFINE=affine, QUANT=fp8, EXACT=quant.INTERPRET, ROWS=rows, BLOCK=triton.next_power_of_2(D),
        num_warps=num_warps)
    return (out, scales) if fp8 else out


@adaln_modulate.register_fake
def _(x, c, weight, bias, mod, eps):
    return x.new_empty(x.shape[0], c.shape[1] + x.shape[1], x.shape[2])


@torch.library.custom_op("cogrt::adaln_modulate_fp8", mutates_args=())
def adaln_modulate_fp8(x: torch.Tensor, c: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None,
                       mod: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """adaln_modulate's h, quantized row-wise to e4m3 in the same pass (kernels/quant.py's rule, applied to the
    float32 h before any rounding): (q (B, Nt + Nv, D) e4m3, scale (B·(Nt + Nv), 1) float32), the operands of the
    fp8 linear layer that reads h. It saves that layer's separate quantization, a read and a write of h."""
    return launch_modulate(x, c, weight, bias, mod, eps, fp8=True)


@adaln_modulate_fp8.register_fake
def _(x, c, weight, bias, mod, eps):
    N = c.shape[1] + x.shape[1]
    return (x.new_empty(x.shape[0], N, x.shape[2], dtype=torch.float8_e4m3fn),
            x.new_empty(x.shape[0] * N, 1, dtype=torch.float32))


@torch.library.custom_op("cogrt::gated_residual", mutates_args=())
def gated_residual(x: torch.Tensor, c: torch.Tensor, a: torch.Tensor,
                   mod: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x + gate·a[:, Nt:] and c + c_gate·a[:, :Nt]; a is the joint (B, Nt + Nv, D) output of a sublayer.
    New tensors, not in place: callers such as a step cache may still hold the inputs."""
    _check(x, c, mod)
    B, Nv, D = x.shape
    Nt = c.shape[1]
    if a.shape != (B, Nt + Nv, D) or not a.is_contiguous():
        raise ValueError(f"a must be a contiguous ({B}, {Nt + Nv}, {D}) tensor, got {tuple(a.shape)}")
    x_out, c_out = alloc.empty(x.shape, x), alloc.empty(c.shape, c)
    _gated_residual_kernel[(B * (Nt + Nv),)](x, c, a, mod, x_out, c_out, Nt + Nv, Nt, D,
                                            BLOCK=triton.next_power_of_2(D))
    return x_out, c_out


@gated_residual.register_fake
def _(x, c, a, mod):
    return torch.empty_like(x), torch.empty_like(c)


# ----------------------------------------------------------------------------------------------------
# Native references: what the engine's block computes without the kernels

def adaln_modulate_reference(x, c, weight, bias, mod, eps):
    D = x.shape[-1]
    shift, scale, _, c_shift, c_scale, _ = mod.unsqueeze(1).chunk(6, dim=-1)  # (B, 1, D) each

    def norm(t):
        return torch.nn.functional.layer_norm(t.float(), (D,), None if weight is None else weight.float(),
                                              None if bias is None else bias.float(), eps)
    h = torch.cat([norm(c) * (1 + c_scale.float()) + c_shift.float(), norm(x) * (1 + scale.float()) + shift.float()],
                  dim=1)
    return h.to(x.dtype)


def adaln_modulate_fp8_reference(x, c, weight, bias, mod, eps):
    h = adaln_modulate_reference(x.float(), c.float(), weight, bias, mod.float(), eps)  # float32: not rounded to x's dtype
    return quant.quant_rows_reference(h, gelu=False)


def gated_residual_reference(x, c, a, mod):
    n = c.shape[1]
    _, _, gate, _, _, c_gate = mod.unsqueeze(1).chunk(6, dim=-1)  # (B, 1, D) each
    return ((x.float() + gate.float() * a[:, n:].float()).to(x.dtype),
            (c.float() + c_gate.float() * a[:, :n].float()).to(c.dtype))
