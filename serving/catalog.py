"""What the served model accepts, read from its checkpoint's config (no weights): sizes, lengths, modes and LoRAs,
and the check of a create form against them. Every refusal names the field and lists the values that fit."""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from pathlib import Path

from cogrt.engine import caches, loader, modes
from cogrt.engine.model import ModelConfig
from cogrt.engine.request import GenerationRequest
from cogrt.engine.caches.teacache import published_coefficients

from .config import ServeConfig
from .schema import ApiError, LoraRef, ModelInfo, VideoCreateForm

DEFAULT_STEPS, DEFAULT_GUIDANCE = 50, 6.0


@dataclass
class Card:
    name: str
    cfg: ModelConfig
    mode: str  # the mode the generator loads
    sizes: list[str]
    max_steps: int
    teacache: bool  # whether TeaCache coefficients exist for it
    cache_levels: list[str] = dataclasses.field(default_factory=list)  # the step cache's calibrated levels

    @property
    def fps(self) -> int:
        return self.cfg.fps

    @property
    def default_size(self) -> str:
        return f"{self.cfg.sample_width * 8}x{self.cfg.sample_height * 8}"

    @property
    def frames(self) -> list[int]:
        """8N+1 frame counts up to the one the model was trained at."""
        return list(range(9, self.cfg.sample_frames + 1, 8))

    @property
    def seconds(self) -> list[str]:
        """Whole seconds whose frame count (seconds · fps + 1) the model takes."""
        return [str(s) for s in range(1, 61) if s * self.fps + 1 in self.frames]

    @property
    def modes(self) -> list[str]:
        return list(modes.request_modes(self.mode, None))

    def info(self, loras: list[str]) -> ModelInfo:
        return ModelInfo(id=self.name, variant=self.cfg.variant, image_to_video=self.cfg.is_i2v, fps=self.fps,
                         sizes=self.sizes, seconds=self.seconds, frames=self.frames, default_size=self.default_size,
                         default_seconds=_seconds(self.cfg.sample_frames, self.fps), modes=self.modes,
                         cache_levels=self.cache_levels, loras=loras,
                         max_inference_steps=self.max_steps)


def card_for(config: ServeConfig) -> Card:
    root = Path(config.model)
    cfg = loader.load_config(root / "transformer")
    sizes = config.sizes or default_sizes(cfg)
    for s in sizes:
        w, h = _size(s)
        GenerationRequest(prompt="", width=w, height=h, image=b"" if cfg.is_i2v else None).check_for(cfg)
    try:
        teacache = (root / "teacache_coefficients.json").is_file() or bool(published_coefficients(cfg))
    except ValueError:
        teacache = False
    levels = root / caches.LEVELS_FILE
    levels = [k for k in caches.LEVELS if k in caches.read_levels(levels)["thresholds"]] if levels.is_file() else []
    return Card(config.name, cfg, modes.check_mode(config.mode), sizes, config.max_steps, teacache, levels)


def default_sizes(cfg: ModelConfig) -> list[str]:
    """The native size; unless the model's positions are learned, its transpose and half of it too, where the
    model's own rules allow them."""
    w, h = cfg.sample_width * 8, cfg.sample_height * 8
    out = [(w, h)]
    if not cfg.use_learned_positional_embeddings:
        step = 8 * cfg.patch_size
        out += [(h, w), (w // 2 // step * step, h // 2 // step * step)]
    ok = []
    for sw, sh in dict.fromkeys(out):
        try:
            GenerationRequest(prompt="", width=sw, height=sh, image=b"" if cfg.is_i2v else None).check_for(cfg)
        except ValueError:
            continue
        ok.append(f"{sw}x{sh}")
    return ok


def resolve(card: Card, form: VideoCreateForm, loras: list[str], has_image: bool, max_prompt: int) -> dict:
    """The form checked against the model -> the job's stored parameters (everything the generator needs)."""
    if not form.prompt.strip():
        raise ApiError(400, "invalid_prompt", "prompt must not be empty", "prompt")
    for name in ("prompt", "negative_prompt"):
        if len(getattr(form, name)) > max_prompt:
            raise ApiError(400, "prompt_too_long", f"{name} is {len(getattr(form, name))} characters; at most "
                                                   f"{max_prompt} are accepted", name)
    if form.model is not None and form.model != card.name:
        raise ApiError(400, "model_not_found", f"unknown model {form.model!r}; served: {card.name}", "model")
    width, height = _size(form.size or (card.default_size if card.default_size in card.sizes else card.sizes[0]),
                          card.sizes)
    if form.frames is not None:
        if form.frames not in card.frames:
            raise ApiError(400, "invalid_frames", f"frames must be one of {card.frames}; got {form.frames}", "frames")
        frames = form.frames
    elif form.seconds is not None:
        if form.seconds.strip() not in card.seconds:
            raise ApiError(400, "invalid_seconds", f"seconds must be one of {card.seconds} for {card.name} "
                                                   f"({card.fps} fps, up to {card.cfg.sample_frames} frames); got "
                                                   f"{form.seconds!r}", "seconds")
        frames = int(form.seconds) * card.fps + 1
    else:
        frames = card.cfg.sample_frames
    mode = form.mode or card.mode
    if mode not in card.modes:
        raise ApiError(400, "invalid_mode", f"mode must be one of {card.modes} here (the generator loaded "
                                            f"{card.mode!r}); got {mode!r}", "mode")
    steps = DEFAULT_STEPS if form.num_inference_steps is None else form.num_inference_steps
    if not 1 <= steps <= card.max_steps:
        raise ApiError(400, "invalid_steps", f"num_inference_steps must be between 1 and {card.max_steps}; got "
                                             f"{steps}", "num_inference_steps")
    guidance = DEFAULT_GUIDANCE if form.guidance_scale is None else form.guidance_scale
    if not (math.isfinite(guidance) and 0 <= guidance <= 50):
        raise ApiError(400, "invalid_guidance", f"guidance_scale must be a finite number in [0, 50]; got {guidance}",
                       "guidance_scale")
    threshold = form.teacache_threshold
    if threshold is not None and not (math.isfinite(threshold) and 0 <= threshold <= 10):
        raise ApiError(400, "invalid_teacache", f"teacache_threshold must be in [0, 10]; got {threshold}",
                       "teacache_threshold")
    if form.cache is not None and form.cache not in card.cache_levels:
        raise ApiError(400, "invalid_cache", f"cache must be one of the levels {card.name} was calibrated for: "
                                             f"{card.cache_levels or 'none'}; got {form.cache!r}", "cache")
    if form.cache is not None and threshold is not None:
        raise ApiError(400, "invalid_cache", "pass cache (a level) or teacache_threshold, not both", "cache")
    if (threshold is not None or mode == "fast") and not (card.teacache or "fast" in card.cache_levels):
        raise ApiError(400, "teacache_unavailable", f"{card.name} has no TeaCache coefficients (a released shape, or "
                                                    f"a teacache_coefficients.json beside it), so it cannot skip "
                                                    f"steps", "teacache_threshold" if threshold is not None else "mode")
    refs = form.lora_refs()
    for ref in refs:
        if ref.name not in loras:
            raise ApiError(400, "lora_not_found", f"unknown LoRA {ref.name!r}; available: {loras or 'none'}", "loras")
    if card.cfg.is_i2v and not has_image:
        raise ApiError(400, "image_required", f"{card.name} is an image-to-video model: send the first frame as "
                                              f"input_reference", "input_reference")
    if has_image and not card.cfg.is_i2v:
        raise ApiError(400, "image_not_supported", f"{card.name} is a text-to-video model and takes no "
                                                   f"input_reference", "input_reference")
    return dict(prompt=form.prompt, negative_prompt=form.negative_prompt, frames=frames, width=width, height=height,
                num_inference_steps=steps, guidance_scale=guidance, use_dynamic_cfg=form.use_dynamic_cfg,
                seed=form.seed, mode=mode, teacache_threshold=threshold, cache=form.cache,
                loras=[LoraRef.model_dump(r) for r in refs], size=f"{width}x{height}",
                seconds=_seconds(frames, card.fps), fps=card.fps)


def _size(s: str, valid: list[str] | None = None) -> tuple[int, int]:
    w, sep, h = s.strip().lower().partition("x")
    if not (sep and w.isdigit() and h.isdigit()) or (valid is not None and f"{int(w)}x{int(h)}" not in valid):
        raise ApiError(400, "invalid_size", f"size must be one of {valid} (WIDTHxHEIGHT); got {s!r}", "size")
    return int(w), int(h)


def _seconds(frames: int, fps: int) -> str:
    s = (frames - 1) / fps
    return str(int(s)) if s == int(s) else f"{s:g}"
