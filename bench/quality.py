"""Speed against quality on the bundled tiny model (models/cogrt-tiny): TeaCache at a sweep of thresholds and
each engine mode, against `exact` with the same prompt and seed.

Per row: PSNR (dB) and SSIM of the decoded uint8 frames against exact's (per frame, then the mean over frames
and prompts; PSNR is inf where a video is identical to exact's: null in the JSON), prompt adherence on
held-out prompts (train.adherence.score, with the prompts and seeds of train/tiny.py's stage_eval), the
fraction of denoising steps whose blocks ran, and the denoise seconds per video with the speed-up over exact
measured in the same run. TeaCache uses the model's own fit (`cogrt calibrate-cache`), passed explicitly.

    OMP_NUM_THREADS=1 python -m cogrt.bench.quality --n 8 --steps 50 --markdown --json quality.json --plot quality.png
    python -m cogrt.bench.quality --modes exact,fp8,fast,int8-dynamic,int8-weight-only --markdown      # CUDA default

On a CPU shared with other work, one thread is several times faster than two fighting for it (measured: 10
steps in 3.7 s against 15.8 s); the rows run interleaved, prompt by prompt, so that a change in the load
hits them all alike.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import time
from pathlib import Path

import numpy as np
import torch

from cogrt.engine.video import psnr  # noqa: F401 (bench.caches and the tests take it from here too)

MODEL = Path(__file__).resolve().parent.parent / "models" / "cogrt-tiny"
THRESHOLDS = (0.05, 0.1, 0.15, 0.2, 0.3)  # 28, 16, 12, 10, 7 of 50 steps with the tiny model's fit
GPU_MODES = ("exact", "fp8", "fast", "int8-dynamic", "int8-weight-only")
TARGET_DB = 30.0  # the quality bar


def ssim(ref: np.ndarray, x: np.ndarray) -> float:
    """Mean over frames of the SSIM of uint8 videos (F, H, W, 3), scikit-image's, on RGB."""
    from skimage.metrics import structural_similarity
    return float(np.mean([structural_similarity(a, b, channel_axis=-1, data_range=255) for a, b in zip(ref, x)]))


def summarize(name: str, results: list, ref: list, scenes: list, steps: int) -> dict:
    from cogrt.train.adherence import score
    adh = score([(sc, r.frames) for sc, r in zip(scenes, results)])
    return dict(name=name, psnr=float(np.mean([psnr(a.frames, b.frames) for a, b in zip(ref, results)])),
                ssim=float(np.mean([ssim(a.frames, b.frames) for a, b in zip(ref, results)])),
                steps_frac=float(np.mean([len(r.steps_computed) / steps for r in results])),
                denoise_s=float(np.mean([r.timings["denoise"] for r in results])),
                color=adh["color"], shape=adh["shape"], direction=adh["direction"])


def sweep(model=MODEL, n: int = 8, steps: int = 50, thresholds=THRESHOLDS, modes=("exact",), device=None,
          dtype=None, num_frames: int = 49, guidance: float = 6.0, coefficients=None, log=print) -> list[dict]:
    """Rows of summarize(): exact first, then TeaCache on exact at each threshold, then each other mode (`fast`
    runs with its own TeaCache threshold and the coefficients file in the model folder). Prompt i gets seed i."""
    from cogrt.engine.pipeline import load_pipeline
    from cogrt.train.synthetic import caption, sample_scenes
    scenes = sample_scenes(n, 7, "heldout")
    prompts = [caption(sc) for sc in scenes]
    coefficients = str(coefficients or Path(model) / "teacache_coefficients.json")
    kw = dict(num_frames=num_frames, guidance_scale=guidance)

    def loaded(**mode):
        pipe = load_pipeline(model, device=device, dtype=dtype, **mode)
        pipe.generate(prompts[0], num_inference_steps=2, seed=0, **kw)  # discarded: first-call costs, compiling
        return pipe

    exact = loaded()
    runs = [("exact", exact, {})]
    runs += [(f"teacache {th:g}", exact, dict(teacache=th, teacache_coefficients=coefficients)) for th in thresholds]
    # exact is the reference row; the other modes bake their transforms into the weights: a pipeline each
    runs += [(f"mode {m}", loaded(mode=m), {}) for m in modes if m != "exact"]
    out = {name: [] for name, _, _ in runs}
    for i, prompt in enumerate(prompts):
        # every row for one prompt before the next: a change in the machine's load hits all rows alike
        for name, pipe, extra in runs:
            out[name].append(pipe.generate(prompt, num_inference_steps=steps, seed=i, **kw, **extra))
        log(f"prompt {i + 1}/{n}, denoise s: " + ", ".join(f"{k} {v[-1].timings['denoise']:.1f}"
                                                         for k, v in out.items()), flush=True)
    rows = [summarize(name, res, out["exact"], scenes, steps) for name, res in out.items()]
    for r in rows:
        r["speedup"] = rows[0]["denoise_s"] / r["denoise_s"]
    return rows


def markdown(rows: list[dict]) -> str:
    out = ["| row | steps computed | denoise s/video | speed-up | PSNR dB | SSIM | colour | shape | direction |",
           "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        db = "inf (reference)" if math.isinf(r["psnr"]) else f"{r['psnr']:.1f}"
        out.append(f"| {r['name']} | {r['steps_frac']:.0%} | {r['denoise_s']:.2f} | {r['speedup']:.2f}x | {db} | "
                   f"{r['ssim']:.3f} | {r['color']:.0%} | {r['shape']:.0%} | {r['direction']:.0%} |")
    return "\n".join(out)


def plot(rows: list[dict], path, target: float = TARGET_DB) -> None:
    """PSNR against speed-up, one labelled point per row; the reference (inf dB) is drawn on the top edge."""
    from matplotlib.figure import Figure  # no pyplot: the Agg canvas, and no global figure state
    finite = [r["psnr"] for r in rows if math.isfinite(r["psnr"])] or [target]
    lo, top = min(finite + [target]) - 3, max(finite + [target]) + 4
    fig = Figure(figsize=(7, 4.5))
    ax = fig.subplots()
    for r in rows:
        inf = math.isinf(r["psnr"])
        y = top if inf else r["psnr"]
        ax.plot(r["speedup"], y, "^" if inf else "o", color="C1" if inf else "C0", clip_on=False)
        label = f"{r['name']} ({'the reference, ' if inf else ''}{r['steps_frac']:.0%} of steps)"
        ax.annotate(label, (r["speedup"], y), textcoords="offset points", xytext=(6, -10 if inf else 4), fontsize=8)
    ax.axhline(target, ls="--", color="gray", lw=1)
    ax.text(ax.get_xlim()[0], target, f" {target:g} dB target", va="bottom", fontsize=8, color="gray")
    ax.set(xlabel="denoise speed-up over exact (same run)", ylabel="PSNR against exact (dB)", ylim=(lo, top),
           title="cogrt-tiny: speed against quality")
    ax.margins(x=0.12)
    ax.grid(alpha=0.3)
    fig.savefig(path, dpi=120, bbox_inches="tight")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default=str(MODEL))
    ap.add_argument("--n", type=int, default=32, help="held-out prompts (8 leave ~1.3 dB of standard error in PSNR)")
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--frames", type=int, default=49, help="the tiny model's length by default")
    ap.add_argument("--guidance", type=float, default=6.0)
    ap.add_argument("--thresholds", default=",".join(map(str, THRESHOLDS)), help="TeaCache thresholds ('' for none)")
    ap.add_argument("--modes", default=None, help="engine modes, comma-separated (default: exact on the CPU, "
                                                  f"{','.join(GPU_MODES)} on CUDA)")
    ap.add_argument("--coefficients", default=None, help="default: MODEL/teacache_coefficients.json")
    ap.add_argument("--json", default=None)
    ap.add_argument("--markdown", action="store_true")
    ap.add_argument("--plot", default=None, metavar="OUT.png")
    a = ap.parse_args(argv)

    cuda = torch.cuda.is_available()
    device, dtype = ("cuda", torch.bfloat16) if cuda else ("cpu", torch.float32)
    modes = (a.modes or ",".join(GPU_MODES if cuda else ("exact",))).split(",")
    thresholds = [float(t) for t in a.thresholds.split(",") if t]
    t0 = time.time()
    rows = sweep(a.model, a.n, a.steps, thresholds, modes, device=device, dtype=dtype, num_frames=a.frames,
                 guidance=a.guidance, coefficients=a.coefficients)
    meta = dict(device=torch.cuda.get_device_name() if cuda else f"cpu, {torch.get_num_threads()} threads",
                dtype=str(dtype), torch=torch.__version__, commit=os.environ.get("COGRT_COMMIT", "?"),
                model=str(a.model), n=a.n, steps=a.steps, frames=a.frames, guidance=a.guidance,
                seconds=time.time() - t0, rows=rows)
    if a.markdown:
        print(markdown(rows))
    print(f"{meta['seconds']:.0f} s in all on {meta['device']}")
    if a.json:
        # strict JSON: the reference's inf PSNR becomes null
        clean = [{k: None if isinstance(v, float) and math.isinf(v) else v for k, v in r.items()} for r in rows]
        Path(a.json).write_text(json.dumps({**meta, "rows": clean}, indent=2))
    if a.plot:
        plot(rows, a.plot)


if __name__ == "__main__":
    main()
