"""The fused-norm transform: blocks whose adaLN, QK norm + RoPE and gated residuals run through the Triton
kernels of cogrt.kernels, swapped in for the model's plain blocks by the runner (`fuse_norms`).

With `fused_ff` (engine/modes.py) the FF's GELU-tanh also leaves its own pass:
- in the model dtype, on a GPU, into the first FF GEMM's epilogue (cuBLASLt's GELU, through
  `torch._addmm_activation`), where Inductor runs it as a separate kernel (25 ms a 5B step);
- in fp8, into the row-wise quantization of its output (kernels/quant.py), and the adaLN kernels quantize the
  inputs of `qkv` and `ff1` as they write them; the attention's output goes through the same row quantization
  (without the GELU) for `out`. The four layers then take e4m3 rows straight to torch._scaled_mm, and torchao's own
  activation quantization (about 100 ms a 5B step in Inductor's kernels) is left out of the fused block.
"""
from __future__ import annotations

import torch

from . import quant
from .model import Block

FP8_FUSED = ("qkv", "out", "ff1", "ff2")  # the fp8 layers whose input our kernels quantize


class FusedBlock(Block):
    """The same block, its parameters shared, with the norm passes fused. The kernels have no backward, so with
    gradients on it runs the plain forward."""
    fused_ff = False
    fp8 = None  # {layer: (e4m3 weight, its row scales, bias, fast accumulation)} where fused_ff takes fp8 inputs

    def forward(self, x, c, temb, rope=None):
        if torch.is_grad_enabled():
            return super().forward(x, c, temb, rope)
        from cogrt.kernels import adaln, qk
        B, n, D = c.shape
        N = n + x.shape[1]
        x, c = x.contiguous(), c.contiguous()
        mod = self.norm1(temb).contiguous()  # (B, 6D): the kernels index shift/scale/gate inside it
        if self.fp8:
            qkv = self.fp8_linear("qkv", *adaln.adaln_modulate_fp8(x, c, self.ln1.weight, self.ln1.bias, mod,
                                                                   self.ln1.eps), x.dtype)
        else:
            qkv = self.qkv(adaln.adaln_modulate(x, c, self.ln1.weight, self.ln1.bias, mod, self.ln1.eps))
        qkv = qkv.view(B, N, 3 * D)
        cos, sin = rope if rope is not None else (None, None)
        q, k = qk.qk_norm_rope(qkv, self.heads, n, self.norm_q.weight, self.norm_q.bias, self.norm_k.weight,
                               self.norm_k.bias, cos, sin, self.norm_q.eps)
        v = qkv.view(B, N, 3, self.heads, -1)[:, :, 2].transpose(1, 2)  # (B, H, N, d), a strided view
        o = self.attend(q, k, v).transpose(1, 2).reshape(B, N, D)  # a view where the backend wrote (B, N, H, d)
        if self.fp8:
            from cogrt.kernels.quant import quant_rows
            a = self.fp8_linear("out", *quant_rows(o, False), x.dtype).view(B, N, D)
        else:
            a = self.out(o)
        x, c = adaln.gated_residual(x, c, a, mod)
        mod = self.norm2(temb).contiguous()
        if self.fp8:
            y = self.fp8_linear("ff1", *adaln.adaln_modulate_fp8(x, c, self.ln2.weight, self.ln2.bias, mod,
                                                                 self.ln2.eps), x.dtype)
            f = self.fp8_linear("ff2", *quant_rows(y, True), x.dtype).view(B, N, D)
        else:
            f = self.ff_fused(adaln.adaln_modulate(x, c, self.ln2.weight, self.ln2.bias, mod, self.ln2.eps))
        return adaln.gated_residual(x, c, f, mod)

    def ff_fused(self, h):
        if not (self.fused_ff and h.is_cuda and self.ff1.bias is not None and not quant.is_quantized(self.ff1)):
            return self.ff(h)
        # GELU-tanh as the GEMM's epilogue (cuBLASLt; its CPU fallback would be the erf GELU, hence CUDA only)
        y = torch._addmm_activation(self.ff1.bias, h.reshape(-1, h.shape[-1]), self.ff1.weight.t(), use_gelu=True)
        return self.ff2(y.view(*h.shape[:-1], -1))

    def fp8_linear(self, name, q, scale, dtype):
        """The fp8 layer `name` on already-quantized rows q (..., K) with scales (M, 1): (M, out) in `dtype`."""
        w, w_scale, bias, fast = self.fp8[name]
        fused_bias = bias if dtype != torch.float32 else None  # _scaled_mm takes no bias with a float32 output
        y = torch._scaled_mm(q.view(-1, q.shape[-1]), w.t(), scale_a=scale, scale_b=w_scale.t(), bias=fused_bias,
                             out_dtype=dtype, use_fast_accum=fast)
        return y if fused_bias is not None or bias is None else y + bias


def fuse_norms(model, on: bool = True, fused_ff: bool = False) -> None:
    """Swap every block of `model` for its fused form (on) or back to the plain one. `fused_ff`: the FF's GELU
    fused too, and in blocks whose linear layers are torchao fp8 ones, the activations quantized by our kernels."""
    if on:
        import cogrt.kernels.adaln  # noqa: F401  (fail now if Triton is missing, not mid-request)
        import cogrt.kernels.qk  # noqa: F401
        import cogrt.kernels.quant  # noqa: F401
    cls = FusedBlock if on else Block
    for i, b in enumerate(model.blocks):
        swapped = cls.__new__(cls)  # the same parameters and submodules, another forward
        swapped.__dict__.update(b.__dict__)
        swapped.__dict__.pop("fp8", None)
        swapped.__dict__.pop("fused_ff", None)
        if on and fused_ff:
            swapped.fused_ff = True
            if all(quant.is_fp8(getattr(b, name)) for name in FP8_FUSED):
                swapped.fp8 = {name: quant.fp8_operands(getattr(b, name)) for name in FP8_FUSED}
        model.blocks[i] = swapped
