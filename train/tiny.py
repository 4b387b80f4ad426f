"""The recipe for the bundled tiny CogVideoX (`models/cogrt-tiny`), trained entirely by this project.

Nobody here can download CogVideoX weights, so `make demo` runs a model we train ourselves on the
synthetic world (train.synthetic):
  1. `vae`: a small AutoencoderKLCogVideoX trained as an autoencoder on synthetic clips; its latent scaling
     factor is set to 1/std of its latents, as for the released VAEs;
  2. a small T5 encoder, randomly initialised and frozen, with the ByT5 tokenizer (bytes: no vocab file);
  3. `transformer`: a 5B-style transformer (3D RoPE) trained from scratch with `train.loop` on latents
     precomputed by `train.precompute` from mp4s written by `train.synthetic`;
  4. `eval`: prompt adherence (train.adherence) on held-out prompts, and VAE reconstruction PSNR.
Each stage reads and writes a work folder, so stages can run in separate processes (or GPU leases).

    python -m cogrt.train.tiny vae --work W           # then: transformer, eval, package
"""
from __future__ import annotations

import argparse
import json
import math
import shutil
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
import torch

from cogrt.engine.model import PRESETS
from cogrt.engine.random_model import write_random_checkpoint

CONFIG = PRESETS["cogrt-tiny"]
VAE_CHANNELS = (32, 32, 64, 64)
LORA_TARGETS = ("to_q", "to_k", "to_v", "to_out.0", "ff.net.0.proj", "ff.net.2")
FRAMES, SIZE = 49, 128


def _device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _clips(n: int, seed: int, frames: int, size: int, split: str) -> np.ndarray:
    from cogrt.train.synthetic import render, sample_scenes
    return np.stack([render(s, frames, size, size) for s in sample_scenes(n, seed, split)])  # (n, F, H, W, 3)


def clip_pool(n: int, seed: int, frames: int, size: int, workers: int = 8) -> np.ndarray:
    """Clips of every colour and shape (held-out ones too: the VAE must reconstruct what LoRAs teach)."""
    splits = ["train", "concept", "train", "heldout"]
    jobs = [(n // 16, seed + i, frames, size, splits[i % 4]) for i in range(16)]
    with ProcessPoolExecutor(workers) as ex:
        return np.concatenate(list(ex.map(_clips, *zip(*jobs))))


def to_video(x: np.ndarray, device) -> torch.Tensor:
    """uint8 (B, F, H, W, 3) -> float (B, 3, F, H, W) in [-1, 1], the VAE's layout."""
    return torch.from_numpy(x).to(device).permute(0, 4, 1, 2, 3).float() / 127.5 - 1


def psnr(vae, clips: np.ndarray, device) -> float:
    """Reconstruction PSNR (dB) over uint8 frames, encoding with the posterior mean."""
    vals = []
    with torch.no_grad():
        for c in clips:
            x = to_video(c[None], device)
            rec = vae.decode(vae.encode(x.to(vae.dtype)).latent_dist.mode()).sample.float()
            a = ((rec.clamp(-1, 1) + 1) * 127.5).round()
            mse = ((a - (x + 1) * 127.5) ** 2).mean().item()
            vals.append(10 * math.log10(255**2 / max(mse, 1e-10)))
    return float(np.mean(vals))


def stage_vae(work: Path, steps: int, batch: int, lr: float, kl: float, seconds: float | None,
              init: Path | None = None, clip_frames: int = 9) -> dict:
    """Build the checkpoint skeleton and train its VAE; writes work/model (or work/vae_ft) and work/vae.json.

    `init`: a trained VAE folder whose decoder is fine-tuned alone. Its encoder, and so its latents and
    scaling factor, stay exactly as they were, and a transformer trained on them remains valid."""
    from diffusers import AutoencoderKLCogVideoX
    dev = _device()
    model = work / "model"
    if init is None:
        write_random_checkpoint(model, CONFIG, seed=0, vae_channels=VAE_CHANNELS, t5_layers=2, scheduler="ddim")
        vae = AutoencoderKLCogVideoX.from_pretrained(model / "vae").to(dev).train()
        trainable = list(vae.parameters())
    else:
        vae = AutoencoderKLCogVideoX.from_pretrained(init, torch_dtype=torch.float32).to(dev).train()
        vae.encoder.requires_grad_(False).eval()
        if vae.quant_conv is not None:
            vae.quant_conv.requires_grad_(False)
        trainable = [p for p in vae.parameters() if p.requires_grad]
    # 9-frame clips are one encoder window (1 + 8 frames) and one decoder window. Longer clips go through the
    # windowed path with its conv caches, which is how 49-frame videos are encoded and decoded: a VAE trained
    # on 9 frames reconstructs 9-frame clips at 40 dB but 49-frame ones at 30 dB, so fine-tune on full clips.
    pool = clip_pool(min(2048 if clip_frames <= 9 else 512, max(64, steps * batch)), 100, clip_frames, SIZE)
    opt = torch.optim.AdamW(trainable, lr=lr, weight_decay=0.0)
    rng = np.random.default_rng(0)
    t0, log = time.time(), []
    for step in range(steps):
        x = to_video(pool[rng.integers(0, len(pool), batch)], dev)
        with torch.autocast(dev.type, torch.bfloat16, enabled=dev.type == "cuda"):
            with torch.set_grad_enabled(init is None):
                post = vae.encode(x).latent_dist
            rec = vae.decode(post.sample()).sample.float()
        if init is None:
            loss = (rec - x).abs().mean() + ((rec - x) ** 2).mean() + kl * post.kl().mean()
        else:  # the decoder alone: plain MSE, which is what PSNR measures
            loss = ((rec - x) ** 2).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trainable, 1.0)
        done = max(step / steps, (time.time() - t0) / seconds if seconds else 0.0)
        for g in opt.param_groups:  # cosine decay to 10%, over the steps or the time budget
            g["lr"] = lr * min(1.0, (step + 1) / 50) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(done, 1.0))))
        opt.step()
        if step % 100 == 0 or step == steps - 1:
            log.append((step, loss.item()))
            print(f"vae step {step} loss {loss.item():.4f} {time.time() - t0:.0f}s", flush=True)
        if seconds and time.time() - t0 > seconds:
            print(f"vae: time budget reached at step {step}", flush=True)
            break
    vae.eval()
    held = _clips(12, 999, FRAMES, SIZE, "heldout")
    if init is None:
        with torch.no_grad():  # scaling factor: unit variance latents, as for the released VAEs
            z = torch.cat([vae.encode(to_video(c[None], dev)).latent_dist.mode() for c in held[:8]])
        vae.register_to_config(scaling_factor=float(1.0 / z.float().std()))
    result = dict(psnr_db=psnr(vae, held, dev), scaling_factor=vae.config.scaling_factor, steps=step + 1,
                  seconds=time.time() - t0, loss=log, decoder_only=init is not None)
    vae.to(torch.float16).save_pretrained(model / "vae" if init is None else work / "vae_ft")
    (work / "vae.json").write_text(json.dumps(result, indent=1))
    print(json.dumps({k: v for k, v in result.items() if k != "loss"}), flush=True)
    return result


def _write_shard(args):
    from cogrt.train.synthetic import write_dataset
    out, n, seed, split = args
    return write_dataset(out, n, seed, FRAMES, SIZE, SIZE, split)


def stage_data(work: Path, n_videos: int, split: str = "train", workers: int = 8) -> Path:
    """Synthetic mp4s in the diffusers-example layout, in 16 shards written in parallel."""
    data = work / f"data_{split}"
    if not (data / "done").is_file():
        shards = [(data / f"shard{i:02d}", n_videos // 16, 1000 + i, split) for i in range(16)]
        with ProcessPoolExecutor(workers) as ex:
            list(ex.map(_write_shard, shards))
        (data / "done").write_text("ok")
    return data


def stage_transformer(work: Path, n_videos: int, steps: int, batch: int, lr: float, split: str = "train",
                      seconds: float | None = None, limit: int | None = None, vae: Path | None = None,
                      init: Path | None = None, lr_schedule: str = "constant", workers: int = 8,
                      base: Path | None = None) -> dict:
    """Synthetic mp4s → precomputed latents → full training; the result goes into work/model.

    `vae`: a trained VAE folder to use (else work/model must exist from the vae stage). `init`: a
    transformer folder to continue training from (else from scratch, or, when work/run holds checkpoints,
    resumed exactly from the latest). `base`: a whole trained model folder (e.g. the bundled one) to
    continue from, VAE and T5 included. `seconds` bounds the whole stage.
    """
    from cogrt.train.loop import TrainConfig, train
    t_stage = time.time()
    model = _model_from(work, base)
    if vae is not None and not (model / "model_index.json").is_file():
        write_random_checkpoint(model, CONFIG, seed=0, vae_channels=VAE_CHANNELS, t5_layers=2, scheduler="ddim")
        shutil.rmtree(model / "vae")
        shutil.copytree(vae, model / "vae")
    if init is not None:
        shutil.rmtree(model / "transformer")
        shutil.copytree(init, model / "transformer")
    t0 = time.time()
    latents = _latents(work, n_videos, split, workers, limit)
    t_pre = time.time() - t0
    left = seconds - (time.time() - t_stage) - 20 if seconds else None  # 20 s for the export
    print(f"precompute took {t_pre:.0f}s; training for {left or steps} {'s' if left else 'steps'}", flush=True)
    res = train(TrainConfig(model=str(model), data=str(latents), out=str(work / "run"), method="full",
                            from_scratch=init is None and base is None, steps=steps, batch_size=batch, lr=lr,
                            warmup=200, lr_schedule=lr_schedule, weight_decay=0.01, caption_dropout=0.1,
                            checkpoint_every=1000, log_every=100, time_limit=left, cache_latents=True))
    shutil.rmtree(work / "model" / "transformer")
    shutil.copytree(work / "run" / "transformer", work / "model" / "transformer")
    out = dict(precompute_s=t_pre, train_s=time.time() - t0 - t_pre, steps=res["steps"], history=res["history"])
    (work / "transformer.json").write_text(json.dumps(out, indent=1))
    return out


def _model_from(work: Path, base: Path | None) -> Path:
    """work/model, copied from `base` (a whole model folder) the first time."""
    model = work / "model"
    if base is not None and not (model / "model_index.json").is_file():
        shutil.copytree(base, model)
    return model


def _latents(work: Path, n_videos: int, split: str, workers: int, limit: int | None = None) -> Path:
    """The split's synthetic mp4s (written if missing), precomputed with work/model into work/latents_<split>."""
    from cogrt.train.data import Record
    from cogrt.train.precompute import precompute
    records = []
    for shard in sorted(stage_data(work, n_videos, split).glob("shard*")):
        caps = (shard / "prompts.txt").read_text().splitlines()
        vids = (shard / "videos.txt").read_text().splitlines()
        records += [Record(c, shard / v) for c, v in zip(caps, vids)]
    out = work / f"latents_{split}"
    precompute(records[:limit], work / "model", out, f"{FRAMES}x{SIZE}x{SIZE}", device=_device(), workers=workers)
    return out


def stage_lora(work: Path, n_videos: int, steps: int, batch: int, lr: float, rank: int,
               seconds: float | None = None, workers: int = 8, base: Path | None = None) -> dict:
    """The demo LoRA: teach the trained model the held-out concepts (purple, star) from the "concept" split.
    Writes work/demo_lora.safetensors; the base model in work/model (copied from `base` if missing) is not changed."""
    from cogrt.train.loop import TrainConfig, train
    t_stage = time.time()
    model = _model_from(work, base)
    latents = _latents(work, n_videos, "concept", workers)
    left = seconds - (time.time() - t_stage) - 10 if seconds else None
    res = train(TrainConfig(model=str(model), data=str(latents), out=str(work / "lora_run"), method="lora",
                            rank=rank, alpha=float(rank), targets=LORA_TARGETS, steps=steps,
                            batch_size=batch, lr=lr, warmup=100, lr_schedule="cosine", weight_decay=0.0,
                            caption_dropout=0.1, checkpoint_every=500, log_every=100, time_limit=left,
                            cache_latents=True))
    shutil.copy(res["export"], work / "demo_lora.safetensors")
    out = dict(steps=res["steps"], seconds=time.time() - t_stage, history=res["history"])
    (work / "lora.json").write_text(json.dumps(out, indent=1))
    return out


def stage_eval(model: Path, n: int = 50, steps: int = 30, guidance: float = 6.0, split: str = "heldout",
               lora: str | None = None, out: Path | None = None) -> dict:
    """Prompt adherence on n prompts of `split` (held out of training), one seed each."""
    from cogrt.train.adherence import score
    from cogrt.engine.pipeline import load_pipeline
    from cogrt.train.synthetic import caption, sample_scenes
    pipe = load_pipeline(model, device=_device(), dtype=torch.float32)
    pairs, t0 = [], time.time()
    for i, sc in enumerate(sample_scenes(n, 7, split)):
        res = pipe.generate(caption(sc), num_frames=FRAMES, height=SIZE, width=SIZE, num_inference_steps=steps,
                            guidance_scale=guidance, seed=i, loras=[(lora, 1.0)] if lora else ())
        pairs.append((sc, res.frames))
        if out is not None and i < 4:
            from cogrt.engine.video import write_mp4
            write_mp4(res.frames, out / f"sample_{split}_{i}.mp4", res.fps)
    result = score(pairs)
    result.update(seconds_per_video=(time.time() - t0) / n, steps=steps, guidance=guidance, split=split)
    print(json.dumps(result, indent=1), flush=True)
    return result


def package(work: Path, dest: Path) -> Path:
    """Copy the trained model into `dest`, weights in fp16 to keep the repository small."""
    from safetensors.torch import load_file, save_file
    if dest.exists():
        shutil.rmtree(dest)
    shutil.copytree(work / "model", dest)
    for f in dest.rglob("*.safetensors"):
        sd = load_file(str(f))
        save_file({k: v.half() if v.is_floating_point() else v for k, v in sd.items()}, str(f))
    return dest


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("stage", choices=["data", "vae", "transformer", "lora", "eval", "psnr", "package"])
    p.add_argument("--work", default=".cache/tiny")
    p.add_argument("--steps", type=int, default=3000)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--lr", type=float, default=None)
    p.add_argument("--seconds", type=float, default=None, help="stop the VAE stage after this long")
    p.add_argument("--videos", type=int, default=2048)
    p.add_argument("--limit", type=int, default=None, help="train on the first N videos only")
    p.add_argument("--vae", default=None, help="transformer stage: a trained VAE folder to build on; "
                                               "vae stage: a trained VAE whose decoder alone is fine-tuned")
    p.add_argument("--base", default=None, help="transformer and lora stages: a whole trained model folder to "
                                                "start from (copied into WORK/model if that is missing)")
    p.add_argument("--clip-frames", type=int, default=9, help="vae stage: frames per training clip")
    p.add_argument("--lr-schedule", default="constant", choices=["constant", "cosine"])
    p.add_argument("--rank", type=int, default=32, help="lora stage")
    p.add_argument("--workers", type=int, default=8, help="threads decoding videos for precompute")
    p.add_argument("--init", default=None, help="transformer stage: a transformer folder to continue from")
    p.add_argument("--n", type=int, default=50)
    p.add_argument("--model", default=None, help="for eval: a model folder (default: WORK/model)")
    p.add_argument("--lora", default=None)
    p.add_argument("--split", default="heldout")
    p.add_argument("--sample-steps", type=int, default=30)
    p.add_argument("--dest", default="models/cogrt-tiny")
    a = p.parse_args(argv)
    work = Path(a.work)
    work.mkdir(parents=True, exist_ok=True)
    if a.stage == "data":
        print(stage_data(work, a.videos, a.split if a.split != "heldout" else "train"))
    elif a.stage == "vae":
        stage_vae(work, a.steps, a.batch, a.lr or 1e-3, kl=1e-6, seconds=a.seconds,
                  init=Path(a.vae) if a.vae else None, clip_frames=a.clip_frames)
    elif a.stage == "transformer":
        stage_transformer(work, a.videos, a.steps, a.batch, a.lr or 5e-4, seconds=a.seconds, limit=a.limit,
                          vae=Path(a.vae) if a.vae else None, init=Path(a.init) if a.init else None,
                          lr_schedule=a.lr_schedule, workers=a.workers, base=Path(a.base) if a.base else None)
    elif a.stage == "lora":
        stage_lora(work, a.videos, a.steps, a.batch, a.lr or 1e-3, a.rank, seconds=a.seconds, workers=a.workers,
                   base=Path(a.base) if a.base else None)
    elif a.stage == "eval":
        res = stage_eval(Path(a.model) if a.model else work / "model", a.n, a.sample_steps, split=a.split,
                         lora=a.lora, out=work)
        (work / f"eval_{a.split}.json").write_text(json.dumps(res, indent=1))
    elif a.stage == "psnr":  # the VAE alone: 12 held-out clips of --clip-frames frames
        from diffusers import AutoencoderKLCogVideoX
        vae = AutoencoderKLCogVideoX.from_pretrained(Path(a.model or work / "model") / "vae", torch_dtype=torch.float32)
        db = psnr(vae.to(_device()).eval(), _clips(12, 999, a.clip_frames, SIZE, "heldout"), _device())
        print(json.dumps({"psnr_db": db, "clip_frames": a.clip_frames, "clips": 12}))
    else:
        print(package(work, Path(a.dest)))


if __name__ == "__main__":
    main()
