"""Flash-attention forward in Triton for CogVideoX's joint [text; video] sequence: non-causal, no mask,
head_dim 64 (any power of two up to 128), N not a multiple of the block size. The reference is SDPA's
math backend. Forward-only: training keeps SDPA.

Importing this module registers the `triton` backend in `engine.attention`.
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from engine import attention

from . import alloc

_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"


@triton.jit
def _flash_fwd_kernel(q_ptr, k_ptr, v_ptr, o_ptr, N, H, qk_scale,
                      sqb, sqh, sqn, skb, skh, skn, svb, svh, svn, sob, soh, son,
                      HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    pid_m = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // H
    h = bh % H
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    row_ok = offs_m < N
    q = tl.load(q_ptr + b * sqb + h * sqh + offs_m[:, None] * sqn + offs_d[None, :], mask=row_ok[:, None],
                other=0.0)
    m_i = tl.full((BLOCK_M,), float("-inf"), tl.float32)
    l_i = tl.zeros((BLOCK_M,), tl.float32)
    acc = tl.zeros((BLOCK_M, HEAD_DIM), tl.float32)
    start = 0
    while start < N:  # not range(0, N, ...): the interpreter cannot index with a runtime scalar under NumPy 2
        offs_n = start + tl.arange(0, BLOCK_N)
        col_ok = offs_n < N
        kt = tl.load(k_ptr + b * skb + h * skh + offs_n[None, :] * skn + offs_d[:, None], mask=col_ok[None, :],
                     other=0.0)  # (HEAD_DIM, BLOCK_N)
        s = tl.dot(q, kt) * qk_scale  # log2 domain: qk_scale folds in 1/ln 2
        s = tl.where(col_ok[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        p = tl.exp2(s - m_new[:, None])
        alpha = tl.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, axis=1)
        v = tl.load(v_ptr + b * svb + h * svh + offs_n[:, None] * svn + offs_d[None, :], mask=col_ok[:, None],
                    other=0.0)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
        m_i = m_new
        start += BLOCK_N
    acc = acc / l_i[:, None]
    tl.store(o_ptr + b * sob + h * soh + offs_m[:, None] * son + offs_d[None, :], acc.to(o_ptr.dtype.element_ty),
             mask=row_ok[:, None])


@torch.library.custom_op("cogrt::flash_attention", mutates_args=())
def flash_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """softmax(q kᵀ/√d) v for q, k, v (B, H, N, d), any strides with a unit last stride; out (B, H, N, d)."""
    B, H, N, d = q.shape
    if k.shape != q.shape or v.shape != q.shape or d & (d - 1) or d > 128:
        raise ValueError(f"q, k, v must share a (B, H, N, d) shape with d a power of two <= 128; "
                         f"got {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    if q.dtype != k.dtype or q.dtype != v.dtype:
        raise ValueError(f"q, k, v dtypes differ: {q.dtype}, {k.dtype}, {v.dtype}")
    q, k, v = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, k, v))
    o = alloc.empty((B, H, N, d), q)
    # block sizes: 128 x 64 tiles for Hopper (to be tuned with bench/kernels.py); small ones keep the
    # interpreter quick
    bm, bn = (32, 32) if _INTERPRET else (128, 64)
    grid = (triton.cdiv(N, bm), B * H)
    _flash_fwd_kernel[grid](q, k, v, o, N, H, d ** -0.5 * 1.4426950408889634,
                            *q.stride()[:3], *k.stride()[:3], *v.stride()[:3], *o.stride()[:3],
                            HEAD_DIM=d, BLOCK_M=bm, BLOCK_N=bn)
    return o


@flash_attention.register_fake
def _(q, k, v):
    return torch.empty_like(q)


@attention.register("triton")
def triton_backend(q, k, v):
    return flash_attention(q, k, v)
