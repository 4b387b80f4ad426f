"""Fine-tuning that distorts, reproduced on the bundled tiny model (issue 21).

The complaint: full fine-tuning of CogVideoX on ~50 videos at 2e-4 warps the subject's shape by 500 steps, and
worse by 4,000, where LoRA on the same data keeps it. Here the subject is a concept the tiny model never saw, the
synthetic world's purple star. Each run trains with `train.loop.train` on ~50 videos of it, and is evaluated at
each of `--steps`: it trains to the first, is evaluated, then resumes (exactly: the checkpoint holds the optimizer,
the RNGs and the data position) to the next, so the 500-step model is the 4,000-step run's own.

Per run and step, on held-out prompts (the concept at (direction, background) pairs that no training video has):
  - colour, shape and concept adherence (train.adherence.detect: the colour, the shape, both);
  - distortion (train.adherence.distortion: 1 - IoU against the ideal shape aligned by centroid and area; 0 on
    the synthetic world's own renderings, 1 where no whole object is seen), over all videos and over those
    whose shape is right (a warped star as against no star);
  - forgetting: PSNR against the base model's videos of prompts without the concept (same seeds), and their
    adherence.

    python -m cogrt.bench.finetune --device cuda --out OUT      # the full run: the defaults
    python -m cogrt.bench.finetune --device cuda --runs full:2e-4 --out A      # the same, split over two calls
    python -m cogrt.bench.finetune --device cuda --runs full:1e-5,lora:1e-4 --out B
    python -m cogrt.bench.finetune --merge A/finetune.json B/finetune.json --out OUT
    cogrt bench finetune --videos 3 --frames 9 --height 64 --width 64 --steps 2,4 --sample-steps 2 \\
        --eval-seeds 1 --forget 1 --device cpu --out /tmp/ft     # a toy run (CPU, under a minute)

Timings per phase are printed as they end and kept in the JSON.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import shutil
import statistics
import time
from pathlib import Path

import numpy as np
import torch

MODEL = Path(__file__).resolve().parent.parent / "models" / "cogrt-tiny"
RUNS = "full:2e-4,full:1e-5,lora:1e-4"
# (direction, background) pairs of the concept kept out of training: one per direction and per background
EVAL_PAIRS = (("up", "gray"), ("left", "checkered"), ("right", "black"), ("down", "striped"))


def concept_scenes(n: int, seed: int, color: str, shape: str, exclude: set) -> list:
    """n scenes of one concept, with the synthetic world's own sizes, starts and speeds (sample_scenes; replacing
    the colour and shape keeps every object inside the frame), skipping the (direction, background) pairs in
    `exclude`."""
    from cogrt.train.synthetic import sample_scenes
    pool = [dataclasses.replace(s, color=color, shape=shape) for s in sample_scenes(4 * n + 16, seed, "concept")]
    scenes = [s for s in pool if (s.direction, s.background) not in exclude][:n]
    if len(scenes) < n:
        raise ValueError(f"the evaluation prompts leave too few (direction, background) pairs to train {n} videos on")
    return scenes


def write_videos(scenes, folder: Path, frames: int, height: int, width: int) -> list:
    """The scenes as mp4s, returned as the trainer's manifest records."""
    from cogrt.engine.video import write_mp4
    from cogrt.train.data import Record
    from cogrt.train.synthetic import caption, render
    folder.mkdir(parents=True, exist_ok=True)
    return [Record(caption(s), write_mp4(render(s, frames, height, width), folder / f"{i:06d}.mp4", fps=8))
            for i, s in enumerate(scenes)]


def evaluate(pipe, eval_set, forget_set, base_forget, loras, a) -> tuple[dict, list]:
    """Adherence and distortion on the held-out concept prompts; PSNR against the base model's videos
    (`base_forget`; None for the base model itself) and adherence on the prompts without the concept. Returns the
    row and the videos of the prompts without the concept."""
    from cogrt.engine.video import psnr
    from cogrt.train.adherence import detect, distortion, score
    from cogrt.train.synthetic import parse
    kw = dict(num_frames=a.frames, height=a.height, width=a.width, num_inference_steps=a.sample_steps,
              guidance_scale=a.guidance, loras=loras)
    color, shape, dist, dist_hit = [], [], [], []
    for prompt, seed in eval_set:
        c, s, _, _ = parse(prompt)
        d = detect(pipe.generate(prompt, seed=seed, **kw).frames)
        color.append(d.color == c)
        shape.append(d.shape == s)
        dist.append(distortion(d, s))
        if d.shape == s:
            dist_hit.append(dist[-1])
    forget = [pipe.generate(prompt, seed=seed, **kw).frames for prompt, seed in forget_set]
    db = [psnr(ref, x) for ref, x in zip(base_forget, forget)] if base_forget is not None else []
    return dict(color=float(np.mean(color)), shape=float(np.mean(shape)),
                concept=float(np.mean([c and s for c, s in zip(color, shape)])), distortion=float(np.mean(dist)),
                distortion_right_shape=float(np.mean(dist_hit)) if dist_hit else None,
                forget_psnr=float(np.mean(db)) if db and all(map(math.isfinite, db)) else None,
                forget_all=score(list(zip(forget_scenes(forget_set), forget)))["all"]), forget


def forget_scenes(forget_set) -> list:
    """Scenes standing in for the forget prompts' truth: `score` reads only colour, shape and direction."""
    from cogrt.train.synthetic import Scene, parse
    return [Scene(*parse(p), 0.0, (0.0, 0.0), 0.0) for p, _ in forget_set]


def markdown(rows: list[dict]) -> str:
    def pct(v):
        return "—" if v is None else f"{v:.0%}"

    def num(v, f):
        return "—" if v is None else format(v, f)
    out = ["| run | steps | colour | shape | concept | distortion (all) | distortion (right shape) | forgetting: PSNR "
           "dB against base | forgetting: adherence | train s/step |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        out.append(f"| {r['run']} | {r['step']:,} | {pct(r['color'])} | {pct(r['shape'])} | {pct(r['concept'])} | "
                   f"{r['distortion']:.3f} | {num(r['distortion_right_shape'], '.3f')} | "
                   f"{num(r['forget_psnr'], '.1f') if r['step'] else 'reference'} | {pct(r['forget_all'])} | "
                   f"{num(r.get('s_per_step'), '.3f')} |")
    return "\n".join(out)


def plot(rows: list[dict], path) -> None:
    """Each metric against the step, one line per run from the base model's point at step 0."""
    from matplotlib.figure import Figure
    base = next(r for r in rows if r["step"] == 0)
    runs = list(dict.fromkeys(r["run"] for r in rows if r["step"]))
    steps = sorted({r["step"] for r in rows})
    fig = Figure(figsize=(10, 7))
    axes = fig.subplots(2, 2).ravel()
    panels = [("shape", "shape adherence (held-out prompts)"), ("concept", "concept adherence (colour and shape)"),
              ("distortion", "distortion: 1 - IoU vs the ideal shape"),
              ("forget_psnr", "PSNR vs base (dB), no concept")]
    for ax, (key, title) in zip(axes, panels):
        for k, run in enumerate(runs):
            pts = [(0, base[key])] + [(r["step"], r[key]) for r in rows if r["run"] == run]
            pts = [(steps.index(s), v) for s, v in pts if v is not None]
            # markers of falling size, so that runs with equal values stay visible on top of each other
            ax.plot(*zip(*pts), "o^sD"[k % 4] + "-", ms=9 - 2 * (k % 3), color=f"C{k}", label=run)
        ax.set_xticks(range(len(steps)), ["base"] + [f"{s:,}" for s in steps[1:]])
        ax.set(title=title, xlabel="training steps")
        if key != "forget_psnr":
            ax.set_ylim(-0.04, 1.04)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle("cogrt-tiny fine-tuned on one concept: does the shape distort?")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--model", default=str(MODEL), help="a model of the synthetic world (the bundled tiny one)")
    ap.add_argument("--concept", default="purple star", help="COLOUR SHAPE of train.synthetic (purple, star: the "
                                                             "held-out ones)")
    ap.add_argument("--videos", type=int, default=50, help="training videos of the concept")
    ap.add_argument("--steps", default="500,4000", help="evaluate at these steps of each run (it trains to the last)")
    ap.add_argument("--runs", default=RUNS, help="METHOD:LR, comma-separated")
    ap.add_argument("--rank", type=int, default=32)
    ap.add_argument("--alpha", type=float, default=16.0)
    ap.add_argument("--batch-size", type=int, default=1)
    ap.add_argument("--frames", type=int, default=49, help="of the training and evaluation videos")
    ap.add_argument("--height", type=int, default=128)
    ap.add_argument("--width", type=int, default=128)
    ap.add_argument("--eval-prompt", action="append", default=None,
                    help="a held-out caption of the concept (repeat it; default: the concept at "
                         + ", ".join(f"{d}/{b}" for d, b in EVAL_PAIRS) + "); its pair is kept out of training")
    ap.add_argument("--eval-seeds", type=int, default=4, help="videos per evaluation prompt")
    ap.add_argument("--forget", type=int, default=8, help="prompts without the concept, for forgetting (held-out "
                                                          "prompts of the base vocabulary, as train/tiny.py's eval)")
    ap.add_argument("--sample-steps", type=int, default=30)
    ap.add_argument("--guidance", type=float, default=6.0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--work", default=".cache/finetune", help="data, latents and runs (checkpoints: ~50 MB a full "
                                                              "run); a rerun reuses the latents")
    ap.add_argument("--out", default="finetune-results", help="writes finetune.json, finetune.md, finetune.png")
    ap.add_argument("--merge", nargs="+", default=None, metavar="JSON",
                    help="run nothing: join the rows of finetune.json files of runs made apart (--runs split over "
                         "several calls) into OUT's json, table and plot")
    a = ap.parse_args(argv)
    if a.merge:
        return merge(a.merge, Path(a.out))

    from cogrt.engine import loader
    from cogrt.engine.pipeline import load_pipeline
    from cogrt.train.loop import TrainConfig, train
    from cogrt.train.precompute import precompute
    from cogrt.train.synthetic import Scene, caption, parse, sample_scenes

    out = Path(a.out)
    work = Path(a.work)
    out.mkdir(parents=True, exist_ok=True)
    color, shape = a.concept.split()
    steps = sorted({int(s) for s in a.steps.split(",")})
    if steps[0] < 1:
        ap.error("--steps must be positive")
    runs = [(m, float(lr)) for m, lr in (r.split(":") for r in a.runs.split(","))]
    eval_prompts = a.eval_prompt or [caption(Scene(color, shape, d, b, 0.0, (0.0, 0.0), 0.0)) for d, b in EVAL_PAIRS]
    held = {parse(p)[2:] for p in eval_prompts if parse(p)[:2] == (color, shape)}
    eval_set = [(p, s) for p in eval_prompts for s in range(a.eval_seeds)]
    forget_set = [(caption(sc), i) for i, sc in enumerate(sample_scenes(a.forget, 7, "heldout"))]
    dev, timings, t0 = torch.device(a.device), {}, time.perf_counter()

    def lap(name: str, since: float) -> float:
        timings[name] = time.perf_counter() - since
        print(f"[{name}] {timings[name]:.1f} s", flush=True)
        return time.perf_counter()

    t = time.perf_counter()
    records = write_videos(concept_scenes(a.videos, a.seed, color, shape, held), work / "videos", a.frames,
                           a.height, a.width)
    t = lap("data", t)
    bucket = f"{a.frames}x{a.height}x{a.width}"
    precompute(records, a.model, work / "latents", bucket, device=dev, dtype=torch.float32)
    t = lap("precompute", t)

    base = load_pipeline(a.model, device=dev, dtype=torch.float32, compile=False)
    row, base_forget = evaluate(base, eval_set, forget_set, None, (), a)
    rows = [dict(run="base", method=None, lr=None, step=0, **row)]
    t = lap("evaluate base", t)

    for method, lr in runs:
        name = f"{method} {lr:g}" + (f" (rank {a.rank}, alpha {a.alpha:g})" if method == "lora" else "")
        run = work / "runs" / f"{method}-{lr:g}"
        shutil.rmtree(run, ignore_errors=True)  # a fresh run: only its own checkpoints may be resumed
        done = 0
        for step in steps:
            tc = TrainConfig(model=a.model, data=str(work / "latents"), out=str(run), method=method, lr=lr,
                             rank=a.rank, alpha=a.alpha, steps=step, batch_size=a.batch_size,
                             checkpoint_every=steps[-1], keep_checkpoints=1, log_every=max(1, min(100, step // 10)),
                             cache_latents=True, seed=a.seed, resume=done > 0, device=a.device)
            res = train(tc)
            s_per_step = (time.perf_counter() - t) / (step - done)  # model load included: the cost of a short run
            t = lap(f"train {name} to {step}", t)
            if method == "lora":
                lora = shutil.copy(res["export"], run / f"lora_step_{step}.safetensors")
                row, _ = evaluate(base, eval_set, forget_set, base_forget, ((str(lora), 1.0),), a)
            else:
                model = loader.load_transformer(Path(res["export"]), dev, torch.float32)
                pipe = load_pipeline(a.model, device=dev, dtype=torch.float32, compile=False, transformer=model)
                row, _ = evaluate(pipe, eval_set, forget_set, base_forget, (), a)
                del pipe, model
            timed = [h["s_per_step"] for h in res["history"][1:]] or [h["s_per_step"] for h in res["history"]]
            rows.append(dict(run=name, method=method, lr=lr, step=step, s_per_step=statistics.median(timed),
                             s_per_step_with_load=s_per_step, **row))
            t = lap(f"evaluate {name} at {step}", t)
            done = step

    meta = dict(device=torch.cuda.get_device_name(dev) if dev.type == "cuda" else
                f"cpu, {torch.get_num_threads()} threads", torch=torch.__version__,
                commit=os.environ.get("COGRT_COMMIT", "?"), args=vars(a), eval_prompts=eval_prompts,
                forget_prompts=[p for p, _ in forget_set], timings=timings, seconds=time.perf_counter() - t0)
    return write(dict(meta, rows=rows), out)


def write(result: dict, out: Path) -> dict:
    (out / "finetune.json").write_text(json.dumps(result, indent=1))
    table = markdown(result["rows"])
    (out / "finetune.md").write_text(table + "\n")
    plot(result["rows"], out / "finetune.png")
    print(table)
    print(f"{result['seconds']:.0f} s in all on {result['device']}; {out}/finetune.json, .md, .png")
    return result


def merge(paths, out: Path) -> dict:
    """One result from several: the first file's base row and settings, every file's trained rows. The files must
    share the data, the evaluation and the base model, or their rows do not compare."""
    parts = [json.loads(Path(p).read_text()) for p in paths]
    same = ("videos", "steps", "frames", "height", "width", "eval_seeds", "forget", "sample_steps", "guidance",
            "seed", "model", "concept", "eval_prompt")
    for p, r in zip(paths[1:], parts[1:]):
        diff = [k for k in same if r["args"][k] != parts[0]["args"][k]]
        if diff:
            raise ValueError(f"{p} differs from {paths[0]} in {', '.join(diff)}: its rows would not compare")
    out.mkdir(parents=True, exist_ok=True)
    rows = parts[0]["rows"][:1] + [r for part in parts for r in part["rows"] if r["step"]]
    timings = {f"{k} ({Path(p).parent.name})": v for p, r in zip(paths, parts) for k, v in r["timings"].items()}
    return write(dict(parts[0], rows=rows, timings=timings, seconds=sum(r["seconds"] for r in parts),
                      merged=list(map(str, paths))), out)


if __name__ == "__main__":
    main()
