"""Where a denoising step's time goes: CUDA kernels by family, against the step's wall time, per mode.

Random weights at the real shapes (no checkpoint can be downloaded here), our pipeline assembled in each mode
as `bench.modes` does it, warmed up (compiled), then `--steps` steps of one request under torch.profiler.
Per step it reports: the wall time of the denoise; each kernel family's GPU time (attention, GEMMs, activation
quantization, our fused norm/prologue/residual kernels, other elementwise, copies); the GPU's busy time, and
the idle rest (host work and syncs between kernels); and the transformer forward alone (CUDA events, median),
so that step - forward is what the loop spends outside the model.

    python -m cogrt.bench.profile --modes exact,fp8 --json profile.json
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import re
import statistics
import time

import torch

from .modes import PROMPT, our_transforms

# the first pattern that matches a kernel's name names its family
FAMILIES = (
    ("attention", r"attn|attention|flash|fmha|sdpa|softmax"),
    ("activation quant", r"quant_rows|quant_v|amax|float8|fp8|_scaled_mm_quant|clamp.*to_copy|to_copy.*clamp|"
                         r"reciprocal"),
    ("GEMM", r"gemm|nvjet|cutlass|xmma|sm90|matmul|_mm_|f8f8|cublas|splitk"),
    ("fused norm / prologue / residual", r"adaln|gated_residual|qk_norm_rope|layer_norm|layernorm|rms"),
    ("copy / fill", r"memcpy|memset|copy_|fill|cat_|CatArrayBatched"),
    ("other elementwise / reductions", r"."),
)


def family(name: str) -> str:
    low = name.lower()
    for fam, pat in FAMILIES:
        if re.search(pat, low):
            return fam
    return FAMILIES[-1][0]


def kernel_table(prof, steps: int) -> tuple[dict[str, float], dict[str, list]]:
    """ms per step by family, and each family's top kernels (name, ms per step, calls per step)."""
    by, top = {}, {}
    for e in prof.key_averages():
        dev_us = getattr(e, "self_device_time_total", None)
        if dev_us is None:
            dev_us = e.self_cuda_time_total
        if dev_us <= 0 or e.key.startswith("cuda") or e.key.startswith("ProfilerStep"):
            continue
        fam = family(e.key)
        ms = dev_us / 1e3 / steps
        by[fam] = by.get(fam, 0.0) + ms
        top.setdefault(fam, []).append((e.key[:90], round(ms, 2), e.count / steps))
    for fam in top:
        top[fam] = sorted(top[fam], key=lambda r: -r[1])[:5]
    return by, top


def profile_mode(mode: str, a, dev, dtype) -> dict:
    from torch.profiler import ProfilerActivity, profile

    from cogrt.bench.components import engine_transformer, random_components
    from cogrt.engine.pipeline import assemble
    from cogrt.engine.runner import use_compile_cache
    use_compile_cache(os.path.join(a.cache_dir, mode))
    c = random_components(a.preset, dev, dtype, a.seed)
    ours = engine_transformer(c.transformer, c.cfg, dtype, copy=False)
    pipe = assemble(ours, c.vae, c.text_encoder, c.tokenizer, c.scheduler_config, dev, dtype, mode,
                    dataclasses.replace(our_transforms(mode, dev)), cache_dir=os.path.join(a.cache_dir, mode),
                    keep_originals=False)
    del c
    kw = dict(num_frames=a.frames, height=a.height, width=a.width, guidance_scale=6.0, seed=a.seed)
    pipe.warm_up(a.frames, a.height, a.width)
    pipe.generate(PROMPT, num_inference_steps=2, **kw)  # the loop's own first-call costs
    timings = []
    for _ in range(2):
        timings.append(pipe.generate(PROMPT, num_inference_steps=a.steps, **kw).timings["denoise"] / a.steps)
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        res = pipe.generate(PROMPT, num_inference_steps=a.steps, **kw)
    by, top = kernel_table(prof, a.steps)

    # the transformer forward alone, on the loop's inputs (a CFG batch at this size), CUDA events
    cfg = pipe.cfg
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, cfg.latent_frames(a.frames)[0], cfg.in_channels, a.height // 8, a.width // 8, generator=g)
    text = torch.randn(2, cfg.max_text_seq_length, cfg.text_embed_dim, generator=g)
    x, text = x.to(dev, dtype), text.to(dev, dtype)
    t = torch.tensor(999, dtype=torch.long, device=dev).expand(2)
    pos = ours.positions(x.shape[1], x.shape[3], x.shape[4], dev)
    fwd = []
    with torch.no_grad():
        for i in range(a.iters + 1):
            s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            pipe.runner.step_begin()
            s.record()
            ours(x, text, t, positions=pos)
            e.record()
            torch.cuda.synchronize(dev)
            if i:
                fwd.append(s.elapsed_time(e))
    decode = [dict(cap_gib=None, decode_s=res.timings["decode"], tiled=bool(pipe.vae.use_tiling),
                   peak_gib=res.peak_memory_bytes / 2**30)]
    if a.memory_cap_gb:  # the same request within a memory fraction: auto tiling must keep it under the cap
        torch.cuda.empty_cache()
        total = torch.cuda.mem_get_info(dev)[1]
        torch.cuda.set_per_process_memory_fraction(min(1.0, a.memory_cap_gb * 2**30 / total), dev)
        try:
            r = pipe.generate(PROMPT, num_inference_steps=2, **kw)
            decode.append(dict(cap_gib=a.memory_cap_gb, decode_s=r.timings["decode"], tiled=bool(pipe.vae.use_tiling),
                               peak_gib=r.peak_memory_bytes / 2**30))
        except Exception as e:  # noqa: BLE001 (reported as the row's result)
            decode.append(dict(cap_gib=a.memory_cap_gb, error=f"{type(e).__name__}: {str(e)[:200]}"))
        finally:
            torch.cuda.set_per_process_memory_fraction(1.0, dev)
    step_ms = 1e3 * statistics.median(timings + [res.timings["denoise"] / a.steps])
    busy = sum(by.values())
    return dict(mode=mode, step_ms=step_ms, forward_ms=statistics.median(fwd), outside_forward_ms=step_ms -
                statistics.median(fwd), gpu_busy_ms=busy, gpu_idle_ms=step_ms - busy, families=by, top=top,
                decode=decode, transforms=pipe.transforms.describe())


def markdown(rows: list[dict]) -> str:
    fams = [f for f, _ in FAMILIES]
    head = "| | " + " | ".join(r["mode"] for r in rows) + " |"
    out = [head, "|---|" + "---|" * len(rows)]
    out.append("| denoise step (wall, median) | " + " | ".join(f"{r['step_ms']:.0f} ms" for r in rows) + " |")
    out.append("| transformer forward alone | " + " | ".join(f"{r['forward_ms']:.0f} ms" for r in rows) + " |")
    out.append("| step outside the forward | " + " | ".join(f"{r['outside_forward_ms']:.0f} ms" for r in rows) + " |")
    for f in fams:
        out.append(f"| {f} | " + " | ".join(f"{r['families'].get(f, 0.0):.1f} ms" for r in rows) + " |")
    out.append("| GPU busy (all kernels) | " + " | ".join(f"{r['gpu_busy_ms']:.0f} ms" for r in rows) + " |")
    out.append("| GPU idle in the step | " + " | ".join(f"{r['gpu_idle_ms']:.0f} ms" for r in rows) + " |")
    for r in rows:
        for d in r["decode"]:
            cap = "no cap" if d["cap_gib"] is None else f"capped at {d['cap_gib']:g} GiB"
            out.append(f"\n{r['mode']}, {cap}: " + (d["error"] if "error" in d else
                       f"decode {d['decode_s']:.2f} s, {'tiled' if d['tiled'] else 'untiled'}, request peak "
                       f"{d['peak_gib']:.1f} GiB"))
    return "\n".join(out)


def main(argv=None):
    ap = argparse.ArgumentParser(prog="cogrt bench profile", description=__doc__.split("\n")[0])
    ap.add_argument("--preset", default="cogvideox-5b")
    ap.add_argument("--modes", default="exact,fp8")
    ap.add_argument("--frames", type=int, default=49)
    ap.add_argument("--height", type=int, default=480)
    ap.add_argument("--width", type=int, default=720)
    ap.add_argument("--steps", type=int, default=3, help="steps profiled (and timed, twice more, unprofiled)")
    ap.add_argument("--iters", type=int, default=5, help="timed transformer forwards")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--cache-dir", default="/tmp/cogrt-profile-cache")
    ap.add_argument("--memory-cap-gb", type=float, default=None,
                    help="also run one request within this much GPU memory (a per-process fraction), to show the "
                         "auto-tiled decode keeping it there")
    ap.add_argument("--json", default=None)
    a = ap.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("bench profile needs a CUDA GPU")
    dev, dtype = torch.device("cuda"), torch.bfloat16
    rows = []
    for mode in a.modes.split(","):
        t0 = time.time()
        rows.append(profile_mode(mode, a, dev, dtype))
        print(f"{mode}: {rows[-1]['step_ms']:.0f} ms/step ({time.time() - t0:.0f} s)", flush=True)
        for fam, top in rows[-1]["top"].items():
            print(f"  {fam}: " + "; ".join(f"{n} {ms} ms x{k:g}" for n, ms, k in top[:3]), flush=True)
        torch.cuda.empty_cache()
        if a.json:  # after each mode, so that a run cut short keeps what it measured
            meta = dict(device=torch.cuda.get_device_name(), torch=torch.__version__, preset=a.preset,
                        commit=os.environ.get("COGRT_COMMIT", "?"), size=f"{a.frames}x{a.height}x{a.width}")
            with open(a.json, "w") as f:
                json.dump({**meta, "rows": rows}, f, indent=1)
    print(markdown(rows))


if __name__ == "__main__":
    main()
