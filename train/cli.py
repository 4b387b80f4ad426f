"""`cogrt train` and `cogrt precompute`: argument parsing over train.loop and train.precompute."""
from __future__ import annotations

import json

from .lora import ATTENTION


def add_commands(sub) -> None:
    """The trainer's subcommands."""
    t = sub.add_parser("train", help="LoRA or full fine-tuning on precomputed latents (torchrun for several GPUs)")
    t.set_defaults(func=cmd_train)
    t.add_argument("--model", required=True, help="base checkpoint directory (diffusers layout)")
    t.add_argument("--data", required=True, help="a folder written by `cogrt precompute`")
    t.add_argument("--out", required=True)
    t.add_argument("--method", choices=["lora", "full"], default="lora")
    t.add_argument("--from-scratch", action="store_true", help="full training of a freshly initialised model")
    t.add_argument("--rank", type=int, default=64)
    t.add_argument("--alpha", type=float, default=None, help="default: the rank (scale 1); below rank/2 warns")
    t.add_argument("--targets", default=",".join(ATTENTION), help="diffusers module names, comma-separated")
    t.add_argument("--steps", type=int, default=1000)
    t.add_argument("--batch-size", type=int, default=1)
    t.add_argument("--lr", type=float, default=None,
                   help="default: 1e-5 for --method full, 1e-4 for lora (full fine-tuning above 5e-5 warns: it is "
                        "known to warp shapes); required with --from-scratch")
    t.add_argument("--weight-decay", type=float, default=1e-4)
    t.add_argument("--warmup", type=int, default=0)
    t.add_argument("--lr-schedule", choices=["constant", "cosine"], default="constant")
    t.add_argument("--optimizer", choices=["adamw", "adamw8bit"], default="adamw")
    t.add_argument("--mixed-precision", choices=["bf16", "no"], default="bf16")
    t.add_argument("--gradient-checkpointing", action="store_true")
    t.add_argument("--offload-activations", action="store_true",
                   help="with checkpointing, keep each block's inputs in host memory until backward")
    t.add_argument("--ff-chunks", type=int, default=1, metavar="N",
                   help="run each block's FFN over N token chunks, each recomputed in backward: less peak memory "
                        "(its two 4x-wide activations, a chunk at a time) for one more FFN forward a step")
    t.add_argument("--caption-dropout", type=float, default=0.0)
    t.add_argument("--checkpoint-every", type=int, default=500)
    t.add_argument("--validate-every", type=int, default=0)
    t.add_argument("--validation-prompt", action="append", default=[])
    t.add_argument("--validation-image", action="append", default=[])
    t.add_argument("--validation-args", default=None, help='JSON, e.g. {"num_frames": 9, "height": 64}')
    t.add_argument("--guard-every", type=int, default=0, metavar="N",
                   help="every N steps (and at the last), generate the guard prompts and log their adherence and "
                        "shape distortion (out/guard.jsonl). Scored by the synthetic world's evaluator, so it only "
                        "means something for the bundled tiny model (models/cogrt-tiny) and its fine-tunes. Each "
                        "guard makes one video a prompt: ~35 s on one CPU thread at the default size, <1 s on a GPU")
    t.add_argument("--guard-prompt", action="append", default=[],
                   help="a caption of the synthetic world, e.g. 'a purple star moving up on a gray background' "
                        "(repeat it; default: two of the held-out concept, two of the base vocabulary)")
    t.add_argument("--guard-args", default=None,
                   help='JSON for the guard\'s videos (default {"num_frames": 49, "height": 128, "width": 128, '
                        '"num_inference_steps": 20, "guidance_scale": 6.0, "seed": 0})')
    t.add_argument("--keep-best", action="store_true",
                   help="with --guard-every: export the model with the best guard score (adherence - distortion) to "
                        "OUT/best, with best.json (its step and score)")
    t.add_argument("--log-every", type=int, default=10)
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--no-resume", action="store_true")
    t.add_argument("--device", default=None)

    p = sub.add_parser("precompute", help="cache VAE latents and T5 embeddings of a video dataset")
    p.set_defaults(func=cmd_precompute)
    p.add_argument("--data", required=True, help="folder (prompts.txt + videos.txt) or a .csv / .jsonl file")
    p.add_argument("--model", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--buckets", required=True, help="FRAMESxHEIGHTxWIDTH[,...], e.g. 49x480x720")
    p.add_argument("--device", default=None)
    p.add_argument("--seed", type=int, default=0)


def cmd_train(a) -> int:
    from .loop import TrainConfig, train
    tc = TrainConfig(model=a.model, data=a.data, out=a.out, method=a.method, from_scratch=a.from_scratch,
                     rank=a.rank, alpha=a.alpha if a.alpha is not None else float(a.rank),
                     targets=tuple(x for x in a.targets.split(",") if x), steps=a.steps, batch_size=a.batch_size,
                     lr=a.lr, weight_decay=a.weight_decay, warmup=a.warmup, lr_schedule=a.lr_schedule,
                     optimizer=a.optimizer,
                     mixed_precision=a.mixed_precision, gradient_checkpointing=a.gradient_checkpointing,
                     offload_activations=a.offload_activations, ff_chunks=a.ff_chunks,
                     caption_dropout=a.caption_dropout, checkpoint_every=a.checkpoint_every,
                     validate_every=a.validate_every, validation_prompts=tuple(a.validation_prompt),
                     validation_images=tuple(a.validation_image), guard_every=a.guard_every,
                     guard_prompts=tuple(a.guard_prompt), keep_best=a.keep_best, log_every=a.log_every, seed=a.seed,
                     resume=not a.no_resume, device=a.device)
    if a.validation_args:
        tc.validation_args.update(json.loads(a.validation_args))
    if a.guard_args:
        tc.guard_args.update(json.loads(a.guard_args))
    res = train(tc)
    if res["export"]:
        print(f"exported {res['export']} after {res['steps']} steps")
    if res["best"]:
        print(f"best by the guard: step {res['best']['step']} (score {res['best']['score']:.3f}) in {a.out}/best")
    return 0


def cmd_precompute(a) -> int:
    from .precompute import main
    argv = ["--data", a.data, "--model", a.model, "--out", a.out, "--buckets", a.buckets, "--seed", str(a.seed)]
    if a.device:
        argv += ["--device", a.device]
    return main(argv) or 0
