"""The fused QK prologue: per-head LayerNorm of q and k, then 3D RoPE on the video tokens, in one pass.

It reads q and k straight out of the fused qkv projection (B, N, 3·H·d) and writes them in the (B, H, N, d)
layout attention wants. The native path makes about four passes over q and k: the two norms, the fp32 rotation
of the video part, and the copies back into place. The text tokens (the first `n_text`) are not rotated.
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
# with BLOCK_T = 2, the best of bench/kernels.py's sweep (bench/RESULTS.md, "Kernels: attention, fused norms and
# the 5B step per backend")
NUM_WARPS = 8


@triton.jit
def _qk_norm_rope_kernel(qkv_ptr, wq_ptr, bq_ptr, wk_ptr, bk_ptr, cos_ptr, sin_ptr, q_out, k_out, N, n_text, eps,
                         H: tl.constexpr, HP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_T: tl.constexpr,
                         HAS_ROPE: tl.constexpr):
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
    tl.store(out + at, y.to(out.dtype.element_ty), mask=ok)


@torch.library.custom_op("cogrt::qk_norm_rope", mutates_args=())
def qk_norm_rope(qkv: torch.Tensor, heads: int, n_text: int, wq: torch.Tensor, bq: torch.Tensor,
                 wk: torch.Tensor, bk: torch.Tensor, cos: torch.Tensor | None, sin: torch.Tensor | None,
                 eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """qkv (B, N, 3·H·d) -> q, k (B, H, N, d): LayerNorm per head, RoPE tables (N - n_text, d) on the video part."""
    return launch(qkv, heads, n_text, wq, bq, wk, bk, cos, sin, eps)


def launch(qkv, heads, n_text, wq, bq, wk, bk, cos, sin, eps, block_t: int = BLOCK_T, num_warps: int = NUM_WARPS):
    """qk_norm_rope with its launch settings given (bench/kernels.py sweeps them)."""
    B, N, _ = qkv.shape
    d = _check(qkv, heads, n_text, cos, sin)
    q, k = alloc.empty((B, heads, N, d), qkv), alloc.empty((B, heads, N, d), qkv)
    rope = cos is not None
    _qk_norm_rope_kernel[(triton.cdiv(N, block_t), B, 2)](
        qkv, wq, bq, wk, bk, cos if rope else qkv, sin if rope else qkv, q, k, N, n_text, eps, H=heads,
        HP=triton.next_power_of_2(heads), HEAD_DIM=d, BLOCK_T=block_t, HAS_ROPE=rope, num_warps=num_warps)
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


@qk_norm_rope.register_fake
def _(qkv, heads, n_text, wq, bq, wk, bk, cos, sin, eps):
    B, N, F3 = qkv.shape
    d = F3 // (3 * heads)
    return qkv.new_empty(B, heads, N, d), qkv.new_empty(B, heads, N, d)


def qk_norm_rope_reference(qkv, heads, n_text, wq, bq, wk, bk, cos, sin, eps):
    """The block's native prologue: norm, then RoPE on the video tokens (interleaved pairs, in fp32)."""
    B, N, _ = qkv.shape
    q, k, _ = qkv.view(B, N, 3, heads, -1).permute(2, 0, 3, 1, 4)  # 3 x (B, H, N, d)
    d = q.shape[-1]
    q = torch.nn.functional.layer_norm(q.float(), (d,), wq.float(), bq.float(), eps).to(qkv.dtype)
    k = torch.nn.functional.layer_norm(k.float(), (d,), wk.float(), bk.float(), eps).to(qkv.dtype)
    if cos is not None:
        q[:, :, n_text:] = rope_reference(q[:, :, n_text:], cos, sin)
        k[:, :, n_text:] = rope_reference(k[:, :, n_text:], cos, sin)
    return q.contiguous(), k.contiguous()


def rope_reference(x, cos, sin):
    """x (B, H, S, d) with each pair (x[2i], x[2i+1]) rotated by the tables (S, d)."""
    xf = x.float()
    pairs = xf.unflatten(-1, (-1, 2))  # (B, H, S, d/2, 2)
    rotated = torch.stack([-pairs[..., 1], pairs[..., 0]], dim=-1).flatten(-2)  # (B, H, S, d)
    return (xf * cos + rotated * sin).to(x.dtype)
