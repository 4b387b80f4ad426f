"""LoRA training at the real shape: peak GPU memory and seconds per step of `train.loop`, on random weights.

No checkpoint can be downloaded here, so the transformer holds random bf16 weights at the real shapes
(5B by default), built directly on the GPU and handed to `train.loop.train`. The precomputed inputs are
random latents and prompt embeddings written in the `train.precompute` layout, so the run goes through
the trainer's own data path, objective, optimizer and export.

    PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True \
    python -m cogrt.bench.train_memory --preset cogvideox-5b --rank 128 --steps 6 --optimizer adamw8bit
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
from pathlib import Path

import torch


def write_random_latents(out: Path, cfg, n: int, frames: int, height: int, width: int) -> Path:
    """n samples of random VAE moments and prompt embeddings, as `train.precompute` lays them out."""
    from safetensors.torch import save_file
    lat_f, h, w = (frames - 1) // cfg.temporal_compression_ratio + 1, height // 8, width // 8
    (out / "samples").mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(0)
    index = []
    c = cfg.out_channels  # the VAE's latent channels (an I2V model's in_channels also count the image's)
    for i in range(n):
        t = {"latent_mean": torch.randn(c, lat_f, h, w, generator=g),  # (C, F_latent, h, w)
             "latent_logvar": torch.full((c, lat_f, h, w), -6.0),
             "prompt_embeds": torch.randn(cfg.max_text_seq_length, cfg.text_embed_dim, generator=g)}
        if cfg.is_i2v:
            t["image_mean"] = torch.randn(c, 1, h, w, generator=g)
            t["image_logvar"] = torch.full((c, 1, h, w), -6.0)
        save_file({k: v.bfloat16() for k, v in t.items()}, str(out / f"samples/{i:06d}.safetensors"))
        index.append({"id": f"{i:06d}", "caption": "random", "frames": frames, "height": height, "width": width,
                      "file": f"samples/{i:06d}.safetensors", "has_image": cfg.is_i2v})
    (out / "index.jsonl").write_text("".join(json.dumps(e) + "\n" for e in index))
    (out / "summary.json").write_text(json.dumps({"vae_scaling_factor": 0.7, "is_i2v": cfg.is_i2v,
                                                  "invert_scale_latents": cfg.patch_size_t is not None}))
    return out


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--preset", default="cogvideox-5b")
    ap.add_argument("--frames", type=int, default=49)
    ap.add_argument("--height", type=int, default=480)
    ap.add_argument("--width", type=int, default=720)
    ap.add_argument("--rank", type=int, default=128)
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--optimizer", default="adamw", choices=["adamw", "adamw8bit"])
    ap.add_argument("--no-checkpointing", action="store_true")
    ap.add_argument("--offload-activations", action="store_true")
    ap.add_argument("--ff-chunks", type=int, default=1, help="the trainer's --ff-chunks")
    ap.add_argument("--json", default=None)
    ap.add_argument("--device", default="cuda", help="cpu: a smoke test of the script at a tiny preset")
    a = ap.parse_args(argv)

    from cogrt.engine.loader import transformer_config
    from cogrt.engine.model import PRESETS, CogVideoXTransformer
    from cogrt.engine.random_model import write_scheduler
    from cogrt.train.loop import TrainConfig, train

    cfg = PRESETS[a.preset]
    work = Path(tempfile.mkdtemp(prefix="train_memory_"))
    (work / "model" / "transformer").mkdir(parents=True)
    (work / "model" / "transformer" / "config.json").write_text(json.dumps(transformer_config(cfg)))
    write_scheduler(work / "model" / "scheduler", cfg)
    write_random_latents(work / "data", cfg, 2, a.frames, a.height, a.width)

    torch.manual_seed(0)
    cuda = a.device.startswith("cuda")
    torch.set_default_dtype(torch.bfloat16 if cuda else torch.float32)  # bf16: a LoRA run's frozen GPU base
    with torch.device(a.device):
        model = CogVideoXTransformer(cfg)
    torch.set_default_dtype(torch.float32)
    weights_gib = sum(p.numel() * p.element_size() for p in model.parameters()) / 2**30
    if cuda:
        torch.cuda.empty_cache()

    tc = TrainConfig(model=str(work / "model"), data=str(work / "data"), out=str(work / "run"), method="lora",
                     rank=a.rank, alpha=float(a.rank), steps=a.steps, batch_size=1, lr=1e-4,
                     optimizer=a.optimizer, gradient_checkpointing=not a.no_checkpointing,
                     offload_activations=a.offload_activations, ff_chunks=a.ff_chunks,
                     checkpoint_every=0, log_every=1, resume=False, device=a.device)
    res = train(tc, transformer=model)
    hist = res["history"]
    timed = [h["s_per_step"] for h in hist[2:]]  # the first two steps warm up (allocator, cuDNN plans)
    out = dict(preset=a.preset, shape=f"{a.frames}x{a.height}x{a.width}", rank=a.rank, optimizer=a.optimizer,
               gradient_checkpointing=not a.no_checkpointing, offload_activations=a.offload_activations,
               ff_chunks=a.ff_chunks, steps=a.steps,
               alloc_conf=os.environ.get("PYTORCH_CUDA_ALLOC_CONF", ""),
               base_weights_gib=weights_gib, s_per_step_median=statistics.median(timed),
               peak_allocated_gib=max(h["peak_gib"] for h in hist),
               peak_reserved_gib=max(h["reserved_gib"] for h in hist),
               losses=[h["loss"] for h in hist], torch=torch.__version__,
               gpu=torch.cuda.get_device_name() if cuda else "cpu")
    print(json.dumps(out, indent=1), flush=True)
    if a.json:
        Path(a.json).write_text(json.dumps(out, indent=1))
    return out


if __name__ == "__main__":
    main()
