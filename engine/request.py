"""What makes one video (`GenerationRequest`) and what comes back (`GenerationResult`).

A request is checked on construction for what it can know alone; `check_for(cfg)` then applies the
model's own rules (frame count, resolution, image or not) before any work starts. Serving and the CLI
both build one.
"""
from __future__ import annotations

import os
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .model import ModelConfig
from .modes import check_mode
from .caches import LEVELS
from .caches.teacache import check_fixed_steps, published_coefficients, read_coefficients


@dataclass
class GenerationRequest:
    prompt: str
    negative_prompt: str = ""
    image: Any = None  # PIL image, HxWx3 uint8 array, or a path; image-to-video models only
    num_frames: int | None = None  # None: the model's default (49 for 1.0, 81 for 1.5)
    height: int | None = None
    width: int | None = None
    num_inference_steps: int = 50
    guidance_scale: float = 6.0
    use_dynamic_cfg: bool = False
    seed: int | None = None  # None: a random seed, reported in the result
    loras: tuple[tuple[str, float], ...] = ()  # (path, weight); weight multiplies the file's alpha/r
    mode: str | None = None  # engine.modes.MODES; None: the pipeline's own. fast = fp8 + TeaCache
    teacache: float | None = None  # TeaCache threshold (0.1-0.3 are usual); None: every step is computed
    # the polynomial, highest power first, or a `cogrt calibrate-cache` JSON file; None: the published one
    teacache_coefficients: Any = None
    # BENCHMARK ONLY: compute exactly these steps (engine.teacache.fixed_schedule), whatever the model says;
    # for speed runs on random weights, where TeaCache's own decisions mean nothing
    teacache_fixed_steps: tuple[int, ...] | None = None
    # the model's calibrated step cache (probe or x0, engine/caches/) at a quality level: safe, balanced or
    # fast (engine.caches.LEVELS); or at a raw threshold (cache_threshold, for experts and calibration)
    cache: str | None = None
    cache_threshold: float | None = None

    def __post_init__(self):
        if not isinstance(self.prompt, str):
            raise TypeError(f"prompt must be a string, got {type(self.prompt).__name__}")
        if not isinstance(self.negative_prompt, str):
            raise TypeError(f"negative_prompt must be a string, got {type(self.negative_prompt).__name__}")
        if not isinstance(self.num_inference_steps, int) or self.num_inference_steps < 1:
            raise ValueError(f"num_inference_steps must be a positive integer, got {self.num_inference_steps!r}")
        if not float(self.guidance_scale) >= 0:
            raise ValueError(f"guidance_scale must be >= 0, got {self.guidance_scale!r}")
        for name in ("num_frames", "height", "width"):
            v = getattr(self, name)
            if v is not None and (not isinstance(v, int) or v < 1):
                raise ValueError(f"{name} must be a positive integer, got {v!r}")
        if self.seed is None:
            self.seed = random.randrange(2**63)
        elif not isinstance(self.seed, int) or isinstance(self.seed, bool):
            raise TypeError(f"seed must be an int, got {type(self.seed).__name__}")
        if self.mode is not None:
            check_mode(self.mode)
        loras = []
        for item in self.loras:
            path, weight = (item, 1.0) if isinstance(item, (str, os.PathLike)) else item
            if not Path(path).is_file():
                raise FileNotFoundError(f"LoRA file not found: {path}")
            loras.append((str(path), float(weight)))
        self.loras = tuple(loras)
        if self.teacache is not None:
            if not float(self.teacache) >= 0:
                raise ValueError(f"teacache (a threshold) must be >= 0, got {self.teacache!r}")
            self.teacache = float(self.teacache)
        if self.teacache_coefficients is not None:
            if self.teacache is None:
                raise ValueError("teacache_coefficients were given without a teacache threshold")
            self.teacache_coefficients = read_coefficients(self.teacache_coefficients)
        if self.teacache_fixed_steps is not None:
            self.teacache_fixed_steps = check_fixed_steps(self.teacache_fixed_steps, self.num_inference_steps)
        if self.cache is not None and self.cache not in LEVELS:
            raise ValueError(f"unknown cache level {self.cache!r}; valid: {', '.join(LEVELS)} (or none)")
        if self.cache_threshold is not None:
            if not float(self.cache_threshold) >= 0:
                raise ValueError(f"cache_threshold must be >= 0, got {self.cache_threshold!r}")
            self.cache_threshold = float(self.cache_threshold)
        asked = [n for n in ("teacache", "teacache_fixed_steps", "cache", "cache_threshold")
                 if getattr(self, n) is not None]
        if len(asked) > 1 and asked != ["cache", "cache_threshold"]:
            raise ValueError(f"one step cache per request: got {' and '.join(asked)}")

    def check_for(self, cfg: ModelConfig) -> None:
        """Fill the model's defaults and apply its rules; every message gives the valid values."""
        self.num_frames = self.num_frames or cfg.sample_frames
        self.height = self.height or cfg.sample_height * 8
        self.width = self.width or cfg.sample_width * 8
        if (self.num_frames - 1) % 8:
            lo = (self.num_frames - 1) // 8 * 8 + 1
            raise ValueError(f"num_frames must be 8N+1 for {cfg.variant} (e.g. {lo} or {lo + 8}, default "
                             f"{cfg.sample_frames}); got {self.num_frames}")
        step = 8 * cfg.patch_size
        for name in ("height", "width"):
            v = getattr(self, name)
            if v % step:
                raise ValueError(f"{name} must be a multiple of {step} for {cfg.variant} (e.g. {v // step * step or step} "
                                 f"or {(v // step + 1) * step}); got {v}")
        if cfg.use_learned_positional_embeddings and (self.height, self.width) != (cfg.sample_height * 8,
                                                                                   cfg.sample_width * 8):
            raise ValueError(f"{cfg.variant} has learned positions and only generates at "
                             f"{cfg.sample_height * 8}x{cfg.sample_width * 8}; got {self.height}x{self.width}")
        if cfg.patch_size_t and (self.height > cfg.sample_height * 8 or self.width > cfg.sample_width * 8):
            raise ValueError(f"{cfg.variant}'s position grid allows at most {cfg.sample_height * 8}x"
                             f"{cfg.sample_width * 8}; got {self.height}x{self.width}")
        if cfg.is_i2v and self.image is None:
            raise ValueError(f"{cfg.variant} is an image-to-video model: pass an image (--image first_frame.png)")
        if not cfg.is_i2v and self.image is not None:
            raise ValueError(f"{cfg.variant} is a text-to-video model and takes no image; "
                             f"use an image-to-video checkpoint for --image")
        if self.teacache is not None and self.teacache_coefficients is None:
            self.teacache_coefficients = published_coefficients(cfg)


@dataclass
class GenerationResult:
    frames: np.ndarray  # uint8 (F, H, W, 3)
    latents: Any  # torch.Tensor (1, F_latent, C, H/8, W/8), the denoised latents before decoding
    seed: int
    fps: int
    # seconds per stage: text, denoise, decode, total, and lora (switching the fused LoRA set; 0 when unchanged)
    timings: dict[str, float] = field(default_factory=dict)
    steps_computed: list[int] = field(default_factory=list)  # step indices whose blocks ran
    steps_skipped: list[int] = field(default_factory=list)  # step indices served by the step cache
    mode: str = "exact"  # the mode the request ran in
    peak_memory_bytes: int | None = None  # the GPU's peak allocation during the request (None off the GPU)
