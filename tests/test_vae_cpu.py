"""The VAE's 3D convolutions through oneDNN on the CPU (engine/vae_cpu.py): the same decode, and autograd untouched."""
import copy

import torch

from cogrt.engine import cli
from cogrt.engine.pipeline import load_pipeline
from cogrt.engine.vae_cpu import native_convs, use_onednn_convs


def test_onednn_convs_decode_as_the_native_ones_and_leave_training_alone():
    pipe = load_pipeline(cli.BUNDLED_MODEL, device="cpu", dtype=torch.float32)  # routes its VAE's convolutions
    with native_convs(pipe.vae):  # nn.Conv3d's own, as torch.export needs them
        native = copy.deepcopy(pipe.vae)
    assert not any("_conv_forward" in m.__dict__ for m in native.modules())
    assert use_onednn_convs(copy.deepcopy(native)) > 10
    z = torch.randn(1, 16, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        got, ref = pipe.vae.decode(z).sample, native.decode(z).sample
    assert got.shape == ref.shape == (1, 3, 9, 64, 64)
    torch.testing.assert_close(got, ref, rtol=0, atol=1e-4)

    conv = next(m for m in pipe.vae.modules() if isinstance(m, torch.nn.Conv3d) and "_conv_forward" in m.__dict__)
    x = torch.randn(1, conv.in_channels, 3, 6, 6, requires_grad=True)
    conv(x).sum().backward()  # with autograd the native convolution runs, and has a gradient
    assert x.grad is not None and x.grad.abs().sum() > 0
