"""Row-wise fp8 quantization in our kernels (kernels/quant.py, adaln_modulate_fp8) against their native
references, and the fp8 block that uses them (engine/fused.py, `fused_ff`) against torchao's own path.
On the CPU the kernels run in Triton's interpreter, where `e4m3` rounds by hand (kernels/quant.py says why); on
a GPU the hardware cast is checked, at the 5B shapes."""
import pytest
import torch

triton = pytest.importorskip("triton")
from cogrt.kernels import adaln, quant  # noqa: E402

from tests.kernel_cases import DEV  # noqa: E402
from tests.test_kernels_adaln import inputs  # noqa: E402

pytestmark = pytest.mark.usefixtures("poison_kernel_outputs")
DTYPES = [torch.float32, torch.float16] + ([torch.bfloat16] if DEV == "cuda" else [])


def assert_same_fp8(q, s, ref_q, ref_s):
    """Scales equal to float32 rounding; codes equal, but for a few one e4m3 step apart (the GELU's and the
    norm's float32 arithmetic differs from torch's in the last bits, which can cross a rounding boundary)."""
    assert q.dtype == torch.float8_e4m3fn and s.dtype == torch.float32 and s.shape == ref_s.shape
    assert not s.isnan().any() and not q.float().isnan().any()
    torch.testing.assert_close(s, ref_s, rtol=2e-5, atol=0)
    a, b = q.float().reshape(ref_q.shape), ref_q.float()
    assert (a != b).float().mean() < 1e-2
    torch.testing.assert_close(a, b, rtol=0.13, atol=2 ** -9)  # one step: 2⁻³ relative, 2⁻⁹ among the subnormals


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("gelu", [True, False])
@pytest.mark.parametrize("shape", [(3, 5, 100), (1, 384), (7, 1000)])
def test_quant_rows_matches_reference(dtype, gelu, shape):
    g = torch.Generator().manual_seed(len(shape))
    y = (torch.randn(*shape, generator=g) * 3 + 0.5).to(DEV, dtype)
    y[0, ..., :7] = 0  # a few exact zeros, and a row of them where there is a second row
    q, s = quant.quant_rows(y, gelu)
    assert q.shape == y.shape and s.shape == (y.numel() // shape[-1], 1)
    assert_same_fp8(q, s, *quant.quant_rows_reference(y, gelu))


def test_quant_rows_row_of_zeros():
    y = torch.zeros(2, 64, device=DEV)
    y[1] = torch.linspace(-448, 448, 64)
    q, s = quant.quant_rows(y, False)
    assert (q[0].float() == 0).all() and s[0].item() > 0  # torchao's rule would give 0/0 here
    assert s[1].item() == 1.0 and (q[1].float() == y[1].to(torch.float8_e4m3fn).float()).all()


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(2, 37, 226, 64), (3, 5, 3, 3 * 64), (1, 263, 7, 32)])
@pytest.mark.parametrize("affine", [True, False])
def test_adaln_modulate_fp8_matches_reference(dtype, shape, affine):
    x, c, w, b, mod = inputs(*shape, dtype, affine)
    q, s = adaln.adaln_modulate_fp8(x, c, w, b, mod, 1e-5)
    B, Nv, Nt, D = shape
    assert q.shape == (B, Nt + Nv, D) and s.shape == (B * (Nt + Nv), 1)
    assert_same_fp8(q, s, *adaln.adaln_modulate_fp8_reference(x, c, w, b, mod, 1e-5))


@pytest.fixture
def fp8_anywhere(monkeypatch):
    """torchao refuses fp8 where no fp8 GPU is (a hardware check at quantize time), but its layer runs on the CPU
    (torch._scaled_mm has a CPU kernel), which is all these tests need of it."""
    if DEV == "cpu":
        import torchao.quantization.quant_api as api
        monkeypatch.setattr(api, "_check_hardware_support", lambda granularity: None)


def fp8_block(fast_accum=False):
    """One tiny 5B-layout block with torchao's fp8 row-wise layers, and its inputs."""
    from cogrt.engine import quant as equant
    from cogrt.engine.model import PRESETS, Block, rope_3d
    torch.manual_seed(0)
    cfg = PRESETS["tiny-5b"]
    model = torch.nn.Module()
    model.blocks = torch.nn.ModuleList([Block(cfg).to(DEV, torch.bfloat16).eval()])
    equant.quantize(model, "fp8", fast_accum=fast_accum)  # torchao's row-wise fp8 takes bf16 weights only
    if DEV == "cpu":  # the rest in float32, which the interpreter loads right (its bf16 loads are wrong)
        for p in model.parameters():
            if type(p) is torch.nn.Parameter:
                p.data = p.data.float()
    cos, sin = rope_3d(cfg, 1, 2, 3, DEV)  # 6 video tokens
    g = torch.Generator().manual_seed(0)
    dt = torch.float32 if DEV == "cpu" else torch.bfloat16
    x, c = torch.randn(2, 6, cfg.dim, generator=g).to(DEV, dt), torch.randn(2, 4, cfg.dim, generator=g).to(DEV, dt)
    temb = torch.randn(2, cfg.time_embed_dim, generator=g).to(DEV, dt)
    return model, (x, c, temb, (cos.to(dt), sin.to(dt)))


def test_fp8_block_with_our_quantization_matches_torchao(fp8_anywhere):
    """The block with `fused_ff` (our kernels quantize the inputs of qkv, ff1 and ff2 and call torch._scaled_mm
    with torchao's weights) against the same block through torchao's own activation quantization."""
    from cogrt.engine.fused import fuse_norms
    model, args = fp8_block()
    with torch.no_grad():
        fuse_norms(model, True, fused_ff=False)
        assert model.blocks[0].fp8 is None
        ref = model.blocks[0](*args)
        fuse_norms(model, True, fused_ff=True)
        assert set(model.blocks[0].fp8) == {"qkv", "out", "ff1", "ff2"}  # the fused path is the one that runs
        out = model.blocks[0](*args)
    for a, r, before in zip(out, ref, args[:2]):  # compared on the block's update to each stream
        assert not a.isnan().any() and (r - before).norm() > 0.1 * before.norm()
        # the same fp8 products of the same rows: in float32 (the CPU) equal to rounding; in bf16 torchao rounds
        # h to bf16 before quantizing it, and we do not
        assert (a - r).norm() / (r - before).norm() < (1e-5 if DEV == "cpu" else 2e-2)
    fuse_norms(model, False)
    assert not hasattr(model.blocks[0], "fp8") or model.blocks[0].__dict__.get("fp8") is None


def test_fp8_block_sees_a_rewritten_weight(fp8_anywhere):
    """A LoRA switch rewrites torchao's weight in place (engine/quant.py write_weight): the fused path reads the
    same tensors, so it computes with the new weight, not a stale copy."""
    from cogrt.engine import quant as equant
    from cogrt.engine.fused import fuse_norms
    model, args = fp8_block()
    with torch.no_grad():
        fuse_norms(model, True, fused_ff=True)
        block = model.blocks[0]
        before = block(*args)[0]
        w = torch.randn(block.ff2.weight.shape, generator=torch.Generator().manual_seed(5)).to(DEV, torch.bfloat16)
        equant.write_weight(block.ff2, w, "fp8", fast_accum=False)
        after = block(*args)[0]
        fuse_norms(model, True, fused_ff=False)
        ref = model.blocks[0](*args)[0]
    update = ref - args[0]
    assert (after - before).norm() > 0.1 * update.norm()
    assert (after - ref).norm() / update.norm() < (1e-5 if DEV == "cpu" else 2e-2)


@pytest.mark.gpu
@pytest.mark.parametrize("gelu,K", [(True, 4 * 3072), (False, 3072)])
def test_real_shape_e4m3(gelu, K):
    """The kernel's own e4m3 cast at the 5B FF shape (rows of 12,288) and the adaLN width."""
    y = (torch.randn(2 * 4096, K, device="cuda") * 2).to(torch.bfloat16)
    assert_same_fp8(*quant.quant_rows(y, gelu), *quant.quant_rows_reference(y, gelu))


@pytest.mark.gpu
def test_real_shape_adaln_fp8():
    x, c, w, b, mod = inputs(2, 4000, 226, 3072, torch.bfloat16)
    assert_same_fp8(*adaln.adaln_modulate_fp8(x, c, w, b, mod, 1e-5),
                    *adaln.adaln_modulate_fp8_reference(x, c, w, b, mod, 1e-5))


def test_fp8_block_traces_whole_under_torch_compile(fp8_anywhere):
    """The fused fp8 path (our quantizing ops, torch._scaled_mm on torchao's inner tensors) in one graph."""
    from cogrt.engine.fused import fuse_norms
    model, args = fp8_block()
    fuse_norms(model, True, fused_ff=True)
    with torch.no_grad():
        ref = model.blocks[0](*args)
        out = torch.compile(model.blocks[0], backend="eager", fullgraph=True)(*args)
    for a, b in zip(out, ref):
        torch.testing.assert_close(a, b)
