"""Attention backends from other packages, registered when this module is imported (on first use).

- `sage`: SageAttention (`sageattention`), int8 Q·Kᵀ with smoothed K; the published fp8 baseline.
- `flash-attn`: FlashAttention (`flash_attn`), which takes (B, N, H, d).
"""
from __future__ import annotations

from importlib.util import find_spec

from .attention import register

if find_spec("sageattention") is not None:
    @register("sage")
    def sage(q, k, v):
        from sageattention import sageattn
        return sageattn(q, k, v, tensor_layout="HND", is_causal=False)

if find_spec("flash_attn") is not None:
    @register("flash-attn")
    def flash_attn(q, k, v):
        from flash_attn import flash_attn_func
        out = flash_attn_func(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))  # (B, N, H, d)
        return out.transpose(1, 2)
