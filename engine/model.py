"""The CogVideoX transformer, all of its math in one file.

Covers the five released checkpoints (2B, 5B, 5B-I2V, 1.5-5B, 1.5-5B-I2V): a config dataclass with presets,
the patch/text/time/ofs embeddings, 3D sin-cos, learned and 3D-RoPE positions, adaLN-zero blocks with
QK-LayerNorm and joint [text; video] attention, and the final norm + unpatchify.

Parameter names follow diffusers' `CogVideoXTransformer3DModel` except where weights are fused at load
time (`loader.to_engine_state_dict`): q/k/v become one `qkv` projection, and the 1.0 patch conv becomes
a linear layer over flattened patches, so that every matmul is an `nn.Linear` that later transforms
(LoRA fuse, quantization) can treat alike.
"""
from __future__ import annotations

import contextlib
import math
from dataclasses import asdict, dataclass, fields, replace

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint


@dataclass(frozen=True)
class ModelConfig:
    num_heads: int = 30
    head_dim: int = 64
    num_layers: int = 30
    in_channels: int = 16
    out_channels: int = 16
    text_embed_dim: int = 4096
    time_embed_dim: int = 512
    ofs_embed_dim: int | None = None  # 1.5-I2V only
    patch_size: int = 2
    patch_size_t: int | None = None  # 2 for 1.5, None for 1.0
    patch_bias: bool = True
    attention_bias: bool = True
    sample_height: int = 60  # latent units; the RoPE crop grid (1.0) or slice grid (1.5) is sized from these
    sample_width: int = 90
    sample_frames: int = 49  # pixel frames, as diffusers stores it
    temporal_compression_ratio: int = 4
    max_text_seq_length: int = 226
    norm_eps: float = 1e-5
    flip_sin_to_cos: bool = True
    freq_shift: int = 0
    spatial_interpolation_scale: float = 1.875
    temporal_interpolation_scale: float = 1.0
    use_rotary_positional_embeddings: bool = False
    use_learned_positional_embeddings: bool = False

    @property
    def dim(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def is_i2v(self) -> bool:
        return self.in_channels != self.out_channels

    @property
    def version(self) -> str:
        return "1.0" if self.patch_size_t is None else "1.5"

    @property
    def variant(self) -> str:
        """The released checkpoint family this config belongs to (tiny test configs included)."""
        if self.patch_size_t is not None:
            return "cogvideox1.5-5b-i2v" if self.is_i2v else "cogvideox1.5-5b"
        if self.is_i2v:
            return "cogvideox-5b-i2v"
        return "cogvideox-5b" if self.use_rotary_positional_embeddings else "cogvideox-2b"

    @property
    def fps(self) -> int:
        return 8 if self.patch_size_t is None else 16

    def latent_frames(self, num_frames: int) -> tuple[int, int]:
        """The latent frames of a `num_frames`-frame video, padded at the front to a multiple of the temporal
        patch (1.5), and how many of them are that padding."""
        n = (num_frames - 1) // self.temporal_compression_ratio + 1
        pad = self.latent_padding(n)
        return n + pad, pad

    def latent_padding(self, latent_frames: int) -> int:
        """The frames 1.5 adds in front of `latent_frames` to fill its temporal patch (0 for 1.0)."""
        return (-latent_frames) % (self.patch_size_t or 1)

    @classmethod
    def from_diffusers(cls, cfg: dict) -> "ModelConfig":
        """Build from a diffusers `transformer/config.json` dict; unknown keys are ignored."""
        renames = {"num_attention_heads": "num_heads", "attention_head_dim": "head_dim"}
        known = {f.name for f in fields(cls)}
        kw = {renames.get(k, k): v for k, v in cfg.items() if renames.get(k, k) in known}
        for k, want in (("activation_fn", "gelu-approximate"), ("timestep_activation_fn", "silu"),
                        ("norm_elementwise_affine", True), ("dropout", 0.0)):
            if k in cfg and cfg[k] != want:
                raise ValueError(f"unsupported transformer config {k}={cfg[k]!r} (CogVideoX uses {want!r})")
        return cls(**kw)

    def to_diffusers(self) -> dict:
        renames = {"num_heads": "num_attention_heads", "head_dim": "attention_head_dim"}
        return {renames.get(k, k): v for k, v in asdict(self).items()}


_5B = dict(num_heads=48, num_layers=42, use_rotary_positional_embeddings=True)
_15 = dict(_5B, patch_size_t=2, patch_bias=False, sample_height=300, sample_width=300, sample_frames=81)
PRESETS: dict[str, ModelConfig] = {
    "cogvideox-2b": ModelConfig(),
    "cogvideox-5b": ModelConfig(**_5B),
    "cogvideox-5b-i2v": ModelConfig(**_5B, in_channels=32, use_learned_positional_embeddings=True),
    "cogvideox1.5-5b": ModelConfig(**_15),
    "cogvideox1.5-5b-i2v": ModelConfig(**_15, in_channels=32, ofs_embed_dim=512),
}
# The bundled model's shape (train/tiny.py trains it): 5B-style (3D RoPE), small enough for 2 CPU cores.
PRESETS["cogrt-tiny"] = ModelConfig(num_heads=3, head_dim=64, num_layers=6, text_embed_dim=128, time_embed_dim=128,
                                    sample_height=16, sample_width=16, use_rotary_positional_embeddings=True)
# Tiny versions of each family for tests and the random demo model: same structure, toy widths.
_TINY = dict(num_heads=2, head_dim=16, num_layers=2, text_embed_dim=32, time_embed_dim=24,
             sample_height=8, sample_width=8, sample_frames=9)
for _name, _cfg in [(k, v) for k, v in PRESETS.items() if k.startswith("cogvideox")]:
    _extra = {"ofs_embed_dim": _TINY["time_embed_dim"]} if _cfg.ofs_embed_dim else {}  # added to the time embedding
    if _cfg.patch_size_t:  # 1.5's RoPE slice grid bounds the size: keep the tiny one roomy, as the real one is
        _extra.update(sample_height=32, sample_width=32)
    PRESETS["tiny-" + _name.removeprefix("cogvideox").lstrip("-")] = replace(_cfg, **{**_TINY, **_extra})


# ----------------------------------------------------------------------------------------------------
# Positions. Computed once per request (they depend only on the latent grid) and passed to forward().

def timestep_embedding(t: torch.Tensor, dim: int, flip_sin_to_cos: bool, shift: float) -> torch.Tensor:
    half = dim // 2
    freqs = torch.exp(-math.log(10000) * torch.arange(half, dtype=torch.float32, device=t.device) / (half - shift))
    args = t[:, None].float() * freqs[None]
    emb = torch.cat([torch.sin(args), torch.cos(args)], dim=-1)
    if flip_sin_to_cos:
        emb = torch.cat([emb[:, half:], emb[:, :half]], dim=-1)
    return F.pad(emb, (0, dim % 2))


def _sincos_1d(dim: int, pos: torch.Tensor) -> torch.Tensor:
    # float64 on purpose: diffusers builds these tables in double before casting
    omega = 1.0 / 10000 ** (torch.arange(dim // 2, dtype=torch.float64, device=pos.device) / (dim / 2.0))
    out = torch.outer(pos.reshape(-1).double(), omega)  # (M, dim/2)
    return torch.cat([out.sin(), out.cos()], dim=1)


def sincos_3d(dim: int, frames: int, h: int, w: int, spatial_scale: float, temporal_scale: float,
              device=None) -> torch.Tensor:
    """2B's fixed 3D sin-cos table, (frames*h*w, dim): a quarter temporal, three quarters spatial (h then w)."""
    gh = torch.arange(h, dtype=torch.float32, device=device) / spatial_scale
    gw = torch.arange(w, dtype=torch.float32, device=device) / spatial_scale
    yy, xx = torch.meshgrid(gh, gw, indexing="ij")  # (h, w)
    ds = 3 * dim // 4
    # diffusers encodes the w coordinate in the first half of the spatial dims, h in the second
    spatial = torch.cat([_sincos_1d(ds // 2, xx), _sincos_1d(ds // 2, yy)], dim=1)  # (h*w, ds)
    temporal = _sincos_1d(dim // 4, torch.arange(frames, dtype=torch.float32, device=device) / temporal_scale)
    emb = torch.cat([temporal[:, None].expand(-1, h * w, -1), spatial[None].expand(frames, -1, -1)], dim=-1)
    return emb.reshape(frames * h * w, dim).float()


def _rope_1d(dim: int, pos: torch.Tensor, theta: float = 10000.0) -> tuple[torch.Tensor, torch.Tensor]:
    freqs = 1.0 / theta ** (torch.arange(0, dim, 2, dtype=torch.float32, device=pos.device) / dim)
    ang = torch.outer(pos, freqs)  # (S, dim/2)
    # interleaved pairs (x0, x1), (x2, x3), ... share one angle
    return ang.cos().repeat_interleave(2, dim=1), ang.sin().repeat_interleave(2, dim=1)


def rope_3d(cfg: ModelConfig, frames: int, h: int, w: int, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """3D RoPE tables (cos, sin), each (frames*h*w, head_dim), for a latent grid after patching.

    1.0 uses a "crop" grid: positions are a linspace over the region that the base grid
    (sample size / patch) covers after resize-and-center-crop. 1.5 uses a "slice" grid: integer positions.
    """
    d = cfg.head_dim
    dt, dh = d // 4, d // 8 * 3
    base_h, base_w = cfg.sample_height // cfg.patch_size, cfg.sample_width // cfg.patch_size
    f32 = dict(dtype=torch.float32, device=device)
    if cfg.patch_size_t is None:
        (top, left), (bottom, right) = _crop_region(h, w, base_h, base_w)
        gh = torch.linspace(top, bottom * (h - 1) / h, h, **f32)
        gw = torch.linspace(left, right * (w - 1) / w, w, **f32)
        gt = torch.linspace(0, frames * (frames - 1) / frames, frames, **f32)
    else:
        gh, gw, gt = torch.arange(h, **f32), torch.arange(w, **f32), torch.arange(frames, **f32)
    (ct, st), (ch, sh), (cw, sw) = _rope_1d(dt, gt), _rope_1d(dh, gh), _rope_1d(dh, gw)

    def grid(t, hh, ww):  # broadcast to (frames, h, w, d) then flatten the positions
        return torch.cat([t[:, None, None].expand(-1, h, w, -1), hh[None, :, None].expand(frames, -1, w, -1),
                          ww[None, None].expand(frames, h, -1, -1)], dim=-1).reshape(frames * h * w, -1)
    return grid(ct, ch, cw), grid(st, sh, sw)


def _crop_region(h: int, w: int, th: int, tw: int):
    if h / w > th / tw:
        rh, rw = th, int(round(th / h * w))
    else:
        rw, rh = tw, int(round(tw / w * h))
    top, left = int(round((th - rh) / 2.0)), int(round((tw - rw) / 2.0))
    return (top, left), (top + rh, left + rw)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate interleaved pairs of x (B, H, S, d) by the tables (S, d); computed in fp32 like diffusers."""
    xf = x.float()
    x1, x2 = xf.unflatten(-1, (-1, 2)).unbind(-1)  # (B, H, S, d/2) each
    rotated = torch.stack([-x2, x1], dim=-1).flatten(-2)  # (B, H, S, d)
    return (xf * cos + rotated * sin).to(x.dtype)


# ----------------------------------------------------------------------------------------------------
# Modules

class TimeMLP(nn.Module):
    def __init__(self, d_in: int, d_out: int):
        super().__init__()
        self.linear_1, self.linear_2 = nn.Linear(d_in, d_out), nn.Linear(d_out, d_out)

    def forward(self, x):
        return self.linear_2(F.silu(self.linear_1(x)))


class SDPA(nn.Module):
    """softmax(q kᵀ/√d) v over the joint sequence, q, k, v (B, H, N, d). The runner puts another attention backend
    in its place (engine/attention.py)."""

    def forward(self, q, k, v):
        return F.scaled_dot_product_attention(q, k, v)


class Block(nn.Module):
    """adaLN-zero block: joint attention over [text; video], then a GELU-tanh FFN, each gated per stream."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        d, self.heads, self.eps = cfg.dim, cfg.num_heads, cfg.norm_eps
        self.norm1 = nn.Linear(cfg.time_embed_dim, 6 * d)  # shift, scale, gate for video, then for text
        self.ln1 = nn.LayerNorm(d, eps=cfg.norm_eps)
        self.qkv = nn.Linear(d, 3 * d, bias=cfg.attention_bias)
        self.norm_q = nn.LayerNorm(cfg.head_dim, eps=1e-6)
        self.norm_k = nn.LayerNorm(cfg.head_dim, eps=1e-6)
        self.out = nn.Linear(d, d)
        self.norm2 = nn.Linear(cfg.time_embed_dim, 6 * d)
        self.ln2 = nn.LayerNorm(d, eps=cfg.norm_eps)
        self.ff1 = nn.Linear(d, 4 * d)
        self.ff2 = nn.Linear(4 * d, d)
        self.attend = SDPA()
        self.ff_chunks = 1  # training: the FFN over this many token chunks, each recomputed in backward

    def ff(self, h):
        return self.ff2(F.gelu(self.ff1(h), approximate="tanh"))

    def modulate(self, ln, mod, x, c):
        """LayerNorm both streams, scale/shift them, and join them as [text; video]."""
        shift, scale, gate, c_shift, c_scale, c_gate = mod.unsqueeze(1).chunk(6, dim=-1)  # (B, 1, D) each
        # autocast runs LayerNorm in fp32; back to the stream's dtype at once, so that training does not keep
        # fp32 copies of every normalised activation (a no-op at inference, where nothing is autocast)
        h = torch.cat([ln(c).to(c.dtype) * (1 + c_scale) + c_shift, ln(x).to(x.dtype) * (1 + scale) + shift], dim=1)
        return h, gate, c_gate

    def attention(self, h, rope, n_text):
        B, N, D = h.shape
        q, k, v = self.qkv(h).view(B, N, 3, self.heads, -1).permute(2, 0, 3, 1, 4)  # 3 x (B, H, N, d)
        q, k = self.norm_q(q).to(v.dtype), self.norm_k(k).to(v.dtype)
        if rope is not None:  # rotate the video tokens only; in place, as q and k are fresh norm outputs
            q[:, :, n_text:] = apply_rope(q[:, :, n_text:], *rope)
            k[:, :, n_text:] = apply_rope(k[:, :, n_text:], *rope)
        o = self.attend(q, k, v)  # (B, H, N, d)
        return self.out(o.transpose(1, 2).reshape(B, N, D))

    def forward(self, x, c, temb, rope=None):
        n = c.shape[1]
        h, gate, c_gate = self.modulate(self.ln1, self.norm1(temb), x, c)
        a = self.attention(h, rope, n)
        x, c = x + gate * a[:, n:], c + c_gate * a[:, :n]
        h, gate, c_gate = self.modulate(self.ln2, self.norm2(temb), x, c)
        if self.ff_chunks > 1 and torch.is_grad_enabled():
            # the FFN's two 4D-wide activations (its input to GELU and GELU's output, both kept for backward) are
            # the block's largest; a chunk at a time, each checkpointed, holds one chunk's of them at once
            f = torch.cat([checkpoint(self.ff, part, use_reentrant=False) for part in h.chunk(self.ff_chunks, 1)], 1)
        else:
            f = self.ff(h)
        return x + gate * f[:, n:], c + c_gate * f[:, :n]


class CogVideoXTransformer(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        d, pt = cfg.dim, cfg.patch_size_t or 1
        self.patch_dim = cfg.in_channels * pt * cfg.patch_size**2
        # 1.0's conv is stored as a linear layer over flattened (C, p, p) patches; 1.5 always has a bias
        self.patch_proj = nn.Linear(self.patch_dim, d, bias=cfg.patch_bias or cfg.patch_size_t is not None)
        self.text_proj = nn.Linear(cfg.text_embed_dim, d)
        if cfg.use_learned_positional_embeddings:
            n_patch = (cfg.sample_height // cfg.patch_size) * (cfg.sample_width // cfg.patch_size) * (
                (cfg.sample_frames - 1) // cfg.temporal_compression_ratio + 1)
            self.pos_embedding = nn.Parameter(torch.zeros(1, cfg.max_text_seq_length + n_patch, d))
        self.time_embedding = TimeMLP(d, cfg.time_embed_dim)
        self.ofs_embedding = TimeMLP(cfg.ofs_embed_dim, cfg.ofs_embed_dim) if cfg.ofs_embed_dim else None
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.num_layers))
        self.norm_final = nn.LayerNorm(d, eps=cfg.norm_eps)
        self.norm_out = nn.Linear(cfg.time_embed_dim, 2 * d)  # shift, scale
        self.norm_out_ln = nn.LayerNorm(d, eps=cfg.norm_eps)
        self.proj_out = nn.Linear(d, cfg.out_channels * pt * cfg.patch_size**2)
        self.gradient_checkpointing = False  # training: recompute each block's activations in backward
        self.offload_activations = False  # training, with checkpointing: keep the block inputs in host memory

    def grid(self, frames: int, height: int, width: int) -> tuple[int, int, int]:
        """Token grid (t, h, w) for a latent of `frames` x `height` x `width`."""
        p, pt = self.cfg.patch_size, self.cfg.patch_size_t or 1
        return frames // pt, height // p, width // p

    def positions(self, frames: int, height: int, width: int, device=None):
        """Everything position-dependent for a latent shape: RoPE tables, or an additive embedding."""
        cfg = self.cfg
        t, h, w = self.grid(frames, height, width)
        if cfg.use_rotary_positional_embeddings:
            rope = rope_3d(cfg, t, h, w, device)
        else:
            rope = None
        pos = None
        if cfg.use_learned_positional_embeddings and (height, width) != (cfg.sample_height, cfg.sample_width):
            raise ValueError(f"this model's learned positions only fit latents of "
                             f"{cfg.sample_height}x{cfg.sample_width}, got {height}x{width}")
        if cfg.use_learned_positional_embeddings and (frames - 1) * cfg.temporal_compression_ratio + 1 == cfg.sample_frames:
            pos = self.pos_embedding
        elif not cfg.use_rotary_positional_embeddings or cfg.use_learned_positional_embeddings:
            # 2B's sin-cos table; diffusers also falls back to it for 5B-I2V at a frame count other than
            # the trained one, and we do the same so that outputs stay comparable
            table = sincos_3d(cfg.dim, t, h, w, cfg.spatial_interpolation_scale,
                              cfg.temporal_interpolation_scale, device)
            pos = F.pad(table, (0, 0, cfg.max_text_seq_length, 0))[None]  # text positions get zeros
        return rope, pos

    def patchify(self, x: torch.Tensor) -> torch.Tensor:
        B, Fr, C, H, W = x.shape
        p, pt = self.cfg.patch_size, self.cfg.patch_size_t or 1
        x = x.view(B, Fr // pt, pt, C, H // p, p, W // p, p)
        x = x.permute(0, 1, 4, 6, 3, 2, 5, 7)  # (B, F', H', W', C, pt, p, p)
        return x.reshape(B, -1, self.patch_dim)

    def unpatchify(self, x: torch.Tensor, frames: int, height: int, width: int) -> torch.Tensor:
        B = x.shape[0]
        p, pt = self.cfg.patch_size, self.cfg.patch_size_t or 1
        t, h, w = self.grid(frames, height, width)
        x = x.view(B, t, h, w, -1, pt, p, p)  # (B, F', H', W', C, pt, p, p)
        x = x.permute(0, 1, 5, 4, 2, 6, 3, 7)  # (B, F', pt, C, H', p, W', p)
        return x.reshape(B, t * pt, -1, h * p, w * p)

    def embed_time(self, timestep: torch.Tensor, ofs: torch.Tensor | None, dtype) -> torch.Tensor:
        cfg = self.cfg
        emb = self.time_embedding(timestep_embedding(timestep, cfg.dim, cfg.flip_sin_to_cos, cfg.freq_shift).to(dtype))
        if self.ofs_embedding is not None:
            if ofs is None:
                raise ValueError("this model (1.5-I2V) needs an `ofs` value")
            o = timestep_embedding(ofs, cfg.ofs_embed_dim, cfg.flip_sin_to_cos, cfg.freq_shift).to(dtype)
            emb = emb + self.ofs_embedding(o)
        return emb

    def forward(self, x: torch.Tensor, text: torch.Tensor, timestep: torch.Tensor,
                ofs: torch.Tensor | None = None, positions=None, cache=None) -> torch.Tensor:
        """x: latents (B, F, C, H, W); text: (B, T, text_dim); timestep: (B,). Returns (B, F, C_out, H, W).

        Three parts (embed, run_blocks, head), so that a regional compile can take the blocks alone. A step
        cache (engine/caches/, one request's) stands in for the block stack: it runs it, or part of it, or not."""
        # 1. Time embedding; every consumer (the adaLN projections) takes it through SiLU first
        emb = self.embed_time(timestep, ofs, x.dtype)
        temb = F.silu(emb)
        # 2. Patch and text embedding, with additive positions for 2B and 5B-I2V
        v, c, rope = self.embed(x, text, positions)
        # 3. Blocks
        v, c = self.run_blocks(v, c, temb, rope) if cache is None else cache.blocks(self, emb, v, c, temb, rope)
        # 4. Final norm and adaLN, 5. Unpatchify
        out = self.head(v, temb, x.shape)
        return out if cache is None else cache.output(x, timestep, out)

    def embed(self, x: torch.Tensor, text: torch.Tensor, positions=None):
        """Latents (B, F, C, H, W) and text (B, T, text_dim) -> video tokens (B, S, D), text tokens (B, T, D),
        and the RoPE tables (or None)."""
        _, Fr, _, H, W = x.shape
        n_text = text.shape[1]
        rope, pos = positions if positions is not None else self.positions(Fr, H, W, x.device)
        c, v = self.text_proj(text), self.patch_proj(self.patchify(x))
        if pos is not None:
            pos = pos.to(x.dtype)
            c, v = c + pos[:, :n_text], v + pos[:, self.cfg.max_text_seq_length:]
        return v, c, rope

    def run_blocks(self, v: torch.Tensor, c: torch.Tensor, temb: torch.Tensor, rope=None, blocks=None):
        """The blocks (all, or those given) over video tokens v (B, S, D) and text tokens c (B, T, D); temb is the
        SiLU'd time embedding."""
        offload = self.offload_activations and self.gradient_checkpointing and torch.is_grad_enabled()
        if offload and not v.requires_grad:
            v = v.detach().requires_grad_()  # a reentrant checkpoint returns no gradient unless an input needs one
        with torch.autograd.graph.save_on_cpu(pin_memory=v.is_cuda) if offload else contextlib.nullcontext():
            for block in self.blocks if blocks is None else blocks:
                if self.gradient_checkpointing and torch.is_grad_enabled():
                    # with offload, the reentrant variant saves each block's inputs through autograd's saved-tensor
                    # hooks, which save_on_cpu moves to pinned host memory until the backward pass needs them
                    v, c = checkpoint(block, v, c, temb, rope, use_reentrant=offload)
                else:
                    v, c = block(v, c, temb, rope)
        return v, c

    def head(self, v: torch.Tensor, temb: torch.Tensor, shape) -> torch.Tensor:
        """Video tokens (B, S, D) after the blocks -> the prediction (B, F, C_out, H, W); `shape` is the
        latents' (B, F, C, H, W)."""
        _, Fr, _, H, W = shape
        shift, scale = self.norm_out(temb).unsqueeze(1).chunk(2, dim=-1)  # (B, 1, D) each
        v = self.norm_out_ln(self.norm_final(v)) * (1 + scale) + shift
        return self.unpatchify(self.proj_out(v), Fr, H, W)
