"""Request → video: text encode → denoise loop (CFG, scheduler) → VAE decode.

Numerics follow diffusers' `CogVideoXPipeline` / `CogVideoXImageToVideoPipeline` step for step (the same
noise from a CPU generator, the same scheduler calls, the same frame padding), so a request gives the same
video in both. The transformer is ours; VAE, T5 and the schedulers are the libraries'.
"""
from __future__ import annotations

import contextlib
import math
import os
import sys
import threading
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from tqdm.auto import tqdm

from . import caches, loader, modes, quant, vae_tiles
from .caches import teacache
from .dpm import DPMSteps
from .lora import lora_key, read_lora
from .model import CogVideoXTransformer, ModelConfig
from .request import GenerationRequest, GenerationResult
from .runner import Runner, compile_errors

# load_pipeline imports the libraries in a thread while the transformer is read, with the interpreter switching
# threads every READ_SWITCH_INTERVAL seconds meanwhile (Python's default is 5 ms; the setting is process-wide, for
# the read's second or so): that hides the read behind the imports (bench/RESULTS.md, "Start-up with a real-size
# T5 and the parallel reader").
READ_SWITCH_INTERVAL = 1e-4
log = logging.getLogger(__name__)


class OutOfMemory(RuntimeError):
    pass


@dataclass(frozen=True)
class LoopSetup:
    """A request's denoise loop before its first step (Pipeline.loop_setup)."""
    sched: object  # the diffusers scheduler, its timesteps set (shared by requests of the same step count)
    ts: list[int]  # its timesteps, on the host
    dpm: DPMSteps | None  # DPM-Solver++'s coefficients (None for DDIM)
    positions: tuple  # the transformer's position tables for this latent shape (shared, read-only)
    noise: torch.Tensor | None  # text-to-video's initial latents, unscaled; None: drawn in the loop (image-to-video)


class Pipeline:
    def __init__(self, runner: Runner, vae, text_encoder, tokenizer, scheduler_config: dict, device: torch.device,
                 dtype: torch.dtype, offload: bool = False, mode: str = "exact", coefficients: Path | None = None,
                 levels: Path | None = None):
        """Use `load_pipeline` or `assemble`. `coefficients`: the model's own TeaCache fit, if it ships one;
        `levels`: its calibrated step-cache levels (engine.caches.LEVELS_FILE), if it ships them."""
        from diffusers.video_processor import VideoProcessor
        self.runner, self.transformer = runner, runner.model
        self.vae, self.text_encoder, self.tokenizer = vae, text_encoder, tokenizer
        self.scheduler_config = dict(scheduler_config)
        self.device, self.dtype, self.offload = device, dtype, offload
        self.mode, self.transforms, self.coefficients = mode, runner.transforms, coefficients
        self.levels = caches.read_levels(levels) if levels is not None else None
        self.vae_tiling = self.transforms.vae_tiling
        if self.device.type == "cpu":  # the decoder's convolutions through oneDNN (engine/vae_cpu.py)
            from .vae_cpu import use_onednn_convs
            use_onednn_convs(self.vae)
        self.video_processor = VideoProcessor(vae_scale_factor=8)
        self._lock = threading.Lock()  # one request at a time: LoRA switching edits the shared weights
        self.load_timings: dict[str, float] = {}  # load_pipeline's stages, in seconds
        self.parallel = None  # engine.parallel.Parallel: this rank's place when each video spans several devices
        self.text_parked = False  # the text encoder waits in host memory because the last decode needed its room
        self.decode_plan: vae_tiles.TilePlan | None = None  # the last decode's tiles
        # the last request's scheduler (with its DPM coefficients) and position tables, by step count and latent
        # shape: the next request of the same kind reuses them (both read-only) instead of 10-20 ms of set-up
        self._last_schedule: tuple[int, tuple] | None = None
        self._last_positions: tuple[tuple, tuple] | None = None

    @property
    def cfg(self) -> ModelConfig:
        return self.transformer.cfg

    # ------------------------------------------------------------------------------------------------
    def generate(self, prompt: str, progress: bool = False, **kw) -> GenerationResult:
        """diffusers-style call: generate("a cat", num_frames=49, seed=0, loras=[("x.safetensors", 1.0)])."""
        return self.run(GenerationRequest(prompt=prompt, **kw), progress=progress)

    def run(self, req: GenerationRequest, progress: bool = False, cache: caches.StepCache | None = None,
            on_step: Callable[[str, int, int], None] | None = None) -> GenerationResult:
        """`cache` replaces the step cache the request would make (calibration passes one that records).
        `on_step(stage, done, total)` is called as the request moves on: ("text", 1, 1) once the prompt is encoded,
        ("denoise", i, steps) after each step, ("decode", 0, 1) before the decode. What it raises stops the request
        there (a server cancels a job or enforces its deadline this way)."""
        mode = self.resolve(req)
        if self.parallel is not None:  # every rank draws the same noise: rank 0's seed
            req.seed = int(self.parallel.broadcast(torch.tensor([req.seed], device=self.device)).item())
        key = lora_key(req.loras)
        # read and checked before the lock is taken; a set that is fused already is not read again
        loras = [(read_lora(p), w) for p, w in req.loras] if key != self.runner.loras.key else None
        with self._lock:
            try:
                try:
                    return self._run(req, mode, loras, key, progress, cache, on_step)
                except compile_errors() as e:
                    if not self.runner.compiled or cache is not None:
                        raise
                    self.runner.uncompile(e)  # every block back to eager, then the request once more
                    return self._run(req, mode, loras, key, progress, cache, on_step)
            except torch.OutOfMemoryError as e:
                torch.cuda.empty_cache()
                raise OutOfMemory(
                    f"out of GPU memory generating {req.num_frames}x{req.height}x{req.width}: {e}. Try VAE tiling "
                    f"(--vae-tiling), model CPU offload (--offload), a quantized mode (--mode fp8), or fewer "
                    f"frames / a smaller size.") from e

    def resolve(self, req: GenerationRequest) -> str:
        """Apply the pipeline's mode and the model's own rules to `req`; returns the mode it runs in."""
        mode = req.mode or self.mode
        allowed = modes.request_modes(self.mode, self.transforms)
        if mode not in allowed:
            raise ValueError(f"this pipeline was loaded in mode {self.mode!r} ({self.transforms.describe()}); a "
                             f"request can ask for {', '.join(allowed)} here. Load another pipeline for {mode!r}")
        if mode == "fast" and all(x is None for x in (req.teacache, req.teacache_fixed_steps, req.cache,
                                                      req.cache_threshold)):
            # the probe cache at its `fast` level where the model was calibrated for it, else TeaCache
            if self.levels is not None and "fast" in self.levels["thresholds"]:
                req.cache = "fast"
            else:
                req.teacache = self.transforms.teacache or modes.FAST_TEACACHE
        if req.cache is not None:
            caches.threshold(req, self.levels)  # refused before the request runs, where the model has no such level
        if req.teacache is not None and req.teacache_coefficients is None and self.coefficients is not None:
            req.teacache_coefficients = teacache.read_coefficients(self.coefficients)
        req.check_for(self.cfg)
        return mode

    def _run(self, req, mode, loras, key, progress, cache, on_step) -> GenerationResult:
        times, t0 = {}, time.perf_counter()
        on_step = on_step or (lambda stage, done, total: None)
        if self.parallel is not None:
            on_step = self.parallel.agree(on_step)  # a stop that rank 0's callback raises stops every rank there
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        if cache is None:  # a fresh step cache for each request (None when it computes every step)
            cache = caches.new_state(req, req.num_inference_steps, self.levels)
        gen = torch.Generator("cpu").manual_seed(req.seed)
        cfg_on = req.guidance_scale > 1.0

        prompts = [req.negative_prompt, req.prompt] if cfg_on else [req.prompt]
        if self.parallel is None or self.parallel.first:
            if self.text_parked:
                self.text_encoder.to(self.device)
                self.text_parked = False
            with self._on_device(self.text_encoder, self.transforms.text_encoder == "offload"):
                text = self.encode_text(prompts)
                setup = self.loop_setup(req, gen)  # on the host while the GPU runs the text encoder
        else:
            setup = self.loop_setup(req, gen)
        if self.parallel is not None:  # encoded once, on rank 0
            if not self.parallel.first:
                text = torch.empty(len(prompts), self.cfg.max_text_seq_length, self.cfg.text_embed_dim,
                                   device=self.device, dtype=self.dtype)
            text = self.parallel.broadcast(text)
        times["text"] = self._lap(t0)
        on_step("text", 1, 1)

        with self._on_device(self.transformer):
            if loras is not None:
                times["lora"] = self.runner.switch_loras(loras, key)
            t1 = time.perf_counter()
            latents, extra = self.denoise(req, text, gen, progress, cache, on_step, setup)
        times["denoise"] = self._lap(t1)
        times.setdefault("lora", 0.0)

        on_step("decode", 0, 1)
        t2 = time.perf_counter()
        with self._on_device(self.vae):
            frames = self.decode(latents[:, extra:], req)
        times["decode"] = self._lap(t2)
        times["total"] = time.perf_counter() - t0
        computed, skipped = (cache.computed, cache.skipped) if cache else (list(range(req.num_inference_steps)), [])
        peak = torch.cuda.max_memory_allocated(self.device) if self.device.type == "cuda" else None
        return GenerationResult(frames=frames, latents=latents[:, extra:], seed=req.seed, fps=self.cfg.fps,
                                timings=times, steps_computed=computed, steps_skipped=skipped, mode=mode,
                                peak_memory_bytes=peak)

    def warm_up(self, num_frames: int | None = None, height: int | None = None, width: int | None = None,
                guidance: bool = True) -> float:
        """Run the transformer once at a request shape (the model's default size), so that compiling happens
        now and not in the first request. Returns its seconds."""
        req = GenerationRequest(prompt="", num_frames=num_frames, height=height, width=width, seed=0,
                                guidance_scale=6.0 if guidance else 1.0)
        req.check_for(self.cfg)
        frames, _ = self.cfg.latent_frames(req.num_frames)
        with self._on_device(self.transformer):
            return self.runner.warm_up(frames, req.height // 8, req.width // 8, 2 if guidance else 1,
                                       self.cfg.max_text_seq_length, self.device, self.dtype)

    def _lap(self, since: float) -> float:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return time.perf_counter() - since

    @contextlib.contextmanager
    def _on_device(self, module, offloaded: bool = False):
        """With model CPU offload (or `offloaded`), a component visits the GPU only for its own stage."""
        if not (self.offload or offloaded):
            yield
            return
        module.to(self.device)
        try:
            yield
        finally:
            module.to("cpu")
            if self.device.type == "cuda":
                torch.cuda.empty_cache()

    # ------------------------------------------------------------------------------------------------
    def encode_text(self, prompts: list[str]) -> torch.Tensor:
        n = self.cfg.max_text_seq_length
        ids = self.tokenizer(prompts, padding="max_length", max_length=n, truncation=True,
                             add_special_tokens=True, return_tensors="pt").input_ids
        for prompt in dict.fromkeys(prompts):  # each prompt once (CFG may pass an empty negative twice)
            full = self.tokenizer(prompt).input_ids  # unpadded, with the end-of-text token
            if len(full) > n:
                cut = self.tokenizer.decode(full[n - 1:], skip_special_tokens=True)
                log.warning("The prompt is longer than the text encoder's %d tokens; this end of it was cut: %r",
                            n, cut)
        dev = next(self.text_encoder.parameters()).device
        with torch.no_grad():
            emb = self.text_encoder(ids.to(dev))[0]
        return emb.to(self.device, self.dtype)  # (B, n, text_dim)

    def image_latents(self, req: GenerationRequest, latent_frames: int, gen: torch.Generator) -> torch.Tensor:
        """The first frame encoded by the VAE, then zero frames: (1, latent_frames, C, h, w)."""
        image = load_image(req.image)
        x = self.video_processor.preprocess(image, height=req.height, width=req.width)
        vae_dev = next(self.vae.parameters()).device
        x = x.to(vae_dev, self.vae.dtype).unsqueeze(2)  # (1, 3, 1, H, W)
        with torch.no_grad():
            self.vae.disable_tiling()  # the last decode's tiles would cut this encode too, unlike diffusers'
            z = self.vae.encode(x).latent_dist.sample(generator=gen)  # (1, C, 1, h, w)
        z = z.to(self.device, self.dtype).permute(0, 2, 1, 3, 4)  # (1, 1, C, h, w)
        s = self.vae.config.scaling_factor
        z = z / s if self.vae.config.invert_scale_latents else z * s
        pad = torch.zeros(1, latent_frames - 1, *z.shape[2:], device=self.device, dtype=self.dtype)
        return torch.cat([z, pad], dim=1)

    def loop_setup(self, req: GenerationRequest, gen: torch.Generator) -> LoopSetup:
        """The denoise loop's set-up: the pipeline calls it while the text encoder runs on the GPU, so that its
        host work (the scheduler's tables, the initial noise drawn on the CPU) hides behind it."""
        import diffusers
        from diffusers.utils.torch_utils import randn_tensor
        cfg, dev = self.cfg, self.device
        steps = req.num_inference_steps
        # host work first and copies to the device last: a copy from pageable memory waits for the queued text
        # encoder, and what comes after it is no longer hidden
        fresh = self._last_schedule is None or self._last_schedule[0] != steps
        if fresh:
            sched = getattr(diffusers, self.scheduler_config["_class_name"]).from_config(self.scheduler_config)
            sched.set_timesteps(steps)  # on the host: reading them back from the GPU would wait for the text encoder
            ts = sched.timesteps.tolist()
            # DPM's step, free of host syncs, its noise drawn while the forward runs (engine/dpm.py)
            dpm = DPMSteps(sched, ts) if type(sched).__name__ == "CogVideoXDPMScheduler" else None
            self._last_schedule = (steps, (sched, ts, dpm))
        sched, ts, dpm = self._last_schedule[1]
        frames, _ = cfg.latent_frames(req.num_frames)
        h, w = req.height // 8, req.width // 8
        noise = None
        if not cfg.is_i2v:  # image-to-video draws the image's latent sample from the generator first
            # on the host, as randn_tensor does for a CPU generator (the same numbers); moved below
            noise = randn_tensor((1, frames, cfg.out_channels, h, w), generator=gen, device=torch.device("cpu"),
                                 dtype=self.dtype)
        if self._last_positions is not None and self._last_positions[0] == (frames, h, w):
            positions = self._last_positions[1]
        else:
            positions = self.transformer.positions(frames, h, w, dev)
            # kept for the next request, unless memory is short: 2B's sin-cos table is 0.2 GB at 49 x 480 x 720
            self._last_positions = None if self.offload else ((frames, h, w), positions)
        if fresh:
            sched.timesteps = sched.timesteps.to(dev)  # where set_timesteps(device=dev) would put them
        noise = noise.to(dev) if noise is not None else None
        return LoopSetup(sched, ts, dpm, positions, noise)

    def denoise(self, req: GenerationRequest, text: torch.Tensor, gen: torch.Generator, progress: bool,
                cache: caches.StepCache | None = None, on_step=None, setup: LoopSetup | None = None):
        """Returns the final latents and how many leading latent frames are padding (1.5's temporal patch).
        With a step `cache` (engine/caches/), the model runs its blocks only where the cache decides to.
        `setup`: what loop_setup made for this request (made here if not given)."""
        from diffusers.utils.torch_utils import randn_tensor
        cfg, dev = self.cfg, self.device
        if setup is None:
            setup = self.loop_setup(req, gen)
        sched, ts, dpm, positions = setup.sched, setup.ts, setup.dpm, setup.positions
        timesteps = sched.timesteps
        steps = len(timesteps)
        if cache is not None and cache.num_steps != steps:
            raise ValueError(f"the step cache was made for {cache.num_steps} steps; the scheduler gives {steps}")

        frames, extra = cfg.latent_frames(req.num_frames)
        h, w = req.height // 8, req.width // 8
        image = self.image_latents(req, frames, gen) if cfg.is_i2v else None
        latents = setup.noise
        if latents is None:
            latents = randn_tensor((1, frames, cfg.out_channels, h, w), generator=gen, device=dev, dtype=self.dtype)
        latents = latents * sched.init_noise_sigma

        cfg_on = req.guidance_scale > 1.0
        # guidance per step, computed up front so that the loop needs no host sync for it
        if req.use_dynamic_cfg:
            scales = [1 + req.guidance_scale * (1 - math.cos(math.pi * ((steps - t) / steps) ** 5.0)) / 2 for t in ts]
        else:
            scales = [req.guidance_scale] * steps
        ofs = torch.full((1,), 2.0, device=dev, dtype=self.dtype) if cfg.ofs_embed_dim else None
        old_x0 = None
        if image is not None and cfg_on:
            image = torch.cat([image, image])
        # with the `cfg` layout each rank runs its half of the CFG batch: the unconditional (rank 0) or the
        # conditional one; the halves are gathered before the combine
        split = cfg_on and self.parallel is not None and self.parallel.layout.cfg == 2
        half = slice(self.parallel.cfg_rank, self.parallel.cfg_rank + 1) if split else slice(None)
        text = text[half]
        if cache is not None:  # e.g. TeaCache's whole schedule now, not a host sync in every step
            cache.parallel = self.parallel
            cache.prepare(self.transformer, timesteps, text.shape[0], ofs, latents.dtype, scheduler=sched)
        with torch.no_grad():
            for i, t in enumerate(tqdm(timesteps, disable=not progress, desc="denoise", unit="step")):
                x = torch.cat([latents, latents]) if cfg_on else latents
                x = sched.scale_model_input(x, t)
                if image is not None:
                    x = torch.cat([x, image], dim=2)
                x = x[half]
                self.runner.step_begin()
                v = self.transformer(x, text, t.expand(x.shape[0]), ofs=ofs, positions=positions, cache=cache)
                noise = dpm.noise(i, latents.shape, gen, latents.dtype) if dpm else None  # the GPU is busy now
                v = self.parallel.cfg_gather(v) if split else v
                v = v.float()
                if cfg_on:
                    v_uncond, v_text = v.chunk(2)
                    v = v_uncond + scales[i] * (v_text - v_uncond)
                if dpm:
                    latents, old_x0 = dpm.step(i, v, old_x0, latents, noise)
                else:  # DDIM: the timestep as an int, so that indexing the scheduler's CPU tables needs no sync
                    latents = sched.step(v, ts[i], latents, eta=0.0, generator=gen, return_dict=False)[0]
                latents = latents.to(self.dtype)
                if on_step is not None:
                    on_step("denoise", i + 1, steps)
        return latents, extra

    def decode(self, latents: torch.Tensor, req: GenerationRequest) -> np.ndarray:
        self._configure_vae(req)
        vae_dev = next(self.vae.parameters()).device
        z = latents.permute(0, 2, 1, 3, 4).to(vae_dev, self.vae.dtype) / self.vae.config.scaling_factor  # (1, C, F, h, w)
        with torch.no_grad():
            v = self.vae
            if self.parallel is not None and v.use_tiling and (z.shape[-1] > v.tile_latent_min_width
                                                                or z.shape[-2] > v.tile_latent_min_height):
                # diffusers would tile this decode: the tiles dealt out to the ranks
                from .parallel import tiled_decode
                video = tiled_decode(self.vae, z, self.parallel)
            else:
                video = self.vae.decode(z).sample
        video = self.video_processor.postprocess_video(video=video, output_type="np")[0]  # (F, H, W, 3) in [0, 1]
        return (video * 255).round().astype(np.uint8)

    def _park_text_encoder(self) -> None:
        """Even the tiled decode does not fit beside the resident weights (a 16 GB GPU, or a memory fraction):
        the text encoder, idle until the next request, waits in host memory. The next request brings it back,
        which costs a copy of its weights (bench/RESULTS.md, issue 19)."""
        if self.text_parked or self.offload or self.transforms.text_encoder == "offload" or (
                self.parallel is not None and not self.parallel.first):
            return
        log.info("memory is short for the VAE decode: the text encoder waits in host memory until the next request")
        self.text_encoder.to("cpu")
        self.text_parked = True
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    def _configure_vae(self, req: GenerationRequest) -> None:
        """The decode's tiles (engine/vae_tiles.py): none where the untiled decode fits in what is free, else the
        cheapest grid that fits; where none fits beside the resident weights, the text encoder waits on the host.
        `vae_tiling` True or False forces a tiled or the untiled decode. With several ranks, rank 0's plan holds
        for all: they must cut the same tiles (engine/parallel.tiled_decode), and rank 0, which keeps the text
        encoder, has the least memory free."""
        h, w, frames, item = req.height // 8, req.width // 8, req.num_frames, self.vae.dtype.itemsize
        forced = self.vae_tiling
        # asked to tile, leave more room than auto tiling does: the user is likely here after running out of memory
        margin = 0.5 if forced else 0.8
        plan = vae_tiles.choose(h, w, frames, item, free_memory(self.device), forced, margin)
        if (plan is None or plan.tiled) and self.device.type == "cuda":
            # memory is short: hand the denoise loop's cached blocks back, so that the decode's large
            # allocations do not fail on a fragmented cache inside a memory fraction (bench/RESULTS.md, issue 19)
            torch.cuda.empty_cache()
        if plan is None:
            possible = [p for p in vae_tiles.plans(h, w) if forced is None or p.tiled == forced]
            if possible and forced is not False:
                self._park_text_encoder()
                plan = vae_tiles.choose(h, w, frames, item, free_memory(self.device), forced, margin)
            if plan is None:  # nothing fits (or no grid of the kind asked for exists): the smallest tiles, and hope
                plan = min(possible, key=lambda p: p.tile_h * p.tile_w) if possible else vae_tiles.grid(h, w, 1, 1)
        if self.parallel is not None:
            grid = self.parallel.broadcast(torch.tensor([plan.rows, plan.cols], device=self.device))
            plan = vae_tiles.grid(h, w, *grid.tolist())
        plan.apply(self.vae)
        self.vae.enable_slicing()
        self.decode_plan = plan


def free_memory(device: torch.device) -> int:
    """Bytes this process could still allocate: on CUDA, what the device has free plus what the caching allocator
    holds unused, within the process's memory fraction (torch.cuda.set_per_process_memory_fraction) if one is set."""
    if device.type == "cuda":
        free, total = torch.cuda.mem_get_info(device)
        allocated = torch.cuda.memory_allocated(device)
        reusable = torch.cuda.memory_reserved(device) - allocated
        index = device.index if device.index is not None else torch.cuda.current_device()
        fraction = getattr(torch.cuda, "get_per_process_memory_fraction", lambda i: 1.0)(index)  # torch >= 2.6 has it
        cap = fraction * total - allocated
        return int(min(free + reusable, cap))
    # on the host, what the kernel could give without swapping (MemAvailable counts the page cache it can drop,
    # which on a busy machine is most of it; the free pages alone can fall to a few GB and tile a decode for nothing)
    try:
        with open("/proc/meminfo") as f:
            return 1024 * next(int(line.split()[1]) for line in f if line.startswith("MemAvailable:"))
    except (OSError, StopIteration, ValueError):
        pass
    try:  # not Linux
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError):
        return 1 << 40


def load_image(image):
    from PIL import Image
    if isinstance(image, (str, Path)):
        if not Path(image).is_file():
            raise FileNotFoundError(f"image not found: {image}")
        return Image.open(image).convert("RGB")
    if isinstance(image, np.ndarray):
        return Image.fromarray(image.astype(np.uint8)).convert("RGB")
    return image.convert("RGB")


# ----------------------------------------------------------------------------------------------------

def load_pipeline(path_or_hub_id, device=None, dtype: torch.dtype | None = None, offload: bool = False,
                  mode: str = "exact", transformer: CogVideoXTransformer | None = None, warm_up: bool = False,
                  cache_dir: str | Path | None = None, keep_originals: bool | str = True, parallel: str | None = None,
                  **transforms) -> Pipeline:
    """Load a diffusers-format CogVideoX directory (or hub id) into a ready pipeline.

    device defaults to CUDA where present, else CPU; dtype to bf16 on CUDA and fp32 on the CPU.
    `mode` names a set of transforms (engine/modes.py: exact, fp8, fast, int8-dynamic, int8-weight-only);
    `transforms` set single ones over it: quant, attention, fused_norms, compile, cuda_graphs, text_encoder,
    vae_tiling, teacache. `transformer` replaces the checkpoint's own (the trainer validates its model this
    way). `warm_up` runs the transformer once at the model's default size, so that the first request does
    not pay for compiling; compiled code is cached in `cache_dir` (default: engine.runner.default_cache_dir()).
    `keep_originals` (quantized modes): LoRAs can be switched, rebuilding layers from their weights in the
    checkpoint file, read when a LoRA first touches them (the first switch of a layer is slower than the next:
    bench/RESULTS.md, "LoRA switch with the originals read from the checkpoint"); "pinned" copies them all to
    pinned memory at load instead (seconds more at every start, and every switch fast); False refuses LoRAs.
    """
    root = loader.resolve(path_or_hub_id)
    layout = None
    if parallel:
        from .parallel import Layout, init_from_env
        layout = Layout.parse(parallel)  # a bad layout fails before anything loads
        device = torch.device(device) if device is not None and torch.device(device).index is not None else \
            init_from_env(device)
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = dtype or (torch.bfloat16 if device.type == "cuda" else torch.float32)
    chosen = modes.transforms_for(mode, device, **transforms)  # a bad mode fails before anything loads
    if offload and chosen.quant:
        raise ValueError(f"model CPU offload and {chosen.quant} quantization do not go together here; the "
                         f"quantized modes fit 5B in 16 GB without offload")
    loader.read_json(root / "model_index.json")
    for comp, stem in (("vae", "diffusion_pytorch_model"), ("text_encoder", "model")):
        loader.read_json(root / comp / "config.json")
        loader.check_safetensors(loader.weight_files(root / comp, stem))
    sched_cfg = loader.read_json(root / "scheduler" / "scheduler_config.json")
    if not (root / "tokenizer").is_dir():
        raise loader.CheckpointError(f"missing folder: {root / 'tokenizer'}")

    home = torch.device("cpu") if offload else device
    source = None
    laps = _Laps(device)
    needs = dict(torchao=chosen.quant is not None or chosen.text_encoder == "int8", dynamo=chosen.compile)
    beside = transformer is None
    importing = _import_in_background(**needs) if beside else None
    interval = sys.getswitchinterval()
    try:
        if beside:  # the readers need the GIL only briefly, but without this they wait 5 ms for each turn
            sys.setswitchinterval(READ_SWITCH_INTERVAL)
        if transformer is None:
            transformer = loader.load_transformer(root / "transformer", home, dtype)
            if chosen.quant and keep_originals and keep_originals != "pinned":  # read from the file, not copied
                source = loader.CheckpointWeights(root / "transformer", transformer.cfg, dtype)
    finally:
        sys.setswitchinterval(interval)
    laps("read_transformer")
    if importing is None:
        _imports(**needs)
    else:
        importing.join()
    laps("imports")
    import diffusers
    from diffusers import AutoencoderKLCogVideoX
    from transformers import AutoTokenizer
    if not hasattr(diffusers, str(sched_cfg.get("_class_name"))):
        raise loader.CheckpointError(f"{root / 'scheduler' / 'scheduler_config.json'} names an unknown scheduler "
                                     f"class {sched_cfg.get('_class_name')!r}")
    try:
        vae = AutoencoderKLCogVideoX.from_pretrained(root / "vae", torch_dtype=dtype).to(home).eval()
        text_encoder = loader.load_text_encoder(root / "text_encoder", home, dtype)
        tokenizer = AutoTokenizer.from_pretrained(root / "tokenizer")
    except (OSError, ValueError) as e:
        raise loader.CheckpointError(f"could not load a component of {root}: {e}") from e
    laps("vae_and_text_encoder")
    coefficients, levels = root / "teacache_coefficients.json", root / caches.LEVELS_FILE
    pipe = assemble(transformer, vae, text_encoder, tokenizer, sched_cfg, device, dtype, mode, chosen,
                    offload=offload, cache_dir=cache_dir, keep_originals=keep_originals, originals_source=source,
                    coefficients=coefficients if coefficients.is_file() else None,
                    levels=levels if levels.is_file() else None, layout=layout)
    laps("transforms")
    if warm_up:
        pipe.warm_up()
        laps("warm_up")
    pipe.load_timings = laps.times
    return pipe


class _Laps:
    """Where a load's seconds went (pipe.load_timings), each lap ending in a device sync."""

    def __init__(self, device: torch.device):
        self.device, self.times, self.t = device, {}, time.perf_counter()

    def __call__(self, name: str) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        now = time.perf_counter()
        self.times[name], self.t = now - self.t, now


def _imports(torchao: bool, dynamo: bool) -> None:
    """What a load needs from diffusers, transformers, torchao and Dynamo: most of a warm start's seconds, and all
    of it Python, holding the GIL. torchao only where the transforms quantize."""
    with quant.torchao_hidden():
        from diffusers import AutoencoderKLCogVideoX  # noqa: F401
        from transformers import AutoTokenizer, T5EncoderModel  # noqa: F401
    if torchao:
        quant.import_torchao()
    if dynamo:
        import torch._dynamo  # noqa: F401
        import torch._inductor.compile_fx  # noqa: F401


def _import_in_background(torchao: bool, dynamo: bool) -> threading.Thread:
    """_imports in one thread (more were no faster: the imports hold the GIL), while the caller reads the
    transformer. An import that fails here fails again, with its error, in the caller."""
    def run():
        with contextlib.suppress(Exception):
            _imports(torchao, dynamo)
    thread = threading.Thread(target=run, name="cogrt-imports", daemon=True)
    thread.start()
    return thread


def assemble(transformer, vae, text_encoder, tokenizer, scheduler_config: dict, device, dtype, mode: str = "exact",
             transforms: modes.Transforms | None = None, offload: bool = False, cache_dir=None,
             keep_originals: bool = True, coefficients: Path | None = None, levels: Path | None = None,
             originals_source=None,
             layout=None) -> Pipeline:
    """A pipeline from components already in memory (benchmarks build random ones this way): the transforms
    of `mode` (or `transforms`) are applied here, in the runner's order."""
    device = torch.device(device)
    transforms = transforms or modes.transforms_for(mode, device)
    if transforms.text_encoder == "int8":
        from .quant import quantize_text_encoder
        quantize_text_encoder(text_encoder)
    elif transforms.text_encoder == "offload":
        text_encoder.to("cpu")
    par = None
    if layout is not None and layout.world > 1:
        from .parallel import Parallel
        par = Parallel(layout, device)
    runner = Runner(transformer, transforms, cache_dir=cache_dir, keep_originals=keep_originals,
                    originals_source=originals_source, parallel=par)
    pipe = Pipeline(runner, vae, text_encoder, tokenizer, scheduler_config, device, dtype, offload, mode, coefficients,
                    levels)
    pipe.parallel = par
    return pipe
