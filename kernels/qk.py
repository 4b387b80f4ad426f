"""The fused QK prologue: per-head LayerNorm of q and k, then 3D RoPE on the video tokens, in one pass.

It reads q and k straight out of the fused qkv projection (B, N, 3·H·d) and writes them in the (B, H, N, d)
layout attention wants. The native path makes about four passes over q and k: the two norms, the fp32 rotation
of the video part, and the copies back into place. The text tokens (the first `n_text`) are not rotated.
Forward-only (inference); training keeps the native path.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import alloc


@triton.jit
def _qk_norm_rope_kernel(qkv_ptr, wq_ptr, bq_ptr, wk_ptr, bk_ptr, cos_ptr, sin_ptr, q_out, k_out,
                         N, n_text, H, eps, HEAD_DIM: tl.constexpr, HAS_ROPE: tl.constexpr):
    row = tl.program_id(0)  # token (b, n) of the joint sequence
    h = tl.program_id(1)
    which = tl.program_id(2)  # 0: q, 1: k
    b = row // N
    n = row % N
    HALF: tl.constexpr = HEAD_DIM // 2
    i = tl.arange(0, HALF)
    # qkv row layout: [q heads | k heads | v heads], each head HEAD_DIM wide; load even and odd lanes apart,
    # since RoPE rotates the interleaved pairs (x[2i], x[2i+1])
    src = qkv_ptr + row * 3 * H * HEAD_DIM + which * H * HEAD_DIM + h * HEAD_DIM
    xe = tl.load(src + 2 * i).to(tl.float32)
    xo = tl.load(src + 2 * i + 1).to(tl.float32)
    mean = (tl.sum(xe, axis=0) + tl.sum(xo, axis=0)) / HEAD_DIM
    de, do = xe - mean, xo - mean
    rstd = 1.0 / tl.sqrt((tl.sum(de * de, axis=0) + tl.sum(do * do, axis=0)) / HEAD_DIM + eps)
    w_ptr = tl.where(which == 0, wq_ptr, wk_ptr)
    b_ptr = tl.where(which == 0, bq_ptr, bk_ptr)
    ye = de * rstd * tl.load(w_ptr + 2 * i).to(tl.float32) + tl.load(b_ptr + 2 * i).to(tl.float32)
    yo = do * rstd * tl.load(w_ptr + 2 * i + 1).to(tl.float32) + tl.load(b_ptr + 2 * i + 1).to(tl.float32)
    out = tl.where(which == 0, q_out, k_out)
    # the native path rounds the norm's output to the stream dtype before rotating; so do we
    ye = ye.to(out.dtype.element_ty).to(tl.float32)
    yo = yo.to(out.dtype.element_ty).to(tl.float32)
    if HAS_ROPE:
        if n >= n_text:
            t = (n - n_text) * HEAD_DIM
            ce, co = tl.load(cos_ptr + t + 2 * i), tl.load(cos_ptr + t + 2 * i + 1)
            se, so = tl.load(sin_ptr + t + 2 * i), tl.load(sin_ptr + t + 2 * i + 1)
            ye, yo = ye * ce - yo * se, yo * co + ye * so
    dst = out + ((b * H + h) * N + n) * HEAD_DIM
    tl.store(dst + 2 * i, ye.to(out.dtype.element_ty))
    tl.store(dst + 2 * i + 1, yo.to(out.dtype.element_ty))


@torch.library.custom_op("cogrt::qk_norm_rope", mutates_args=())
def qk_norm_rope(qkv: torch.Tensor, heads: int, n_text: int, wq: torch.Tensor, bq: torch.Tensor,
                 wk: torch.Tensor, bk: torch.Tensor, cos: torch.Tensor | None, sin: torch.Tensor | None,
                 eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """qkv (B, N, 3·H·d) -> q, k (B, H, N, d): LayerNorm per head, RoPE tables (N - n_text, d) on the video part."""
    B, N, F3 = qkv.shape
    d = F3 // (3 * heads)
    if not qkv.is_contiguous() or F3 != 3 * heads * d or d % 2 or d & (d - 1):
        raise ValueError(f"qkv must be contiguous (B, N, 3*{heads}*d) with d a power of two, got {tuple(qkv.shape)}")
    rope = cos is not None
    if rope and (cos.shape != (N - n_text, d) or sin.shape != cos.shape or cos.dtype != torch.float32
                 or not (cos.is_contiguous() and sin.is_contiguous())):
        raise ValueError(f"RoPE tables must be contiguous fp32 ({N - n_text}, {d}), got {tuple(cos.shape)}")
    q, k = alloc.empty((B, heads, N, d), qkv), alloc.empty((B, heads, N, d), qkv)
    _qk_norm_rope_kernel[(B * N, heads, 2)](qkv, wq, bq, wk, bk, cos if rope else qkv, sin if rope else qkv, q, k,
                                            N, n_text, heads, eps, HEAD_DIM=d, HAS_ROPE=rope)
    return q, k


@qk_norm_rope.register_fake
def _(qkv, heads, n_text, wq, bq, wk, bk, cos, sin, eps):
    B, N, F3 = qkv.shape
    d = F3 // (3 * heads)
    return qkv.new_empty(B, heads, N, d), qkv.new_empty(B, heads, N, d)


def qk_norm_rope_reference(qkv, heads, n_text, wq, bq, wk, bk, cos, sin, eps):
    """The engine block's native prologue (norm, then in-place RoPE on the video tokens)."""
    from engine.model import apply_rope
    B, N, _ = qkv.shape
    q, k, _ = qkv.view(B, N, 3, heads, -1).permute(2, 0, 3, 1, 4)  # 3 x (B, H, N, d)
    d = q.shape[-1]
    q = torch.nn.functional.layer_norm(q.float(), (d,), wq.float(), bq.float(), eps).to(qkv.dtype)
    k = torch.nn.functional.layer_norm(k.float(), (d,), wk.float(), bk.float(), eps).to(qkv.dtype)
    if cos is not None:
        q[:, :, n_text:] = apply_rope(q[:, :, n_text:], cos, sin)
        k[:, :, n_text:] = apply_rope(k[:, :, n_text:], cos, sin)
    return q.contiguous(), k.contiguous()
