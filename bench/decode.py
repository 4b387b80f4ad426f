"""The VAE decode at the real size: untiled, diffusers' own tiles, and the tile grids the pipeline plans
(engine/vae_tiles.py), each with its time, peak memory and difference from the untiled decode.

The VAE is the real-size CogVideoX VAE with random weights (no checkpoint here); the latents are the 5B request's,
13 x 60 x 90, unless `--latent` says otherwise. Each setting's first call is timed apart, then the median of
`--iters` calls after it, with CUDA events; peak memory is over those calls, beside the VAE's own weights. The
planner's estimate of each grid's peak is printed beside the measured one, so that its constants can be checked
(`--frames-check` also decodes 3 latent frames, to see how the peak scales with frames).

    python -m cogrt.bench.decode --json decode.json
    python -m cogrt.bench.decode --grids untiled,diffusers --cudnn-benchmark   # the earlier search comparison
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

import torch


def apply_setting(vae, name: str, h: int, w: int):
    """Apply a setting by name: untiled (the 1x1 grid), diffusers (its fixed 240 x 360 tiles), or RxC (a planned
    grid)."""
    from cogrt.engine import vae_tiles
    if name == "diffusers":
        vae.enable_tiling(tile_sample_min_height=240, tile_sample_min_width=360, tile_overlap_factor_height=1 / 6,
                          tile_overlap_factor_width=1 / 5)
        return None
    rows, cols = (1, 1) if name == "untiled" else (int(x) for x in name.split("x"))
    plan = vae_tiles.grid(h, w, rows, cols)
    if plan is None:
        raise SystemExit(f"no {name} grid for {h} x {w} latents")
    plan.apply(vae)
    return plan


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", default="cogvideox-5b")
    ap.add_argument("--latent", default="13,60,90", help="latent frames, height, width")
    ap.add_argument("--grids", default="untiled,diffusers,2x1,3x1,4x1,2x2,3x2,3x3",
                    help="comma-separated: untiled, diffusers, or RxC grids of engine/vae_tiles.py")
    ap.add_argument("--cudnn-benchmark", action="store_true", help="each setting also with cuDNN's search on")
    ap.add_argument("--frames-check", action="store_true", help="also the first two settings at 3 latent frames")
    ap.add_argument("--iters", type=int, default=3)
    ap.add_argument("--hold-gb", type=float, default=0.0, help="hold this much beside the VAE, as resident weights")
    ap.add_argument("--cap-gb", type=float, default=None,
                    help="a memory fraction of this many GiB for the process (with --hold-gb: what is left to decode)")
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
    vae.enable_slicing()
    weights = torch.cuda.memory_allocated() / 2**30
    # held to the end, as resident weights would be
    _held = torch.empty(int(args.hold_gb * 2**30), dtype=torch.uint8, device=dev) if args.hold_gb else None
    if args.cap_gb:
        total = torch.cuda.mem_get_info(dev)[1]
        torch.cuda.set_per_process_memory_fraction(min(1.0, args.cap_gb * 2**30 / total), torch.cuda.current_device())
    base = torch.cuda.memory_allocated() / 2**30  # the VAE and what is held
    names = args.grids.split(",")
    todo = [(n, f, b) for n in names for b in ((False, True) if args.cudnn_benchmark else (False,))]
    if args.frames_check:
        todo += [(n, 3, False) for n in names[:2]]
    rows, ref = [], {}
    for name, frames, bench in todo:
        z = torch.randn(1, cfg.out_channels, frames, h, w, device=dev, dtype=dt,
                        generator=torch.Generator(dev).manual_seed(0))
        plan = apply_setting(vae, name, h, w)
        with torch.backends.cudnn.flags(enabled=True, benchmark=bench, deterministic=False, allow_tf32=True), \
                torch.no_grad():
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
            t0 = time.perf_counter()
            try:
                out = vae.decode(z).sample.float().cpu()  # off the GPU, so that no later peak counts it
                first = time.perf_counter() - t0
                first_peak = torch.cuda.max_memory_allocated() / 2**30 - base
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats()
                ms = statistics.median(cuda_times(lambda: vae.decode(z).sample, 0, args.iters))
                peak = torch.cuda.max_memory_allocated() / 2**30 - base
                reserved = torch.cuda.max_memory_reserved() / 2**30 - base
            except torch.OutOfMemoryError:
                row = dict(setting=name, latent_frames=frames, cudnn_benchmark=bench, oom=True,
                           peak_reserved_gib=torch.cuda.max_memory_reserved() / 2**30 - base)
                rows.append(row)
                print(json.dumps(row), flush=True)
                continue
        ref.setdefault(frames, out)  # the first setting (untiled by default) is the reference
        row = dict(setting=name, latent_frames=frames, cudnn_benchmark=bench, first_s=first, first_peak_gib=first_peak,
                   s=ms / 1e3, peak_gib=peak, peak_reserved_gib=reserved, rel_err_vs_first=rel_err(out, ref[frames]),
                   tiles=(plan.rows * plan.cols if plan else None),
                   tile_latents=([plan.tile_h, plan.tile_w] if plan else None),
                   decoded_pixels_vs_frame=(plan.decoded_pixels(h, w) / (64 * h * w) if plan else None),
                   planned_peak_gib=(plan.peak_bytes(1 + 4 * (frames - 1), 2) / 2**30 if plan else None))
        rows.append(row)
        print(json.dumps(row), flush=True)
    meta = dict(environment(dev), preset=args.preset, latent=[f, h, w], weights="random (real-size VAE)",
                vae_weights_gib=weights, hold_gib=args.hold_gb, cap_gib=args.cap_gb,
                command=" ".join(["python -m cogrt.bench.decode", *(sys.argv[1:] if argv is None else argv)]),
                rows=rows)
    print("\n| decode | latent frames | cudnn.benchmark | first call s | s (median) | peak GiB | peak reserved GiB | "
          "planned peak GiB | pixels decoded / frame | rel err vs the first |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        if r.get("oom"):
            print(f"| {r['setting']} | {r['latent_frames']} | | out of memory | | | "
                  f"{r['peak_reserved_gib']:.1f} | | | |")
            continue
        planned = f"{r['planned_peak_gib']:.1f}" if r["planned_peak_gib"] is not None else ""
        px = f"{r['decoded_pixels_vs_frame']:.2f}" if r["decoded_pixels_vs_frame"] is not None else ""
        print(f"| {r['setting']} | {r['latent_frames']} | {'on' if r['cudnn_benchmark'] else 'off'} | "
              f"{r['first_s']:.2f} | {r['s']:.2f} | {r['peak_gib']:.1f} | {r['peak_reserved_gib']:.1f} | {planned} | "
              f"{px} | {r['rel_err_vs_first']:.1e} |")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(meta, fh, indent=2)


if __name__ == "__main__":
    main()
