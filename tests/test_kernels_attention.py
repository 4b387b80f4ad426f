"""The Triton flash-attention forward against SDPA's math backend, on CogVideoX-like shapes."""
import pytest
import torch

triton = pytest.importorskip("triton")
from kernels import attention as fa  # noqa: E402

from engine import attention  # noqa: E402

from tests.kernel_cases import DEV, DTYPES  # noqa: E402

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


def test_transformer_with_triton_attention_matches_sdpa(checkpoint):
    from engine.loader import load_transformer
    model = load_transformer(checkpoint("5b") / "transformer").to(DEV)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, 3, model.cfg.in_channels, 6, 10, generator=g).to(DEV)
    text, t = torch.randn(1, 226, model.cfg.text_embed_dim, generator=g).to(DEV), torch.tensor([900], device=DEV)
    with torch.no_grad():
        ref = model(x, text, t)
        model.set_attention_backend("triton")
        out = model(x, text, t)
    assert (out - ref).norm() / ref.norm() < 1e-5
