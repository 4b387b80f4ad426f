"""The `cogrt` command. Each layer adds its own subcommands through the `cogrt.commands` entry points
(pyproject.toml), so that the engine never imports the layers above it: the engine's are generate,
calibrate-cache, export, info, random-checkpoint and convert-lora; train/ adds precompute and train, bench/ adds bench,
serving/ adds serve.

A subcommand's function returns the exit code. What it prints is its result; progress and warnings go through
`logging` (the `cogrt` loggers), which main() shows on stderr."""
from __future__ import annotations

import argparse
import logging
import sys
import warnings
from pathlib import Path

# the bundled tiny model: beside engine/ in the repository, and beside cogrt/engine/ in an installed wheel
BUNDLED_MODEL = Path(__file__).resolve().parent.parent / "models" / "cogrt-tiny"
DTYPES = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}


def _lora_arg(s: str) -> tuple[str, float]:
    """PATH or PATH:WEIGHT (a Windows-style drive colon is left alone)."""
    path, sep, w = s.rpartition(":")
    if sep and path and not w.startswith(("\\", "/")):
        try:
            return path, float(w)
        except ValueError:
            pass
    return s, 1.0


def _parser() -> argparse.ArgumentParser:
    from importlib.metadata import entry_points, version
    ap = argparse.ArgumentParser(prog="cogrt", description="Fast CogVideoX text/image-to-video runtime and service")
    ap.add_argument("--version", action="version", version=f"cogrt {version('cogrt')}")
    sub = ap.add_subparsers(dest="cmd", required=True)
    for ep in sorted(entry_points(group="cogrt.commands"), key=lambda e: e.name):
        ep.load()(sub)
    return ap


def add_commands(sub) -> None:
    """The engine's subcommands."""
    g = sub.add_parser("generate", help="generate a video")
    g.set_defaults(func=cmd_generate)
    g.add_argument("prompt")
    g.add_argument("--model", default=None, help=f"diffusers-format directory or hub id (default: {BUNDLED_MODEL})")
    g.add_argument("--image", default=None, help="first frame, for image-to-video models")
    g.add_argument("--frames", type=int, default=None, help="8N+1; default: the model's (49, or 81 for 1.5)")
    g.add_argument("--height", type=int, default=None)
    g.add_argument("--width", type=int, default=None)
    g.add_argument("--steps", type=int, default=50)
    g.add_argument("--guidance", type=float, default=6.0)
    g.add_argument("--dynamic-cfg", action="store_true", help="diffusers' use_dynamic_cfg schedule")
    g.add_argument("--negative", default="", help="negative prompt")
    g.add_argument("--seed", type=int, default=None)
    g.add_argument("--fps", type=int, default=None, help="default: the model's native fps (8, or 16 for 1.5)")
    g.add_argument("--lora", action="append", default=[], type=_lora_arg, metavar="PATH[:WEIGHT]",
                   help="a diffusers-format LoRA; repeat to stack. WEIGHT multiplies the file's alpha/r")
    g.add_argument("--device", default=None)
    g.add_argument("--parallel", default=None, metavar="LAYOUT",
                   help="spread the video over several GPUs (processes): cfg, ulysses=N, or cfg,ulysses=N; under "
                        "torchrun, or with --gpus")
    g.add_argument("--gpus", type=int, default=None, metavar="N",
                   help="run on N GPUs (N processes on the CPU), as torchrun would; the layout defaults to cfg for "
                        "2, cfg,ulysses=N/2 for an even N > 2, else ulysses=N")
    g.add_argument("--dtype", choices=sorted(DTYPES), default=None)
    add_mode_args(g)
    g.add_argument("--offload", action="store_true", help="model CPU offload, for small GPUs")
    g.add_argument("--vae-tiling", dest="vae_tiling", action="store_true", default=None)
    g.add_argument("--no-vae-tiling", dest="vae_tiling", action="store_false")
    g.add_argument("-o", "--output", default="out.mp4")
    g.add_argument("--frames-npy", default=None, help="also write the uint8 frames (F, H, W, 3) as .npy")
    g.add_argument("--teacache", type=float, default=None, metavar="THRESHOLD",
                   help="TeaCache step skipping (0.1-0.3 are usual; higher skips more)")
    g.add_argument("--teacache-coefficients", default=None, metavar="FILE",
                   help="a `cogrt calibrate-cache` file; default: the published ones (released checkpoints only)")
    g.add_argument("--teacache-fixed-steps", type=int, default=None, metavar="N",
                   help="BENCHMARK ONLY: compute N evenly spread steps (first and last included), skip the rest")
    g.add_argument("--cache", choices=("safe", "balanced", "fast"), default=None,
                   help="step skipping at a quality level the model was calibrated for (`cogrt calibrate-cache "
                        "--levels`): safe ~40 dB, balanced ~35 dB, fast ~32 dB against the uncached video")
    g.add_argument("--cache-threshold", type=float, default=None, metavar="T",
                   help="the calibrated cache kind (step_cache.json's; else the probe cache) at a raw threshold")

    k = sub.add_parser("calibrate-cache", help="fit TeaCache's coefficients (and with --levels, the probe or x0 "
                                               "cache's quality levels) on a model's own trajectories")
    k.set_defaults(func=cmd_calibrate_cache)
    k.add_argument("--model", default=None, help=f"diffusers-format directory (default: {BUNDLED_MODEL})")
    k.add_argument("--lora", action="append", default=[], type=_lora_arg, metavar="PATH[:WEIGHT]")
    k.add_argument("--prompts", default=None, help="a text file, one prompt a line (default: a few built in)")
    k.add_argument("--image", default=None, help="first frame, for image-to-video models")
    k.add_argument("--steps", type=int, default=50, help="the step count the coefficients will serve")
    k.add_argument("--degree", type=int, default=4)
    k.add_argument("--frames", type=int, default=None)
    k.add_argument("--height", type=int, default=None)
    k.add_argument("--width", type=int, default=None)
    k.add_argument("--guidance", type=float, default=6.0)
    k.add_argument("--seed", type=int, default=0)
    k.add_argument("--device", default=None)
    k.add_argument("--dtype", choices=sorted(DTYPES), default=None)
    k.add_argument("--out", default="teacache_coefficients.json")
    k.add_argument("--levels", action="store_true",
                   help="instead: find the --kind cache's threshold for each quality level (safe, balanced, fast) and "
                        "write them to --levels-out")
    k.add_argument("--levels-out", default="step_cache.json",
                   help="put it in the model's folder for `fast` and --cache to use it")
    k.add_argument("--iters", type=int, default=10, help="bisection steps per level (--levels)")
    k.add_argument("--margin-db", type=float, default=0.0,
                   help="calibrate each level to its PSNR target plus this much (--levels): room for prompts the "
                        "calibration did not see, where a cache's quality falls off steeply")
    k.add_argument("--only", default=None,
                   help="with --levels: calibrate only these comma-separated levels (e.g. fast)")
    k.add_argument("--merge", action="store_true",
                   help="with --levels: keep the other levels of an existing --levels-out file, each with the cache kind "
                        "it was calibrated for, so that each level can use the cache that serves it best")
    k.add_argument("--kind", choices=("probe", "x0"), default=None,
                   help="with --levels: the cache they are for (default probe; x0: a skipped step's output forecast "
                        "in log-SNR)")

    x = sub.add_parser("export", help="export the transformer and the VAE decoder as ONNX graphs")
    x.set_defaults(func=cmd_export)
    x.add_argument("format", choices=["onnx"])
    x.add_argument("--model", default=None, help=f"diffusers-format directory (default: {BUNDLED_MODEL})")
    x.add_argument("--out", required=True, help="a directory: transformer.onnx, vae_decoder.onnx (+ .data)")
    x.add_argument("--lora", action="append", default=[], type=_lora_arg, metavar="PATH[:WEIGHT]",
                   help="fused before the export, as a served request fuses it")
    x.add_argument("--component", choices=["transformer", "vae-decoder", "all"], default="all")
    x.add_argument("--dtype", choices=sorted(DTYPES), default="fp32")
    x.add_argument("--size", default=None, metavar="FxHxW",
                   help="the traced size (default: the model's); the VAE decoder graph's only size")
    x.add_argument("--mode", default="exact", help="only exact exports: the quantized modes and the Triton kernels "
                                                    "have no ONNX form")
    x.add_argument("--device", default="cpu", help="where to trace (cuda is faster at 5B)")

    i = sub.add_parser("info", help="describe a checkpoint without loading its weights")
    i.set_defaults(func=cmd_info)
    i.add_argument("model")

    r = sub.add_parser("random-checkpoint", help="write a random-weight checkpoint in the diffusers layout")
    r.set_defaults(func=cmd_random)
    r.add_argument("out")
    r.add_argument("--preset", default="tiny-5b")
    r.add_argument("--seed", type=int, default=0)
    r.add_argument("--dtype", choices=list(DTYPES), help="the transformer's stored dtype (default fp32)")
    r.add_argument("--device", default="cpu", help="where to build the random transformer (cuda is faster at 5B)")
    r.add_argument("--real-t5", action="store_true", help="T5-XXL's shape (9.5 GB in bf16), to time a real start; "
                                                          "default: a test-sized T5")

    c = sub.add_parser("convert-lora", help="rewrite a LoRA with its scale in the standard header")
    c.set_defaults(func=cmd_convert_lora)
    c.add_argument("src", help="a LoRA .safetensors: diffusers, finetrainers or SAT key names")
    c.add_argument("out")
    c.add_argument("--from", dest="convention", choices=["auto", "sat"], default="auto",
                   help="sat: a SAT LoRA already renamed to diffusers keys (CogVideo's export script), scale 1/r")


def add_mode_args(p) -> None:
    """--mode and the switches of its single transforms (engine/modes.py); unset switches follow the mode."""
    from .modes import MODES, QUANTS, TEXT_ENCODER
    p.add_argument("--mode", choices=MODES, default="exact",
                   help="exact: bf16; fp8: fp8 linear layers and attention; fast: fp8 + TeaCache; int8-*: for GPUs "
                        "without fp8. On a GPU every mode also fuses the norm kernels and compiles the blocks")
    p.add_argument("--quant", choices=(*QUANTS, "none"), default=None, help="override the mode's quantization")
    p.add_argument("--attention", default=None,
                   help="attention backend: sdpa, triton, triton-fp8 (int8 Q·K, fp8 P·V), triton-fp8-e4m3 (e4m3 Q·K: "
                        "4%% faster at 5B, 3 dB lower PSNR on the bundled model), flash-attn-4 (FlashAttention 4, "
                        "the modes' choice where installed), auto, sage, flash-attn, ...")
    p.add_argument("--fused-norms", dest="fused_norms", action="store_true", default=None,
                   help="run the blocks' adaLN, QK norm + RoPE and residual passes through the Triton kernels")
    p.add_argument("--no-fused-norms", dest="fused_norms", action="store_false")
    p.add_argument("--fused-ff", dest="fused_ff", action=argparse.BooleanOptionalAction, default=None,
                   help="with the fused norms: the FF's GELU in its GEMM's epilogue, and in fp8 the activations "
                        "quantized by our kernels (default on GPUs)")
    p.add_argument("--compile", dest="compile", action="store_true", default=None,
                   help="regional torch.compile of the transformer blocks (default on GPUs)")
    p.add_argument("--no-compile", dest="compile", action="store_false")
    p.add_argument("--cuda-graphs", action="store_true", default=None, help="compile with CUDA graphs")
    p.add_argument("--text-encoder", choices=TEXT_ENCODER, default=None,
                   help="T5: full (model dtype), int8 (weights), or offload (host memory between requests)")
    p.add_argument("--compile-cache", default=None, metavar="DIR",
                   help="where compiled code is kept (default: $COGRT_CACHE/compile or ~/.cache/cogrt/compile)")


def mode_kwargs(a) -> dict:
    return dict(mode=a.mode, quant=a.quant, attention=a.attention, fused_norms=a.fused_norms, fused_ff=a.fused_ff,
                compile=a.compile,
                cuda_graphs=a.cuda_graphs, text_encoder=a.text_encoder, cache_dir=a.compile_cache)


def cmd_generate(a) -> int:
    import os

    import torch

    if a.gpus and "WORLD_SIZE" not in os.environ:
        return _launch(a.gpus, a.argv, a.parallel)
    world = int(os.environ.get("WORLD_SIZE", 1))
    parallel = a.parallel or (default_layout(world) if world > 1 else None)
    first = int(os.environ.get("RANK", 0)) == 0

    from .pipeline import load_pipeline
    from .request import GenerationRequest
    from .video import write_mp4, write_npy

    from .caches.teacache import fixed_schedule

    fixed = fixed_schedule(a.steps, a.teacache_fixed_steps) if a.teacache_fixed_steps is not None else None
    req = GenerationRequest(prompt=a.prompt, negative_prompt=a.negative, image=a.image, num_frames=a.frames,
                            height=a.height, width=a.width, num_inference_steps=a.steps, guidance_scale=a.guidance,
                            use_dynamic_cfg=a.dynamic_cfg, seed=a.seed, loras=tuple(a.lora), teacache=a.teacache,
                            teacache_coefficients=a.teacache_coefficients, teacache_fixed_steps=fixed,
                            cache=a.cache, cache_threshold=a.cache_threshold)
    pipe = load_pipeline(_model(a), device=a.device, dtype=getattr(torch, DTYPES[a.dtype]) if a.dtype else None,
                         offload=a.offload, vae_tiling=a.vae_tiling, parallel=parallel, **mode_kwargs(a))
    res = pipe.run(req, progress=first)
    if not first:  # the other ranks write nothing
        return 0
    out = write_mp4(res.frames, a.output, a.fps or res.fps)
    if a.frames_npy:
        write_npy(res.frames, a.frames_npy)
    t = res.timings
    print(f"wrote {out} ({res.frames.shape[0]} frames, {res.frames.shape[2]}x{res.frames.shape[1]}, "
          f"seed {res.seed}) text {t['text']:.2f}s denoise {t['denoise']:.2f}s decode {t['decode']:.2f}s "
          f"total {t['total']:.2f}s (mode {res.mode})")
    if res.steps_skipped:
        print(f"step cache: computed {len(res.steps_computed)} of {a.steps} steps: {res.steps_computed}")
    return 0


def default_layout(world: int) -> str:
    if world == 2:
        return "cfg"
    return f"cfg,ulysses={world // 2}" if world % 2 == 0 else f"ulysses={world}"


def _launch(n: int, argv: list[str], parallel: str | None) -> int:
    """`cogrt generate --gpus N`: the same command in N processes, as torchrun would start them."""
    from torch.distributed import run
    rest, skip = [], False
    for x in argv:
        if skip:
            skip = False
        elif x == "--gpus":
            skip = True
        elif not x.startswith("--gpus="):
            rest.append(x)
    if parallel is None:
        rest += ["--parallel", default_layout(n)]
    try:
        run.main(["--standalone", f"--nproc-per-node={n}", "-m", "cogrt.engine.cli", *rest])
    except Exception as e:  # a rank failed: torchrun has printed its error
        print(f"cogrt: error: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}", file=sys.stderr)
        return 1
    return 0


def _model(a):
    if a.model is None and not BUNDLED_MODEL.is_dir():
        raise FileNotFoundError(f"no --model given and the bundled model is missing at {BUNDLED_MODEL}; "
                                f"pass --model DIR (or make one with `cogrt random-checkpoint DIR`)")
    return a.model or BUNDLED_MODEL


def cmd_calibrate_cache(a) -> int:
    import json

    import torch

    from .pipeline import load_pipeline
    from .calibrate import DEFAULT_PROMPTS, calibrate
    if (a.kind or a.only or a.merge) and not a.levels:
        raise ValueError("--kind, --only and --merge are for --levels; TeaCache's fit (without --levels) has none")
    from .video import atomic_write

    prompts = DEFAULT_PROMPTS
    if a.prompts:
        prompts = [line.strip() for line in Path(a.prompts).read_text().splitlines() if line.strip()]
    pipe = load_pipeline(_model(a), device=a.device, dtype=getattr(torch, DTYPES[a.dtype]) if a.dtype else None)
    kw = dict(loras=tuple(a.lora), image=a.image, num_frames=a.frames, height=a.height, width=a.width,
              guidance_scale=a.guidance)
    if a.levels:
        from .caches import LEVELS, merge_levels
        from .calibrate import calibrate_levels
        only = a.only.split(",") if a.only else list(LEVELS)
        if set(only) - set(LEVELS):
            raise ValueError(f"unknown levels {sorted(set(only) - set(LEVELS))}; valid: {', '.join(LEVELS)}")
        old = json.loads(Path(a.levels_out).read_text()) if a.merge and Path(a.levels_out).is_file() else None
        out = calibrate_levels(pipe, prompts, steps=a.steps, kind=a.kind or "probe", seed=a.seed, iters=a.iters, log=print,
                               margin_db=a.margin_db, targets={k: LEVELS[k] for k in only}, **kw)
        out = {"model": str(_model(a)), "loras": [list(x) for x in a.lora], **out}
        if old is not None:
            out = merge_levels(old, out)
        path = atomic_write(a.levels_out, lambda tmp: Path(tmp).write_text(json.dumps(out, indent=1)))
        print(f"wrote {path}: " + ", ".join(f"{k} threshold {v['threshold']:.4g} ({v['psnr_db']:.1f} dB, "
                                              f"{v['steps_frac']:.0%} of steps)" for k, v in out["levels"].items()))
        return 0
    fit = calibrate(pipe, prompts, steps=a.steps, degree=a.degree, seed=a.seed, **kw)
    fit = {"model": str(_model(a)), "loras": [list(x) for x in a.lora], **fit}
    out = atomic_write(a.out, lambda tmp: Path(tmp).write_text(json.dumps(fit, indent=1)))
    print(f"wrote {out}: coefficients {[f'{c:.6g}' for c in fit['coefficients']]}, fit over "
          f"{len(fit['points'])} step pairs: R^2 {fit['r2']:.3f}, mean relative residual "
          f"{fit['mean_relative_residual']:.3f}")
    return 0


def cmd_export(a) -> int:
    import json

    import torch

    from .export import ExportError, export_onnx
    from .modes import check_mode
    from .pipeline import load_pipeline
    if check_mode(a.mode) != "exact":
        raise ExportError(f"mode {a.mode!r} cannot be exported: fp8/int8 quantization and the Triton kernels have no "
                          f"ONNX form. Export runs the native path (mode exact); quantize the graph with your "
                          f"runtime's tools (TensorRT, ONNX Runtime) instead")
    pipe = load_pipeline(_model(a), device=a.device, dtype=torch.float32, mode="exact", attention="sdpa",
                         fused_norms=False, compile=False, text_encoder="offload")
    done = export_onnx(pipe, a.out, a.component, getattr(torch, DTYPES[a.dtype]), a.size, tuple(a.lora))
    for name, r in done.items():
        print(f"wrote {r['path']} ({r['bytes'] / 2**20:.1f} MiB{', external data' if r['external_data'] else ''}) "
              f"in {r['export_s']:.1f} s")
        if "dynamic" in r:
            print("  shapes: " + json.dumps(r["dynamic"]))
    return 0


def cmd_info(a) -> int:
    from .loader import inspect_checkpoint
    rep = inspect_checkpoint(a.model)
    print(f"checkpoint: {rep['path']}")
    print(f"variant:    {rep.get('variant', 'unknown')}")
    cfg = rep.get("config")
    if cfg is not None:
        print(f"transformer: {cfg.num_layers} layers, {cfg.num_heads} heads x {cfg.head_dim}, "
              f"in_channels {cfg.in_channels}, native fps {cfg.fps}")
    for comp, info in rep["components"].items():
        if "parameters" in info:
            print(f"  {comp:13s} {info['parameters'] / 1e6:10.2f} M params  dtypes {', '.join(info['dtypes'])}")
        elif info:
            print(f"  {comp:13s} {info}")
    if rep["missing"]:
        print("missing or broken:")
        for m in rep["missing"]:
            print(f"  - {m}")
        return 1
    print("complete: nothing missing")
    return 0


def cmd_random(a) -> int:
    from .random_model import write_random_checkpoint
    import torch
    dtype = getattr(torch, DTYPES[a.dtype]) if a.dtype else None
    out = write_random_checkpoint(a.out, a.preset, a.seed, dtype=dtype, device=a.device, real_t5=a.real_t5)
    print(f"wrote a random-weight {a.preset} checkpoint to {out}")
    return 0


def cmd_convert_lora(a) -> int:
    from .lora import read_lora, write_lora
    lf = read_lora(a.src, a.convention)
    out = write_lora(a.out, lf)
    scale = next(iter(lf.scales.values()))
    print(f"wrote {out}: {len(lf.pairs)} modules, rank {lf.rank}, scale {scale:g} (from the {lf.convention} "
          f"convention), now in the lora_adapter_metadata header that diffusers and cogrt read")
    return 0


def main(argv=None) -> int:
    from .loader import CheckpointError
    from .pipeline import OutOfMemory

    a = _parser().parse_args(argv)
    a.argv = list(sys.argv[1:] if argv is None else argv)
    setup_logging()
    try:
        return a.func(a)
    except (CheckpointError, OutOfMemory, FileNotFoundError, ValueError, TypeError) as e:
        print(f"cogrt: error: {e}", file=sys.stderr)
        return 2


def setup_logging(level: int = logging.INFO) -> None:
    """Our loggers' messages on stderr, plainly; the libraries' Python warnings (deprecations and the like, which
    no user of ours can act on) are not shown. Ours go through logging, so they still are."""
    logging.basicConfig(format="%(message)s")  # a no-op where the process has configured logging already
    logging.getLogger("cogrt").setLevel(level)
    warnings.simplefilter("ignore")


if __name__ == "__main__":
    sys.exit(main())
