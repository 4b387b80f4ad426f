"""Flash-attention forward in Triton for CogVideoX's joint [text; video] sequence: non-causal, no mask,
head_dim a power of two up to 128, N not a multiple of the block size. Two precisions share one kernel:

- `flash_attention(q, k, v)`: bf16/fp16 in, fp32 accumulation; the `triton` backend.
- `sage_attention(q, k, v)`: low precision, as SageAttention does it; the `triton-fp8` backend.
  - K is smoothed: its mean over tokens is subtracted, which leaves softmax unchanged (it shifts each row
    of q·kᵀ by a constant) and takes the large per-channel offset of trained models out of the range.
  - Q and K are quantized with one scale per tile of rows, to int8 by default. e4m3 is the other choice
    (`qk="fp8"`), but with 3 mantissa bits its score error was 3x int8's on every input we tried, while
    Hopper runs both at the same tensor-core rate (bench/RESULTS.md has the table).
  - V is smoothed the same way (its mean is added back after, since each softmax row sums to 1) and
    quantized to e4m3 with one scale per channel. P comes out of the exponential scaled by 448 (e4m3's
    largest value), so that small probabilities keep their precision. P·V runs on the fp8 tensor cores.

References: SDPA's math backend, and `sage_attention_reference`, the same rounding in PyTorch.
Forward-only: training keeps SDPA. The engine registers these as its `triton` and `triton-fp8` attention backends.

q, k, v go in through TMA tensor descriptors over their 4D (B, H, N, d) views, so strided views (v straight
out of the fused qkv) need no copy, and rows past N read as zeros instead of the next head's rows.
N is a compile-time constant: the loop bounds are then known, and a serving shape compiles once.
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl
from triton.tools.tensor_descriptor import TensorDescriptor


from . import alloc
from .quant import e4m3

_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
_LOG2E = 1.4426950408889634
FP8 = torch.float8_e4m3fn
FP8_MAX = 448.0  # largest finite e4m3 value

# (BLOCK_M, BLOCK_N, num_warps, num_stages, SPLIT) by head dim, chosen by the sweeps of bench/kernels.py
# (bench/RESULTS.md, "Split query tiles, and the attention table on the H200"); the interpreter gets small tiles
# so that CI stays quick. SPLIT = 2 gives each program two halves of its query tile that share every key and value
# load, so that one half's exponentials can overlap the other's asynchronous matmul (FlashAttention-3's overlap,
# within a warpgroup). It wins for bf16 below LONG tokens and loses above it and for fp8.
CONFIGS = {64: (128, 64, 4, 3, 2)}
CONFIGS_LONG = {64: (128, 128, 4, 3, 1)}  # bf16 at N >= LONG
LONG = 32768
CONFIGS_FP8 = {64: (128, 128, 4, 3, 1)}
_DEFAULT_CONFIG = (64, 64, 4, 2, 1)  # head dims not swept yet
_INTERPRET_CONFIG = (32, 32, 4, 1, 2)  # split; the tests that set SPLIT = 1 cover the whole tile


@triton.jit
def _load_kv(desc_k, desc_v, b, h, start, HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr, LOWP: tl.constexpr):
    """One BLOCK_N-wide tile of keys and values. In LOWP, V is stored transposed (B, H, d, N_pad): fp8 tensor
    cores want both operands K-major on Hopper."""
    k = desc_k.load([b, h, start, 0]).reshape(BLOCK_N, HEAD_DIM)
    if LOWP:
        v = desc_v.load([b, h, 0, start]).reshape(HEAD_DIM, BLOCK_N)
    else:
        v = desc_v.load([b, h, start, 0]).reshape(BLOCK_N, HEAD_DIM)
    return k, v


@triton.jit
def _update(acc, l_i, m_i, q, k, v, start, scale, N: tl.constexpr, BLOCK_N: tl.constexpr, LOWP: tl.constexpr,
            MASKED: tl.constexpr, EXACT: tl.constexpr, PREC: tl.constexpr):
    """One key tile folded into the running softmax (log2 domain) of one tile of queries. `scale` is positive, so
    the row's max of s·scale is its max of s, times scale."""
    s = tl.dot(q, k.T, input_precision=PREC).to(tl.float32)  # int8 scores come out as int32
    if MASKED:  # the last, partial tile: the rows past N read as zeros and must not count
        s = tl.where((start + tl.arange(0, BLOCK_N))[None, :] < N, s * scale, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        x = s - m_new[:, None]
    else:
        m_new = tl.maximum(m_i, tl.max(s, 1) * scale)
        x = s * scale - m_new[:, None]  # one FMA per score
    if LOWP:  # P·448 straight out of the exponential: e4m3's whole range, and 448 cancels in acc / l
        x = x + 8.807354922057604  # log2(448)
    p = tl.math.exp2(x)
    alpha = tl.math.exp2(m_i - m_new)
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None]
    if LOWP:
        acc = tl.dot(e4m3(p, EXACT), v.T, acc)
    else:
        acc = tl.dot(p.to(v.dtype), v, acc, input_precision=PREC)
    return acc, l_i, m_new


@triton.jit
def _key_tile(acc0, l0, m0, acc1, l1, m1, q0, q1, desc_k, desc_v, b, h, start, scale, ks_ptr,
              N: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr, LOWP: tl.constexpr,
              MASKED: tl.constexpr, SPLIT: tl.constexpr, EXACT: tl.constexpr, PREC: tl.constexpr):
    """One key tile for the program's queries: one tile of them, or two halves (SPLIT) that share the loads."""
    k, v = _load_kv(desc_k, desc_v, b, h, start, HEAD_DIM, BLOCK_N, LOWP)
    if LOWP:
        scale = scale * tl.load(ks_ptr + start // BLOCK_N)  # this key tile's dequantization scale
    acc0, l0, m0 = _update(acc0, l0, m0, q0, k, v, start, scale, N, BLOCK_N, LOWP, MASKED, EXACT, PREC)
    if SPLIT == 2:
        acc1, l1, m1 = _update(acc1, l1, m1, q1, k, v, start, scale, N, BLOCK_N, LOWP, MASKED, EXACT, PREC)
    return acc0, l0, m0, acc1, l1, m1


@triton.jit
def _store(desc_o, acc, l_i, b, h, bh, row, vs_ptr, vm_ptr, HEAD_DIM: tl.constexpr, ROWS: tl.constexpr,
           LOWP: tl.constexpr):
    acc = acc / l_i[:, None]
    if LOWP:  # undo V's per-channel scales, then add back V's mean
        cols = bh * HEAD_DIM + tl.arange(0, HEAD_DIM)
        acc = acc * tl.load(vs_ptr + cols)[None, :] + tl.load(vm_ptr + cols)[None, :]
    desc_o.store([b, h, row, 0], acc.to(desc_o.dtype).reshape(1, 1, ROWS, HEAD_DIM))


@triton.jit
def _attn_fwd_kernel(desc_q, desc_k, desc_v, desc_o, qs_ptr, ks_ptr, vs_ptr, vm_ptr, H, qk_scale,
                     N: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                     LOWP: tl.constexpr, SPLIT: tl.constexpr, EXACT: tl.constexpr, PREC: tl.constexpr):
    pid_m = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // H
    h = bh % H
    HALF: tl.constexpr = BLOCK_M // SPLIT
    row = pid_m * BLOCK_M
    q0 = desc_q.load([b, h, row, 0]).reshape(HALF, HEAD_DIM)
    q1 = q0  # the second half's queries, with SPLIT; otherwise unused, and dropped by the compiler
    if SPLIT == 2:
        q1 = desc_q.load([b, h, row + HALF, 0]).reshape(HALF, HEAD_DIM)
    scale = qk_scale
    if LOWP:  # one q scale per tile of BLOCK_M rows, which both halves share
        n_kt: tl.constexpr = (N + BLOCK_N - 1) // BLOCK_N
        n_qt: tl.constexpr = (N + BLOCK_M - 1) // BLOCK_M
        ks_ptr = ks_ptr + bh * n_kt
        scale = qk_scale * tl.load(qs_ptr + bh * n_qt + pid_m)
    m0 = tl.full((HALF,), float("-inf"), tl.float32)
    l0 = tl.zeros((HALF,), tl.float32)
    acc0 = tl.zeros((HALF, HEAD_DIM), tl.float32)
    m1, l1, acc1 = m0, l0, acc0
    FULL: tl.constexpr = N // BLOCK_N * BLOCK_N
    for start in tl.range(0, FULL, BLOCK_N):
        acc0, l0, m0, acc1, l1, m1 = _key_tile(acc0, l0, m0, acc1, l1, m1, q0, q1, desc_k, desc_v, b, h, start,
                                               scale, ks_ptr, N, HEAD_DIM, BLOCK_N, LOWP, False, SPLIT, EXACT, PREC)
    if FULL < N:
        acc0, l0, m0, acc1, l1, m1 = _key_tile(acc0, l0, m0, acc1, l1, m1, q0, q1, desc_k, desc_v, b, h, FULL,
                                               scale, ks_ptr, N, HEAD_DIM, BLOCK_N, LOWP, True, SPLIT, EXACT, PREC)
    _store(desc_o, acc0, l0, b, h, bh, row, vs_ptr, vm_ptr, HEAD_DIM, HALF, LOWP)
    if SPLIT == 2:
        _store(desc_o, acc1, l1, b, h, bh, row + HALF, vs_ptr, vm_ptr, HEAD_DIM, HALF, LOWP)


def _config(d: int, fp8: bool, config=None, n: int = 0):
    """(BLOCK_M, BLOCK_N, num_warps, num_stages, SPLIT) for head dim d and sequence length n; a given config may
    leave SPLIT out (1)."""
    if config is not None:
        return (*config, 1)[:5]
    if _INTERPRET:
        return _INTERPRET_CONFIG
    return (CONFIGS_FP8 if fp8 else CONFIGS_LONG if n >= LONG else CONFIGS).get(d, _DEFAULT_CONFIG)


def _switches(dtype: torch.dtype) -> dict:
    """The interpreter rounds e4m3 by hand (EXACT); fp32 inputs (the tests) get true fp32 matmuls, not TF32."""
    return dict(EXACT=_INTERPRET, PREC="ieee" if dtype == torch.float32 else "tf32")


def _desc(t: torch.Tensor, rows: int, cols: int) -> TensorDescriptor:
    """A TMA descriptor over a 4D tensor, one (rows, cols) tile of one (batch, head) per load."""
    return TensorDescriptor(t, list(t.shape), list(t.stride()), [1, 1, rows, cols])


def _check(q, k, v):
    B, H, N, d = q.shape
    if k.shape != q.shape or v.shape != q.shape or d & (d - 1) or not 16 <= d <= 128:
        raise ValueError(f"q, k, v must share a (B, H, N, d) shape with d a power of two in [16, 128]; "
                         f"got {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    if q.dtype != k.dtype or q.dtype != v.dtype or q.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise ValueError(f"q, k, v must share a float dtype; got {q.dtype}, {k.dtype}, {v.dtype}")


def _aligned(t: torch.Tensor) -> torch.Tensor:
    """TMA needs a unit last stride and 16-byte aligned other strides and base."""
    ok = t.stride(-1) == 1 and all(s * t.element_size() % 16 == 0 for s in t.stride()[:-1]) \
        and t.data_ptr() % 16 == 0
    return t if ok else t.contiguous()


@torch.library.custom_op("cogrt::flash_attention", mutates_args=())
def flash_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """softmax(q kᵀ/√d) v for q, k, v (B, H, N, d), any 16-byte aligned strides; out (B, H, N, d)."""
    return _flash(q, k, v)


def _flash(q, k, v, config=None):
    _check(q, k, v)
    B, H, N, d = q.shape
    q, k, v = _aligned(q), _aligned(k), _aligned(v)
    o = alloc.empty((B, H, N, d), q)
    bm, bn, warps, stages, split = _config(d, False, config, N)
    half = bm // split  # the rows of one query load and one store
    _attn_fwd_kernel[(triton.cdiv(N, bm), B * H)](
        _desc(q, half, d), _desc(k, bn, d), _desc(v, bn, d), _desc(o, half, d), q, q, q, q, H, d ** -0.5 * _LOG2E,
        N=N, HEAD_DIM=d, BLOCK_M=bm, BLOCK_N=bn, LOWP=False, SPLIT=split, **_switches(q.dtype),
        num_warps=warps, num_stages=stages)
    return o


@flash_attention.register_fake
def _(q, k, v):
    return torch.empty_like(q)


# ---------------------------------------------------------------------------------------------------------
# Low precision: quantization passes, then the same kernel with LOWP


@triton.jit
def _head_tile(x_ptr, N, sxb, sxh, sxn, H, HEAD_DIM: tl.constexpr, BLOCK: tl.constexpr):
    """Program (t, b·H + h)'s tile: BLOCK rows of head h of x (B, H, N, d) in fp32, zeros past N."""
    t = tl.program_id(0)
    bh = tl.program_id(1)
    rows = t * BLOCK + tl.arange(0, BLOCK)
    cols = tl.arange(0, HEAD_DIM)
    ok = rows[:, None] < N
    x = tl.load(x_ptr + (bh // H) * sxb + (bh % H) * sxh + rows[:, None] * sxn + cols[None, :], mask=ok,
                other=0.0).to(tl.float32)
    return x, t, bh, rows, cols, ok


@triton.jit
def _quant_rows_kernel(x_ptr, mean_ptr, out_ptr, scale_ptr, N, sxb, sxh, sxn, H, HEAD_DIM: tl.constexpr,
                       BLOCK: tl.constexpr, HAS_MEAN: tl.constexpr, INT8: tl.constexpr, EXACT: tl.constexpr):
    """One tile of BLOCK rows of one head -> int8 (or e4m3) with one scale; the mean is subtracted first."""
    x, t, bh, rows, cols, ok = _head_tile(x_ptr, N, sxb, sxh, sxn, H, HEAD_DIM, BLOCK)
    if HAS_MEAN:
        x = tl.where(ok, x - tl.load(mean_ptr + bh * HEAD_DIM + cols)[None, :], 0.0)
    amax = tl.maximum(tl.max(tl.max(tl.abs(x), 1), 0), 1e-12)
    if INT8:
        scale = amax / 127.0
        y = x / scale
        y = (y + tl.where(y >= 0, 0.5, -0.5)).to(tl.int8)  # round half away from zero
    else:
        scale = amax / 448.0
        y = e4m3(x / scale, EXACT)
    tl.store(out_ptr + (bh * N + rows[:, None]) * HEAD_DIM + cols[None, :], y, mask=ok)
    tl.store(scale_ptr + bh * tl.num_programs(0) + t, scale)


@triton.jit
def _quant_v_kernel(v_ptr, mean_ptr, scale_ptr, out_ptr, N, N_PAD, svb, svh, svn, H,
                    HEAD_DIM: tl.constexpr, BLOCK: tl.constexpr, EXACT: tl.constexpr):
    """(V - its mean) / its per-channel scale -> e4m3, written transposed (B, H, d, N_pad), zeros past N."""
    v, t, bh, rows, cols, ok = _head_tile(v_ptr, N, svb, svh, svn, H, HEAD_DIM, BLOCK)
    v = tl.where(ok, (v - tl.load(mean_ptr + bh * HEAD_DIM + cols)[None, :])
                 / tl.load(scale_ptr + bh * HEAD_DIM + cols)[None, :], 0.0)
    tl.store(out_ptr + (bh * HEAD_DIM + cols[None, :]) * N_PAD + rows[:, None], e4m3(v, EXACT))


def _quant_rows(x, mean, blk: int, int8: bool):
    """x (B, H, N, d) -> x8 and one scale per tile of blk rows (B, H, ⌈N/blk⌉); `mean` (B, H, d), if given, is
    subtracted first."""
    B, H, N, d = x.shape
    x8 = alloc.empty((B, H, N, d), x, torch.int8 if int8 else FP8)
    s = alloc.empty((B, H, triton.cdiv(N, blk)), x, torch.float32)
    _quant_rows_kernel[(triton.cdiv(N, blk), B * H)](
        x, mean if mean is not None else x, x8, s, N, *x.stride()[:3], H, HEAD_DIM=d, BLOCK=blk,
        HAS_MEAN=mean is not None, INT8=int8, EXACT=_INTERPRET)
    return x8, s


def quantize_kv(k, v, block_n: int, qk: str = "int8"):
    """-> k8 (smoothed), k_scale (B, H, ⌈N/block_n⌉), vt8 (B, H, d, N_pad), v_scale (B, H, d), v_mean (B, H, d);
    scales and means in fp32, k8 in int8 (or e4m3)."""
    B, H, N, d = k.shape
    k_mean = torch.mean(k, dim=2, dtype=torch.float32).contiguous()  # (B, H, d)
    v_mean = torch.mean(v, dim=2, dtype=torch.float32)  # (B, H, d)
    # the smoothed V's absmax per channel: max(v) - mean or mean - min(v)
    v_scale = (torch.maximum(v.amax(dim=2).float() - v_mean, v_mean - v.amin(dim=2).float()) / FP8_MAX
               ).clamp_min(1e-12).contiguous()
    v_mean = v_mean.contiguous()
    k8, ks = _quant_rows(k, k_mean, block_n, qk == "int8")
    n_pad = triton.cdiv(N, block_n) * block_n
    vt8 = alloc.empty((B, H, d, n_pad), v, FP8)
    _quant_v_kernel[(n_pad // block_n, B * H)](v, v_mean, v_scale, vt8, N, n_pad, *v.stride()[:3], H, HEAD_DIM=d,
                                               BLOCK=block_n, EXACT=_INTERPRET)
    return k8, ks, vt8, v_scale, v_mean


def quantize_qkv(q, k, v, block_m: int, block_n: int, qk: str = "int8"):
    """-> q8, q_scale (B, H, ⌈N/block_m⌉), then quantize_kv's five."""
    return (*_quant_rows(q, None, block_m, qk == "int8"), *quantize_kv(k, v, block_n, qk))


@torch.library.custom_op("cogrt::sage_attention", mutates_args=())
def sage_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, qk: str = "int8") -> torch.Tensor:
    """Low-precision softmax(q kᵀ/√d) v (see the module docstring) for q, k, v (B, H, N, d); out in q's dtype."""
    return _sage(q, k, v, qk)


def _sage(q, k, v, qk="int8", config=None):
    _check(q, k, v)
    if qk not in ("int8", "fp8"):
        raise ValueError(f"qk must be 'int8' or 'fp8', got {qk!r}")
    B, H, N, d = q.shape
    cfg = _config(d, True, config, N)
    q8, qs, k8, ks, vt8, vs, vm = quantize_qkv(q, k, v, cfg[0], cfg[1], qk)
    bm, bn, warps, stages, split = cfg
    o = alloc.empty((B, H, N, d), q)
    half = bm // split
    _attn_fwd_kernel[(triton.cdiv(N, bm), B * H)](
        _desc(q8, half, d), _desc(k8, bn, d), _desc(vt8, d, bn), _desc(o, half, d), qs, ks, vs, vm, H,
        d ** -0.5 * _LOG2E, N=N, HEAD_DIM=d, BLOCK_M=bm, BLOCK_N=bn, LOWP=True, SPLIT=split,
        **_switches(q.dtype), num_warps=warps, num_stages=stages)
    return o


@sage_attention.register_fake
def _(q, k, v, qk="int8"):
    return torch.empty_like(q)


def sage_attention_reference(q, k, v, block_m: int, block_n: int, qk: str = "int8") -> torch.Tensor:
    """The same quantization and online softmax in PyTorch, in fp32 on the rounded values, for the tests."""
    B, H, N, d = q.shape

    def quant_tiles(x, blk):  # per tile of rows: x ≈ x8 · scale
        xt = torch.nn.functional.pad(x, (0, 0, 0, (-N) % blk)).view(B, H, -1, blk, d)  # (B, H, tiles, blk, d)
        amax = xt.abs().amax(dim=(-1, -2), keepdim=True).clamp_min(1e-12)
        if qk == "int8":
            s = amax / 127
            r = torch.trunc(xt / s + torch.where(xt >= 0, 0.5, -0.5))
        else:
            s = amax / FP8_MAX
            r = (xt / s).to(FP8).float()
        return (r * s).view(B, H, -1, d)[:, :, :N]

    q, k, v = q.float(), k.float(), v.float()
    qd = quant_tiles(q, block_m)
    kd = quant_tiles(k - k.mean(dim=2, keepdim=True), block_n)
    vm = v.mean(dim=2, keepdim=True)
    vs = ((v - vm).abs().amax(dim=2, keepdim=True) / FP8_MAX).clamp_min(1e-12)
    vd = ((v - vm) / vs).to(FP8).float()
    # the kernel's online softmax, tile by tile: P·448 is rounded to e4m3 against the running max, as there
    m = torch.full((B, H, N, 1), float("-inf"))
    l, acc = torch.zeros(B, H, N, 1), torch.zeros(B, H, N, d)
    for j in range(0, N, block_n):
        s = qd @ kd[:, :, j:j + block_n].transpose(-1, -2) * d ** -0.5  # (B, H, N, tile)
        m_new = torch.maximum(m, s.amax(dim=-1, keepdim=True))
        p = torch.exp(s - m_new) * FP8_MAX
        alpha = torch.exp(m - m_new)
        l = l * alpha + p.sum(dim=-1, keepdim=True)
        acc = acc * alpha + p.to(FP8).float() @ vd[:, :, j:j + block_n]
        m = m_new
    return (acc / l * vs + vm).to(q.dtype)
