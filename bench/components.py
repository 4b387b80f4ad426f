"""What the real-size benchmarks share: random CogVideoX components, and the record of a run.

Random components for speed runs: the diffusers transformer, VAE, T5 encoder, tokenizer and
scheduler config, deterministic from a seed and built directly on the device (no checkpoint can be downloaded
here, and writing a 5B one to disk only to read it back costs minutes).

Tiny presets get the tiny VAE and T5 of engine/random_model.py. Real presets get the real-size VAE and
T5-XXL encoder with RANDOM weights: every benchmark that uses them must say so. The tokenizer is always
ByT5's (it needs no download); its ids are a subset of T5-XXL's vocabulary and prompts are padded to 226
tokens either way, so the compute is the real one.

The record: GPU, versions and commit for a benchmark's JSON, and a section appended to bench/RESULTS.md.
"""
from __future__ import annotations

import contextlib
import json
import os
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

from cogrt.engine.model import PRESETS, ModelConfig


def diffusers_rope(cfg: ModelConfig, frames: int, height: int, width: int, device=None):
    """The RoPE tables for latents of frames x height x width (latent units, 1.5's padding included), exactly as
    diffusers' CogVideoX pipelines build them from their own functions, independent of our model file."""
    from diffusers.models.embeddings import get_3d_rotary_pos_embed
    from diffusers.pipelines.cogvideo.pipeline_cogvideox import get_resize_crop_region_for_grid
    p, pt = cfg.patch_size, cfg.patch_size_t
    h, w = height // p, width // p
    base_h, base_w = cfg.sample_height // p, cfg.sample_width // p
    if pt is None:
        crops = get_resize_crop_region_for_grid((h, w), base_w, base_h)
        return get_3d_rotary_pos_embed(cfg.head_dim, crops, (h, w), frames, device=device)
    return get_3d_rotary_pos_embed(cfg.head_dim, None, (h, w), frames // pt, grid_type="slice",
                                   max_size=(base_h, base_w), device=device)


@dataclass
class Components:
    cfg: ModelConfig
    transformer: torch.nn.Module  # diffusers' CogVideoXTransformer3DModel
    vae: torch.nn.Module
    text_encoder: torch.nn.Module
    tokenizer: object
    scheduler_config: dict
    real_vae_t5: bool  # False: the tiny VAE and T5 (fine where only the transformer is timed)


@contextlib.contextmanager
def building(device, dtype: torch.dtype, seed: int):
    """Parameters made on `device` in `dtype`, from `seed`: a 5B model initialises in seconds on a GPU."""
    old = torch.get_default_dtype()
    torch.manual_seed(seed)
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            yield
    finally:
        torch.set_default_dtype(old)


def is_real(cfg: ModelConfig) -> bool:
    return cfg.dim >= 1024  # the tiny presets are a few dozen wide


def random_vae(cfg: ModelConfig, real: bool):
    from diffusers import AutoencoderKLCogVideoX
    return AutoencoderKLCogVideoX(
        block_out_channels=(128, 256, 256, 512) if real else (16,) * 4, latent_channels=cfg.out_channels,
        layers_per_block=3 if real else 1, norm_num_groups=32 if real else 16,
        scaling_factor=1.15258426 if cfg.variant == "cogvideox-2b" else 0.7,
        invert_scale_latents=cfg.patch_size_t is not None,
        sample_height=cfg.sample_height * 8, sample_width=cfg.sample_width * 8).eval().requires_grad_(False)


def scheduler_config(cfg: ModelConfig) -> dict:
    from cogrt.engine.random_model import write_scheduler
    with tempfile.TemporaryDirectory() as d:  # the released config, as write_scheduler saves it
        write_scheduler(d, cfg)
        return json.loads((Path(d) / "scheduler_config.json").read_text())


def random_transformer(cfg: ModelConfig, device, dtype: torch.dtype, seed: int = 0):
    """diffusers' transformer with its default random init."""
    from diffusers import CogVideoXTransformer3DModel
    with building(device, dtype, seed):
        return CogVideoXTransformer3DModel(**cfg.to_diffusers()).eval().requires_grad_(False)


def random_components(preset: str, device, dtype: torch.dtype, seed: int = 0,
                      real_vae_t5: bool | None = None) -> Components:
    """All components of `preset`, random from `seed`. `real_vae_t5` (default: for real presets) picks the
    real-size VAE and T5-XXL over the tiny ones."""
    from transformers import ByT5Tokenizer

    from cogrt.engine.random_model import random_t5
    cfg = PRESETS[preset]
    real = is_real(cfg) if real_vae_t5 is None else real_vae_t5
    if real and not is_real(cfg):
        raise ValueError(f"{preset} is a tiny preset: its embeddings are {cfg.text_embed_dim} wide, not T5-XXL's 4096")
    transformer = random_transformer(cfg, device, dtype, seed)
    with building(device, dtype, seed + 1):
        vae = random_vae(cfg, real)
    with building(device, dtype, seed + 2):
        t5 = random_t5(cfg, real)
    return Components(cfg, transformer, vae, t5, ByT5Tokenizer(), scheduler_config(cfg), real)


def engine_transformer(diffusers_transformer, cfg: ModelConfig, dtype: torch.dtype, copy: bool = True):
    """Our transformer with the diffusers one's weights. `copy=False` shares every tensor but the fused qkv, so
    drop the diffusers module afterwards; with `copy=True` the two are independent (LoRA switching and
    quantization write into our weights)."""
    from cogrt.engine.loader import build_transformer, to_engine_state_dict
    sd = {k: v.clone() if copy else v for k, v in diffusers_transformer.state_dict().items()}
    return build_transformer(cfg, to_engine_state_dict(sd, cfg), dtype)


def weights_note(cfg: ModelConfig, real_vae_t5: bool | None = None) -> str:
    """What a benchmark's output says about its weights."""
    if not is_real(cfg):
        return "random (tiny preset; tiny VAE and T5)"
    real = real_vae_t5 is not False
    return "random (real shapes; " + ("real-size VAE and T5-XXL, random too)" if real else
                                      "tiny VAE and T5: only the transformer is real-size)")


def environment(dev: torch.device) -> dict:
    """GPU, versions and commit (COGRT_COMMIT, else git describe) for a benchmark's JSON and RESULTS.md entry."""
    import diffusers
    import torchao
    commit = os.environ.get("COGRT_COMMIT")
    try:
        commit = commit or subprocess.run(["git", "describe", "--always", "--dirty"], capture_output=True, text=True,
                                          cwd=os.path.dirname(os.path.abspath(__file__))).stdout.strip() or "?"
    except OSError:  # no git here (a copied tree): set COGRT_COMMIT
        commit = "?"
    return dict(gpu=torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu", torch=torch.__version__,
                diffusers=diffusers.__version__, torchao=torchao.__version__, commit=commit)


def append_results(path, title: str, meta: dict, text: str) -> None:
    """A RESULTS.md section: the title with GPU, versions and commit, the command, then `text`."""
    with open(path, "a") as f:
        f.write(f"\n### {title} ({meta['gpu']}, torch {meta['torch']}, diffusers {meta['diffusers']}, torchao "
                f"{meta['torchao']}, commit `{meta['commit']}`)\n\nWeights: {meta['weights']}.\n\n"
                f"```\n{meta['command']}\n```\n\n{text}\n")
