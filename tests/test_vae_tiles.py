"""Tile plans for the VAE decode (engine/vae_tiles.py): diffusers' loop cuts exactly the planned grid, the choice
follows the free memory, and a planned tiled decode matches the untiled one away from nothing but its seams."""
from __future__ import annotations

import copy

import pytest
import torch

from cogrt.engine import vae_tiles
from cogrt.engine.vae_tiles import SCALE


@pytest.mark.parametrize("h,w", [(60, 90), (96, 170), (30, 45), (13, 17), (8, 8), (44, 80)])
def test_every_plan_is_the_grid_diffusers_cuts(h, w):
    plans = vae_tiles.plans(h, w)
    assert plans[0].rows == plans[0].cols == 1 and not plans[0].tiled  # untiled: always possible, the cheapest
    for p in plans:
        class Vae:  # what diffusers' tiled_decode reads
            def enable_tiling(self): self.use_tiling = True
            def disable_tiling(self): self.use_tiling = False
        v = Vae()
        p.apply(v)
        if not p.tiled:
            assert not v.use_tiling
            continue
        # diffusers' own arithmetic (AutoencoderKLCogVideoX.tiled_decode)
        step_h = int(v.tile_latent_min_height * (1 - v.tile_overlap_factor_height))
        step_w = int(v.tile_latent_min_width * (1 - v.tile_overlap_factor_width))
        blend_h = int(v.tile_sample_min_height * v.tile_overlap_factor_height)
        blend_w = int(v.tile_sample_min_width * v.tile_overlap_factor_width)
        assert len(range(0, h, step_h)) == p.rows and len(range(0, w, step_w)) == p.cols, p
        assert blend_h == SCALE * p.overlap_h and blend_w == SCALE * p.overlap_w, p
        # the kept part of each tile is its step: the rows and columns add up to the frame
        assert v.tile_sample_min_height - blend_h == SCALE * step_h and v.tile_sample_min_width - blend_w == SCALE * step_w
        assert p.tile_h >= 3 * p.overlap_h and p.tile_w >= 3 * p.overlap_w
        assert p.decoded_pixels(h, w) >= h * w * SCALE * SCALE


def test_the_choice_follows_free_memory():
    h, w = 60, 90  # the 5B request, 480 x 720
    big = vae_tiles.choose(h, w, 49, 2, 140 * 2**30)
    assert not big.tiled
    short = vae_tiles.choose(h, w, 49, 2, 8 * 2**30)
    assert short.tiled and short.peak_bytes(49, 2) <= 0.8 * 8 * 2**30
    # the cheapest that fits: a plan that decodes fewer pixels would not have fit
    cheaper = [p for p in vae_tiles.plans(h, w) if p.decoded_pixels(h, w) < short.decoded_pixels(h, w)]
    assert cheaper and all(p.peak_bytes(49, 2) > 0.8 * 8 * 2**30 for p in cheaper)
    # fewer tiles than diffusers' fixed 240 x 360 ones (3 x 3 at this size, 1.4x the pixels) where memory allows
    assert short.decoded_pixels(h, w) < 1.4 * h * w * SCALE * SCALE
    assert vae_tiles.choose(h, w, 49, 2, 2**20) is None
    assert vae_tiles.choose(h, w, 49, 2, 140 * 2**30, tiled=True).tiled
    assert not vae_tiles.choose(h, w, 49, 2, 2**20, tiled=False, margin=1e9).tiled


def test_a_planned_tiled_decode_matches_the_untiled_one(checkpoint):
    from diffusers import AutoencoderKLCogVideoX
    vae = AutoencoderKLCogVideoX.from_pretrained(checkpoint("5b") / "vae").eval()
    vae.enable_slicing()
    h, w = 20, 36  # latents: 160 x 288 pixels, room for 2 x 2 tiles of at least three overlaps
    z = torch.randn(1, vae.config.latent_channels, 3, h, w, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        vae_tiles.grid(h, w, 1, 1).apply(vae)
        ref = vae.decode(z).sample
        out = {}
        for rows, cols in [(2, 1), (1, 2), (2, 2)]:
            plan = vae_tiles.grid(h, w, rows, cols)
            assert plan is not None and plan.tiled
            plan.apply(copy_of := copy.deepcopy(vae))
            out[rows, cols] = copy_of.decode(z).sample
    for key, got in out.items():
        assert got.shape == ref.shape, key
        # tiles differ from the whole frame by their seams and by the decoder's GroupNorm statistics, taken per
        # tile: 2.3-3.7% of the mean here, where a misplaced or missing tile would be of the order of 100%
        err = (got - ref).abs().mean() / ref.abs().mean()
        assert err < 0.06, (key, err)


def test_the_pipeline_tiles_only_when_memory_is_short(checkpoint, monkeypatch):
    from cogrt.engine import load_pipeline
    from cogrt.engine import pipeline as pipeline_module
    pipe = load_pipeline(checkpoint("5b"))
    kw = dict(num_frames=9, height=160, width=288, num_inference_steps=1, seed=0)
    # the host's free memory is whatever the other processes leave (CI ran short of it once): each part sets its own
    monkeypatch.setattr(pipeline_module, "free_memory", lambda device: 1 << 40)
    want = pipe.generate("a red circle", **kw)
    assert not pipe.decode_plan.tiled and not pipe.vae.use_tiling
    untiled = pipe.decode_plan.peak_bytes(9, pipe.vae.dtype.itemsize)
    with monkeypatch.context() as m:  # room for tiles, not for the whole frame
        m.setattr(pipeline_module, "free_memory", lambda device: untiled)
        got = pipe.generate("a red circle", **kw)
    assert pipe.decode_plan.tiled and not pipe.text_parked
    assert got.frames.shape == want.frames.shape
    assert torch.equal(got.latents, want.latents)


def test_forced_tiling_and_where_the_text_encoder_goes(checkpoint, monkeypatch):
    from cogrt.engine import load_pipeline
    from cogrt.engine import pipeline as pipeline_module
    from cogrt.engine.request import GenerationRequest
    pipe = load_pipeline(checkpoint("5b"))
    small = GenerationRequest(prompt="x", num_frames=9, height=64, width=64)  # no tiled grid exists at 8 x 8 latents
    big = GenerationRequest(prompt="x", num_frames=9, height=160, width=288)
    with monkeypatch.context() as m:
        m.setattr(pipeline_module, "free_memory", lambda device: 1)  # nothing fits
        pipe.vae_tiling = True
        pipe._configure_vae(small)  # asked to tile what cannot be tiled: untiled, and nothing is parked for it
        assert not pipe.decode_plan.tiled and not pipe.text_parked
        pipe.vae_tiling = False
        pipe._configure_vae(big)  # tiling off: untiled whatever the memory, nothing parked
        assert not pipe.decode_plan.tiled and not pipe.text_parked and not pipe.vae.use_tiling
        pipe.vae_tiling = None
        pipe._configure_vae(big)  # auto, and not even the smallest tiles fit: the text encoder leaves, the smallest
        assert pipe.decode_plan.tiled and pipe.text_parked
        smallest = min(vae_tiles.plans(20, 36), key=lambda p: p.tile_h * p.tile_w)
        assert pipe.decode_plan == smallest
    pipe.vae_tiling = True
    # asked to tile, with memory to spare (set here: CI's host once had too little free for this grid at half of
    # it, and took a finer one): the cheapest tiled grid
    monkeypatch.setattr(pipeline_module, "free_memory", lambda device: 1 << 40)
    pipe._configure_vae(big)
    assert pipe.decode_plan == next(p for p in vae_tiles.plans(20, 36) if p.tiled) and pipe.vae.use_tiling
