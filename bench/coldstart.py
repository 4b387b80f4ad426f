"""Cold and warm start: seconds from process start to the first denoising step done, in a fresh process.

    python -m cogrt.bench.coldstart --preset cogvideox-5b --mode fp8 --json coldstart.json --results bench/RESULTS.md
    python -m cogrt.bench.coldstart --device cpu --preset tiny-5b --mode exact --compile --frames 9 --height 64 --width 64

The parent starts this module twice as a child process with one compile cache directory (fresh unless
`--cache-dir` names an empty one): the first run finds it empty (cold), the second finds what the first wrote
(warm: Inductor's graphs and autotuning, Triton's kernels). The child notes time.time() before its first import
and gets the parent's spawn time, so the interpreter start and the imports count. It builds our pipeline in the
mode, runs pipe.warm_up() (the compile) at the request size, then a 1-step request, and prints its stages as JSON.

Weights are random and built on the device, so no disk read is timed: a real server also reads ~11 GB of
transformer weights (plus T5), so give `--model DIR` to time a checkpoint's load instead (`cogrt random-checkpoint
DIR --preset cogvideox-5b --dtype bf16 --device cuda --real-t5` writes one, with a T5-XXL as the released
models have: without `--real-t5` its T5 is test-sized); diffusers, transformers and torchao are then
imported by load_pipeline, beside the read, and count in "build". With random
weights the VAE and T5 are the tiny ones unless `--real-vae-t5`: only the transformer's build, quantization and
compile matter for the first step.

Targets (H100, 5B, fp8): cold <= 90 s, warm <= 20 s.
"""
from __future__ import annotations

import time

T0 = time.time()  # before every other import: the child's own start

import argparse  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import shlex  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
from pathlib import Path  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
TARGETS = {"cold": 90.0, "warm": 20.0}  # seconds, 5B in fp8 on the H100
PROMPT = "a panda playing guitar in a bamboo forest"


def child(a) -> dict:
    """One start, measured: runs in the child process and returns its stage times."""
    start = a.spawn_time or T0
    marks, imports = {}, {}
    t = time.time()
    imports["interpreter"] = t - start

    def lap(name):
        nonlocal t
        imports[name], t = time.time() - t, time.time()
    import torch
    lap("torch")
    if not a.model:
        # the random components need these: load them here, so that "build" is building. load_pipeline (--model)
        # imports them itself, in a thread beside the checkpoint's read, as a server does
        import torchao.quantization  # noqa: F401
        lap("torchao")
        from diffusers import AutoencoderKLCogVideoX, CogVideoXTransformer3DModel  # noqa: F401
        lap("diffusers")
        from transformers import T5EncoderModel  # noqa: F401
        lap("transformers")

    from cogrt.engine import pipeline as engine_pipeline
    from cogrt.bench.components import engine_transformer, environment, random_components, weights_note
    from cogrt.bench.modes import SIZES
    from cogrt.engine import modes
    from cogrt.engine.model import PRESETS
    lap("engine")
    marks["imports"] = time.time() - start
    dev = torch.device(a.device)
    dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
    t = time.time()
    transforms = modes.transforms_for(a.mode, dev, compile=a.compile)
    if a.model:
        pipe = engine_pipeline.load_pipeline(a.model, dev, dtype, mode=a.mode, cache_dir=a.cache_dir,
                                             compile=a.compile)
        from cogrt.engine.random_model import T5_XXL
        t5 = pipe.text_encoder.config
        xxl = all(getattr(t5, k) == T5_XXL[k] for k in ("num_layers", "d_model", "d_ff", "num_heads"))
        cfg, weights = pipe.cfg, (f"the checkpoint in {a.model} (its T5: {t5.num_layers} layers of width "
                                  f"{t5.d_model}{', T5-XXL' if xxl else ''})")
    else:
        cfg = PRESETS[a.preset]
        c = random_components(a.preset, dev, dtype, a.seed, a.real_vae_t5 or False)
        ours = engine_transformer(c.transformer, cfg, dtype, copy=False)
        c.transformer = None  # our module holds the weights now
        pipe = engine_pipeline.assemble(ours, c.vae, c.text_encoder, c.tokenizer, c.scheduler_config, dev, dtype,
                                        a.mode, transforms, cache_dir=a.cache_dir)
        weights = weights_note(cfg, a.real_vae_t5 or False)
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
    marks["build"] = time.time() - t  # components (or the checkpoint's load), quantization included
    marks["quantize"] = pipe.runner.timings["quantize"]
    f, h, w = SIZES.get(None if a.model else a.preset, (cfg.sample_frames, cfg.sample_height * 8, cfg.sample_width * 8))
    f, h, w = a.frames or f, a.height or h, a.width or w
    marks["warm_up"] = pipe.warm_up(f, h, w)
    from torch._dynamo.utils import counters  # what the compile cache gave: hits, misses, bypasses
    caches = {k: dict(v) for k, v in counters.items() if k in ("inductor", "aot_autograd") and v}
    res = pipe.generate(PROMPT, num_frames=f, height=h, width=w, num_inference_steps=1, seed=a.seed)
    marks["first_step"] = res.timings["text"] + res.timings["denoise"]  # text encoding + the step itself
    marks["decode"] = res.timings["decode"]
    end = time.time()
    return dict(environment(dev), preset=a.model or a.preset, mode=a.mode, transforms=pipe.transforms.describe(),
                frames=f, height=h, width=w, weights=weights, stages=marks, imports=imports,
                load=pipe.load_timings, compile_counters=caches,
                compiled=pipe.runner.compiled,
                total_to_first_step=end - marks["decode"] - start, total_to_first_video=end - start)


def child_argv(a) -> list[str]:
    out = ["--preset", a.preset, "--mode", a.mode, "--device", a.device, "--seed", str(a.seed),
           "--cache-dir", a.cache_dir]
    for name in ("frames", "height", "width", "model"):
        if getattr(a, name):
            out += [f"--{name.replace('_', '-')}", str(getattr(a, name))]
    for name in ("compile", "real_vae_t5"):
        if getattr(a, name) is not None:
            out.append(f"--{'' if getattr(a, name) else 'no-'}{name.replace('_', '-')}")
    return out


def spawn(a, label: str) -> dict:
    cache = Path(a.cache_dir)
    # set before the child's interpreter starts, so that nothing it imports finds another cache
    env = dict(os.environ, TORCHINDUCTOR_CACHE_DIR=str(cache / "inductor"), TRITON_CACHE_DIR=str(cache / "triton"))
    cmd = [sys.executable, "-m", "cogrt.bench.coldstart", "--child", *child_argv(a), "--spawn-time", repr(time.time())]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=a.timeout)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if proc.returncode or not lines:
        raise RuntimeError(f"the {label} child failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
    return json.loads(lines[-1])


def main(argv=None) -> dict:
    argv = sys.argv[1:] if argv is None else list(argv)
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--preset", default="cogvideox-5b")
    ap.add_argument("--mode", default="fp8")
    ap.add_argument("--device", default=None, help="default: cuda where there is one")
    ap.add_argument("--frames", type=int)
    ap.add_argument("--height", type=int)
    ap.add_argument("--width", type=int)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--compile", action=argparse.BooleanOptionalAction, help="default: the mode's (on for CUDA)")
    ap.add_argument("--real-vae-t5", action=argparse.BooleanOptionalAction, help="default: the tiny ones")
    ap.add_argument("--model", help="a checkpoint directory: time its load instead of building random weights")
    ap.add_argument("--cache-dir", help="an empty directory for the compile cache (default: a fresh one)")
    ap.add_argument("--timeout", type=float, default=900, help="seconds allowed to each child")
    ap.add_argument("--json")
    ap.add_argument("--results", help="append the cold/warm table and the command to this markdown file")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--spawn-time", type=float, help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.device is None:
        import torch
        a.device = "cuda" if torch.cuda.is_available() else "cpu"
    if a.child:
        print(json.dumps(child(a)), flush=True)
        return {}
    if a.cache_dir and Path(a.cache_dir).is_dir() and any(Path(a.cache_dir).iterdir()):
        ap.error(f"{a.cache_dir} is not empty, so the first start would not be cold")
    runs = {}
    with tempfile.TemporaryDirectory(prefix="cogrt-coldstart-") as tmp:
        a.cache_dir = a.cache_dir or tmp
        for label in ("cold", "warm"):
            r = runs[label] = spawn(a, label)
            print(f"{label}: {r['total_to_first_step']:.1f} s to the first step (target {TARGETS[label]:.0f} s for 5B "
                  f"in fp8); stages {json.dumps(r['stages'])}; imports {json.dumps(r['imports'])}; "
                  f"compile caches {json.dumps(r['compile_counters'])}", flush=True)
    meta = {k: v for k, v in runs["cold"].items() if k not in ("stages", "total_to_first_step", "total_to_first_video")}
    meta.update(command="python -m cogrt.bench.coldstart " + shlex.join(argv), targets=TARGETS, runs=runs)
    if a.json:
        Path(a.json).write_text(json.dumps(meta, indent=2))
    if a.results:
        from cogrt.bench.components import append_results
        note = "From the spawn of a fresh process to the first denoising step; the warm start reuses the cold compile."
        if not a.model:
            note += " The random weights are built on the device: no checkpoint read is timed."
        rows = [note, "",
                "| start | to first step s | target s | imports | build | quantize | warm-up (compile) | first step |",
                "|---|---|---|---|---|---|---|---|"]
        for label, r in runs.items():
            s = r["stages"]
            rows.append(f"| {label} | {r['total_to_first_step']:.1f} | {TARGETS[label]:.0f} | {s['imports']:.1f} | "
                        f"{s['build']:.1f} | {s['quantize']:.1f} | {s['warm_up']:.1f} | {s['first_step']:.2f} |")
        append_results(a.results, f"Cold and warm start: {meta['preset']}, {meta['mode']}, {meta['frames']} x "
                       f"{meta['height']} x {meta['width']}", meta, "\n".join(rows))
    return meta


if __name__ == "__main__":
    main()
