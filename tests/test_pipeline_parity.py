"""engine.load_pipeline vs diffusers' CogVideoX pipelines: same checkpoint, request and seed -> same video."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from diffusers import CogVideoXImageToVideoPipeline, CogVideoXPipeline
from PIL import Image

from conftest import VARIANTS
from helpers import random_image
from cogrt.engine.request import GenerationRequest

PROMPT = "a red fox runs through fresh snow at dawn, cinematic"
NEGATIVE = "blurry, low quality"


def size_for(variant: str) -> tuple[int, int]:
    return (64, 64) if variant == "5b-i2v" else (64, 80)  # 5B-I2V has learned positions: its sample size only


def request_for(variant: str, seed: int, **kw) -> dict:
    h, w = size_for(variant)
    req = dict(prompt=PROMPT, negative_prompt=NEGATIVE, num_frames=9, height=h, width=w, num_inference_steps=3,
               guidance_scale=6.0)
    req.update(kw)
    if variant.endswith("i2v"):
        req["image"] = random_image(req["height"], req["width"], seed=seed + 100)
    return req


def diffusers_frames(ckpt, variant: str, req: dict, seed: int) -> np.ndarray:
    cls = CogVideoXImageToVideoPipeline if variant.endswith("i2v") else CogVideoXPipeline
    pipe = cls.from_pretrained(ckpt)  # fp32 on the CPU
    pipe.set_progress_bar_config(disable=True)
    kw = dict(req)
    if "image" in kw:
        kw["image"] = Image.fromarray(kw["image"])
    out = pipe(**kw, generator=torch.Generator("cpu").manual_seed(seed), output_type="np").frames[0]
    return (np.asarray(out) * 255).round().astype(np.uint8)


def assert_video_close(ours: np.ndarray, ref: np.ndarray):
    assert ours.dtype == np.uint8
    assert ours.shape == ref.shape
    assert ref.std() > 0  # a real video, not a constant
    diff = np.abs(ours.astype(np.int16) - ref.astype(np.int16)).max()
    assert diff <= 1, f"max abs diff {diff} (uint8)"


@pytest.mark.parametrize("variant", VARIANTS)
def test_pipeline_matches_diffusers(checkpoint, pipeline, variant):
    seed = 1234 + VARIANTS.index(variant)
    req = request_for(variant, seed)
    res = pipeline(variant).generate(**req, seed=seed)
    h, w = size_for(variant)
    assert res.frames.shape == (9, h, w, 3)
    assert tuple(res.latents.shape) == (1, 3, 16, h // 8, w // 8)
    assert res.seed == seed
    assert set(res.timings) >= {"text", "denoise", "decode", "total"}
    assert all(v >= 0 for v in res.timings.values())
    assert res.timings["total"] >= res.timings["denoise"]
    assert_video_close(res.frames, diffusers_frames(checkpoint(variant), variant, req, seed))


def test_dynamic_cfg_matches_diffusers(checkpoint, pipeline):
    seed = 77
    req = request_for("5b", seed, use_dynamic_cfg=True)
    ours = pipeline("5b").generate(**req, seed=seed).frames
    assert_video_close(ours, diffusers_frames(checkpoint("5b"), "5b", req, seed))
    plain = pipeline("5b").generate(**request_for("5b", seed), seed=seed).frames
    assert not np.array_equal(ours, plain)  # dynamic CFG changes the result


def test_1_5_odd_latent_frames_pads_like_diffusers(checkpoint, pipeline):
    seed = 5
    req = request_for("1.5-5b", seed, num_frames=17)  # 5 latent frames: padded to 6 for patch_size_t=2
    res = pipeline("1.5-5b").generate(**req, seed=seed)
    assert res.frames.shape == (17, 64, 80, 3)
    assert tuple(res.latents.shape) == (1, 5, 16, 8, 10)
    assert_video_close(res.frames, diffusers_frames(checkpoint("1.5-5b"), "1.5-5b", req, seed))


def test_seed_determinism(pipeline):
    pipe = pipeline("2b")
    req = request_for("2b", 0, num_inference_steps=2)
    a = pipe.generate(**req, seed=11).frames
    b = pipe.generate(**req, seed=11).frames
    c = pipe.generate(**req, seed=12).frames
    assert np.array_equal(a, b)
    assert not np.array_equal(a, c)
    assert np.abs(a.astype(np.int16) - c.astype(np.int16)).mean() > 1


def test_no_seed_gives_a_reported_random_seed(pipeline):
    pipe = pipeline("2b")
    req = request_for("2b", 0, num_inference_steps=1)
    res = pipe.generate(**req)
    assert isinstance(res.seed, int)
    again = pipe.generate(**req, seed=res.seed)
    assert np.array_equal(res.frames, again.frames)


def test_load_reports_where_its_time_went(pipeline):
    times = pipeline("2b").load_timings
    assert list(times) == ["read_transformer", "imports", "vae_and_text_encoder", "transforms"]
    assert all(v >= 0 for v in times.values()) and times["read_transformer"] > 0


def test_loop_setup_is_reused_and_changes_nothing(pipeline):
    """The scheduler and position tables of the last request serve the next one of the same step count and shape
    (Pipeline.loop_setup): the same objects, the same video; a request of another kind in between changes nothing."""
    pipe = pipeline("5b")
    req = request_for("5b", 0, num_inference_steps=2)
    first = pipe.generate(**req, seed=3).frames
    sched, positions = pipe._last_schedule[1][0], pipe._last_positions[1]
    again = pipe.generate(**req, seed=3).frames  # runs on the kept scheduler and tables
    assert pipe._last_schedule[1][0] is sched and pipe._last_positions[1] is positions
    assert np.array_equal(again, first)
    pipe.generate(**request_for("5b", 0, num_inference_steps=3, height=64, width=64, num_frames=17), seed=3)
    assert pipe._last_schedule[1][0] is not sched  # replaced by the other kind's
    assert np.array_equal(pipe.generate(**req, seed=3).frames, first)


def test_image_encode_ignores_the_last_decodes_tiles(pipeline):
    """A tiled decode leaves its tiles set on the VAE; the next image-to-video request's image encode must not be
    cut by them (diffusers' pipeline encodes it whole)."""
    from cogrt.engine import vae_tiles
    pipe = pipeline("5b-i2v")
    req = GenerationRequest(**request_for("5b-i2v", 0, height=160, width=288))
    frames, _ = pipe.cfg.latent_frames(req.num_frames)
    want = pipe.image_latents(req, frames, torch.Generator("cpu").manual_seed(0))
    vae_tiles.grid(20, 36, 2, 2).apply(pipe.vae)
    pipe.vae.tile_sample_min_height = pipe.vae.tile_sample_min_width = 64  # small enough to cut a 160 x 288 image
    got = pipe.image_latents(req, frames, torch.Generator("cpu").manual_seed(0))
    assert torch.equal(got, want)
