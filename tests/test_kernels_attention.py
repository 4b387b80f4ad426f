"""The Triton attention kernels: flash (bf16/fp16) against SDPA's math backend, and the low-precision
(SageAttention-style) path against its PyTorch reference and against math, on CogVideoX-like shapes."""
import pytest
import torch

triton = pytest.importorskip("triton")
from cogrt.kernels import attention as fa  # noqa: E402

from cogrt.engine import attention  # noqa: E402

from helpers import as_projection_views, realistic_qkv, rel_err as rel, sampled_error  # noqa: E402
from tests.kernel_cases import DEV, DTYPES, transformer_case  # noqa: E402

pytestmark = pytest.mark.usefixtures("poison_kernel_outputs")

TOL = {torch.float32: 2e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2}


def qkv(B, H, N, d, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, H, N, d, generator=g) * 1.5
    k = torch.randn(B, H, N, d, generator=g) + torch.randn(1, 1, 1, d, generator=g) * 2  # a per-channel offset
    v = torch.randn(B, H, N, d, generator=g)
    return [t.to(DEV, dtype) for t in (q, k, v)]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("B,H,N,d", [(1, 3, 226 + 37, 64), (2, 2, 1, 64), (1, 1, 70, 32), (1, 2, 33, 128)])
def test_flash_attention_matches_math(dtype, B, H, N, d):
    q, k, v = qkv(B, H, N, d, dtype)
    out = fa.flash_attention(q, k, v)
    ref = attention.attend(q.float(), k.float(), v.float(), "sdpa-math")
    assert out.shape == ref.shape and out.dtype == dtype and not out.isnan().any()
    torch.testing.assert_close(out.float(), ref, rtol=TOL[dtype], atol=TOL[dtype])


def test_strided_views_as_the_block_passes_them():
    """v comes straight out of the fused qkv as a strided (B, H, N, d) view."""
    B, N, H, d = 1, 40, 2, 64
    qkv_out = torch.randn(B, N, 3, H, d, generator=torch.Generator().manual_seed(1)).to(DEV)
    q, k, v = qkv_out.permute(2, 0, 3, 1, 4)  # 3 x (B, H, N, d), not contiguous
    torch.testing.assert_close(attention.attend(q, k, v, "triton"), attention.attend(q, k, v, "sdpa-math"),
                               rtol=2e-5, atol=2e-5)


@pytest.mark.gpu
@pytest.mark.parametrize("heads", [48, 30])
def test_real_shape_bf16(heads):
    q, k, v = qkv(2, heads, 17550 + 226, 64, torch.bfloat16, seed=3)
    ref = attention.attend(q, k, v, "sdpa")
    err = (fa.flash_attention(q, k, v).float() - ref.float()).norm() / ref.float().norm()
    assert err < 1e-2


@pytest.mark.parametrize("qk", ["int8", "fp8"])
@pytest.mark.parametrize("B,H,N,d", [(1, 3, 226 + 37, 64), (2, 2, 1, 64), (1, 1, 70, 32), (1, 2, 33, 128)])
def test_sage_attention_matches_its_reference(qk, B, H, N, d):
    """The kernel does exactly what the PyTorch reference does (same rounding, same online softmax)."""
    q, k, v = (t.half().to(DEV) for t in realistic_qkv(B, H, N, d))
    bm, bn = fa._config(d, True)[:2]
    out = fa.sage_attention(q, k, v, qk)
    ref = fa.sage_attention_reference(q.cpu(), k.cpu(), v.cpu(), bm, bn, qk)
    assert out.shape == q.shape and out.dtype == torch.float16 and not out.isnan().any()
    # fp16 output rounding; e4m3 ties round differently by hand in the interpreter than on the GPU
    assert rel(out.cpu(), ref) < (2e-3 if qk == "int8" else 6e-3)


@pytest.mark.parametrize("split", [2, 1])
def test_split_query_tile(split):
    """The query tile whole or as two halves that share the key loads: both kernels stay within their
    tolerances, the last partial tile included."""
    config = (32, 32, 4, 1, split)
    B, H, N, d = 1, 2, 226 + 70, 64  # 9 full interpreter tiles and a partial one
    q, k, v = qkv(B, H, N, d, torch.float16, seed=5)
    ref = attention.attend(q.float(), k.float(), v.float(), "sdpa-math")
    torch.testing.assert_close(fa._flash(q, k, v, config).float(), ref, rtol=2e-3, atol=2e-3)
    q, k, v = (t.half().to(DEV) for t in realistic_qkv(B, H, N, d))
    ref = fa.sage_attention_reference(q.cpu(), k.cpu(), v.cpu(), 32, 32, "int8")
    assert rel(fa._sage(q, k, v, "int8", config).cpu(), ref) < 2e-3


def test_quantize_qkv_scales_and_padding():
    B, H, N, d = 1, 2, 45, 64
    q, k, v = (t.half().to(DEV) for t in realistic_qkv(B, H, N, d, seed=2))
    q8, qs, k8, ks, vt8, vs, vm = fa.quantize_qkv(q, k, v, 32, 16)
    assert q8.dtype == k8.dtype == torch.int8 and vt8.dtype == fa.FP8
    assert qs.shape == (B, H, 2) and ks.shape == (B, H, 3) and vt8.shape == (B, H, d, 48)
    km = k.float() - k.float().mean(dim=2, keepdim=True)
    torch.testing.assert_close(ks[:, :, 0], km[:, :, :16].abs().amax(dim=(-1, -2)) / 127)
    torch.testing.assert_close(qs[:, :, 1], q.float()[:, :, 32:].abs().amax(dim=(-1, -2)) / 127)
    assert int(k8.abs().max()) == 127 and int(q8[:, :, :32].abs().amax(dim=(-1, -2)).min()) == 127
    assert (vt8[..., N:].float() == 0).all()  # the padding V^T keys read is written, as zeros
    vd = vt8[..., :N].float().transpose(-1, -2) * vs[:, :, None] + vm[:, :, None]
    assert rel(vd, v) < 3e-2


@pytest.mark.parametrize("qk,bound", [("int8", 2e-2), ("fp8", 4e-2)])
def test_sage_attention_error_on_realistic_inputs(qk, bound):
    q, k, v = (t.half().to(DEV) for t in realistic_qkv(1, 2, 300, 64, seed=5))
    assert rel(fa.sage_attention(q, k, v, qk), attention.attend(q.float(), k.float(), v.float(), "sdpa-math")) < bound


def test_sage_attention_rejects_bad_input():
    q = torch.randn(1, 1, 8, 64, device=DEV, dtype=torch.float16)
    with pytest.raises(ValueError, match="int8"):
        fa.sage_attention(q, q, q, "int4")
    with pytest.raises(ValueError, match="power of two"):
        fa.sage_attention(q[..., :48], q[..., :48], q[..., :48])


@pytest.mark.gpu
@pytest.mark.parametrize("heads,N", [(48, 17550 + 226), (30, 17550 + 226), (48, 44880 + 226)])
def test_real_shape_low_precision(heads, N):
    """bf16 at the 5B, 2B and 1.5 shapes on realistic inputs, against fp32 math on sampled query rows (the
    full fp32 scores would not fit); the issue's bound is 3e-2."""
    q, k, v = realistic_qkv(2, heads, N, 64, seed=heads, device=DEV, dtype=torch.bfloat16)
    assert sampled_error(fa.sage_attention(q, k, v), q, k, v) < 3e-2
    assert sampled_error(fa.flash_attention(q, k, v), q, k, v) < 5e-3


def test_auto_backend_is_sdpa_off_the_gpu():
    q = torch.randn(1, 2, 10, 16)
    assert attention.choose(q, q, q) == "sdpa"
    torch.testing.assert_close(attention.attend(q, q, q, "auto"), attention.attend(q, q, q, "sdpa"))


@pytest.mark.gpu
def test_auto_backend_picks_an_accurate_one():
    q, k, v = qkv(2, 48, 4096, 64, torch.bfloat16, seed=9)
    name = attention.choose(q, k, v)
    assert name in attention.AUTO_CANDIDATES
    ref = attention.attend(q, k, v, "sdpa").float()
    assert rel(attention.attend(q, k, v, "auto"), ref) <= attention.AUTO_TOLERANCE


def test_transformer_with_triton_attention_matches_sdpa(checkpoint):
    model, x, text, t = transformer_case(checkpoint)
    with torch.no_grad():
        ref = model(x, text, t)
        attention.set_attention(model, "triton")
        out = model(x, text, t)
    assert (out - ref).norm() / ref.norm() < 1e-5


@pytest.mark.gpu
def test_cudnn_fp8_on_realistic_inputs():
    """cuDNN's fp8 attention (a baseline backend, where nvidia-cudnn-frontend is installed) on realistic inputs:
    the issue's 3e-2 bound, at the 2B shape and at an N that no tile divides."""
    pytest.importorskip("cudnn")
    for heads, N in [(30, 17550 + 226), (3, 226 + 37)]:
        q, k, v = realistic_qkv(2, heads, N, 64, seed=N, device=DEV, dtype=torch.bfloat16)
        assert sampled_error(attention.attend(q, k, v, "cudnn-fp8"), q, k, v) < 3e-2
    q, k, v = as_projection_views(*realistic_qkv(2, 3, 263, 64, seed=2, device=DEV, dtype=torch.bfloat16))
    assert not q.is_contiguous()
    assert sampled_error(attention.attend(q, k, v, "cudnn-fp8"), q, k, v) < 3e-2


@pytest.mark.gpu
def test_cudnn_fp8_block_compiles_whole():
    """cudnn-fp8 is a custom op: inductor compiles the block fullgraph around it, and agrees with eager."""
    pytest.importorskip("cudnn")
    from cogrt.engine.model import PRESETS, Block, rope_3d
    cfg = PRESETS["tiny-5b"]
    block = Block(cfg).to(DEV, torch.bfloat16).eval()
    block.attend = attention.Attention("cudnn-fp8")
    cos, sin = rope_3d(cfg, 2, 4, 6, DEV)  # 48 video tokens
    g = torch.Generator().manual_seed(0)
    x, c = (torch.randn(2, n, cfg.dim, generator=g).to(DEV, torch.bfloat16) for n in (48, 7))
    temb = torch.randn(2, cfg.time_embed_dim, generator=g).to(DEV, torch.bfloat16)
    with torch.no_grad():
        ref = block(x, c, temb, (cos, sin))
        out = torch.compile(block, fullgraph=True)(x, c, temb, (cos, sin))
    for a, b in zip(out, ref):
        assert rel(a, b) < 2e-2


@pytest.mark.gpu
def test_flash_attention_4_on_realistic_inputs():
    """FlashAttention 4 (the modes' attention where installed) within bf16's error of fp32 math at the 2B shape,
    at an N that no tile divides, and on the strided views of the fused qkv that the block passes."""
    pytest.importorskip("flash_attn.cute")
    if "flash-attn-4" not in attention.available():
        pytest.skip("FlashAttention 4 needs a Hopper or newer GPU")
    for heads, N in [(30, 17550 + 226), (3, 226 + 37)]:
        q, k, v = realistic_qkv(2, heads, N, 64, seed=N, device=DEV, dtype=torch.bfloat16)
        assert sampled_error(attention.attend(q, k, v, "flash-attn-4"), q, k, v) < 1e-2
    q, k, v = as_projection_views(*realistic_qkv(2, 3, 263, 64, seed=2, device=DEV, dtype=torch.bfloat16))
    assert not q.is_contiguous()
    out = attention.attend(q, k, v, "flash-attn-4")
    assert out.shape == q.shape and out.transpose(1, 2).is_contiguous()
    assert rel(out, attention.attend(q, k, v, "sdpa")) < 1e-2


@pytest.mark.gpu
def test_flash_attention_4_block_compiles_whole():
    """FlashAttention 4 sits in our custom op: inductor compiles the block fullgraph around it, and agrees with
    eager SDPA."""
    pytest.importorskip("flash_attn.cute")
    if "flash-attn-4" not in attention.available():
        pytest.skip("FlashAttention 4 needs a Hopper or newer GPU")
    from cogrt.engine.model import PRESETS, Block, rope_3d
    cfg = PRESETS["tiny-5b"]
    block = Block(cfg).to(DEV, torch.bfloat16).eval()
    cos, sin = rope_3d(cfg, 2, 4, 6, DEV)  # 48 video tokens
    g = torch.Generator().manual_seed(0)
    x, c = (torch.randn(2, n, cfg.dim, generator=g).to(DEV, torch.bfloat16) for n in (48, 7))
    temb = torch.randn(2, cfg.time_embed_dim, generator=g).to(DEV, torch.bfloat16)
    with torch.no_grad():
        ref = block(x, c, temb, (cos, sin))
        block.attend = attention.Attention("flash-attn-4")
        out = torch.compile(block, fullgraph=True)(x, c, temb, (cos, sin))
    for a, b in zip(out, ref):
        assert rel(a, b) < 2e-2
