"""The fused QK prologue: per-head LayerNorm of q and k, then 3D RoPE on the video tokens, in one pass.

It reads q and k straight out of the fused qkv projection (B, N, 3·H·d) and writes them in the (B, H, N, d)
layout attention wants. The native path makes about four passes over q and k: the two norms, the fp32 rotation
of the video part, and the copies back into place. The text tokens (the first `n_text`) are not rotated.
`qk_norm_rope_q8` also quantizes q to int8 in the same pass, for the int8 attention kernel. K is left alone:
its smoothing subtracts its mean over all tokens, which no single pass over a few tokens knows.
Forward-only (inference); training keeps the native path.
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from . import alloc


# tokens per program; each program takes every head of q or of k for its tokens, so that it reads its RoPE
# tables once, not once per head
BLOCK_T = 16 if os.environ.get("TRITON_INTERPRET") == "1" else 2  # the interpreter pays per program
NUM_WARPS = 8  # with BLOCK_T = 2: 93% of copy bandwidth on the H100 (bench/kernels.py --sweep)


@triton.jit
def _qk_norm_rope_kernel(qkv_ptr, wq_ptr, bq_ptr, wk_ptr, bk_ptr, cos_ptr, sin_ptr, q_out, k_out, q8_out, qs_out,
                         N, n_text, eps, H: tl.constexpr, HP: tl.constexpr, HEAD_DIM: tl.constexpr,
                         BLOCK_T: tl.constexpr, HAS_ROPE: tl.constexpr, QUANT_Q: tl.constexpr):
    t = tl.program_id(0)  # a tile of BLOCK_T tokens of batch row b
    b = tl.program_id(1)
    which = tl.program_id(2)  # 0: q, 1: k
    n = t * BLOCK_T + tl.arange(0, BLOCK_T)
    hh = tl.arange(0, HP)  # heads, padded to a power of two
    j = tl.arange(0, HEAD_DIM)
    ok = (n < N)[:, None, None] & (hh < H)[None, :, None]  # (T, HP, 1)
    # qkv row layout: [q heads | k heads | v heads], each head HEAD_DIM wide
    src = qkv_ptr + ((b * N + n) * 3 * H * HEAD_DIM)[:, None, None] + which * H * HEAD_DIM \
        + (hh * HEAD_DIM)[None, :, None] + j[None, None, :]
    x = tl.load(src, mask=ok, other=0.0).to(tl.float32)  # (T, HP, d)
    mean = tl.sum(x, axis=2) / HEAD_DIM
    diff = x - mean[:, :, None]
    rstd = 1.0 / tl.sqrt(tl.sum(diff * diff, axis=2) / HEAD_DIM + eps)
    w = tl.load(tl.where(which == 0, wq_ptr, wk_ptr) + j).to(tl.float32)
    bias = tl.load(tl.where(which == 0, bq_ptr, bk_ptr) + j).to(tl.float32)
    out = tl.where(which == 0, q_out, k_out)
    # the native path rounds the norm's output to the stream dtype before rotating; so do we
    y = (diff * rstd[:, :, None] * w[None, None, :] + bias[None, None, :]).to(out.dtype.element_ty).to(tl.float32)
    if HAS_ROPE:  # the interleaved pairs (y[2i], y[2i+1]) rotate; text rows (n < n_text) keep cos 1, sin 0
        vid = ((n >= n_text) & (n < N))[:, None]
        tab = (n - n_text)[:, None] * HEAD_DIM + j[None, :]  # (T, d)
        cs = tl.load(cos_ptr + tab, mask=vid, other=1.0)[:, None, :]
        sn = tl.load(sin_ptr + tab, mask=vid, other=0.0)[:, None, :]
        ye, yo = tl.split(y.reshape(BLOCK_T, HP, HEAD_DIM // 2, 2))  # (T, HP, d/2) each
        y = y * cs + tl.join(-yo, ye).reshape(BLOCK_T, HP, HEAD_DIM) * sn  # (-y[2i+1], y[2i]) pairs
    at = ((b * H + hh)[None, :, None] * N + n[:, None, None]) * HEAD_DIM + j[None, None, :]  # in (B, H, N, d)
    y = y.to(out.dtype.element_ty)
    if QUANT_Q:
        if which == 0:
            # q as the int8 attention kernel takes it: one scale per token and head, from the values the unfused
            # path would store (y, rounded to the stream dtype), so no tile of rows is needed
            yf = y.to(tl.float32)
            scale = tl.maximum(tl.max(tl.abs(yf), 2), 1e-12) / 127.0  # (T, HP)
            z = yf / scale[:, :, None]
            tl.store(q8_out + at, (z + tl.where(z >= 0, 0.5, -0.5)).to(tl.int8), mask=ok)  # half away from 0
            tl.store(qs_out + (b * H + hh)[None, :] * N + n[:, None], scale,
                     mask=(n < N)[:, None] & (hh < H)[None, :])
        else:
            tl.store(out + at, y, mask=ok)
    else:
        tl.store(out + at, y, mask=ok)


@torch.library.custom_op("cogrt::qk_norm_rope", mutates_args=())
def qk_norm_rope(qkv: torch.Tensor, heads: int, n_text: int, wq: torch.Tensor, bq: torch.Tensor,
                 wk: torch.Tensor, bk: torch.Tensor, cos: torch.Tensor | None, sin: torch.Tensor | None,
                 eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """qkv (B, N, 3·H·d) -> q, k (B, H, N, d): LayerNorm per head, RoPE tables (N - n_text, d) on the video part."""
    B, N, _ = qkv.shape
    d = _check(qkv, heads, n_text, cos, sin)
    q, k = alloc.empty((B, heads, N, d), qkv), alloc.empty((B, heads, N, d), qkv)
    _launch(qkv, heads, n_text, wq, bq, wk, bk, cos, sin, eps, q, k, None, None)
    return q, k


def _check(qkv, heads, n_text, cos, sin) -> int:
    """-> the head dim d."""
    B, N, F3 = qkv.shape
    d = F3 // (3 * heads)
    if not qkv.is_contiguous() or F3 != 3 * heads * d or d % 2 or d & (d - 1):
        raise ValueError(f"qkv must be contiguous (B, N, 3*{heads}*d) with d a power of two, got {tuple(qkv.shape)}")
    if cos is not None and (cos.shape != (N - n_text, d) or sin.shape != cos.shape or cos.dtype != torch.float32
                            or not (cos.is_contiguous() and sin.is_contiguous())):
        raise ValueError(f"RoPE tables must be contiguous fp32 ({N - n_text}, {d}), got {tuple(cos.shape)}")
    return d


def _launch(qkv, heads, n_text, wq, bq, wk, bk, cos, sin, eps, q, k, q8, qs):
    B, N, F3 = qkv.shape
    rope = cos is not None
    _qk_norm_rope_kernel[(triton.cdiv(N, BLOCK_T), B, 2)](
        qkv, wq, bq, wk, bk, cos if rope else qkv, sin if rope else qkv, q if q is not None else k, k,
        q8 if q8 is not None else k, qs if qs is not None else k, N, n_text, eps, H=heads,
        HP=triton.next_power_of_2(heads), HEAD_DIM=F3 // (3 * heads), BLOCK_T=BLOCK_T, HAS_ROPE=rope,
        QUANT_Q=q8 is not None, num_warps=NUM_WARPS)


@torch.library.custom_op("cogrt::qk_norm_rope_q8", mutates_args=())
def qk_norm_rope_q8(qkv: torch.Tensor, heads: int, n_text: int, wq: torch.Tensor, bq: torch.Tensor,
                    wk: torch.Tensor, bk: torch.Tensor, cos: torch.Tensor | None, sin: torch.Tensor | None,
                    eps: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """qk_norm_rope with q quantized in the same pass, for the int8 attention kernel: -> q8 (B, H, N, d) int8,
    q_scale (B, H, N) fp32 (q ≈ q8 · q_scale, one scale per token and head), k (B, H, N, d). This saves the
    attention's own pass over q: a write of q in bf16, its read, and the int8 write."""
    B, N, _ = qkv.shape
    d = _check(qkv, heads, n_text, cos, sin)
    k = alloc.empty((B, heads, N, d), qkv)
    q8 = alloc.empty((B, heads, N, d), qkv, torch.int8)
    qs = alloc.empty((B, heads, N), qkv, torch.float32)
    _launch(qkv, heads, n_text, wq, bq, wk, bk, cos, sin, eps, None, k, q8, qs)
    return q8, qs, k


@qk_norm_rope_q8.register_fake
def _(qkv, heads, n_text, wq, bq, wk, bk, cos, sin, eps):
    B, N, F3 = qkv.shape
    d = F3 // (3 * heads)
    return (qkv.new_empty(B, heads, N, d, dtype=torch.int8), qkv.new_empty(B, heads, N, dtype=torch.float32),
            qkv.new_empty(B, heads, N, d))


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
