"""The training loop: LoRA or full fine-tuning (or training from scratch) on precomputed latents.

Single process, or several under `torchrun` (DDP for LoRA, FSDP2 for full training). Checkpoints hold the
trainable weights, the optimizer, every RNG and the data position, so a killed run resumes losing at most
the steps since its last checkpoint. Validation videos come from the engine's own pipeline, with the LoRA
applied exactly as serving applies it. For models of the synthetic world (the bundled tiny model), a guard
scores adherence and shape distortion every N steps and can keep the best model (`guard`, `keep_best`).
"""
from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from cogrt.engine import loader
from cogrt.engine.attention import set_attention
from cogrt.engine.model import CogVideoXTransformer, ModelConfig

from . import checkpoint as ckpt
from .lora import ATTENTION, add_lora, base_state_dict, save_lora
from .objective import Batch, LatentScale, model_inputs, v_loss

log = logging.getLogger(__name__)


@dataclass
class TrainConfig:
    model: str  # base checkpoint directory (diffusers layout): its scheduler, VAE scale and, unless from scratch, weights
    data: str  # a precomputed latent folder (train.precompute)
    out: str
    method: str = "lora"  # lora | full
    from_scratch: bool = False  # full training of a freshly initialised transformer with `model`'s config
    rank: int = 64
    alpha: float = 64.0
    targets: tuple[str, ...] = ATTENTION
    steps: int = 1000
    batch_size: int = 1
    lr: float | None = None  # None: the method's default (DEFAULT_LR)
    weight_decay: float = 1e-4
    warmup: int = 0
    lr_schedule: str = "constant"  # constant | cosine (to 10% of lr at `steps`), after the linear warm-up
    grad_clip: float = 1.0
    optimizer: str = "adamw"  # adamw | adamw8bit (torchao, CUDA)
    mixed_precision: str = "bf16"  # bf16 | no; bf16 autocast applies on CUDA only
    gradient_checkpointing: bool = False
    offload_activations: bool = False  # with checkpointing: block inputs wait in pinned host memory (~4 GiB at 5B)
    ff_chunks: int = 1  # the FFN over this many token chunks, each recomputed in backward (less peak memory)
    caption_dropout: float = 0.0  # replace the prompt by "" so classifier-free guidance has an unconditional model
    image_dropout: float = 0.05
    checkpoint_every: int = 500
    keep_checkpoints: int = 2
    validate_every: int = 0
    validation_prompts: tuple[str, ...] = ()
    validation_images: tuple[str, ...] = ()
    validation_args: dict = field(default_factory=lambda: dict(num_frames=9, height=64, width=64,
                                                                num_inference_steps=20, seed=0))
    # The guard: every guard_every steps (and at the last), videos of guard_prompts scored for adherence and
    # distortion by the synthetic world's evaluator (`guard`). Only meaningful for models of that world: the
    # bundled tiny model and its fine-tunes.
    guard_every: int = 0
    guard_prompts: tuple[str, ...] = ()  # captions of train.synthetic; empty: GUARD_PROMPTS
    guard_args: dict = field(default_factory=lambda: dict(num_frames=49, height=128, width=128,
                                                           num_inference_steps=20, guidance_scale=6.0, seed=0))
    keep_best: bool = False  # export the model of the best guard score to out/best, with best.json
    log_every: int = 10
    time_limit: float | None = None  # seconds; the run ends (and exports) at the first step past it
    cache_latents: bool = False  # hold the whole precomputed dataset in host memory (small datasets)
    seed: int = 0
    resume: bool = True
    device: str | None = None


# Learning rates by method. Full fine-tuning moves every weight: at LoRA's rates it warps a subject's shape within
# a few hundred steps (the effect users report for CogVideoX at 2e-4 on ~50 videos, worse by 4,000 steps), so its
# default is ten times lower. From scratch there is nothing to distort, and the caller sets its own rate.
DEFAULT_LR = {"lora": 1e-4, "full": 1e-5}
FULL_LR_WARN = 5e-5
GUIDANCE = ("full fine-tuning at about 1e-5; LoRA at 1e-4 to 1e-3 with alpha at least rank/2; 100-200 videos for "
            "a concept; about 2,500 steps for a style and 6,000-20,000 for a new concept")


def resolve_defaults(tc: TrainConfig) -> TrainConfig:
    """Fill the method's learning rate and warn, once each, about settings known to distort: full fine-tuning
    above FULL_LR_WARN, and a LoRA alpha below half its rank (which scales the update down and is usually
    compensated by a learning rate high enough to overshoot)."""
    if tc.method not in DEFAULT_LR:
        raise ValueError(f"unknown method {tc.method!r}; use 'lora' or 'full'")
    if tc.lr is None:
        if tc.from_scratch:
            raise ValueError("training from scratch has no default learning rate: pass lr")
        tc.lr = DEFAULT_LR[tc.method]
    if tc.method == "full" and not tc.from_scratch and tc.lr > FULL_LR_WARN:
        _warn_once("full", f"full fine-tuning at lr {tc.lr:g} (above {FULL_LR_WARN:g}) is known to warp subjects' "
                           f"shapes within a few hundred steps (reported for CogVideoX at 2e-4 on ~50 videos, worse by "
                           f"4,000 steps); LoRA on the same data keeps them. Usual guidance: {GUIDANCE}")
    if tc.method == "lora" and tc.alpha < tc.rank / 2:
        _warn_once("alpha", f"LoRA alpha {tc.alpha:g} is below half the rank ({tc.rank}): the update is scaled by "
                            f"{tc.alpha / tc.rank:g}, and the learning rate that makes up for it tends to distort. "
                            f"Usual guidance: {GUIDANCE}")
    return tc


_warned: set[str] = set()


def _warn_once(key: str, message: str) -> None:
    if key not in _warned:
        _warned.add(key)
        log.warning(message)


def _setup_distributed():
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return 0, 1
    import torch.distributed as dist
    if not dist.is_initialized():
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    return dist.get_rank(), world


def _scratch_model(cfg: ModelConfig, device) -> CogVideoXTransformer:
    """DiT-style init for training from scratch: adaLN-zero, so every block starts as the identity."""
    with torch.device(device):
        model = CogVideoXTransformer(cfg)
    with torch.no_grad():
        for b in model.blocks:
            for lin in (b.norm1, b.norm2):
                lin.weight.zero_()
                lin.bias.zero_()
        model.proj_out.weight.zero_()
        model.proj_out.bias.zero_()
    return model


def _collate(items: list[dict]) -> dict:
    """Stack one bucket's samples; every tensor field has the same shape within a bucket."""
    return {k: torch.stack([it[k] for it in items]) if torch.is_tensor(items[0][k]) else items[0][k]
            for k in items[0]}


def _batches(dataset, sampler, device):
    """Batches forever, epoch after epoch; the sampler's state is the data position a checkpoint keeps."""
    while True:
        for idx in sampler:
            batch = _collate([dataset[i] for i in idx])
            yield {k: (v.to(device, non_blocking=True) if torch.is_tensor(v) else v) for k, v in batch.items()}
        sampler.set_epoch(sampler.epoch + 1)


def train(tc: TrainConfig, transformer: CogVideoXTransformer | None = None) -> dict:
    """Run (or resume) a training run. `transformer`: an already built model to train instead of loading
    `tc.model`'s weights (benchmarks at the real shapes use random weights built on the GPU)."""
    from .precompute import BucketBatchSampler, LatentDataset
    resolve_defaults(tc)
    rank, world = _setup_distributed()
    prompts = guard_prompts(tc, world)
    dev = torch.device(tc.device or (f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}" if torch.cuda.is_available()
                                     else "cpu"))
    if dev.type == "cuda" and dev.index is not None:
        torch.cuda.set_device(dev)
    torch.manual_seed(tc.seed)  # the same on every rank: LoRA and scratch inits must agree across ranks
    out = Path(tc.out)
    root = loader.resolve(tc.model)
    data = Path(tc.data)
    summary = loader.read_json(data / "summary.json")
    scale = LatentScale(summary["vae_scaling_factor"], summary.get("invert_scale_latents", False))

    # the model: trainable weights in fp32; a LoRA's frozen base in bf16 on the GPU
    if transformer is not None:
        model = transformer.to(dev)
    elif tc.from_scratch:
        model = _scratch_model(loader.load_config(root / "transformer"), dev)
    else:
        base_dtype = torch.bfloat16 if tc.method == "lora" and dev.type == "cuda" else torch.float32
        model = loader.load_transformer(root / "transformer", dev, base_dtype)
    set_attention(model, "sdpa")  # PyTorch's SDPA, cuDNN first on the GPU
    cfg = model.cfg
    if cfg.is_i2v != bool(summary.get("is_i2v", False)):
        raise ValueError(f"{data} was precomputed for a {'I2V' if summary.get('is_i2v') else 'T2V'} model, "
                         f"but {root} is {cfg.variant}")
    if tc.method == "lora":
        add_lora(model, tc.rank, tc.alpha, tc.targets)
    elif tc.method == "full":
        model.requires_grad_(True)
    else:
        raise ValueError(f"unknown method {tc.method!r}; use 'lora' or 'full'")
    model.train()
    model.gradient_checkpointing = tc.gradient_checkpointing or tc.offload_activations
    model.offload_activations = tc.offload_activations
    for block in model.blocks:
        block.ff_chunks = tc.ff_chunks
    params = [p for p in model.parameters() if p.requires_grad]

    wrapped = model
    if world > 1:
        if tc.method == "lora":
            from torch.nn.parallel import DistributedDataParallel
            wrapped = DistributedDataParallel(model, device_ids=[dev.index] if dev.type == "cuda" else None)
        else:
            from torch.distributed.fsdp import fully_shard
            for b in model.blocks:
                fully_shard(b)
            fully_shard(model)
            params = [p for p in model.parameters() if p.requires_grad]

    opt = _optimizer(tc, params, dev)
    sched_lr = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: _lr_factor(tc, s))
    alphas = _alphas_cumprod(root)
    null_text = _null_text(root, cfg, dev) if tc.caption_dropout > 0 else None

    dataset = LatentDataset(data, cache=tc.cache_latents)
    sampler = BucketBatchSampler(dataset, tc.batch_size, seed=tc.seed, shuffle=True, rank=rank, world_size=world)
    gen = torch.Generator(dev).manual_seed(tc.seed * 1000 + rank)
    state = ckpt.TrainState(step=0)
    found = ckpt.latest(out) if tc.resume else None
    if found is not None:
        state = ckpt.load(found, model, opt, sched_lr, sampler, gen, tc.method, rank)
        log.info("[rank %d] resumed from %s at step %d", rank, found, state.step)
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
        (out / "train_config.json").write_text(json.dumps(asdict(tc), indent=2, default=str))
    guards, best = [], None  # the guard's scores, and its best (rank 0)
    if prompts and rank == 0:
        guards, best = _guard_resume(out, state.step if found is not None else None)

    val_pipe = None  # built at the first validation
    positions: dict[tuple, tuple] = {}  # per bucket; they depend only on the latent shape
    autocast = torch.autocast("cuda", torch.bfloat16, enabled=dev.type == "cuda" and tc.mixed_precision == "bf16")
    batches = _batches(dataset, sampler, dev)
    t_last, losses, history = time.perf_counter(), [], []
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
    t_start = time.perf_counter()
    while state.step < tc.steps:
        if tc.time_limit and time.perf_counter() - t_start > tc.time_limit:
            log.info("time limit reached after %d steps", state.step)
            if tc.checkpoint_every and state.step % tc.checkpoint_every:  # so that a rerun resumes from here
                ckpt.save(out, state, model, opt, sched_lr, sampler, gen, tc.method, rank, tc.keep_checkpoints)
            break
        b = next(batches)
        batch = Batch(b["latent_mean"].float(), b["latent_logvar"].float(), b["prompt_embeds"],
                      b.get("image_mean"), b.get("image_logvar"))
        if batch.image_mean is not None:
            batch.image_mean, batch.image_logvar = batch.image_mean.float(), batch.image_logvar.float()
        x0, image = model_inputs(batch, cfg, scale, gen, tc.image_dropout)
        text = batch.prompt_embeds.float()
        if null_text is not None:
            drop = torch.rand(text.shape[0], generator=gen, device=dev) < tc.caption_dropout
            text = torch.where(drop[:, None, None], null_text.expand_as(text), text)
        key = tuple(x0.shape[1:])
        if key not in positions:
            positions[key] = model.positions(x0.shape[1], x0.shape[3], x0.shape[4], dev)
        with autocast:
            loss = v_loss(wrapped, x0, text, alphas, gen, image, positions[key])
        loss.backward()
        gnorm = torch.nn.utils.clip_grad_norm_(params, tc.grad_clip) if tc.grad_clip else None
        opt.step()
        sched_lr.step()
        opt.zero_grad(set_to_none=True)
        state.step += 1
        losses.append(loss.detach())
        if state.step % tc.log_every == 0 or state.step == tc.steps:
            mean_loss = torch.stack(losses).mean().item()  # the only host sync, once per log interval
            dt = (time.perf_counter() - t_last) / len(losses)
            mem = torch.cuda.max_memory_allocated(dev) / 2**30 if dev.type == "cuda" else 0.0
            reserved = torch.cuda.max_memory_reserved(dev) / 2**30 if dev.type == "cuda" else 0.0
            history.append(dict(step=state.step, loss=mean_loss, s_per_step=dt, peak_gib=mem, reserved_gib=reserved,
                                grad_norm=float(gnorm) if gnorm is not None else None))
            if rank == 0:
                log.info("step %6d  loss %.4f  %.3f s/step  peak %.1f GiB", state.step, mean_loss, dt, mem)
            losses, t_last = [], time.perf_counter()
        if tc.checkpoint_every and (state.step % tc.checkpoint_every == 0 or state.step == tc.steps):
            ckpt.save(out, state, model, opt, sched_lr, sampler, gen, tc.method, rank, tc.keep_checkpoints)
        if tc.validate_every and tc.validation_prompts and state.step % tc.validate_every == 0 and rank == 0:
            val_pipe = val_pipe or validation_pipeline(model, root, dev)
            validate(tc, model, val_pipe, out / "validation" / f"step_{state.step:06d}")
        if prompts and (state.step % tc.guard_every == 0 or state.step == tc.steps) and rank == 0:
            val_pipe = val_pipe or validation_pipeline(model, root, dev)
            guards.append(guard(tc, model, val_pipe, prompts, out, state.step))
            if tc.keep_best and (best is None or guards[-1]["score"] > best["score"]):
                best = keep_best(tc, model, out, guards[-1])
    final = export(tc, model, out, rank)
    if world > 1:
        torch.distributed.barrier()
    return dict(history=history, export=str(final) if final else None, steps=state.step, guard=guards, best=best)


def _lr_factor(tc: TrainConfig, step: int) -> float:
    warm = min(1.0, (step + 1) / max(1, tc.warmup))
    if tc.lr_schedule == "constant":
        return warm
    if tc.lr_schedule == "cosine":
        done = min(1.0, max(0, step - tc.warmup) / max(1, tc.steps - tc.warmup))
        return warm * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * done)))
    raise ValueError(f"unknown lr_schedule {tc.lr_schedule!r}; use constant or cosine")


def _optimizer(tc: TrainConfig, params, dev):
    if tc.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=tc.lr, betas=(0.9, 0.95), weight_decay=tc.weight_decay)
    if tc.optimizer == "adamw8bit":
        if dev.type != "cuda":
            raise ValueError("adamw8bit (torchao) needs a CUDA GPU; use --optimizer adamw on the CPU")
        from cogrt.engine.quant import import_torchao
        import_torchao()
        from torchao.optim import AdamW8bit
        return AdamW8bit(params, lr=tc.lr, betas=(0.9, 0.95), weight_decay=tc.weight_decay)
    raise ValueError(f"unknown optimizer {tc.optimizer!r}; use adamw or adamw8bit")


def _alphas_cumprod(root: Path) -> torch.Tensor:
    import diffusers
    conf = loader.read_json(root / "scheduler" / "scheduler_config.json")
    return getattr(diffusers, conf["_class_name"]).from_config(conf).alphas_cumprod.float()


def _null_text(root: Path, cfg: ModelConfig, dev) -> torch.Tensor:
    """T5's embedding of the empty prompt, computed once: what the pipeline feeds the unconditional branch."""
    from transformers import AutoTokenizer, T5EncoderModel
    tok = AutoTokenizer.from_pretrained(root / "tokenizer")
    t5 = T5EncoderModel.from_pretrained(root / "text_encoder").eval()
    ids = tok([""], padding="max_length", max_length=cfg.max_text_seq_length, truncation=True,
              return_tensors="pt").input_ids
    with torch.no_grad():
        return t5(ids)[0].to(dev, torch.float32)  # (1, T, text_dim)


def export(tc: TrainConfig, model, out: Path, rank: int) -> Path | None:
    """LoRA: pytorch_lora_weights.safetensors. Full: a complete diffusers checkpoint folder under out/model."""
    if tc.method == "full" and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        sd = ckpt.full_state_dict(model)
        if rank != 0:
            return None
        model = loader.build_transformer(model.cfg, sd, torch.float32)
    if rank != 0:
        return None
    if tc.method == "lora":
        return save_lora(out / "pytorch_lora_weights.safetensors", model)
    return loader.save_transformer(out / "transformer", model)


# The guard's default prompts: the synthetic world's held-out concept (what its demo LoRA teaches) and two prompts of
# the base vocabulary held out of the tiny model's training, so that both learning and forgetting show.
GUARD_PROMPTS = ("a purple star moving up on a gray background",
                 "a purple star moving left on a checkered background",
                 "an orange circle moving right on a black background",
                 "a yellow triangle moving down on a striped background")


def guard_prompts(tc: TrainConfig, world: int) -> tuple[str, ...]:
    """The guard's prompts, () when it is off; ValueError for settings it cannot honour."""
    from .synthetic import parse
    if tc.keep_best and not tc.guard_every:
        raise ValueError("keep_best keeps the best model by the guard's score: set guard_every too")
    if not tc.guard_every:
        return ()
    if world > 1 and tc.method == "full":
        raise ValueError("the guard generates on rank 0 alone and cannot gather a sharded (FSDP) model: run full "
                         "fine-tuning with the guard in one process")
    prompts = tc.guard_prompts or GUARD_PROMPTS
    for p in prompts:
        try:
            parse(p)
        except ValueError as e:
            raise ValueError(f"the guard scores videos of the synthetic world (train/synthetic.py) and only reads "
                             f"its captions, such as {GUARD_PROMPTS[0]!r}: {e}") from None
    return tuple(prompts)


def guard(tc: TrainConfig, model, pipe, prompts, out: Path, step: int) -> dict:
    """Videos of the guard's prompts from the model as it is now (prompt i with seed guard_args' seed + i), scored
    by the synthetic world's evaluator (train.adherence.guard_score); logged and appended to out/guard.jsonl."""
    from .adherence import guard_score
    args = dict(tc.guard_args)
    seed = args.pop("seed", 0)
    with _as_trained(tc, model, pipe, out / "guard") as loras:
        pairs = [(p, pipe.generate(p, loras=loras, seed=seed + i, **args).frames) for i, p in enumerate(prompts)]
    res = dict(step=step, **guard_score(pairs))
    with open(out / "guard.jsonl", "a") as f:
        f.write(json.dumps(res) + "\n")
    log.info("guard at step %d: score %.3f (adherence %.3f, distortion %.3f, %d prompts)", step, res["score"],
             res["adherence"], res["distortion"], res["n"])
    return res


def keep_best(tc: TrainConfig, model, out: Path, score: dict) -> dict:
    """Export the model to out/best (as `export` writes it) with best.json: the step and its guard score. Written
    beside and renamed into place, so that out/best is always one complete model."""
    import shutil
    tmp, best = out / ".best.tmp", out / "best"
    shutil.rmtree(tmp, ignore_errors=True)
    export(tc, model, tmp, 0)
    (tmp / "best.json").write_text(json.dumps(score, indent=1))
    shutil.rmtree(best, ignore_errors=True)
    tmp.rename(best)
    log.info("guard: best so far at step %d (score %.3f), exported to %s", score["step"], score["score"], best)
    return score


def _guard_resume(out: Path, step: int | None) -> tuple[list[dict], dict | None]:
    """The guard's log and best so far, as of a resumed run's checkpoint step; a fresh run (step None) starts
    both anew. Entries after the checkpoint (a run killed between a guard and its next checkpoint) are dropped."""
    path, best_json = out / "guard.jsonl", out / "best" / "best.json"
    lines = path.read_text().splitlines() if step is not None and path.is_file() else []
    guards = [g for g in map(json.loads, filter(None, lines)) if g["step"] <= step]
    path.write_text("".join(json.dumps(g) + "\n" for g in guards))
    best = json.loads(best_json.read_text()) if step is not None and best_json.is_file() else None
    return guards, best if best is not None and best["step"] <= step else None


@contextlib.contextmanager
def _as_trained(tc: TrainConfig, model, pipe, folder: Path):
    """The `loras` argument that makes the validation pipeline generate as the model is now (the LoRA being
    trained, saved into `folder`; none for full fine-tuning), and no LoRA fused afterwards: the pipeline's base
    weights are the trained model's own storage, so a LoRA left fused there would be trained on top of itself."""
    loras = ((str(save_lora(folder / "lora.safetensors", model)), 1.0),) if tc.method == "lora" else ()
    try:
        yield loras
    finally:
        pipe.runner.switch_loras([], ())


def validation_pipeline(model, root: Path, dev):
    """The engine pipeline over a view of the model's base weights. The view shares their storage and the
    optimizer updates them in place, so one pipeline serves every validation of the run."""
    from cogrt.engine.pipeline import load_pipeline
    dtype = next(p for n, p in model.named_parameters() if ".lora_" not in n).dtype
    view = loader.build_transformer(model.cfg, base_state_dict(model), None)
    return load_pipeline(root, device=dev, dtype=dtype, transformer=view, compile=False)  # a few calls: compiling costs more


def validate(tc: TrainConfig, model, pipe, folder: Path) -> list[Path]:
    """Videos from the engine pipeline, with the LoRA fused per request exactly as serving does."""
    from cogrt.engine.video import write_mp4
    paths = []
    with _as_trained(tc, model, pipe, folder) as loras:
        for i, prompt in enumerate(tc.validation_prompts):
            image = tc.validation_images[i] if i < len(tc.validation_images) else None
            res = pipe.generate(prompt, image=image, loras=loras, **tc.validation_args)
            paths.append(write_mp4(res.frames, folder / f"{i:02d}.mp4", res.fps))
    return paths
