"""One transformer step, ours against diffusers' `CogVideoXTransformer3DModel`, in one process on one GPU.

Both models hold the same random weights (real shapes, random values: no checkpoint can be downloaded
here), get the same inputs, and are timed with CUDA events after warm-up (median). The relative error of
our output against diffusers' is printed beside the times.

    python -m cogrt.bench.step --preset cogvideox-5b --batch 2 --frames 49 --height 480 --width 720
    python -m cogrt.bench.step --backends sdpa,triton,triton-fp8 --fused-norms   # + ours with each attention backend

With `--backends`, ours also runs with each named attention backend (and, with `--fused-norms`, with the
Triton norm/prologue/residual kernels on too); those rows give the relative error against ours with
`sdpa`, in bf16, which is the reference the kernels issue sets (bf16 backends <= 1e-2, fp8 <= 3e-2).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics

import torch


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", default="cogvideox-5b")
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--frames", type=int, default=49)
    ap.add_argument("--height", type=int, default=480)
    ap.add_argument("--width", type=int, default=720)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--iters", type=int, default=5)
    ap.add_argument("--json", default=None)
    ap.add_argument("--profile", action="store_true", help="print the top CUDA kernels of one step of each")
    ap.add_argument("--backends", default="", help="comma-separated attention backends to run ours with")
    ap.add_argument("--fused-norms", action="store_true", help="also run each backend with the fused kernels")
    args = ap.parse_args(argv)

    from diffusers import CogVideoXTransformer3DModel
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from cogrt.bench.components import diffusers_rope
    from cogrt.engine.attention import set_attention
    from cogrt.engine.fused import fuse_norms
    from cogrt.engine.loader import build_transformer, to_engine_state_dict
    from cogrt.engine.model import PRESETS
    from cogrt.kernels.measure import cuda_times, rel_err

    cfg = PRESETS[args.preset]
    dev, dt = torch.device("cuda"), torch.bfloat16
    torch.manual_seed(0)
    torch.set_default_dtype(dt)
    with dev:
        ref = CogVideoXTransformer3DModel(**cfg.to_diffusers()).eval().requires_grad_(False)
    torch.set_default_dtype(torch.float32)
    # ours shares every tensor with diffusers' module except the fused qkv
    ours = build_transformer(cfg, to_engine_state_dict(dict(ref.state_dict()), cfg), dt)
    set_attention(ours, "sdpa")

    lat_f, _ = cfg.latent_frames(args.frames)
    B, H, W = args.batch, args.height // 8, args.width // 8
    g = torch.Generator(dev).manual_seed(1)
    x = torch.randn(B, lat_f, cfg.in_channels, H, W, device=dev, dtype=dt, generator=g)
    text = torch.randn(B, cfg.max_text_seq_length, cfg.text_embed_dim, device=dev, dtype=dt, generator=g)
    t = torch.full((B,), 999.0, device=dev)
    ofs = torch.full((1,), 2.0, device=dev) if cfg.ofs_embed_dim else None
    rope = diffusers_rope(cfg, lat_f, H, W, dev) if cfg.use_rotary_positional_embeddings else None
    positions = ours.positions(lat_f, H, W, dev)

    def run_ref(backends=None):
        def f():
            if backends is None:
                return ref(hidden_states=x, encoder_hidden_states=text, timestep=t, ofs=ofs,
                           image_rotary_emb=rope, return_dict=False)[0]
            with sdpa_kernel(backends):
                return ref(hidden_states=x, encoder_hidden_states=text, timestep=t, ofs=ofs,
                           image_rotary_emb=rope, return_dict=False)[0]
        return f

    def run_ours():
        return ours(x, text, t, ofs=ofs, positions=positions)

    tt, hh, ww = ours.grid(lat_f, H, W)
    n = (tt * hh * ww) + cfg.max_text_seq_length
    flops = B * cfg.num_layers * (24 * n * cfg.dim**2 + 4 * n * n * cfg.dim)
    rows = []

    def measure(name, fn, ours_sdpa=None):
        """Time fn, then its output's error against diffusers (cuDNN) and, given it, against ours with sdpa."""
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        ms = statistics.median(cuda_times(fn, args.warmup, args.iters))
        peak = torch.cuda.max_memory_allocated() / 2**30
        out = fn().float()
        row = dict(name=name, ms=ms, tflops=flops / ms / 1e9, peak_gib=peak,
                   rel_err=rel_err(out, ref_out))
        line = (f"{name:34s} {ms:9.1f} ms  {flops / ms / 1e9:6.0f} TFLOP/s  peak {peak:5.1f} GiB  "
                f"rel err {row['rel_err']:.2e}")
        if ours_sdpa is not None:
            row["rel_err_vs_ours_sdpa"] = rel_err(out, ours_sdpa)
            line += f"  vs ours-sdpa {row['rel_err_vs_ours_sdpa']:.2e}"
        rows.append(row)
        print(line, flush=True)
        return out

    with torch.no_grad():
        ref_out = run_ref([SDPBackend.CUDNN_ATTENTION])().float()
        measure("diffusers eager (SDPA default)", run_ref())
        measure("diffusers eager (SDPA cuDNN)", run_ref([SDPBackend.CUDNN_ATTENTION]))
        ours_sdpa = measure("cogrt exact, eager (sdpa)", run_ours)
        for backend in filter(None, args.backends.split(",")):
            for fused in [False, True] if args.fused_norms else [False]:
                set_attention(ours, backend)
                fuse_norms(ours, fused)
                measure(f"cogrt eager, {backend}" + (" + fused norms" if fused else ""), run_ours, ours_sdpa)
        set_attention(ours, "sdpa")
        fuse_norms(ours, False)
        if args.profile:
            from torch.profiler import ProfilerActivity, profile
            for name, fn in [("diffusers", run_ref([SDPBackend.CUDNN_ATTENTION])), ("cogrt", run_ours)]:
                with profile(activities=[ProfilerActivity.CUDA]) as prof:
                    fn()
                    torch.cuda.synchronize()
                print(f"--- {name}")
                print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=14, max_name_column_width=60))
    base = rows[1]["ms"]
    for r in rows:
        r["speedup_vs_diffusers_cudnn"] = base / r["ms"]
    meta = dict(gpu=torch.cuda.get_device_name(), torch=torch.__version__,
                diffusers=__import__("diffusers").__version__, commit=os.environ.get("COGRT_COMMIT", "?"),
                preset=args.preset, batch=B, frames=args.frames, height=args.height, width=args.width,
                tokens=n, weights="random (real shapes)", rows=rows)
    print("\n| what | ms/step | TFLOP/s | peak GiB | rel err vs diffusers | rel err vs ours sdpa | "
          "speed-up vs diffusers cuDNN |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        vs = r.get("rel_err_vs_ours_sdpa")
        print(f"| {r['name']} | {r['ms']:.0f} | {r['tflops']:.0f} | {r['peak_gib']:.1f} | {r['rel_err']:.1e} | "
              f"{'' if vs is None else f'{vs:.1e}'} | {r['speedup_vs_diffusers_cudnn']:.2f}x |")
    print(json.dumps({k: v for k, v in meta.items() if k != "rows"}))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(meta, f, indent=2)


if __name__ == "__main__":
    main()
