"""Write a random-weight CogVideoX checkpoint in the real diffusers layout.

Used by the tests (every variant, at tiny size), by `cogrt random-checkpoint`, and by `make demo` until a
trained model is bundled. Weights are random, so the video is noise-like; the layout, configs and code
paths are the real ones, and diffusers loads the result as it would a released checkpoint.
"""
from __future__ import annotations

import json
import os
from dataclasses import replace
from pathlib import Path

import torch

from .loader import save_transformer
from .model import PRESETS, CogVideoXTransformer, ModelConfig

PIPELINE_CLASS = {False: "CogVideoXPipeline", True: "CogVideoXImageToVideoPipeline"}


def random_transformer(cfg: ModelConfig, seed: int = 0, device="cpu") -> CogVideoXTransformer:
    """Default init, plus random norm affines and positions so that every tensor's mapping is exercised."""
    torch.manual_seed(seed)
    with torch.device(device):
        model = CogVideoXTransformer(cfg)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name == "pos_embedding":
                p.normal_(0, 0.5)
            elif p.dim() == 1 and ("ln" in name or "norm_q" in name or "norm_k" in name or "norm_final" in name):
                p.add_(torch.randn_like(p) * 0.1)
    return model.eval()


def write_scheduler(folder: str | os.PathLike, cfg: ModelConfig, kind: str | None = None):
    """The released models' scheduler config: DDIM for 2B and the I2V models, DPM for the others."""
    from diffusers import CogVideoXDDIMScheduler, CogVideoXDPMScheduler
    two_b = cfg.variant == "cogvideox-2b"
    sched_cls = {"ddim": CogVideoXDDIMScheduler, "dpm": CogVideoXDPMScheduler}[
        kind or ("ddim" if two_b or cfg.is_i2v else "dpm")]
    sched_cls(num_train_timesteps=1000, beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
              clip_sample=False, prediction_type="v_prediction", rescale_betas_zero_snr=True,
              set_alpha_to_one=True, timestep_spacing="trailing",
              snr_shift_scale=3.0 if two_b else 1.0).save_pretrained(folder)
    return sched_cls


T5_XXL = dict(d_model=4096, d_ff=10240, d_kv=64, num_heads=64, num_layers=24, vocab_size=32128,
              feed_forward_proj="gated-gelu", relative_attention_num_buckets=32,
              is_encoder_decoder=False, use_cache=False)  # the released models' text encoder (4.8B parameters)


def random_t5(cfg: ModelConfig, real: bool = False, layers: int = 1):
    """A random T5 encoder giving the model's embedding width: T5-XXL's shape if `real`, else `layers` narrow
    layers (test-sized)."""
    from transformers import T5Config, T5EncoderModel
    if real:
        if cfg.text_embed_dim != T5_XXL["d_model"]:
            raise ValueError(f"T5-XXL gives 4096-wide embeddings; this model takes {cfg.text_embed_dim}")
        conf = T5Config(**T5_XXL)
    else:
        conf = T5Config(vocab_size=384, d_model=cfg.text_embed_dim, d_kv=16, d_ff=2 * cfg.text_embed_dim,
                        num_layers=layers, num_heads=2, feed_forward_proj="gated-gelu", is_encoder_decoder=False,
                        use_cache=False)
    return T5EncoderModel(conf).eval().requires_grad_(False)


def write_random_checkpoint(out: str | os.PathLike, preset: str | ModelConfig = "tiny-5b", seed: int = 0,
                            vae_channels: int | tuple[int, ...] = 16, t5_layers: int = 1,
                            scheduler: str | None = None, dtype: torch.dtype | None = None, device="cpu",
                            real_t5: bool = False) -> Path:
    """`dtype`: the transformer's stored dtype (default fp32; the released checkpoints are bf16). `device`: where
    the random transformer (and T5) is built (a GPU builds 5B in seconds). `real_t5`: T5-XXL's shape, stored in
    `dtype` (bf16 by default, as released; 9.5 GB), for timing a real start; else a test-sized T5."""
    from diffusers import AutoencoderKLCogVideoX
    from transformers import ByT5Tokenizer

    cfg = PRESETS[preset] if isinstance(preset, str) else preset
    out = Path(out)

    model = random_transformer(cfg, seed, device)
    save_transformer(out / "transformer", model.to(dtype) if dtype is not None else model)
    del model

    torch.manual_seed(seed + 1)
    small = cfg.dim < 1024
    chans = (vae_channels,) * 4 if isinstance(vae_channels, int) else tuple(vae_channels)
    vae = AutoencoderKLCogVideoX(
        block_out_channels=chans if small else (128, 256, 256, 512), latent_channels=cfg.out_channels,
        layers_per_block=1 if small else 3, norm_num_groups=min(min(chans), 32) if small else 32,
        scaling_factor=1.15258426 if cfg.variant == "cogvideox-2b" else 0.7,
        invert_scale_latents=cfg.patch_size_t is not None,
        sample_height=cfg.sample_height * 8, sample_width=cfg.sample_width * 8)
    vae.save_pretrained(out / "vae")

    torch.manual_seed(seed + 2)
    if real_t5:
        with torch.device(device):
            t5 = random_t5(cfg, real=True).to(dtype or torch.bfloat16)
    else:
        t5 = random_t5(cfg, layers=t5_layers)
    t5.save_pretrained(out / "text_encoder")
    del t5
    ByT5Tokenizer().save_pretrained(out / "tokenizer")

    sched_cls = write_scheduler(out / "scheduler", cfg, scheduler)

    index = {"_class_name": PIPELINE_CLASS[cfg.is_i2v], "_diffusers_version": "0.42.1",
             "scheduler": ["diffusers", sched_cls.__name__], "text_encoder": ["transformers", "T5EncoderModel"],
             "tokenizer": ["transformers", "ByT5Tokenizer"], "transformer": ["diffusers", "CogVideoXTransformer3DModel"],
             "vae": ["diffusers", "AutoencoderKLCogVideoX"]}
    (out / "model_index.json").write_text(json.dumps(index, indent=2))
    return out


def tiny_config(variant: str, **overrides) -> ModelConfig:
    return replace(PRESETS[f"tiny-{variant}"], **overrides)
