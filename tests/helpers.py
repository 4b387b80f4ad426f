"""What several test files share. Each thing has one home: measurement helpers come from cogrt.kernels.measure,
diffusers' own RoPE tables from cogrt.bench.components; what only the tests need is defined here."""
from __future__ import annotations

import torch

from cogrt.bench.components import diffusers_rope as _diffusers_rope
from cogrt.engine.model import ModelConfig
from cogrt.kernels.measure import as_projection_views, realistic_qkv, rel_err, sampled_error  # noqa: F401


def random_image(height: int, width: int, seed: int = 0):
    """A random uint8 RGB image (H, W, 3)."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (height, width, 3), generator=g, dtype=torch.uint8).numpy()


def diffusers_rope(config, latent_frames: int, h: int, w: int, device=None):
    """diffusers' RoPE tables for a diffusers transformer `config` and latents of latent_frames x h x w."""
    return _diffusers_rope(ModelConfig.from_diffusers(dict(config)), latent_frames, h, w, device)
