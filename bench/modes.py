"""diffusers against each of our modes, in one process on one GPU, with the same random weights, prompt (so T5
embeddings) and initial noise (one CPU generator seed, drawn the same way) for every row.

    python -m cogrt.bench.modes --preset cogvideox-5b --json modes-5b.json --results bench/RESULTS.md
    python -m cogrt.bench.modes --device cpu --preset tiny-5b --frames 9 --height 64 --width 64 --steps 2   # smoke run

Rows (`--rows`); `diffusers` always runs, first, since every ratio is against it in the same run:
`diffusers` (CogVideoXPipeline, eager, bf16: the baseline); `diffusers-compile` (each block compiled, fullgraph);
`diffusers-torchao-fp8-compile` (torchao fp8 row-wise on every linear layer, then the whole transformer compiled,
`--torchao-compile-mode` max-autotune, as the diffusers-torchao recipe); our modes, each with its full transforms
(compile on CUDA). Each row builds its components afresh from the seed and frees them: its peak memory is its own.

- first call: from the built components to the end of a 2-step end-to-end call, compile and our warm_up() included.
- s/step: the denoising seconds of one end-to-end call of `--steps` steps, / steps. diffusers is timed in three
  stages that each end in a device sync: `encode_prompt`; the pipeline given those embeddings with
  output_type="latent" (the loop with its latent and RoPE set-up, as our denoise time has); `decode_latents` and
  postprocessing. Ours: the stage times our pipeline reports.
- end to end = text + 50 x s/step + decode, EXTRAPOLATED (the note says from how many steps). `fast` instead runs
  50 steps for real (`--fast-real`, default on CUDA) with a fixed TeaCache schedule of 22 computed: on random
  weights TeaCache's own decisions mean nothing. Its s/step is the average over the 50.
- peak GiB: torch.cuda.max_memory_allocated over that call.
- rel err: the row's transformer on one fixed input (latents, text embeddings, timestep 999, CFG batch) against
  our `exact` transforms run eagerly on the same weights; diffusers gets its own RoPE tables. The JSON also has
  each row's final latents against the baseline's after the same steps: the check that the noise was the same.
On the CPU (fp32, tiny presets) the fp8 rows are skipped with a note.

Targets (H100, 5B, 49x480x720, CFG): exact <= 1.10 s/step (>= 1.65x diffusers, >= 1.25x diffusers-compile); fp8
<= 0.65 s/step (>= 1.85x diffusers-torchao-fp8-compile) and peak <= 16 GB; fast <= 20 s end to end (>= 4.5x).
"""
from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import os
import shlex
import sys
import tempfile
import time

import torch

from cogrt.engine import modes
from cogrt.engine.model import PRESETS
from cogrt.kernels.measure import rel_err

DIFFUSERS_ROWS = ("diffusers", "diffusers-compile", "diffusers-torchao-fp8-compile")
# fp8 with its choices changed, to weigh them (engine/quant.py): the first and last blocks in bf16, and fp32
# accumulation instead of Hopper's fast one
VARIANT_ROWS = {"fp8-keep-ends": ("fp8", {"keep_blocks": (0, -1)}),
                "fp8-fp32-accum": ("fp8", {"fp8_fast_accum": False}),
                # without the FF's fused GELU and our fp8 activation quantization (engine/fused.py)
                "exact-unfused-ff": ("exact", {"fused_ff": False}),
                "fp8-unfused-ff": ("fp8", {"fused_ff": False}),
                # Q·Kᵀ in e4m3 instead of int8 (engine/attention.py): faster, about twice the attention's error
                "fp8-e4m3-attention": ("fp8", {"attention": "triton-fp8-e4m3"}),
                # our own attention kernels where FlashAttention 4 is installed (and the modes take it): the A/B
                "exact-triton-attention": ("exact", {"attention": "triton"}),
                "fp8-int8-attention": ("fp8", {"attention": "triton-fp8"})}
ROWS = DIFFUSERS_ROWS + modes.MODES + tuple(VARIANT_ROWS)
SIZES = {"cogvideox-2b": (49, 480, 720), "cogvideox-5b": (49, 480, 720), "cogvideox1.5-5b": (81, 768, 1360)}
PROMPT = "a panda playing guitar in a bamboo forest, sunlight through the leaves"
E2E_STEPS, FAST_COMPUTED = 50, 22  # 22 of 50: the ratio published for TeaCache 0.2 on 5B
WARMUP_STEPS = 2  # CUDA graph trees (max-autotune) run a graph once, record it on the 2nd call and replay from the 3rd


def our_transforms(mode: str, dev: torch.device) -> modes.Transforms:
    return modes.transforms_for(mode, dev)  # one place, so that a test can stand in a `fast` the CPU can run


def skip_reason(row: str, dev: torch.device) -> str | None:
    if row == "diffusers-torchao-fp8-compile" and not modes.has_fp8(dev):
        return "needs a CUDA GPU with fp8 tensor cores"
    if row in modes.MODES or row in VARIANT_ROWS:
        try:
            our_transforms(VARIANT_ROWS.get(row, (row,))[0], dev)
        except ValueError as e:
            return str(e).split(";")[0]
    return None


def lap(dev: torch.device, since: float) -> float:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
    return time.perf_counter() - since


def reference(a, dev, dtype):
    """The one input every row's transformer sees (a CFG batch at the benchmark size), and our `exact`
    transforms' output on it with compile off: what every row's error is measured against."""
    from cogrt.bench.components import engine_transformer, random_transformer
    from cogrt.engine.runner import Runner
    cfg, g = PRESETS[a.preset], torch.Generator().manual_seed(a.seed + 100)
    x = torch.randn(2, cfg.latent_frames(a.frames)[0], cfg.in_channels, a.height // 8, a.width // 8, generator=g)
    text = torch.randn(2, cfg.max_text_seq_length, cfg.text_embed_dim, generator=g)
    # as the pipelines pass it, an int64 timestep expanded to the batch: a compiled diffusers model does not recompile
    t = torch.tensor(999, dtype=torch.long, device=dev).expand(2)
    x, text = x.to(dev, dtype), text.to(dev, dtype)
    ours = engine_transformer(random_transformer(cfg, dev, dtype, a.seed), cfg, dtype, copy=False)
    Runner(ours, dataclasses.replace(our_transforms("exact", dev), compile=False))
    with torch.no_grad():
        out = ours(x, text, t, positions=ours.positions(x.shape[1], x.shape[3], x.shape[4], dev)).float().cpu()
    return (x, text, t), out


# ---------------------------------------------------------------------------------------------------------------
# A row builder returns (prepare, call, forward): prepare() warms up; call(steps, computed) runs one end-to-end
# request and returns its stage seconds and final latents; forward(x, text, t) is the transformer on the fixed input.

def diffusers_row(row, c, a, dev, dtype):
    import diffusers

    from cogrt.bench.components import diffusers_rope
    tr, cfg = c.transformer, c.cfg
    if row == "diffusers-torchao-fp8-compile":
        from torchao.quantization import Float8DynamicActivationFloat8WeightConfig, PerRow, quantize_
        quantize_(tr, Float8DynamicActivationFloat8WeightConfig(granularity=PerRow()))
        if a.torchao_compile == "full":
            tr.compile(mode=a.torchao_compile_mode, fullgraph=True)
        else:  # what diffusers now recommends: each block, one graph for all, a fraction of the compile time
            for block in tr.transformer_blocks:
                block.compile(mode=a.torchao_compile_mode, fullgraph=True)
    elif row == "diffusers-compile" and getattr(tr, "_repeated_blocks", None):
        tr.compile_repeated_blocks(fullgraph=True)
    elif row == "diffusers-compile":  # diffusers 0.42's CogVideoX declares no repeated blocks
        for block in tr.transformer_blocks:
            block.compile(fullgraph=True)
    sched = getattr(diffusers, c.scheduler_config["_class_name"]).from_config(c.scheduler_config)
    pipe = diffusers.CogVideoXPipeline(tokenizer=c.tokenizer, text_encoder=c.text_encoder, vae=c.vae, transformer=tr,
                                       scheduler=sched)
    pipe.set_progress_bar_config(disable=True)
    if cfg.patch_size_t and c.real_vae_t5:
        pipe.vae.enable_tiling()  # 1.5's untiled decode runs out of memory even on 80 GB
    extra = cfg.latent_frames(a.frames)[1]

    @torch.no_grad()
    def call(steps, computed=None):
        t0 = time.perf_counter()
        pos, neg = pipe.encode_prompt(PROMPT, "", do_classifier_free_guidance=a.guidance > 1, device=dev,
                                      max_sequence_length=cfg.max_text_seq_length)
        tm = {"text": lap(dev, t0)}
        t0 = time.perf_counter()
        lat = pipe(prompt_embeds=pos, negative_prompt_embeds=neg, num_frames=a.frames, height=a.height,
                   width=a.width, num_inference_steps=steps, guidance_scale=a.guidance, output_type="latent",
                   generator=torch.Generator("cpu").manual_seed(a.seed), return_dict=False)[0][:, extra:]
        tm["denoise"] = lap(dev, t0)
        t0 = time.perf_counter()
        pipe.video_processor.postprocess_video(video=pipe.decode_latents(lat), output_type="np")
        tm["decode"] = lap(dev, t0)
        return dict(tm, total=sum(tm.values()), computed=steps, latents=lat)

    def forward(x, text, t):
        rope = diffusers_rope(cfg, x.shape[1], x.shape[3], x.shape[4], dev) if cfg.use_rotary_positional_embeddings \
            else None
        return tr(hidden_states=x, encoder_hidden_states=text, timestep=t, image_rotary_emb=rope,
                  attention_kwargs=None, return_dict=False)[0]  # the pipeline's own arguments: no recompile
    return (lambda: None), call, forward


def ours_row(row, c, a, dev, dtype):
    from cogrt.bench.components import engine_transformer
    from cogrt.engine.pipeline import assemble
    from cogrt.engine.caches.teacache import fixed_schedule
    mode, settings = VARIANT_ROWS.get(row, (row, {}))
    ours = engine_transformer(c.transformer, c.cfg, dtype, copy=False)
    c.transformer = None  # our module holds the weights now
    # keep_originals=False: no LoRA here, and 9.5 GB of pinned host copies would only slow the build
    pipe = assemble(ours, c.vae, c.text_encoder, c.tokenizer, c.scheduler_config, dev, dtype, mode,
                    dataclasses.replace(our_transforms(mode, dev), **settings),
                    cache_dir=os.path.join(a.cache_dir, row), keep_originals=False)

    def call(steps, computed=None):
        kw = {"teacache_fixed_steps": fixed_schedule(steps, computed or steps)} if mode == "fast" else {}
        res = pipe.generate(PROMPT, num_frames=a.frames, height=a.height, width=a.width, num_inference_steps=steps,
                            guidance_scale=a.guidance, seed=a.seed, **kw)
        return dict(res.timings, computed=len(res.steps_computed), latents=res.latents)

    def forward(x, text, t):
        pipe.runner.step_begin()
        return ours(x, text, t, positions=ours.positions(x.shape[1], x.shape[3], x.shape[4], dev))
    return (lambda: pipe.warm_up(a.frames, a.height, a.width, guidance=a.guidance > 1)), call, forward


def run_row(row, a, dev, dtype, inputs, ref) -> dict:
    from cogrt.bench.components import random_components
    from cogrt.engine.runner import use_compile_cache
    # each row its own compile cache (diffusers' compiles too): all cold in a fresh directory, or all warm in one
    # that a run before filled; fast and fp8 share their graphs, and one must not warm the other
    use_compile_cache(os.path.join(a.cache_dir, row))
    cuda = dev.type == "cuda"
    resident = torch.cuda.memory_allocated(dev) / 2**30 if cuda else 0.0  # what the last row left behind: ~0
    t0 = time.perf_counter()
    c = random_components(a.preset, dev, dtype, a.seed, a.real_vae_t5)
    prepare, call, forward = (diffusers_row if row in DIFFUSERS_ROWS else ours_row)(row, c, a, dev, dtype)
    del c  # the closures hold what the row needs, and all of it goes with them
    build = lap(dev, t0)
    t0 = time.perf_counter()
    prepare()
    call(WARMUP_STEPS)
    first = lap(dev, t0)
    if cuda:
        torch.cuda.reset_peak_memory_stats(dev)
    real = row == "fast" and a.fast_real
    n = E2E_STEPS if real else a.steps
    tm = call(n, FAST_COMPUTED if real else n)
    peak = torch.cuda.max_memory_allocated(dev) / 2**30 if cuda else None
    with torch.no_grad():
        out = forward(*inputs).float().cpu()
    step, label = tm["denoise"] / n, f"extrapolated from {n} steps"
    e2e = tm["text"] + E2E_STEPS * step + tm["decode"]
    if real:
        e2e, step, label = tm["total"], tm["denoise"] / E2E_STEPS, f"measured: 50 steps, {tm['computed']} computed"
    elif row == "fast":  # a skipped step costs only the embedding and the head: counted as free
        e2e, step = tm["text"] + FAST_COMPUTED * step + tm["decode"], FAST_COMPUTED * step / E2E_STEPS
        label += f", {FAST_COMPUTED} of 50 computed, skipped ones free"
    return dict(row=row, status="ok", build_s=build, first_call_s=first, step_s=step, e2e_s=e2e, e2e_label=label,
                text_s=tm["text"], denoise_s=tm["denoise"], decode_s=tm["decode"], steps_run=n,
                steps_computed=tm["computed"], peak_gib=peak, resident_gib_at_start=resident, rel_err=rel_err(out, ref),
                latents=tm["latents"].float().cpu())


def free(dev):
    gc.collect()
    torch._dynamo.reset()  # the last row's compiled code and CUDA graph pools; also its recompile budget
    if dev.type == "cuda":
        torch.cuda.empty_cache()


def markdown(rows: list[dict]) -> str:
    out = ["| row | first call s | s/step | end to end s (50 steps) | peak GiB | rel err vs exact | speed-up/step | "
           "speed-up end to end | note |", "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        peak = "" if r.get("peak_gib") is None else f"{r['peak_gib']:.1f}"
        out.append(f"| {r['row']} | | | | | | | | {r['status']}: {r['note']} |" if r["status"] != "ok" else
                   f"| {r['row']} | {r['first_call_s']:.1f} | {r['step_s']:.3f} | {r['e2e_s']:.1f} | {peak} | "
                   f"{r['rel_err']:.1e} | {r['speedup_step']:.2f}x | {r['speedup_e2e']:.2f}x | {r['e2e_label']} |")
    return "\n".join(out)


def parse(argv):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--preset", default="cogvideox-5b", choices=sorted(PRESETS))
    ap.add_argument("--rows", default=",".join(ROWS), help=f"comma-separated, of: {', '.join(ROWS)}")
    for name in ("--frames", "--height", "--width"):
        ap.add_argument(name, type=int, help="default: the preset's (5B: 49 x 480 x 720; 1.5: 81 x 768 x 1360)")
    ap.add_argument("--steps", type=int, default=3, help="denoising steps measured, then extrapolated to 50")
    ap.add_argument("--guidance", type=float, default=6.0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--torchao-compile-mode", default="max-autotune")
    ap.add_argument("--torchao-compile", choices=["full", "regional"], default="full",
                    help="the torchao row: the whole transformer compiled (the recipe), or each block")
    ap.add_argument("--fast-real", action=argparse.BooleanOptionalAction, help="fast's 50 steps for real (CUDA: on)")
    ap.add_argument("--real-vae-t5", action=argparse.BooleanOptionalAction, help="default: for the real presets")
    ap.add_argument("--cache-dir", help="compile caches, a folder per row (default: fresh ones: compiles are cold)")
    ap.add_argument("--json")
    ap.add_argument("--results", help="append the table and the command to this markdown file (bench/RESULTS.md)")
    a = ap.parse_args(argv)
    rows = set(filter(None, a.rows.split(",")))
    if rows - set(ROWS):
        ap.error(f"unknown rows {sorted(rows - set(ROWS))}; valid: {', '.join(ROWS)}")
    a.rows = [r for r in ROWS if r in rows | {"diffusers"}]  # the baseline first, then the table's order
    cfg = PRESETS[a.preset]
    f, h, w = SIZES.get(a.preset, (cfg.sample_frames, cfg.sample_height * 8, cfg.sample_width * 8))
    a.frames, a.height, a.width = a.frames or f, a.height or h, a.width or w
    a.fast_real = a.device.startswith("cuda") if a.fast_real is None else a.fast_real
    return a


def main(argv=None) -> dict:
    argv = sys.argv[1:] if argv is None else list(argv)
    a = parse(argv)
    with tempfile.TemporaryDirectory(prefix="cogrt-compile-") as tmp:
        a.cache_dir = a.cache_dir or tmp
        return run(a, argv)


def run(a, argv) -> dict:
    from cogrt.bench.components import append_results, environment, weights_note
    cfg, dev = PRESETS[a.preset], torch.device(a.device)
    dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
    meta = dict(environment(dev), preset=a.preset, frames=a.frames, height=a.height, width=a.width,
                guidance=a.guidance, steps=a.steps, seed=a.seed, dtype=str(dtype), prompt=PROMPT,
                weights=weights_note(cfg, a.real_vae_t5), command="python -m cogrt.bench.modes " + shlex.join(argv), rows=[])
    print(json.dumps({k: v for k, v in meta.items() if k != "rows"}), flush=True)
    inputs, ref = reference(a, dev, dtype)
    free(dev)
    base_latents = None
    for row in a.rows:
        reason = skip_reason(row, dev)
        try:
            r = dict(row=row, status="skipped", note=reason) if reason else run_row(row, a, dev, dtype, inputs, ref)
        except Exception as e:  # a broken row must not cost the others their numbers; without the baseline, stop
            if row == "diffusers":
                raise
            r = dict(row=row, status="error", note=f"{type(e).__name__}: {str(e)[:300]}".splitlines()[0])
        free(dev)
        if r["status"] == "ok":
            base = meta["rows"][0] if meta["rows"] else r
            r["speedup_step"], r["speedup_e2e"] = base["step_s"] / r["step_s"], base["e2e_s"] / r["e2e_s"]
            lat = r.pop("latents")
            base_latents = lat if base_latents is None else base_latents
            r["latents_rel_err_vs_diffusers"] = rel_err(lat, base_latents) if r["steps_run"] == base["steps_run"] else None
        meta["rows"].append(r)
        print(json.dumps(r), flush=True)
        if a.json:  # after every row, so that a run cut short keeps what it measured
            with open(a.json, "w") as fh:
                json.dump(meta, fh, indent=2)
    table = markdown(meta["rows"])
    print(table)
    if a.results:
        title = f"Modes: {a.preset}, {a.frames} x {a.height} x {a.width}, CFG {a.guidance:g}, 50 steps, one process"
        table = ("Every row has the same weights, prompt and initial noise. End to end = text + 50 steps + VAE decode, "
                 "extrapolated where the note says so. rel err: the transformer on one input against our `exact` run "
                 "eagerly.\n\n" + table)
        append_results(a.results, title, meta, table)
    return meta


if __name__ == "__main__":
    main()
