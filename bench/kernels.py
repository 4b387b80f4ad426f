"""The kernels of kernels/ against their baselines, in one run on one GPU (issue 4).

- Attention at the 5B, 2B and 1.5-5B shapes: cuDNN and flash SDPA, our `triton` and `triton-fp8` kernels,
  and the `sage` / `flash-attn` packages where installed. TFLOP/s = 4·B·H·N²·d / time. Each backend's error
  is measured against fp32 math on a sample of query rows (the full N×N fp32 scores would not fit).
- The fused passes (adaLN, gated residual, QK prologue) against the native PyTorch code they replace, in
  GB/s of compulsory traffic, and as a fraction of the device bandwidth measured by a large copy.
- `--sweep`: every tile configuration of the attention kernel at the 5B shape, to choose `CONFIGS`.

Times are `triton.testing.do_bench` medians after warm-up. Inputs are random (never zeros), with the
outlier channels and offsets of trained models (see `realistic_qkv`).

    python -m cogrt.bench.kernels --sweep --json kernels.json --markdown kernels.md
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess

import torch

from cogrt.kernels.measure import realistic_qkv, sampled_error

SHAPES = {  # name: (B, H, N, d) with CFG's batch of 2; N = video tokens + 226 text tokens
    "5B 49x480x720": (2, 48, 17550 + 226, 64),
    "2B 49x480x720": (2, 30, 17550 + 226, 64),
    "1.5-5B 81x768x1360": (2, 48, 44880 + 226, 64),
}


def bench_ms(fn, rep: int = 300) -> float:
    import triton.testing
    return triton.testing.do_bench(fn, warmup=50, rep=rep, return_mode="median")


def copy_bandwidth() -> float:
    """GB/s of a 2 GiB device-to-device copy (read + write), the ceiling for the memory-bound kernels."""
    a = torch.empty(2**30, dtype=torch.bfloat16, device="cuda")
    b = torch.empty_like(a)
    ms = bench_ms(lambda: b.copy_(a))
    return 2 * a.numel() * a.element_size() / ms / 1e6


def attention_rows(shape_name, backends, qk_fp8: bool):
    from cogrt.engine import attention
    from cogrt.kernels import attention as fa
    B, H, N, d = SHAPES[shape_name]
    q, k, v = realistic_qkv(B, H, N, d, seed=1, device="cuda", dtype=torch.bfloat16)
    flops = 4 * B * H * N * N * d

    def same(o):
        return o
    # (name, the timed call, what turns its output into the attention's, for the error)
    runs = [(name, (lambda n=name: attention.attend(q, k, v, n)), same) for name in backends]
    if qk_fp8:
        runs.append(("triton-fp8 (e4m3 Q·Kᵀ)", lambda: fa.sage_attention(q, k, v, "fp8"), same))
    if "cudnn-fp8" in backends:  # cuDNN's kernel alone, on inputs quantized beforehand
        from cogrt.engine import attention_cudnn as ac
        fp8_inputs = ac.quantize(q, k, v)  # q8, k8, v8, descale_q, descale_k, v_scale, v_mean
        vs, vm = fp8_inputs[5:]
        runs.append(("cudnn-fp8 (kernel only)", lambda: ac.attend_fp8(*fp8_inputs[:5]),
                     lambda o: o.float() * vs + vm))
    rows, base = [], None
    for name, fn, to_out in runs:
        try:
            err = sampled_error(to_out(fn()), q, k, v)
            ms = bench_ms(fn)
        except Exception as e:  # a backend that cannot run here is reported, not fatal
            print(f"{shape_name:22s} {name:26s} failed: {type(e).__name__}: {e}", flush=True)
            continue
        base = base or ms  # the first backend (sdpa, cuDNN) is the baseline
        rows.append(dict(shape=shape_name, B=B, H=H, N=N, d=d, backend=name, ms=ms, tflops=flops / ms / 1e9,
                         rel_err=err, speedup_vs_cudnn=base / ms))
        print(f"{shape_name:22s} {name:26s} {ms:8.2f} ms {flops / ms / 1e9:6.0f} TFLOP/s  x{base / ms:4.2f}  "
              f"err {err:.2e}", flush=True)
        torch.cuda.empty_cache()
    return rows


# (BLOCK_M, BLOCK_N, warps, stages, SPLIT) around the best of earlier, wider sweeps (bench/RESULTS.md). With
# SPLIT = 2 each half of BLOCK_M should fill a 64-row tensor-core instruction per warpgroup.
_SPLIT = [(128, 64, 4, 2, 2), (128, 64, 4, 3, 2), (128, 128, 4, 2, 2), (128, 128, 4, 3, 2)]
SWEEP = {
    "triton": [(64, 128, 4, 2, 1), (64, 128, 4, 3, 1), (128, 128, 4, 3, 1), (128, 128, 8, 2, 1)] + _SPLIT,
    "triton-fp8": [(64, 128, 4, 2, 1), (128, 128, 4, 2, 1), (128, 128, 4, 3, 1), (128, 128, 8, 2, 1)] + _SPLIT,
}


def sweep_rows():
    """Each tile configuration of each kernel, at the 5B shape."""
    from cogrt.kernels import attention as fa
    B, H, N, d = SHAPES["5B 49x480x720"]
    q, k, v = realistic_qkv(B, H, N, d, seed=1, device="cuda", dtype=torch.bfloat16)
    flops = 4 * B * H * N * N * d
    rows = []
    for kernel, configs in SWEEP.items():
        for cfg in configs:
            fn = (lambda c=cfg: fa._sage(q, k, v, "int8", c)) if kernel == "triton-fp8" else \
                (lambda c=cfg: fa._flash(q, k, v, c))
            try:
                err = sampled_error(fn(), q, k, v)
                ms = bench_ms(fn, rep=100)
            except Exception as e:  # e.g. out of shared memory for this tile size
                print(f"sweep {kernel} {cfg} failed: {type(e).__name__}: {str(e)[:200]}", flush=True)
                continue
            rows.append(dict(kernel=kernel, config=cfg, ms=ms, tflops=flops / ms / 1e9, rel_err=err))
            print(f"sweep {kernel:32s} {cfg} {ms:8.2f} ms {flops / ms / 1e9:6.0f} TFLOP/s err {err:.2e}", flush=True)
    return rows


def prologue_sweep():
    from cogrt.kernels import qk
    B, Nt, H, d = 2, 226, 48, 64
    qkv = torch.randn(B, Nt + 17550, 3 * H * d, device="cuda", dtype=torch.bfloat16)
    w = torch.randn(d, device="cuda", dtype=torch.bfloat16)
    cos, sin = rope_tables()
    best = None
    for bt in (1, 2, 4, 8):
        for warps in (2, 4, 8):
            ms = bench_ms(lambda: qk.launch(qkv, H, Nt, w, w, w, w, cos, sin, 1e-6, bt, warps), rep=100)
            print(f"sweep QK prologue BLOCK_T={bt} warps={warps}: {ms:.3f} ms", flush=True)
            best = min(best or (ms, bt, warps), (ms, bt, warps))
    print(f"QK prologue: best BLOCK_T={best[1]} warps={best[2]} (kernels/qk.py has BLOCK_T={qk.BLOCK_T} "
          f"warps={qk.NUM_WARPS})", flush=True)


def adaln_sweep():
    """Rows per program and warps for adaln_modulate, at the 5B shape."""
    from cogrt.kernels import adaln
    B, Nv, Nt, D = 2, 17550, 226, 3072
    x = torch.randn(B, Nv, D, device="cuda", dtype=torch.bfloat16)
    c = torch.randn(B, Nt, D, device="cuda", dtype=torch.bfloat16)
    w = torch.randn(D, device="cuda", dtype=torch.bfloat16)
    mod = torch.randn(B, 6 * D, device="cuda", dtype=torch.bfloat16)
    for fp8, have in [(False, (adaln.ROWS, adaln.NUM_WARPS)), (True, (adaln.FP8_ROWS, adaln.FP8_NUM_WARPS))]:
        best = None
        for rows in (1, 2, 4, 8):
            for warps in (2, 4, 8, 16):
                ms = bench_ms(lambda: adaln.launch_modulate(x, c, w, w, mod, 1e-5, rows, warps, fp8=fp8), rep=100)
                print(f"sweep adaLN fp8={fp8} ROWS={rows} warps={warps}: {ms * 1e3:.1f} us", flush=True)
                best = min(best or (ms, rows, warps), (ms, rows, warps))
        print(f"adaLN fp8={fp8}: best ROWS={best[1]} warps={best[2]} {best[0] * 1e3:.1f} us (kernels/adaln.py has "
              f"ROWS={have[0]} warps={have[1]})", flush=True)


def quant_rows_sweep():
    """Warps for the fp8 row quantization (kernels/quant.py) at the 5B rows: the FF's GELU output (12,288 wide) and
    the attention's output (3,072), B=2 × 17,776 tokens; GB/s of compulsory traffic (bf16 in, e4m3 out)."""
    import triton

    from cogrt.kernels import quant
    M = 2 * (17550 + 226)
    for gelu, K in [(True, 4 * 3072), (False, 3072)]:
        y = (torch.randn(M, K, device="cuda") * 2).to(torch.bfloat16)
        q = torch.empty(M, K, device="cuda", dtype=torch.float8_e4m3fn)
        s = torch.empty(M, 1, device="cuda")
        for warps in (4, 8, 16, 32):
            ms = bench_ms(lambda: quant._fp8_rows_kernel[(M,)](y, q, s, K, GELU=gelu, EXACT=False,
                                                               BLOCK=triton.next_power_of_2(K), num_warps=warps))
            print(f"sweep quant_rows K={K} gelu={gelu} warps={warps}: {ms * 1e3:.1f} us, "
                  f"{3 * M * K / ms / 1e6:.0f} GB/s", flush=True)


def rope_tables():
    """The 5B RoPE tables at 49 x 480 x 720 (13 x 30 x 45 patches), as the QK prologue takes them."""
    from cogrt.engine.model import PRESETS, rope_3d
    return [t.float().contiguous() for t in rope_3d(PRESETS["cogvideox-5b"], 13, 30, 45, "cuda")]


def fused_rows(bandwidth: float):
    """The 5B block's memory-bound passes: kernel vs the native code, B=2, 17,550 video + 226 text tokens."""
    from cogrt.kernels import adaln, qk
    B, Nv, Nt, D, H = 2, 17550, 226, 3072, 48
    d = D // H
    dev, dt = "cuda", torch.bfloat16
    g = torch.Generator(dev).manual_seed(0)
    x = torch.randn(B, Nv, D, device=dev, dtype=dt, generator=g)
    c = torch.randn(B, Nt, D, device=dev, dtype=dt, generator=g)
    a = torch.randn(B, Nt + Nv, D, device=dev, dtype=dt, generator=g)
    mod = torch.randn(B, 6 * D, device=dev, dtype=dt, generator=g) * 0.1
    w, b = torch.randn(D, device=dev, dtype=dt, generator=g), torch.randn(D, device=dev, dtype=dt, generator=g)
    qkv = torch.randn(B, Nt + Nv, 3 * D, device=dev, dtype=dt, generator=g)
    wq, bq, wk, bk = (torch.randn(d, device=dev, dtype=dt, generator=g) for _ in range(4))
    cos, sin = rope_tables()
    n, e = (Nt + Nv) * B * D, dt.itemsize
    cases = [
        ("adaLN modulate (LN + scale/shift, both streams)", 2 * n * e,
         lambda: adaln.adaln_modulate(x, c, w, b, mod, 1e-5), lambda: adaln.adaln_modulate_reference(x, c, w, b, mod, 1e-5)),
        ("adaLN modulate + row-wise e4m3 (fp8's qkv and FF input)", n * e + n + (Nt + Nv) * B * 4,
         lambda: adaln.adaln_modulate_fp8(x, c, w, b, mod, 1e-5),
         lambda: adaln.adaln_modulate_fp8_reference(x, c, w, b, mod, 1e-5)),
        ("gated residual (both streams)", 3 * n * e,
         lambda: adaln.gated_residual(x, c, a, mod), lambda: adaln.gated_residual_reference(x, c, a, mod)),
        ("QK prologue (LN per head + 3D RoPE)", 4 * n * e + 2 * cos.numel() * 4,
         lambda: qk.qk_norm_rope(qkv, H, Nt, wq, bq, wk, bk, cos, sin, 1e-6),
         lambda: qk.qk_norm_rope_reference(qkv, H, Nt, wq, bq, wk, bk, cos, sin, 1e-6)),
    ]
    rows = []
    for name, nbytes, kernel, native in cases:
        ms, ms_native = bench_ms(kernel), bench_ms(native)
        gbs = nbytes / ms / 1e6
        rows.append(dict(kernel=name, ms=ms, native_ms=ms_native, gb_s=gbs, frac_of_copy=gbs / bandwidth,
                         speedup_vs_native=ms_native / ms))
        print(f"{name:48s} {ms:7.3f} ms ({gbs:6.0f} GB/s, {gbs / bandwidth:4.0%} of copy)  native {ms_native:7.3f} ms "
              f"x{ms_native / ms:4.1f}", flush=True)
    return rows


def markdown(meta, attn, sweep, fused) -> str:
    out = [f"- GPU: {meta['gpu']}; torch {meta['torch']}, triton {meta['triton']}; commit `{meta['commit']}`.",
           f"- Measured copy bandwidth: {meta['copy_gb_s']:.0f} GB/s (a 2 GiB bf16 device copy, read + write).", "",
           "| shape (B, H, N, d) | backend | ms | TFLOP/s | vs cuDNN SDPA | rel err vs fp32 |", "|---|---|---|---|---|---|"]
    for r in attn:
        out.append(f"| {r['shape']} ({r['B']}, {r['H']}, {r['N']}, {r['d']}) | {r['backend']} | {r['ms']:.2f} | "
                   f"{r['tflops']:.0f} | {r['speedup_vs_cudnn']:.2f}× | {r['rel_err']:.1e} |")
    if fused:
        out += ["", "| fused pass (5B, B=2, N=17,776, D=3072) | ms | GB/s | of copy bandwidth | native ms | speed-up |",
                "|---|---|---|---|---|---|"]
        for r in fused:
            out.append(f"| {r['kernel']} | {r['ms']:.3f} | {r['gb_s']:.0f} | {r['frac_of_copy']:.0%} | "
                       f"{r['native_ms']:.3f} | {r['speedup_vs_native']:.1f}× |")
    if sweep:
        out += ["", "| sweep at the 5B shape | (BLOCK_M, BLOCK_N, warps, stages, split) | ms | TFLOP/s | rel err vs fp32 |",
                "|---|---|---|---|---|"]
        for r in sorted(sweep, key=lambda r: (r["kernel"], r["ms"])):
            out.append(f"| {r['kernel']} | {r['config']} | {r['ms']:.2f} | {r['tflops']:.0f} | {r['rel_err']:.1e} |")
    return "\n".join(out) + "\n"


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--shapes", default=",".join(SHAPES), help="comma-separated names from SHAPES")
    ap.add_argument("--sweep", action="store_true", help="sweep the attention kernel's tile configurations")
    ap.add_argument("--no-fused", action="store_true")
    ap.add_argument("--sweep-fused", action="store_true", help="sweep the fused passes' launch settings first")
    ap.add_argument("--json", default=None)
    ap.add_argument("--markdown", default=None, help="write the tables there (to paste into bench/RESULTS.md)")
    args = ap.parse_args(argv)

    import triton

    from cogrt.engine import attention
    commit = os.environ.get("COGRT_COMMIT") or subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip() or "?"
    meta = dict(gpu=torch.cuda.get_device_name(), torch=torch.__version__, triton=triton.__version__, commit=commit,
                copy_gb_s=copy_bandwidth(), inputs="random, realistic_qkv (LayerNorm rows, outlier channels, K offset)")
    print(json.dumps(meta), flush=True)
    backends = ["sdpa", "sdpa-flash", "triton", "triton-fp8"] + [
        b for b in ("sage", "flash-attn", "flash-attn-4", "cudnn-fp8") if b in attention.available()]
    if "cudnn-fp8" in backends:
        import cudnn
        meta.update(cudnn=cudnn.backend_version(), cudnn_frontend=cudnn.__version__)
        print(f"cuDNN {cudnn.backend_version()} (torch's: {torch.backends.cudnn.version()}), "
              f"frontend {cudnn.__version__}", flush=True)
    sweep = sweep_rows() if args.sweep else []
    if (args.sweep or args.sweep_fused) and not args.no_fused:
        prologue_sweep()
        adaln_sweep()
        quant_rows_sweep()
    attn = []
    for name in args.shapes.split(","):
        attn += attention_rows(name, backends, qk_fp8=name.startswith("5B"))
    fused = [] if args.no_fused else fused_rows(meta["copy_gb_s"])
    md = markdown(meta, attn, sweep, fused)
    print(md)
    if args.markdown:
        with open(args.markdown, "w") as f:
            f.write(md)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(meta, attention=attn, sweep=sweep, fused=fused), f, indent=2)


if __name__ == "__main__":
    main()
