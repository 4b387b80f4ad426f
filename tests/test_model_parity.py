"""Our transformer vs diffusers' CogVideoXTransformer3DModel on the same weights and inputs (fp32)."""
from __future__ import annotations

import pytest
import torch
from diffusers import CogVideoXTransformer3DModel
from diffusers.models.embeddings import get_3d_sincos_pos_embed

from conftest import VARIANTS
from helpers import diffusers_rope
from cogrt.engine.loader import load_transformer
from cogrt.engine.model import rope_3d, sincos_3d
from cogrt.engine.random_model import tiny_config


def run_both(ckpt, frames: int, h: int, w: int, batch: int = 2, seed: int = 0):
    ours = load_transformer(ckpt / "transformer")
    ref = CogVideoXTransformer3DModel.from_pretrained(ckpt / "transformer").eval()
    cfg = ours.cfg
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, frames, cfg.in_channels, h, w, generator=g)
    text = torch.randn(batch, cfg.max_text_seq_length, cfg.text_embed_dim, generator=g)
    t = torch.randperm(1000, generator=g)[:batch].float()  # a different timestep per sample
    ofs = torch.full((1,), 2.0) if cfg.ofs_embed_dim else None
    rope = diffusers_rope(ref.config, frames, h, w) if cfg.use_rotary_positional_embeddings else None
    with torch.no_grad():
        got = ours(x, text, t, ofs=ofs)
        want = ref(hidden_states=x, encoder_hidden_states=text, timestep=t, ofs=ofs, image_rotary_emb=rope,
                   return_dict=False)[0]
    return got, want


def assert_matches(got, want, rel=1e-5):
    assert got.shape == want.shape
    assert torch.isfinite(want).all() and want.abs().max() > 0
    err, scale = (got - want).abs().max().item(), want.abs().max().item()
    assert err <= rel * scale, f"max|ours-ref| = {err:.3g}, max|ref| = {scale:.3g}"


def latent_shape(variant: str) -> tuple[int, int, int]:
    if variant == "5b-i2v":  # learned positions: only the sample size (8x8 latent, 9 frames -> 3 latent frames)
        return 3, 8, 8
    if variant.startswith("1.5"):  # an even latent frame count; the pipeline pads odd ones
        return 4, 6, 10
    return 3, 6, 10


@pytest.mark.parametrize("variant", VARIANTS)
def test_transformer_matches_diffusers(custom_checkpoint, variant):
    ckpt = custom_checkpoint(variant, num_layers=3)
    got, want = run_both(ckpt, *latent_shape(variant))
    assert got.shape[2] == 16
    assert_matches(got, want)


def test_5b_i2v_other_frame_count_matches_diffusers(custom_checkpoint):
    # diffusers falls back to the sin-cos table when the frame count differs from the learned one
    got, want = run_both(custom_checkpoint("5b-i2v", num_layers=3), 5, 8, 8)
    assert_matches(got, want)


def test_5b_i2v_rejects_other_resolution(custom_checkpoint):
    ours = load_transformer(custom_checkpoint("5b-i2v", num_layers=3) / "transformer")
    x = torch.randn(1, 3, 32, 6, 10)
    with pytest.raises(ValueError, match="8x8"):
        ours(x, torch.randn(1, 226, 32), torch.tensor([500.0]))


@pytest.mark.parametrize("frames,h,w", [(3, 6, 10), (13, 60, 90), (7, 10, 4), (1, 8, 8), (4, 16, 16)])
def test_rope_3d_crop_grid_matches_diffusers(frames, h, w):
    cfg = tiny_config("5b")  # grids are counted after patching
    ref_cfg = CogVideoXTransformer3DModel.from_config(cfg.to_diffusers()).config
    cos, sin = rope_3d(cfg, frames, h, w)
    ref_cos, ref_sin = diffusers_rope(ref_cfg, frames, 2 * h, 2 * w)
    assert cos.shape == (frames * h * w, cfg.head_dim)
    torch.testing.assert_close(cos, ref_cos, rtol=0, atol=1e-6)
    torch.testing.assert_close(sin, ref_sin, rtol=0, atol=1e-6)


@pytest.mark.parametrize("frames,h,w", [(2, 3, 5), (5, 16, 16), (1, 7, 2)])
def test_rope_3d_slice_grid_matches_diffusers(frames, h, w):
    cfg = tiny_config("1.5-5b")
    ref_cfg = CogVideoXTransformer3DModel.from_config(cfg.to_diffusers()).config
    cos, sin = rope_3d(cfg, frames, h, w)
    ref_cos, ref_sin = diffusers_rope(ref_cfg, 2 * frames, 2 * h, 2 * w)
    assert cos.shape == (frames * h * w, cfg.head_dim)
    torch.testing.assert_close(cos, ref_cos, rtol=0, atol=1e-6)
    torch.testing.assert_close(sin, ref_sin, rtol=0, atol=1e-6)


@pytest.mark.parametrize("dim,frames,h,w", [(32, 3, 3, 5), (64, 2, 4, 4), (1920, 13, 30, 45)])
def test_sincos_3d_matches_diffusers(dim, frames, h, w):
    got = sincos_3d(dim, frames, h, w, 1.875, 1.0)
    want = get_3d_sincos_pos_embed(dim, (w, h), frames, 1.875, 1.0, output_type="pt").flatten(0, 1)
    assert got.shape == want.shape == (frames * h * w, dim)
    torch.testing.assert_close(got, want.float(), rtol=0, atol=1e-6)
