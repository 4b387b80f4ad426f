"""Attention backends from other packages, registered when this module is imported (on first use).

- `sage`: SageAttention (`sageattention`), int8 Q·Kᵀ with smoothed K; the published fp8 baseline.
- `flash-attn`: FlashAttention 2 (`flash_attn`), which takes (B, N, H, d).
- `flash-attn-4`: FlashAttention 4 (`flash_attn.cute`, the `flash-attn-4` package, CuTe DSL kernels for Hopper and
  Blackwell), which takes (B, N, H, d) with any 16-byte aligned strides: the transposed views of the fused qkv
  projection go in as they are, and its contiguous (B, N, H, d) output is what the block's out-projection reads.
"""
from __future__ import annotations

import torch

from .attention import has_module, register

if has_module("sageattention"):
    @register("sage")
    def sage(q, k, v):
        from sageattention import sageattn
        return sageattn(q, k, v, tensor_layout="HND", is_causal=False)

if has_module("flash_attn.flash_attn_interface"):
    @register("flash-attn")
    def flash_attn(q, k, v):
        from flash_attn import flash_attn_func
        out = flash_attn_func(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))  # (B, N, H, d)
        return out.transpose(1, 2)

# An op of our own around FlashAttention 4: it is an autograd.Function that compiles its kernel at the first call,
# which torch.compile must not trace into. Forward only, as every other fast backend here. The op exists whether
# or not the package is installed (its fake form lets the compiled blocks trace anywhere); the backend is
# registered only where it is.
@torch.library.custom_op("cogrt::flash_attention_4", mutates_args=())
def flash_attention_4(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    from flash_attn.cute import flash_attn_func
    with torch.no_grad():
        out = flash_attn_func(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))  # (B, N, H, d)
    out = out[0] if isinstance(out, tuple) else out  # some versions also return the log-sum-exp
    return out.transpose(1, 2)  # (B, H, N, d): a view of the contiguous (B, N, H, d)


@flash_attention_4.register_fake
def _(q, k, v):
    B, H, N, d = q.shape
    return q.new_empty(B, N, H, d).transpose(1, 2)


if has_module("flash_attn.cute"):
    register("flash-attn-4")(flash_attention_4)
