"""The fused-norm transform: blocks whose adaLN, QK norm + RoPE and gated residuals run through the Triton
kernels of cogrt.kernels, swapped in for the model's plain blocks by the runner (`fuse_norms`)."""
from __future__ import annotations

import torch

from .model import Block


class FusedBlock(Block):
    """The same block, its parameters shared, with the norm passes fused. The kernels have no backward, so with
    gradients on it runs the plain forward."""

    def forward(self, x, c, temb, rope=None):
        if torch.is_grad_enabled():
            return super().forward(x, c, temb, rope)
        from cogrt.kernels import adaln, qk
        B, n, D = c.shape
        N = n + x.shape[1]
        x, c = x.contiguous(), c.contiguous()
        mod = self.norm1(temb).contiguous()  # (B, 6D): the kernels index shift/scale/gate inside it
        h = adaln.adaln_modulate(x, c, self.ln1.weight, self.ln1.bias, mod, self.ln1.eps)
        qkv = self.qkv(h)  # (B, N, 3D)
        cos, sin = rope if rope is not None else (None, None)
        q, k = qk.qk_norm_rope(qkv, self.heads, n, self.norm_q.weight, self.norm_q.bias, self.norm_k.weight,
                               self.norm_k.bias, cos, sin, self.norm_q.eps)
        v = qkv.view(B, N, 3, self.heads, -1)[:, :, 2].transpose(1, 2)  # (B, H, N, d), a strided view
        o = self.attend(q, k, v)
        a = self.out(o.transpose(1, 2).reshape(B, N, D))
        x, c = adaln.gated_residual(x, c, a, mod)
        mod = self.norm2(temb).contiguous()
        h = adaln.adaln_modulate(x, c, self.ln2.weight, self.ln2.bias, mod, self.ln2.eps)
        f = self.ff2(torch.nn.functional.gelu(self.ff1(h), approximate="tanh"))
        return adaln.gated_residual(x, c, f, mod)


def fuse_norms(model, on: bool = True) -> None:
    """Swap every block of `model` for its fused form (on) or back to the plain one."""
    if on:
        import cogrt.kernels.adaln  # noqa: F401  (fail now if Triton is missing, not mid-request)
        import cogrt.kernels.qk  # noqa: F401
    cls = FusedBlock if on else Block
    for i, b in enumerate(model.blocks):
        swapped = cls.__new__(cls)  # the same parameters and submodules, another forward
        swapped.__dict__.update(b.__dict__)
        model.blocks[i] = swapped
