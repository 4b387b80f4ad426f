"""Which part of the `fp8` mode costs quality on the bundled tiny model: the fp8 linear layers, the int8/fp8
attention, the int8 T5, torchao's fast fp8 accumulation, or the first and last blocks. Each variant is `fp8` with
one choice changed (or `exact` with one transform switched on); PSNR of the frames against `exact`, same prompts
and seeds as bench/quality.py, every pipeline eager. Needs an fp8 GPU.

    python -m cogrt.bench.fp8_ablation --n 32
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

VARIANTS = {  # name -> load_pipeline's mode and transforms
    "fp8": dict(mode="fp8"),
    "fp8, fp32 accumulation": dict(mode="fp8", fp8_fast_accum=False),
    "fp8, first and last blocks bf16": dict(mode="fp8", keep_blocks=(0, -1)),
    "fp8, bf16 attention": dict(mode="fp8", attention="triton"),
    "fp8, e4m3 Q·K attention": dict(mode="fp8", attention="triton-fp8-e4m3"),
    "fp8, bf16 T5": dict(mode="fp8", text_encoder="full"),
    "fp8 linear layers only": dict(mode="fp8", attention="triton", text_encoder="full"),
    "exact + fp8 attention only": dict(mode="exact", attention="triton-fp8"),
}


def main(argv=None) -> dict:
    from cogrt.bench.quality import MODEL, psnr
    from cogrt.engine.pipeline import load_pipeline
    from cogrt.train.synthetic import caption, sample_scenes
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default=str(MODEL))
    # a prompt's PSNR spreads by dB, so 8 prompts leave more standard error than the choices weighed here differ
    # by (bench/RESULTS.md, "fp8 on the tiny model: which choice costs quality")
    ap.add_argument("--n", type=int, default=32, help="held-out prompts")
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--variants", default=";".join(VARIANTS), help="names from VARIANTS, separated by ';'")
    ap.add_argument("--json", help="write each variant's mean and per-prompt PSNR here")
    argv = sys.argv[1:] if argv is None else list(argv)
    a = ap.parse_args(argv)
    prompts = [caption(s) for s in sample_scenes(a.n, 7, "heldout")]
    kw = dict(num_frames=49, guidance_scale=6.0, num_inference_steps=a.steps)

    def videos(transforms):
        # eager: compiling changes no rounding here, and saves a compile per variant
        pipe = load_pipeline(a.model, compile=False, **transforms)
        return [pipe.generate(p, seed=i, **kw).frames for i, p in enumerate(prompts)]

    ref, out, per_prompt = videos({}), {}, {}
    for name in a.variants.split(";"):
        x = videos(VARIANTS[name])
        per_prompt[name] = [psnr(r, v) for r, v in zip(ref, x)]
        out[name] = float(np.mean(per_prompt[name]))
        print(f"{name:34s} PSNR {out[name]:.1f} dB against exact (per prompt: "
              f"{' '.join(f'{p:.1f}' for p in per_prompt[name])})", flush=True)
    if a.json:
        from cogrt.bench.components import environment
        import torch
        meta = dict(environment(torch.device("cuda")), n=a.n, steps=a.steps, psnr_mean=out,
                    psnr_per_prompt=per_prompt, command="python -m cogrt.bench.fp8_ablation " + " ".join(argv or []))
        Path(a.json).write_text(json.dumps(meta, indent=2))
    return out


if __name__ == "__main__":
    main()
