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

import torch
import triton
import triton.language as tl

from . import alloc


@triton.jit
def _adaln_modulate_kernel(x_ptr, c_ptr, w_ptr, b_ptr, mod_ptr, out_ptr, N, n_text, D, eps,
                           HAS_AFFINE: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0)  # one token of the joint sequence: batch row // N, position row % N
    b = row // N
    n = row % N
    is_text = n < n_text
    cols = tl.arange(0, BLOCK)
    m = cols < D
    # text rows read c[b, n]; video rows read x[b, n - n_text]
    src = tl.where(is_text, c_ptr + (b * n_text + n) * D, x_ptr + (b * (N - n_text) + n - n_text) * D)
    v = tl.load(src + cols, mask=m, other=0.0).to(tl.float32)
    mean = tl.sum(v, axis=0) / D
    diff = tl.where(m, v - mean, 0.0)
    rstd = 1.0 / tl.sqrt(tl.sum(diff * diff, axis=0) / D + eps)
    y = diff * rstd
    if HAS_AFFINE:
        y = y * tl.load(w_ptr + cols, mask=m, other=0.0).to(tl.float32) \
            + tl.load(b_ptr + cols, mask=m, other=0.0).to(tl.float32)
    # mod row b holds [shift, scale, gate, c_shift, c_scale, c_gate], D columns each
    base = mod_ptr + b * 6 * D + tl.where(is_text, 3 * D, 0)
    shift = tl.load(base + cols, mask=m, other=0.0).to(tl.float32)
    scale = tl.load(base + D + cols, mask=m, other=0.0).to(tl.float32)
    y = y * (1.0 + scale) + shift
    tl.store(out_ptr + row * D + cols, y.to(out_ptr.dtype.element_ty), mask=m)


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
    _check(x, c, mod)
    B, Nv, D = x.shape
    Nt = c.shape[1]
    out = alloc.empty((B, Nt + Nv, D), x)
    affine = weight is not None
    _adaln_modulate_kernel[(B * (Nt + Nv),)](x, c, weight if affine else x, bias if affine else x, mod, out,
                                            Nt + Nv, Nt, D, eps, HAS_AFFINE=affine,
                                            BLOCK=triton.next_power_of_2(D))
    return out


@adaln_modulate.register_fake
def _(x, c, weight, bias, mod, eps):
    return x.new_empty(x.shape[0], c.shape[1] + x.shape[1], x.shape[2])


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


def gated_residual_reference(x, c, a, mod):
    n = c.shape[1]
    _, _, gate, _, _, c_gate = mod.unsqueeze(1).chunk(6, dim=-1)  # (B, 1, D) each
    return ((x.float() + gate.float() * a[:, n:].float()).to(x.dtype),
            (c.float() + c_gate.float() * a[:, :n].float()).to(c.dtype))
