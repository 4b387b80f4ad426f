"""The fused QK prologue (per-head LayerNorm + RoPE on the video tokens) against the engine's native path."""
import pytest
import torch

triton = pytest.importorskip("triton")
from cogrt.kernels import qk  # noqa: E402

from cogrt.engine.fused import FusedBlock, fuse_norms  # noqa: E402
from tests.kernel_cases import DEV, DTYPES, transformer_case  # noqa: E402

pytestmark = pytest.mark.usefixtures("poison_kernel_outputs")

TOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}


def inputs(B, N, n_text, H, d, dtype, rope=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    qkv = (torch.randn(B, N, 3 * H * d, generator=g) * 2 + 0.3).to(DEV, dtype)
    params = [(torch.randn(d, generator=g) * s + o).to(DEV, dtype) for s, o in ((0.2, 1.0), (0.1, 0.0))] * 2
    cos = sin = None
    if rope:
        ang = torch.rand(N - n_text, d // 2, generator=g) * 6.3
        cos = ang.cos().repeat_interleave(2, dim=-1).to(DEV)  # (N - n_text, d), pairs share an angle
        sin = ang.sin().repeat_interleave(2, dim=-1).to(DEV)
    return qkv, params, cos, sin


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("B,N,n_text,H,d", [(1, 226 + 37, 226, 3, 64), (1, 1, 0, 2, 64), (1, 9, 9, 3, 32),
                                            (2, 12, 5, 4, 16)])
@pytest.mark.parametrize("rope", [True, False])
def test_qk_norm_rope_matches_reference(dtype, B, N, n_text, H, d, rope):
    qkv, (wq, bq, wk, bk), cos, sin = inputs(B, N, n_text, H, d, dtype, rope)
    q, k = qk.qk_norm_rope(qkv, H, n_text, wq, bq, wk, bk, cos, sin, 1e-6)
    rq, rk = qk.qk_norm_rope_reference(qkv, H, n_text, wq, bq, wk, bk, cos, sin, 1e-6)
    for got, ref in ((q, rq), (k, rk)):
        assert got.shape == (B, H, N, d) and not got.isnan().any()
        torch.testing.assert_close(got.float(), ref.float(), rtol=TOL[dtype], atol=TOL[dtype] * 4)


def test_text_tokens_are_not_rotated():
    qkv, (wq, bq, wk, bk), cos, sin = inputs(1, 12, 5, 2, 16, torch.float32)
    q, _ = qk.qk_norm_rope(qkv, 2, 5, wq, bq, wk, bk, cos, sin, 1e-6)
    q0, _ = qk.qk_norm_rope(qkv, 2, 5, wq, bq, wk, bk, None, None, 1e-6)
    assert torch.equal(q[:, :, :5], q0[:, :, :5]) and not torch.allclose(q[:, :, 5:], q0[:, :, 5:])


def test_reference_is_the_engine_block():
    """The reference must be what Block.attention does, so capture the q, k the block hands to attention."""
    from cogrt.engine.model import PRESETS, Block, rope_3d
    cfg = PRESETS["tiny-5b"]
    block = Block(cfg).to(DEV)
    with torch.no_grad():
        for ln in (block.norm_q, block.norm_k):
            ln.weight.add_(torch.randn_like(ln.weight) * 0.2)
            ln.bias.add_(torch.randn_like(ln.bias) * 0.1)
    cos, sin = rope_3d(cfg, 2, 2, 3, DEV)  # 12 video tokens
    h = torch.randn(2, 4 + 12, cfg.dim, device=DEV)
    seen = {}
    block.attend.register_forward_hook(lambda mod, args, out: seen.update(q=args[0].clone(), k=args[1].clone()))
    with torch.no_grad():
        block.attention(h, (cos, sin), 4)
        qkv = block.qkv(h)
    rq, rk = qk.qk_norm_rope_reference(qkv, cfg.num_heads, 4, block.norm_q.weight, block.norm_q.bias,
                                       block.norm_k.weight, block.norm_k.bias, cos, sin, block.norm_q.eps)
    torch.testing.assert_close(rq, seen["q"])
    torch.testing.assert_close(rk, seen["k"])


def test_transformer_with_fused_norms_matches_native(checkpoint):
    """Model level: the engine's transformer (5B layout: RoPE) through the kernels against its native path."""
    model, x, text, t = transformer_case(checkpoint)
    with torch.no_grad():
        ref = model(x, text, t)
        fuse_norms(model)
        assert all(isinstance(b, FusedBlock) for b in model.blocks)
        out = model(x, text, t)
    assert not out.isnan().any()
    assert (out - ref).norm() / ref.norm() < 1e-5


@pytest.mark.gpu
def test_real_shape_bf16():
    qkv, (wq, bq, wk, bk), cos, sin = inputs(2, 17550 + 226, 226, 48, 64, torch.bfloat16, seed=7)
    q, k = qk.qk_norm_rope(qkv, 48, 226, wq, bq, wk, bk, cos, sin, 1e-6)
    rq, rk = qk.qk_norm_rope_reference(qkv, 48, 226, wq, bq, wk, bk, cos, sin, 1e-6)
    for got, ref in ((q, rq), (k, rk)):
        torch.testing.assert_close(got.float(), ref.float(), rtol=1.6e-2, atol=6.4e-2)


@pytest.mark.parametrize("backend", ["sdpa", "triton-fp8"])
def test_fused_block_traces_whole_under_torch_compile(backend):
    """The kernels are torch.library ops with fake implementations, so Dynamo captures the block in one graph,
    with our attention kernel too."""
    from cogrt.engine import attention
    from cogrt.engine.model import PRESETS, rope_3d
    cfg = PRESETS["tiny-5b"]
    block = FusedBlock(cfg).to(DEV).eval()
    block.attend = attention.Attention(backend)
    cos, sin = rope_3d(cfg, 1, 2, 3, DEV)  # 6 video tokens
    g = torch.Generator().manual_seed(0)
    x, c = torch.randn(1, 6, cfg.dim, generator=g).to(DEV), torch.randn(1, 4, cfg.dim, generator=g).to(DEV)
    temb = torch.randn(1, cfg.time_embed_dim, generator=g).to(DEV)
    with torch.no_grad():
        ref = block(x, c, temb, (cos, sin))
        compiled = torch.compile(block, backend="eager", fullgraph=True)
        out = compiled(x, c, temb, (cos, sin))
    for a, b in zip(out, ref):
        torch.testing.assert_close(a, b)
