"""`cogrt bench caches`: step caches compared at equal compute, on the bundled tiny model.

The tiny model is trained, so its trajectories are real ones. Every cache is brought to each target fraction of
steps computed by a bisection of its knob on a few calibration prompts (the synthetic world's training split,
not the test prompts), then run at that knob on `--n` held-out prompts with fixed seeds (prompt i, seed i).
Per point: PSNR and SSIM of the frames against the uncached run of the same framework (ours against our
`exact`, diffusers' and cache-dit's against diffusers' plain pipeline, which agrees with ours: the
`reference parity` line), adherence (colour, shape, direction), the fraction of steps whose whole block stack
ran, the fraction of block work done (FirstBlockCache and our probe run the first block on every step; PAB and
FasterCache skip parts of blocks, so they are matched on it), and the denoise seconds per video. A cache that
cannot reach a target (MagCache's, PAB's and FasterCache's floors are above 30%) runs at the nearest point it
can.

    python -m cogrt.bench.caches --n 32 --markdown --json caches.json --plot caches.png     # CUDA if present
    python -m cogrt.bench.caches --n 4 --caches cogrt-probe,diffusers-fbcache --targets 0.3  # a quick look
"""
from __future__ import annotations

import argparse
import json
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .quality import MODEL, psnr, ssim

TARGETS = (0.55, 0.4, 0.3, 0.2)
# caches that skip parts of a block, whose feed-forward still runs on a "skipped" step: matched on the block work
# they do, not on steps
BLOCK_MATCHED = {"diffusers-pab", "diffusers-fastercache"}
FRAMES, SIZE, STEPS, GUIDANCE = 49, 128, 50, 6.0


@dataclass
class Ours:
    """One of our caches, made per request by `make(knob, steps)`; the knob raises skipping as it grows."""
    name: str
    knob: str
    lo: float
    hi: float
    make: object

    more_compute_when_lower = True


def our_caches(model: Path) -> dict[str, Ours]:
    from cogrt.engine.caches.probe import ProbeCache
    from cogrt.engine.caches.x0 import X0Cache
    from cogrt.engine.caches.teacache import TeaCache, read_coefficients
    coef = read_coefficients(Path(model) / "teacache_coefficients.json")
    return {c.name: c for c in (
        Ours("cogrt-teacache", "threshold (the model's own fit)", 1e-3, 5.0, lambda k, n: TeaCache(k, coef, n)),
        Ours("cogrt-probe", "threshold (forecast order 2)", 1e-3, 2.0, lambda k, n: ProbeCache(k, n, order=2)),
        Ours("cogrt-x0", "threshold (the probe's rule; skipped outputs from x0 forecast in log-SNR)", 1e-3, 2.0,
             lambda k, n: X0Cache(k, n)),
        Ours("cogrt-x0-s1", "threshold (the x0 cache; the first skipped step of a run from the residual forecast)",
             1e-3, 2.0, lambda k, n: X0Cache(k, n, short=1)),
        Ours("cogrt-x0-s2", "threshold (the x0 cache; the first two skipped steps of a run from the residual "
             "forecast)", 1e-3, 2.0, lambda k, n: X0Cache(k, n, short=2)),
        Ours("cogrt-probe-o1", "threshold (forecast order 1)", 1e-3, 2.0, lambda k, n: ProbeCache(k, n, order=1)),
        Ours("cogrt-probe-o0", "threshold (no forecast: FirstBlockCache's rule)", 1e-3, 2.0,
             lambda k, n: ProbeCache(k, n, order=0)),
        Ours("cogrt-probe-last", "threshold (order 1, decided against the last computed probe)", 1e-3, 2.0,
             lambda k, n: ProbeCache(k, n, order=1, decide="last")),
        Ours("cogrt-probe-forecast", "threshold (order 1, decided by the probe's forecast error)", 1e-3,
             2.0, lambda k, n: ProbeCache(k, n, order=1, decide="forecast")),
    )}


class OurRunner:
    """Our pipeline, with a cache made per request."""

    def __init__(self, model, device, dtype, steps: int, frames: int):
        from cogrt.engine.pipeline import load_pipeline
        self.pipe = load_pipeline(model, device=device, dtype=dtype)
        self.steps, self.frames = steps, frames

    def request(self, prompt, seed):
        from cogrt.engine.request import GenerationRequest
        return GenerationRequest(prompt=prompt, seed=seed, num_inference_steps=self.steps, num_frames=self.frames,
                                 height=SIZE, width=SIZE, guidance_scale=GUIDANCE)

    def fraction(self, make, prompt, seed) -> float:
        """Steps computed, from the denoise alone (no decode)."""
        pipe, req, cache = self.pipe, self.request(prompt, seed), make(self.steps)
        pipe.resolve(req)
        text = pipe.encode_text([req.negative_prompt, req.prompt])
        pipe.denoise(req, text, torch.Generator("cpu").manual_seed(seed), False, cache, None)
        return len(cache.computed) / self.steps

    def video(self, make, prompt, seed) -> dict:
        cache = make(self.steps) if make else None
        r = self.pipe.run(self.request(prompt, seed), cache=cache)
        from cogrt.engine.caches.probe import ProbeCache
        steps = len(r.steps_computed) / self.steps
        # the probe runs block 0 on every step
        blocks = steps + (1 - steps) / self.pipe.cfg.num_layers if isinstance(cache, ProbeCache) else steps
        return dict(frames=r.frames, steps_frac=steps, block_frac=blocks, denoise_s=r.timings["denoise"])


def _maker(ours: Ours, knob: float):
    return lambda steps: ours.make(knob, steps)


class PeerRunner:
    """diffusers' CogVideoXPipeline of the same model, with a peer's cache applied (bench/cache_peers.py)."""

    def __init__(self, model, device, dtype, steps: int, frames: int):
        from diffusers import CogVideoXPipeline
        self.pipe = CogVideoXPipeline.from_pretrained(model, torch_dtype=dtype).to(device)
        self.pipe.set_progress_bar_config(disable=True)
        self.device = torch.device(device)
        self.steps, self.frames = steps, frames

    def _call(self, prompt, seed, output_type):
        return self.pipe(prompt=prompt, negative_prompt="", num_frames=self.frames, height=SIZE, width=SIZE,
                         num_inference_steps=self.steps, guidance_scale=GUIDANCE, output_type=output_type,
                         generator=torch.Generator("cpu").manual_seed(seed)).frames

    def fraction(self, peer, knob, prompt, seed) -> float:
        """Steps computed; for the caches that skip parts of blocks (PAB, FasterCache), the block work done."""
        from .cache_peers import Meter
        peer.apply(self.pipe, knob, self.steps)
        try:
            with Meter(self.pipe) as m:
                self._call(prompt, seed, "latent")
        finally:
            peer.remove(self.pipe)
        return m.block_fraction if peer.name in BLOCK_MATCHED else m.steps_fraction

    def video(self, peer, knob, prompt, seed) -> dict:
        from .cache_peers import Meter
        if peer is not None:
            peer.apply(self.pipe, knob, self.steps)
        try:
            with Meter(self.pipe) as m:
                sync(self.device)
                t = time.perf_counter()
                latents = self._call(prompt, seed, "latent")
                sync(self.device)
                denoise = time.perf_counter() - t
        finally:
            if peer is not None:
                peer.remove(self.pipe)
        with torch.no_grad():
            video = self.pipe.decode_latents(latents)
        video = self.pipe.video_processor.postprocess_video(video=video, output_type="np")[0]  # (F, H, W, 3)
        frames = (video * 255).round().astype(np.uint8)
        return dict(frames=frames, steps_frac=m.steps_fraction, block_frac=m.block_fraction, denoise_s=denoise)


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def match(fraction_at, lo: float, hi: float, target: float, more_compute_when_lower: bool = True,
          iters: int = 8, log=print) -> tuple[float, float]:
    """The knob in [lo, hi] whose fraction of steps computed is nearest `target`, by bisection in log space.
    fraction_at(knob) -> mean fraction on the calibration prompts. -> (knob, its fraction)."""
    best, a, b = None, math.log(lo), math.log(hi)
    for _ in range(iters):
        k = math.exp((a + b) / 2)
        f = fraction_at(k)
        if best is None or abs(f - target) < abs(best[1] - target):
            best = (k, f)
        if abs(f - target) < 0.01:
            break
        # too much compute: move toward the knob's skipping end
        if (f > target) == more_compute_when_lower:
            a = math.log(k)
        else:
            b = math.log(k)
    log(f"  knob {best[0]:.4g} -> {best[1]:.0%} of steps (target {target:.0%})", flush=True)
    return best


def run(model=MODEL, n: int = 32, calib: int = 2, targets=TARGETS, names=None, device=None, dtype=None,
        steps: int = STEPS, frames: int = FRAMES, levels=(), log=print) -> dict:
    """`levels`: also run the probe cache at these of the model's calibrated quality levels (its step_cache.json),
    as `--cache LEVEL` would: the held-out check of a calibration."""
    from cogrt.train.adherence import score
    from cogrt.train.synthetic import caption, sample_scenes
    scenes = sample_scenes(n, 7, "heldout")
    prompts = [caption(s) for s in scenes]
    calib_prompts = [caption(s) for s in sample_scenes(calib, 11, "train")]
    ours = our_caches(model)
    peers = {}
    try:
        from .cache_peers import PEERS
        peers = dict(PEERS)
    except ImportError as e:
        log(f"peers skipped: {e}")
    names = list(ours) + list(peers) if names is None else names
    skipped = {}
    our = OurRunner(model, device, dtype, steps, frames)
    peer = PeerRunner(model, device, dtype, steps, frames) if any(nm in peers for nm in names) else None
    # a warm-up each, discarded: first-call costs
    our.video(None, prompts[0], 0)
    if peer is not None:
        peer.video(None, None, prompts[0], 0)

    ref_ours = [our.video(None, p, i) for i, p in enumerate(prompts)]
    ref_peer = [peer.video(None, None, p, i) for i, p in enumerate(prompts)] if peer is not None else None
    parity = float(np.mean([psnr(a["frames"], b["frames"]) for a, b in zip(ref_ours, ref_peer)])) if ref_peer else None
    rows = [summarize("exact (uncached)", None, None, ref_ours, ref_ours, scenes, score)]
    for name in names:
        log(f"{name}:", flush=True)
        for target in targets:
            try:
                if name in ours:
                    c = ours[name]
                    frac = lambda k: np.mean([our.fraction(_maker(c, k), p, 100 + j)  # noqa: E731
                                              for j, p in enumerate(calib_prompts)])
                    knob, _ = match(frac, c.lo, c.hi, target, log=log)
                    vids = [our.video(_maker(c, knob), p, i) for i, p in enumerate(prompts)]
                    ref = ref_ours
                else:
                    c = peers[name]
                    frac = lambda k: np.mean([peer.fraction(c, k, p, 100 + j)  # noqa: E731
                                              for j, p in enumerate(calib_prompts)])
                    knob, _ = match(frac, c.lo, c.hi, target, c.more_compute_when_lower, log=log)
                    vids = [peer.video(c, knob, p, i) for i, p in enumerate(prompts)]
                    ref = ref_peer
            except Exception as e:  # noqa: BLE001 (a peer that fails here is a row saying why, not a crash)
                skipped[name] = f"{type(e).__name__}: {e}"
                log(f"  skipped: {skipped[name]}", flush=True)
                break
            rows.append(summarize(name, target, knob, vids, ref, scenes, score))
            r = rows[-1]
            log(f"  {r['steps_frac']:.0%} of steps: {r['psnr']:.2f} dB, SSIM {r['ssim']:.3f}", flush=True)
    if levels:
        from cogrt.engine.caches import LEVELS_FILE, level_cache, read_levels
        lv = read_levels(Path(model) / LEVELS_FILE)
        for name in levels:
            th, kind, order = lv["thresholds"][name], lv["kinds"][name], lv["orders"][name]
            make = lambda n_steps, th=th, kind=kind, order=order: level_cache(kind, th, n_steps, order)  # noqa: E731
            vids = [our.video(make, p, i) for i, p in enumerate(prompts)]
            rows.append(summarize(f"cogrt-{kind}, level {name}", None, th, vids, ref_ours, scenes, score))
            r = rows[-1]
            log(f"level {name}: {r['steps_frac']:.0%} of steps: {r['psnr']:.2f} dB, SSIM {r['ssim']:.3f}", flush=True)
    return dict(rows=rows, skipped=skipped, reference_parity_db=parity, n=n, calib=calib, targets=list(targets),
                steps=steps, frames=frames)


def summarize(name, target, knob, vids, ref, scenes, score) -> dict:
    adh = score([(sc, v["frames"]) for sc, v in zip(scenes, vids)])
    return dict(cache=name, target=target, knob=knob,
                psnr=float(np.mean([psnr(a["frames"], b["frames"]) for a, b in zip(ref, vids)])),
                ssim=float(np.mean([ssim(a["frames"], b["frames"]) for a, b in zip(ref, vids)])),
                steps_frac=float(np.mean([v["steps_frac"] for v in vids])),
                block_frac=float(np.mean([v["block_frac"] for v in vids])),
                denoise_s=float(np.mean([v["denoise_s"] for v in vids])),
                color=adh["color"], shape=adh["shape"], direction=adh["direction"])


def markdown(res: dict) -> str:
    out = ["| cache | target | knob | steps computed | block work | PSNR dB | SSIM | colour | shape | direction "
           "| denoise s |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in res["rows"]:
        db = "inf" if math.isinf(r["psnr"]) else f"{r['psnr']:.2f}"
        tgt = "" if r["target"] is None else f"{r['target']:.0%}"
        knob = "" if r["knob"] is None else f"{r['knob']:.4g}"
        out.append(f"| {r['cache']} | {tgt} | {knob} | {r['steps_frac']:.0%} | {r['block_frac']:.0%} | {db} | "
                   f"{r['ssim']:.3f} | {r['color']:.0%} | {r['shape']:.0%} | {r['direction']:.0%} | "
                   f"{r['denoise_s']:.2f} |")
    for name, why in res["skipped"].items():
        out.append(f"\n{name}: skipped, {why}")
    if res["reference_parity_db"] is not None:
        out.append(f"\nreference parity (diffusers' uncached frames against ours): {res['reference_parity_db']:.1f} dB")
    return "\n".join(out)


def plot(res: dict, path) -> None:
    from matplotlib.figure import Figure
    fig = Figure(figsize=(7, 4.5))
    ax = fig.subplots()
    by = {}
    for r in res["rows"]:
        if r["target"] is not None:
            by.setdefault(r["cache"], []).append((r["steps_frac"], r["psnr"]))
    for i, (name, pts) in enumerate(sorted(by.items())):
        x, y = zip(*sorted(pts))
        ax.plot(x, y, "o-", color=f"C{i % 10}", label=name, lw=2.5 if name == "cogrt-probe" else 1)
    ax.set(xlabel="fraction of steps computed", ylabel="PSNR against the uncached run (dB)",
           title=f"cogrt-tiny: step caches at equal compute ({res['n']} prompts)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.savefig(path, dpi=120, bbox_inches="tight")


def main(argv=None):
    ap = argparse.ArgumentParser(prog="cogrt bench caches", description=__doc__.split("\n")[0])
    ap.add_argument("--model", default=str(MODEL))
    ap.add_argument("--n", type=int, default=32, help="held-out prompts")
    ap.add_argument("--calib", type=int, default=2, help="calibration prompts for the knob bisection")
    ap.add_argument("--targets", default=",".join(map(str, TARGETS)), help="fractions of steps computed")
    ap.add_argument("--caches", default=None, help="comma-separated (default: all; '' for none)")
    ap.add_argument("--levels", default="", help="also the model's calibrated levels, comma-separated "
                                                 "(safe,balanced,fast), each at its own threshold")
    ap.add_argument("--steps", type=int, default=STEPS)
    ap.add_argument("--frames", type=int, default=FRAMES)
    ap.add_argument("--json", default=None)
    ap.add_argument("--markdown", action="store_true")
    ap.add_argument("--plot", default=None, metavar="OUT.png")
    a = ap.parse_args(argv)
    cuda = torch.cuda.is_available()
    device = "cuda" if cuda else "cpu"
    if cuda:  # fp32 without TF32: the differences are the caches', not rounding's
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    t0 = time.time()
    res = run(a.model, a.n, a.calib, [float(t) for t in a.targets.split(",")],
              None if a.caches is None else [c for c in a.caches.split(",") if c], device=device, dtype=torch.float32, steps=a.steps,
              frames=a.frames, levels=[x for x in a.levels.split(",") if x])
    res.update(device=torch.cuda.get_device_name() if cuda else f"cpu, {torch.get_num_threads()} threads",
               torch=torch.__version__, commit=os.environ.get("COGRT_COMMIT", "?"), seconds=time.time() - t0)
    if a.markdown:
        print(markdown(res))
    print(f"{res['seconds']:.0f} s in all on {res['device']}")
    if a.json:
        clean = [{k: None if isinstance(v, float) and math.isinf(v) else v for k, v in r.items()} for r in res["rows"]]
        Path(a.json).write_text(json.dumps({**res, "rows": clean}, indent=2))
    if a.plot:
        plot(res, a.plot)


if __name__ == "__main__":
    main()
