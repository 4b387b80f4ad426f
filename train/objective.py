"""CogVideoX's training objective: v-prediction, scored on x0 with weight 1/(1 - ᾱ_t).

With x_t = √ᾱ·x0 + √(1-ᾱ)·ε and the model's v, the predicted clean latent is x̂0 = √ᾱ·x_t − √(1-ᾱ)·v.
The loss is mean(w·(x̂0 − x0)²) with w = 1/(1-ᾱ), which equals the plain v-MSE: ‖v̂ − v‖² = (x̂0 − x0)²/(1-ᾱ).
Timesteps are uniform over the scheduler's training steps. This is the recipe of the CogVideoX authors'
and diffusers' fine-tuning scripts, so LoRAs trained here behave as those do.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class Batch:
    """One bucket's worth of precomputed inputs, already on the device."""
    latent_mean: torch.Tensor  # (B, C, F, h, w), as the VAE returns them
    latent_logvar: torch.Tensor
    prompt_embeds: torch.Tensor  # (B, T, text_dim)
    image_mean: torch.Tensor | None = None  # (B, C, 1, h, w): I2V first frame, noised before encoding
    image_logvar: torch.Tensor | None = None


@dataclass
class LatentScale:
    scaling_factor: float
    invert_image: bool = False  # 1.5 VAEs divide image latents by the factor instead (invert_scale_latents)


def sample_latents(mean: torch.Tensor, logvar: torch.Tensor, gen: torch.Generator | None) -> torch.Tensor:
    std = torch.exp(0.5 * logvar.clamp(-30.0, 20.0))  # the clamp diffusers' DiagonalGaussianDistribution uses
    return mean + std * torch.randn(mean.shape, generator=gen, device=mean.device, dtype=mean.dtype)


def model_inputs(batch: Batch, cfg, scale: LatentScale, gen, image_dropout: float = 0.05):
    """x0 (B, F, C, h, w) and the I2V conditioning latents (or None), padded as the 1.5 pipeline pads."""
    x0 = sample_latents(batch.latent_mean, batch.latent_logvar, gen).permute(0, 2, 1, 3, 4)  # (B, F, C, h, w)
    x0 = x0 * scale.scaling_factor
    image = None
    if cfg.is_i2v:
        z = sample_latents(batch.image_mean, batch.image_logvar, gen).permute(0, 2, 1, 3, 4)  # (B, 1, C, h, w)
        z = z / scale.scaling_factor if scale.invert_image else z * scale.scaling_factor
        keep = (torch.rand(z.shape[0], generator=gen, device=z.device) >= image_dropout).to(z.dtype)
        z = z * keep[:, None, None, None, None]  # 5% of samples learn to go without the image
        image = torch.cat([z, z.new_zeros(z.shape[0], x0.shape[1] - 1, *z.shape[2:])], dim=1)
    pad = cfg.latent_padding(x0.shape[1])
    if pad:
        x0 = torch.cat([x0[:, :1].expand(-1, pad, -1, -1, -1), x0], dim=1)  # repeat the first frame in front
        if image is not None:
            image = torch.cat([image[:, :1].expand(-1, pad, -1, -1, -1), image], dim=1)
    return x0, image


def v_loss(model, x0: torch.Tensor, text: torch.Tensor, alphas_cumprod: torch.Tensor, gen=None,
           image: torch.Tensor | None = None, positions=None, t: torch.Tensor | None = None) -> torch.Tensor:
    """The weighted x0 loss for one batch. x0: (B, F, C, h, w) scaled latents; alphas_cumprod: (T,)."""
    B = x0.shape[0]
    if t is None:
        t = torch.randint(0, alphas_cumprod.shape[0], (B,), generator=gen, device=x0.device)
    noise = torch.randn(x0.shape, generator=gen, device=x0.device, dtype=x0.dtype)
    ab = alphas_cumprod.to(x0.device, torch.float32)[t].view(B, 1, 1, 1, 1)
    xt = ab.sqrt() * x0 + (1 - ab).sqrt() * noise
    inp = xt if image is None else torch.cat([xt, image], dim=2)
    cfg = getattr(model, "module", model).cfg  # through a DDP wrapper
    ofs = torch.full((1,), 2.0, device=x0.device) if cfg.ofs_embed_dim else None
    v = model(inp.to(text.dtype), text, t, ofs=ofs, positions=positions).float()
    x0_hat = ab.sqrt() * xt - (1 - ab).sqrt() * v
    w = 1.0 / (1 - ab)
    return (w * (x0_hat - x0) ** 2).mean(dim=(1, 2, 3, 4)).mean()
