"""On the CPU, the VAE's 3D convolutions through oneDNN rather than the backend PyTorch picks for them.

For batch 1 and 3x3x3 kernels, PyTorch's CPU backend choice sends a convolution to its native im2col path
(`slow_conv3d`) unless batch x channels x depth x height exceeds 20,480. The CogVideoX decoder walks the frames
a few at a time with 32-128 channels, so nearly all of its 3D convolutions fall below that line, and there
oneDNN's convolution (`torch.mkldnn_convolution`, the same kernels PyTorch uses above it) is 2-6x faster per
convolution. The bundled model's 49 x 128 x 128 decode on two cores (torch 2.13.0+cpu) takes 5.2-5.8 s against
7.4-7.7 s natively (1.34-1.44x), and agrees with the native path to float rounding (6.9e-6; 1/255 in a few
pixels).
"""
from __future__ import annotations

import contextlib
import types

import torch
import torch.nn.functional as F
from torch import nn


def use_onednn_convs(module: nn.Module) -> int:
    """Route every zero-padded nn.Conv3d in `module` through oneDNN where it runs on CPU fp32 without autograd;
    the rest (CUDA, other dtypes, training) keeps PyTorch's own choice. Returns how many were routed."""
    if not (torch.backends.mkldnn.is_available() and torch.backends.mkldnn.enabled):
        return 0
    n = 0
    for m in module.modules():
        if isinstance(m, nn.Conv3d) and m.padding_mode == "zeros" and not isinstance(m.padding, str):
            m._conv_forward = types.MethodType(_conv_forward, m)  # what nn.Conv3d.forward calls
            n += 1
    return n


def _conv_forward(self: nn.Conv3d, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None):
    if x.device.type != "cpu" or x.dtype != torch.float32 or (torch.is_grad_enabled() and (
            x.requires_grad or weight.requires_grad)):
        return F.conv3d(x, weight, bias, self.stride, self.padding, self.dilation, self.groups)
    return torch.mkldnn_convolution(x.contiguous(), weight.contiguous(), bias, self.padding, self.stride,
                                    self.dilation, self.groups)


@contextlib.contextmanager
def native_convs(module: nn.Module):
    """Within: `module`'s convolutions as PyTorch has them (for tracing: torch.export and ONNX know no oneDNN call)."""
    routed = [m for m in module.modules() if "_conv_forward" in m.__dict__]
    for m in routed:
        del m._conv_forward
    try:
        yield module
    finally:
        for m in routed:
            m._conv_forward = types.MethodType(_conv_forward, m)
