"""Fused adaLN kernels against their native references. On the CPU they run in Triton's interpreter, in
fp32 and fp16 (its bf16 loads are wrong); on a GPU in bf16 too. Outputs start as NaN, so a skipped element fails."""
import pytest
import torch

triton = pytest.importorskip("triton")
from cogrt.kernels import adaln  # noqa: E402

from tests.kernel_cases import DEV, DTYPES  # noqa: E402

pytestmark = pytest.mark.usefixtures("poison_kernel_outputs")

TOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}


def inputs(B, Nv, Nt, D, dtype, affine=True, seed=0):
    g = torch.Generator().manual_seed(seed)

    def r(*s, scale=1.0, offset=0.0):
        return (torch.randn(*s, generator=g) * scale + offset).to(DEV, dtype)
    x, c = r(B, Nv, D, scale=3.0, offset=0.5), r(B, Nt, D, scale=2.0, offset=-1.0)  # not unit: LN must normalise
    w, b = (r(D, scale=0.2, offset=1.0), r(D, scale=0.2)) if affine else (None, None)
    return x, c, w, b, r(B, 6 * D, scale=0.5)


SHAPES = [(2, 37, 226, 64), (1, 1, 0, 96), (3, 5, 3, 3 * 64), (1, 263, 7, 32)]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("affine", [True, False])
def test_adaln_modulate_matches_reference(dtype, shape, affine):
    x, c, w, b, mod = inputs(*shape, dtype, affine)
    out = adaln.adaln_modulate(x, c, w, b, mod, 1e-5)
    ref = adaln.adaln_modulate_reference(x, c, w, b, mod, 1e-5)
    assert out.shape == ref.shape and out.dtype == dtype and not out.isnan().any()
    torch.testing.assert_close(out.float(), ref.float(), rtol=TOL[dtype], atol=TOL[dtype] * ref.abs().max().item())


@pytest.mark.parametrize("rows", [1, 2, 8])
def test_adaln_modulate_row_tiles(rows):
    """Rows-per-program settings the sweep can pick (2 is the GPU's default): tiles that end inside a stream, a
    stream shorter than a tile, no text, no affine, and a text/video boundary inside what one tile would cover."""
    for shape, affine in [((2, 13, 5, 96), True), ((3, 16, 0, 64), False), ((1, 1, 9, 32), True)]:
        x, c, w, b, mod = inputs(*shape, torch.float16, affine)
        out = adaln.launch_modulate(x, c, w, b, mod, 1e-5, rows)
        ref = adaln.adaln_modulate_reference(x, c, w, b, mod, 1e-5)
        assert not out.isnan().any()
        torch.testing.assert_close(out.float(), ref.float(), rtol=2e-3, atol=2e-3 * ref.abs().max().item())


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_gated_residual_matches_reference(dtype, shape):
    x, c, _, _, mod = inputs(*shape, dtype)
    B, Nv, Nt, D = shape
    a = torch.randn(B, Nt + Nv, D, generator=torch.Generator().manual_seed(3)).to(DEV, dtype)
    ref_x, ref_c = adaln.gated_residual_reference(x, c, a, mod)
    x0, c0 = x.clone(), c.clone()
    got_x, got_c = adaln.gated_residual(x, c, a, mod)
    assert torch.equal(x, x0) and torch.equal(c, c0)  # the inputs are left alone
    for got, ref in ((got_x, ref_x), (got_c, ref_c)):
        assert not got.isnan().any()
        torch.testing.assert_close(got.float(), ref.float(), rtol=TOL[dtype], atol=TOL[dtype])


def test_reference_is_what_the_engine_block_computes():
    """The reference is the block's own modulate: the kernel is checked against the real thing."""
    from cogrt.engine.model import PRESETS, Block
    cfg = PRESETS["tiny-5b"]
    block = Block(cfg).to(DEV)
    x, c, _, _, mod = inputs(2, 9, 4, cfg.dim, torch.float32)
    h, _, _ = block.modulate(block.ln1, mod, x, c)
    torch.testing.assert_close(adaln.adaln_modulate_reference(x, c, block.ln1.weight, block.ln1.bias, mod,
                                                              block.ln1.eps), h)


def test_bad_shapes_are_refused():
    x, c, w, b, mod = inputs(2, 5, 3, 64, torch.float32)
    with pytest.raises(ValueError):
        adaln.adaln_modulate(x, c, w, b, mod[:, :-1].contiguous(), 1e-5)
    with pytest.raises(ValueError):
        adaln.gated_residual(x, c, torch.zeros(2, 7, 64, device=DEV), mod)


@pytest.mark.gpu
def test_real_shape_bf16():
    """5B at 49 x 480 x 720, batch 2: 17,550 video and 226 text tokens of width 3,072, fresh random inputs."""
    x, c, w, b, mod = inputs(2, 17550, 226, 3072, torch.bfloat16, seed=7)
    ref = adaln.adaln_modulate_reference(x, c, w, b, mod, 1e-5)
    torch.testing.assert_close(adaln.adaln_modulate(x, c, w, b, mod, 1e-5).float(), ref.float(), rtol=1.6e-2,
                               atol=1.6e-2 * ref.abs().max().item())
