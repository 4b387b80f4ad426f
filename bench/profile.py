"""Where a denoising step's time goes: CUDA kernels by family, against the step's wall time, per mode.

Random weights at the real shapes (no checkpoint can be downloaded here), our pipeline assembled in each mode
as `bench.modes` does it, warmed up (compiled). It reports the wall time of a denoising step (what one more step
costs: the denoise loops of `--steps` and 3 x `--steps` steps, median of 2-3 each, differenced, so that the loop's
fixed set-up per request is reported apart), the transformer forward alone on the loop's inputs (CUDA events, median), so that
step - forward is what the loop spends outside the model, and each kernel family's GPU time in one forward
(torch.profiler over `--iters` forwards; device kernels and copies only, so that an op and the kernel it launches
are not counted twice, and the VAE decode and the text encoder stay out). One more long loop then times each
forward inside the loop, and the gap between one forward's end and the next one's start, on the GPU's own timeline,
and the GPU's SM clock and power are read as each timed loop ends: a forward that is slower inside the loop than
alone (clocks, power) shows apart from work done between the forwards.

    python -m cogrt.bench.profile --modes exact,fp8 --json profile.json
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import re
import statistics
import subprocess
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


def kernel_table(prof, calls: int) -> tuple[dict[str, float], dict[str, list]]:
    """ms per call by family, and each family's top kernels (name, ms per call, launches per call), over the
    device's own events: kernels, copies and fills."""
    from torch.autograd import DeviceType
    by, top = {}, {}
    for e in prof.key_averages():
        if e.device_type != DeviceType.CUDA or e.key.startswith("Command Buffer"):
            continue
        dev_us = getattr(e, "self_device_time_total", None)
        if dev_us is None:
            dev_us = e.self_cuda_time_total
        if dev_us <= 0:
            continue
        fam = family(e.key)
        ms = dev_us / 1e3 / calls
        by[fam] = by.get(fam, 0.0) + ms
        top.setdefault(fam, []).append((e.key[:90], round(ms, 2), e.count / calls))
    for fam in top:
        top[fam] = sorted(top[fam], key=lambda r: -r[1])[:5]
    return by, top


def parse_spec(spec: str) -> tuple[str, dict]:
    """"fp8" or "fp8:fused_ff=0:attention=triton": a mode and single transforms set over it."""
    mode, *sets = spec.split(":")
    overrides = {}
    for s in sets:
        k, v = s.split("=", 1)
        overrides[k] = {"0": False, "false": False, "1": True, "true": True}.get(v.lower(), v)
    return mode, overrides


def profile_mode(spec: str, a, dev, dtype) -> dict:
    from torch.profiler import ProfilerActivity, profile

    from cogrt.bench.components import engine_transformer, random_components
    from cogrt.engine.pipeline import assemble
    from cogrt.engine.request import GenerationRequest
    from cogrt.engine.runner import use_compile_cache
    mode, overrides = parse_spec(spec)
    cache = os.path.join(a.cache_dir, spec.replace(":", "_").replace("=", "-"))
    use_compile_cache(cache)
    c = random_components(a.preset, dev, dtype, a.seed)
    ours = engine_transformer(c.transformer, c.cfg, dtype, copy=False)
    pipe = assemble(ours, c.vae, c.text_encoder, c.tokenizer, c.scheduler_config, dev, dtype, mode,
                    dataclasses.replace(our_transforms(mode, dev), **overrides), cache_dir=cache,
                    keep_originals=False)
    del c
    kw = dict(num_frames=a.frames, height=a.height, width=a.width, guidance_scale=6.0, seed=a.seed)
    pipe.warm_up(a.frames, a.height, a.width)
    pipe.generate(PROMPT, num_inference_steps=2, **kw)  # the loop's own first-call costs
    clocks, power = {}, {}  # per loop kind: the GPU's SM clock (MHz) and power (W) as each timed loop ends

    def sample(kind):
        try:  # NVML's averages over its last sample period (1/6 to 1 s), through pynvml
            c, w = torch.cuda.clock_rate(dev), torch.cuda.power_draw(dev) / 1e3
        except Exception:  # noqa: BLE001 (no pynvml: the same NVML readings through nvidia-smi)
            c = w = None
            try:
                q = subprocess.run(["nvidia-smi", "-i", str(dev.index or 0), "--query-gpu=clocks.sm,power.draw",
                                    "--format=csv,noheader,nounits"], capture_output=True, text=True, timeout=10)
                c, w = (float(x) for x in q.stdout.split(","))
            except (OSError, ValueError, subprocess.SubprocessError):
                pass  # the run goes on without them
        clocks.setdefault(kind, []).append(c)
        power.setdefault(kind, []).append(w)

    def request(steps, kind):
        # pipe.generate(PROMPT, num_inference_steps=steps, **kw) is this run(), which also takes on_step: its
        # "decode" call comes as the loop ends (synchronized) and before the decode, whose seconds a sample
        # taken after generate() returns would describe instead
        def on_step(stage, done, total):
            if stage == "decode":
                sample(kind)
        return pipe.run(GenerationRequest(prompt=PROMPT, num_inference_steps=steps, **kw), on_step=on_step)
    # the denoise loop at two lengths: the difference is what one more step costs, free of the request's fixed
    # set-up (scheduler, noise, position tables), which a short loop would otherwise spread over its few steps
    short, long_ = [], []
    for _ in range(2):
        short.append(request(a.steps, "short").timings["denoise"])
        long_.append(request(3 * a.steps, "long").timings["denoise"])
    res = request(a.steps, "short")
    short.append(res.timings["denoise"])
    marginal = (statistics.median(long_) - statistics.median(short)) / (2 * a.steps)
    setup = statistics.median(short) - a.steps * marginal

    # one more long loop with CUDA events on the stream right before and after each transformer call: each
    # forward as the loop runs it, and the GPU-timeline gap from one forward's end to the next one's start (the
    # scheduler step, the CFG combine and any idle), so that a forward slower in the loop than alone shows apart
    # from work between forwards. Not among the loops above: the hooks are its only difference.
    # Hooks, as pipe.transformer is a plain nn.Module compiled block by block (engine/runner.py): they run eagerly
    # around each whole call, never traced into a graph.
    starts, ends = [], []

    def mark(events):
        def hook(*_):
            e = torch.cuda.Event(enable_timing=True)
            e.record()
            events.append(e)
        return hook
    hooks = [pipe.transformer.register_forward_pre_hook(mark(starts)),
             pipe.transformer.register_forward_hook(mark(ends))]
    try:
        request(3 * a.steps, "in_loop")
    finally:
        for h in hooks:
            h.remove()
    torch.cuda.synchronize(dev)
    in_fwd = [s.elapsed_time(e) for s, e in zip(starts, ends)]
    gaps = [e.elapsed_time(s) for e, s in zip(ends, starts[1:])]

    # the transformer forward alone, on the loop's inputs (a CFG batch at this size): CUDA events, then profiled
    cfg = pipe.cfg
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, cfg.latent_frames(a.frames)[0], cfg.in_channels, a.height // 8, a.width // 8, generator=g)
    text = torch.randn(2, cfg.max_text_seq_length, cfg.text_embed_dim, generator=g)
    x, text = x.to(dev, dtype), text.to(dev, dtype)
    t = torch.tensor(999, dtype=torch.long, device=dev).expand(2)
    pos = ours.positions(x.shape[1], x.shape[3], x.shape[4], dev)

    def forward():
        pipe.runner.step_begin()
        ours(x, text, t, positions=pos)
    fwd = []
    with torch.no_grad():
        for i in range(a.iters + 1):
            s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            s.record()
            forward()
            e.record()
            sample("forward_alone")  # while this forward runs (the host is ahead of it); the untimed first too
            torch.cuda.synchronize(dev)
            if i:
                fwd.append(s.elapsed_time(e))
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            for _ in range(a.iters):
                forward()
            torch.cuda.synchronize(dev)
    by, top = kernel_table(prof, a.iters)
    decode = [dict(cap_gib=None, decode_s=res.timings["decode"], text_s=res.timings["text"],
                   tiled=bool(pipe.vae.use_tiling), tiles=f"{pipe.decode_plan.rows}x{pipe.decode_plan.cols}",
                   peak_gib=res.peak_memory_bytes / 2**30)]
    if a.memory_cap_gb:  # the same request within a memory fraction: auto tiling must keep it under the cap
        torch.cuda.empty_cache()
        total = torch.cuda.mem_get_info(dev)[1]
        torch.cuda.set_per_process_memory_fraction(min(1.0, a.memory_cap_gb * 2**30 / total), dev)
        resident = torch.cuda.memory_allocated(dev) / 2**30  # the weights (and whatever else stays) before it
        reached = ["text encoding"]  # the stage the request was in when it stopped, from its on_step calls

        def on_step(stage, done, total):  # each call ends a stage: record the one that starts
            if stage == "text":
                reached.append("denoising step 1")
            elif stage == "denoise" and done < total:
                reached.append(f"denoising step {done + 1}")
            else:
                reached.append("VAE decode")
        try:
            for n in (1, 2):  # the first capped request pays the new tiles' first call; the second is steady
                r = pipe.run(GenerationRequest(prompt=PROMPT, num_inference_steps=2, **kw), on_step=on_step)
                p = pipe.decode_plan
                decode.append(dict(cap_gib=a.memory_cap_gb, request=n, decode_s=r.timings["decode"],
                                   text_s=r.timings["text"], tiled=bool(pipe.vae.use_tiling),
                                   tiles=f"{p.rows}x{p.cols}", tile_latents=[p.tile_h, p.tile_w],
                                   text_encoder_parked=pipe.text_parked, peak_gib=r.peak_memory_bytes / 2**30,
                                   resident_gib=resident))
        except Exception as e:  # noqa: BLE001 (reported as the row's result)
            decode.append(dict(cap_gib=a.memory_cap_gb, error=f"{type(e).__name__} in {reached[-1]}: {str(e)[:200]}",
                               failed_in=reached[-1], resident_gib=resident))
        finally:
            torch.cuda.set_per_process_memory_fraction(1.0, dev)
    step_ms = 1e3 * marginal
    forward_ms = statistics.median(fwd)
    busy = sum(by.values())
    return dict(mode=spec, step_ms=step_ms, request_setup_ms=1e3 * setup, forward_ms=forward_ms,
                outside_forward_ms=step_ms - forward_ms,
                in_loop_forward_ms=statistics.median(in_fwd), in_loop_gap_ms=statistics.median(gaps),
                in_loop_first_last_forward_ms=[in_fwd[0], in_fwd[-1]], in_loop_forwards_ms=in_fwd,
                in_loop_gaps_ms=gaps, clocks_mhz=clocks, power_w=power,
                forward_gpu_busy_ms=busy, forward_gpu_idle_ms=forward_ms - busy, families=by, top=top,
                decode=decode, transforms=pipe.transforms.describe())


def markdown(rows: list[dict]) -> str:
    fams = [f for f, _ in FAMILIES]
    head = "| | " + " | ".join(r["mode"] for r in rows) + " |"
    out = [head, "|---|" + "---|" * len(rows)]
    out.append("| denoise step (wall: one more step's cost) | " + " | ".join(f"{r['step_ms']:.0f} ms" for r in rows)
               + " |")
    out.append("| the loop's fixed set-up, once a request | " + " | ".join(f"{r['request_setup_ms']:.0f} ms"
                                                                       for r in rows) + " |")
    out.append("| transformer forward alone | " + " | ".join(f"{r['forward_ms']:.0f} ms" for r in rows) + " |")
    out.append("| step outside the forward | " + " | ".join(f"{r['outside_forward_ms']:.0f} ms" for r in rows) + " |")
    out.append("| forward inside the loop (median) | " + " | ".join(f"{r['in_loop_forward_ms']:.0f} ms" for r in rows)
               + " |")
    out.append("| forward inside the loop, first / last | " + " | ".join(
        "{:.0f} / {:.0f} ms".format(*r["in_loop_first_last_forward_ms"]) for r in rows) + " |")
    out.append("| gap between forwards inside the loop (median) | " + " | ".join(f"{r['in_loop_gap_ms']:.1f} ms"
                                                                            for r in rows) + " |")
    for f in fams:
        out.append(f"| forward: {f} | " + " | ".join(f"{r['families'].get(f, 0.0):.1f} ms" for r in rows) + " |")
    out.append("| forward: GPU busy (all kernels) | " + " | ".join(f"{r['forward_gpu_busy_ms']:.0f} ms" for r in rows)
               + " |")
    out.append("| forward: GPU idle | " + " | ".join(f"{r['forward_gpu_idle_ms']:.0f} ms" for r in rows) + " |")
    for r in rows:
        for name, unit, by in (("SM clock", "MHz", r["clocks_mhz"]), ("power", "W", r["power_w"])):
            out.append(f"\n{r['mode']}, {name} as each timed loop ended ({unit}): " + "; ".join(
                f"{kind} " + ", ".join("?" if v is None else f"{v:.0f}" for v in vs) for kind, vs in by.items()))
        for d in r["decode"]:
            cap = "no cap" if d["cap_gib"] is None else f"capped at {d['cap_gib']:g} GiB, request {d.get('request', 1)}"
            out.append(f"\n{r['mode']}, {cap}: " + (d["error"] if "error" in d else
                       f"text {d['text_s']:.2f} s, decode {d['decode_s']:.2f} s, tiles {d['tiles']}"
                       f"{', text encoder parked' if d.get('text_encoder_parked') else ''}, request peak "
                       f"{d['peak_gib']:.1f} GiB"))
    return "\n".join(out)


def main(argv=None):
    ap = argparse.ArgumentParser(prog="cogrt bench profile", description=__doc__.split("\n")[0])
    ap.add_argument("--preset", default="cogvideox-5b")
    ap.add_argument("--modes", default="exact,fp8",
                    help="comma-separated modes, each optionally with transforms set over it: fp8:fused_ff=0")
    ap.add_argument("--frames", type=int, default=49)
    ap.add_argument("--height", type=int, default=480)
    ap.add_argument("--width", type=int, default=720)
    ap.add_argument("--steps", type=int, default=3, help="the short timed loop's steps (the long one has 3x)")
    ap.add_argument("--iters", type=int, default=5, help="transformer forwards timed, and then profiled")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--cache-dir", default="/tmp/cogrt-profile-cache")
    ap.add_argument("--memory-cap-gb", type=float, default=None,
                    help="also run one request within this much GPU memory (a per-process fraction), to show the "
                         "auto-tiled decode keeping it there")
    ap.add_argument("--json", default=None)
    a = ap.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("bench profile needs a CUDA GPU")
    dev, dtype = torch.device("cuda", torch.cuda.current_device()), torch.bfloat16
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
