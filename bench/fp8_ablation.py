"""Which part of the `fp8` mode costs quality on the bundled tiny model: the fp8 linear layers, the int8/fp8
attention, or the int8 T5. Each variant is `fp8` with one transform switched back (or `exact` with one
switched on); PSNR of the frames against `exact`, same prompts and seeds as bench/quality.py. Needs an fp8 GPU.

    python -m bench.fp8_ablation --n 8
"""
from __future__ import annotations

import argparse

import numpy as np

VARIANTS = {
    "fp8": dict(mode="fp8"),
    "fp8, bf16 attention": dict(mode="fp8", attention="triton"),
    "fp8, bf16 T5": dict(mode="fp8", text_encoder="full"),
    "fp8 linear layers only": dict(mode="fp8", attention="triton", text_encoder="full"),
    "exact + fp8 attention only": dict(mode="exact", attention="triton-fp8"),
}


def main(argv=None) -> dict:
    from bench.quality import MODEL, psnr
    from engine.pipeline import load_pipeline
    from train.synthetic import caption, sample_scenes
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default=str(MODEL))
    ap.add_argument("--n", type=int, default=8, help="held-out prompts")
    ap.add_argument("--steps", type=int, default=50)
    a = ap.parse_args(argv)
    prompts = [caption(s) for s in sample_scenes(a.n, 7, "heldout")]
    kw = dict(num_frames=49, guidance_scale=6.0, num_inference_steps=a.steps)

    def videos(**transforms):
        pipe = load_pipeline(a.model, **transforms)
        return [pipe.generate(p, seed=i, **kw).frames for i, p in enumerate(prompts)]

    ref, out = videos(), {}
    for name, transforms in VARIANTS.items():
        out[name] = float(np.mean([psnr(r, x) for r, x in zip(ref, videos(**transforms))]))
        print(f"{name:30s} PSNR {out[name]:.1f} dB against exact", flush=True)
    return out


if __name__ == "__main__":
    main()
