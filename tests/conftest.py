"""Shared fixtures: tiny random checkpoints of every CogVideoX variant, written once per session."""
from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():  # Triton kernels run in its interpreter on the CPU (set before triton loads)
    os.environ.setdefault("TRITON_INTERPRET", "1")

from engine.random_model import tiny_config, write_random_checkpoint

VARIANTS = ("2b", "5b", "5b-i2v", "1.5-5b", "1.5-5b-i2v")


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def poison_kernel_outputs(monkeypatch):
    """Kernel outputs start as NaN, so that an element a kernel fails to write fails the test."""
    from kernels import alloc
    def poisoned(shape, like, dtype=None):
        dtype = dtype or like.dtype
        fill = float("nan") if dtype.is_floating_point else torch.iinfo(dtype).min  # int8 quant stops at ±127
        return torch.full(shape, fill, device=like.device, dtype=dtype)
    monkeypatch.setattr(alloc, "empty", poisoned)


@pytest.fixture(scope="session")
def checkpoint(tmp_path_factory):
    """checkpoint("5b") -> Path of a tiny-5b checkpoint in the diffusers layout (written once per session)."""
    cache = {}

    def get(variant: str):
        if variant not in cache:
            d = tmp_path_factory.mktemp(f"ckpt-{variant}")
            cache[variant] = write_random_checkpoint(d, f"tiny-{variant}")
        return cache[variant]
    return get


@pytest.fixture(scope="session")
def custom_checkpoint(tmp_path_factory):
    """custom_checkpoint("5b", num_layers=3) -> Path of a checkpoint of tiny_config(variant, **overrides)."""
    cache = {}

    def get(variant: str, **overrides):
        key = (variant, tuple(sorted(overrides.items())))
        if key not in cache:
            d = tmp_path_factory.mktemp(f"ckpt-{variant}-custom")
            cache[key] = write_random_checkpoint(d, tiny_config(variant, **overrides), seed=7)
        return cache[key]
    return get


@pytest.fixture(scope="session")
def pipeline(checkpoint):
    """pipeline("5b") -> an fp32 CPU engine.Pipeline, loaded once per session. Tests must not change it."""
    import engine
    cache = {}

    def get(variant: str):
        if variant not in cache:
            cache[variant] = engine.load_pipeline(checkpoint(variant), device="cpu", dtype=torch.float32)
        return cache[variant]
    return get


def random_image(height: int, width: int, seed: int = 0):
    """A random uint8 RGB image (H, W, 3)."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (height, width, 3), generator=g, dtype=torch.uint8).numpy()


def diffusers_rope(config, latent_frames: int, h: int, w: int, device=None):
    """CogVideoXPipeline._prepare_rotary_positional_embeddings, in latent units, from diffusers' own functions."""
    from diffusers.models.embeddings import get_3d_rotary_pos_embed
    from diffusers.pipelines.cogvideo.pipeline_cogvideox import get_resize_crop_region_for_grid
    p, pt = config.patch_size, config.patch_size_t
    grid_h, grid_w = h // p, w // p
    base_h, base_w = config.sample_height // p, config.sample_width // p
    if pt is None:
        crops = get_resize_crop_region_for_grid((grid_h, grid_w), base_w, base_h)
        return get_3d_rotary_pos_embed(embed_dim=config.attention_head_dim, crops_coords=crops,
                                       grid_size=(grid_h, grid_w), temporal_size=latent_frames, device=device)
    return get_3d_rotary_pos_embed(embed_dim=config.attention_head_dim, crops_coords=None,
                                   grid_size=(grid_h, grid_w), temporal_size=latent_frames // pt,
                                   grid_type="slice", max_size=(base_h, base_w), device=device)
