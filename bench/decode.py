"""The VAE decode at the real size: tiled and untiled, with cuDNN's algorithm search (`cudnn.benchmark`) off and on.

The decode is 4 s of a 5B `fp8` request (tiled, for the 16 GB peak) and 15% of a `fast` one. The VAE is the
real-size CogVideoX VAE with random weights (no checkpoint here); the latents are the 5B request's, 13 x 60 x 90.
Each setting's first call is timed apart (it includes cuDNN's search when benchmark is on), then the median of
`--iters` calls after it, with CUDA events; peak memory is over those calls.

    python -m cogrt.bench.decode --json decode.json
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

import torch


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", default="cogvideox-5b")
    ap.add_argument("--latent", default="13,60,90", help="latent frames, height, width")
    ap.add_argument("--iters", type=int, default=3)
    ap.add_argument("--json")
    args = ap.parse_args(argv)

    from cogrt.bench.components import building, environment, random_vae
    from cogrt.kernels.measure import cuda_times, rel_err
    from cogrt.engine.model import PRESETS
    cfg = PRESETS[args.preset]
    dev, dt = torch.device("cuda"), torch.bfloat16
    with building(dev, dt, 0):
        vae = random_vae(cfg, real=True)
    f, h, w = (int(x) for x in args.latent.split(","))
    z = torch.randn(1, cfg.out_channels, f, h, w, device=dev, dtype=dt, generator=torch.Generator(dev).manual_seed(0))
    vae.enable_slicing()
    rows, ref = [], None
    for tiled in (True, False):
        vae.enable_tiling() if tiled else vae.disable_tiling()
        for bench in (False, True):
            with torch.backends.cudnn.flags(enabled=True, benchmark=bench, deterministic=False, allow_tf32=True), \
                    torch.no_grad():
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats()
                t0 = time.perf_counter()
                out = vae.decode(z).sample.float().cpu()  # off the GPU, so that no later peak counts it
                first = time.perf_counter() - t0
                first_peak = torch.cuda.max_memory_allocated() / 2**30
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats()
                ms = statistics.median(cuda_times(lambda: vae.decode(z).sample, 0, args.iters))
                peak = torch.cuda.max_memory_allocated() / 2**30
            ref = out if ref is None else ref
            err = rel_err(out, ref)
            row = dict(tiled=tiled, cudnn_benchmark=bench, first_s=first, first_peak_gib=first_peak, s=ms / 1e3,
                       peak_gib=peak, rel_err_vs_first_row=err)
            rows.append(row)
            print(json.dumps(row), flush=True)
    meta = dict(environment(dev), preset=args.preset, latent=[f, h, w], weights="random (real-size VAE)",
                command=" ".join(["python -m cogrt.bench.decode", *(sys.argv[1:] if argv is None else argv)]), rows=rows)
    print("\n| decode | cudnn.benchmark | first call s | its peak GiB | s (median) | peak GiB | "
          "rel err vs tiled, no search |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {'tiled' if r['tiled'] else 'untiled'} | {'on' if r['cudnn_benchmark'] else 'off'} | "
              f"{r['first_s']:.2f} | {r['first_peak_gib']:.1f} | {r['s']:.2f} | {r['peak_gib']:.1f} | "
              f"{r['rel_err_vs_first_row']:.1e} |")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(meta, fh, indent=2)


if __name__ == "__main__":
    main()
