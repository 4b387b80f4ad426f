"""Prompt adherence of videos of the synthetic world (`train.synthetic`): which colour, shape and motion
direction does a video show, and how often does that match the prompt?

The detector is plain numpy. It knows the vocabulary and the ideal shapes, nothing else of the renderer, so
it also reads imperfect videos (noise, blur, colour casts, faded colours, mp4 artefacts) such as a tiny
model generates:

1. background: per frame, the median of a thin ring of border pixels (the object is never most of it);
2. colour: the palette colour that most far-from-background pixels are nearest to, allowing the palette
   colour to be seen at 50-120% of its contrast against the background (a dark red is still red);
3. mask: pixels more than halfway from the background to the object's colour (a half-contrast cut keeps the
   area of a blurred shape), restricted per frame to the heaviest row/column run (the largest blob);
4. direction: a line fitted through the per-frame centroids; its dominant axis and sign;
5. shape: the median over frames of a few features of the blob's soft occupancy (fill of its extent, where
   the mass sits vertically, how wide the top and bottom rows are), nearest to those of the ideal shapes
   drawn at the same size in pixels and cut the same way.

`distortion` measures how far the object's outline is from the ideal shape the prompt names, aligned by
centroid and area (1 - IoU; 0 on the world's own renderings), and `guard_score` combines it with adherence
for the trainer's guard (train.loop).

    python -m cogrt.train.adherence DATA_DIR [--degrade]
"""
from __future__ import annotations

import argparse
import json
from collections import Counter
from dataclasses import dataclass, field
from functools import lru_cache

import numpy as np

from .synthetic import COLORS, DIRECTIONS, SHAPES, parse, shape_mask

PALETTE = np.array(list(COLORS.values()), np.float32)  # (K, 3)
PALETTE.flags.writeable = False
SCALES = (0.08, 0.05, 0.12, 0.12)  # how far apart in each shape feature counts as different
MIN_FOUND = 0.5  # fraction of frames the object must be seen in
MIN_MOVE = 0.05  # net displacement, as a fraction of the frame, below which no direction is claimed


@dataclass(frozen=True)
class Detection:
    """Fields are None when the video gives no evidence for them; confidences are in [0, 1]."""
    color: str | None = None
    shape: str | None = None
    direction: str | None = None
    color_conf: float = 0.0  # share of the object's pixels that vote for `color`
    shape_conf: float = 0.0  # 1 - (distance to the nearest prototype) / (distance to the second)
    direction_conf: float = 0.0  # share of the displacement along the dominant axis
    found: float = 0.0  # fraction of frames with an object
    features: dict = field(default_factory=dict)  # shape features, motion (dx, dy), area, rgb: for debugging
    # the soft occupancy (h', w') of the object in each frame where it is whole and of typical size: `distortion`
    objects: tuple = field(default=(), repr=False, compare=False)


def _blur(x: np.ndarray) -> np.ndarray:
    """Separable [1 2 1]/4 blur over the last two axes (H, W), edges replicated: noise std x 0.375 while
    keeping small shapes' tips (a 3x3 box would round them off). In place on a copy, for speed."""
    for ax in (-2, -1):
        lo, hi = [slice(None)] * x.ndim, [slice(None)] * x.ndim
        lo[ax], hi[ax] = slice(None, -1), slice(1, None)
        first, last = [slice(None)] * x.ndim, [slice(None)] * x.ndim
        first[ax], last[ax] = slice(0, 1), slice(-1, None)
        y = x * 2
        y[tuple(hi)] += x[tuple(lo)]
        y[tuple(lo)] += x[tuple(hi)]
        y[tuple(first)] += x[tuple(first)]
        y[tuple(last)] += x[tuple(last)]
        x = y
    return x / 16


def _open3(m: np.ndarray) -> np.ndarray:
    """3x3 morphological opening of bool (F, H, W): drops specks and one-pixel lines."""
    def pool(x, op):
        p = np.pad(x, ((0, 0), (1, 1), (1, 1)), constant_values=op is np.logical_and)
        r = op(op(p[:, :-2], p[:, 1:-1]), p[:, 2:])  # (F, H, W+2)
        return op(op(r[:, :, :-2], r[:, :, 1:-1]), r[:, :, 2:])
    return pool(pool(m, np.logical_and), np.logical_or)


def _main_run(counts: np.ndarray) -> tuple[int, int]:
    """[start, stop) of the run of consecutive nonzero entries with the largest sum."""
    nz = np.concatenate([[0], (counts > 0).astype(np.int8), [0]])
    starts, stops = np.flatnonzero(np.diff(nz) == 1), np.flatnonzero(np.diff(nz) == -1)
    csum = np.concatenate([[0], np.cumsum(counts)])
    k = int(np.argmax(csum[stops] - csum[starts]))
    return int(starts[k]), int(stops[k])


def _blob(mask: np.ndarray, core: np.ndarray) -> tuple[int, int, int, int]:
    """Bounding box (y0, y1, x0, x1) of the largest blob of one frame's mask (H, W): runs picked on the
    despeckled `core`, then the full mask inside them (2 px of slack keeps thin tips)."""
    c0, c1 = _main_run(core.sum(0))
    r0, r1 = _main_run(core[:, c0:c1].sum(1))
    c0, c1 = _main_run(core[r0:r1].sum(0))
    h, w = mask.shape
    y0, x0 = max(r0 - 2, 0), max(c0 - 2, 0)
    sub = mask[y0:min(r1 + 2, h), x0:min(c1 + 2, w)]
    rows, cols = np.flatnonzero(sub.any(1)), np.flatnonzero(sub.any(0))
    return y0 + rows[0], y0 + rows[-1] + 1, x0 + cols[0], x0 + cols[-1] + 1


def shape_features(a: np.ndarray) -> tuple[float, float, float, float, float]:
    """(fill, vertical centroid, top-quarter width, bottom-quarter width, width in px) of a soft occupancy
    (h, w) in [0, 1], relative to its extent: square (1, .5, 1, 1), circle (.79, .5, .59, .59), triangle
    (.5, .67, .13, .88); a star fills little and is narrow at the top and (between its legs) the bottom.

    Soft, because a hard cut makes an edge that lies at half coverage ragged (texture or noise pushes its
    pixels either way) and a square then looks round. The extent is the sum of row / column maxima, and a
    row's width is its sum over its maximum, so partly covered edge rows count as what they are."""
    rh, cw = a.max(1), a.max(0)  # (h,), (w,)
    ht, wd = max(rh.sum(), 1e-6), max(cw.sum(), 1e-6)
    rs = a.sum(1)  # (h,)
    area = max(rs.sum(), 1e-6)
    pos = (np.cumsum(rh) - rh / 2) / ht  # row centres in [0, 1] of the extent

    def width(sel):
        return float(rs[sel].sum() / rh[sel].sum() / wd) if rh[sel].sum() > 0 else 1.0
    return (float(area / (ht * wd)), float((pos * rs).sum() / area), width(pos < 0.25), width(pos > 0.75),
            float(wd))


def _soft(t: np.ndarray) -> np.ndarray:
    """Occupancy from the half-way coordinate t: clipped to [0, 1], and 0 below a quarter (texture, noise)."""
    return np.where(t >= 0.25, np.minimum(t, 1.0), 0.0).astype(np.float32)


def prototypes(width: float, ss: int = 4, shifts: int = 4) -> dict[str, tuple]:
    """Shape features of each ideal shape drawn `width` pixels wide, blurred and cut as `detect` does,
    averaged over sub-pixel shifts. Small shapes lose their tips and fill more of their box; this follows."""
    out = {}
    for shape in SHAPES:
        half = width / 2 / (0.951 if shape == "star" else 1.0)  # a star is 0.951 of its size wide
        n = int(np.ceil(2 * half)) + 3
        feats = []
        for k in range(shifts):
            ox, oy = (k + 0.5) / shifts, ((3 * k) % shifts + 0.5) / shifts
            g = (np.arange(n * ss) + 0.5) / ss - n / 2  # subsample centres, pixels from the middle
            inside = shape_mask(shape, ((g - ox) / half)[None, :], ((g - oy) / half)[:, None])
            feats.append(shape_features(_soft(_blur(inside.reshape(n, ss, n, ss).mean(axis=(1, 3)))))[:4])
        out[shape] = tuple(np.mean(feats, axis=0))
    return out


def nearest_color(px: np.ndarray, bg: np.ndarray, contrast=(0.5, 1.2)) -> np.ndarray:
    """Index into PALETTE of the colour nearest to each pixel px (N, 3) when palette colours may be seen
    at 50-120% of their contrast against the background bg (3,): a washed-out or dark red is still red,
    where plain RGB distance would call a faded yellow orange."""
    x, v = px - bg, PALETTE - bg  # (N, 3), (K, 3)
    scale = np.clip(x @ v.T / np.maximum((v * v).sum(1), 1.0), *contrast)  # (N, K)
    d2 = (x * x).sum(1, keepdims=True) - 2 * scale * (x @ v.T) + scale ** 2 * (v * v).sum(1)  # |x - s v|^2
    return np.argmin(d2, axis=1)


def _classify(feats, width: float) -> tuple[str, float]:
    d = {k: float(np.sqrt((((np.array(feats) - p) / SCALES) ** 2).sum())) for k, p in prototypes(width).items()}
    (best, d1), (_, d2) = sorted(d.items(), key=lambda kv: kv[1])[:2]
    return best, 1.0 - d1 / max(d2, 1e-9)


def detect(frames: np.ndarray) -> Detection:
    """frames: uint8 (F, H, W, 3). Returns Detection() (everything None) where no single coloured object is
    seen in at least half the frames, e.g. on pure noise; `direction` is None where the object moves less
    than MIN_MOVE of the frame, `shape` where it is never whole in the frame."""
    if frames.ndim != 4 or frames.shape[-1] != 3:
        raise ValueError(f"expected frames of shape (F, H, W, 3), got {frames.shape}")
    f, h, w, _ = frames.shape
    s = _blur(np.moveaxis(frames, -1, 0).astype(np.float32))  # (3, F, H, W), channel first: fast reductions
    r = max(1, min(h, w) // 32)
    ring = np.concatenate([s[:, :, :r].reshape(3, f, -1), s[:, :, -r:].reshape(3, f, -1),
                           s[..., :r].reshape(3, f, -1), s[..., -r:].reshape(3, f, -1)], axis=2)  # (3, F, N)
    bg = np.median(ring, axis=2)  # (3, F)
    spread = np.median(np.percentile(np.sqrt(((ring - bg[..., None]) ** 2).sum(0)), 90, axis=1))
    diff = s - bg[..., None, None]  # (3, F, H, W)
    dist2 = diff[0] ** 2 + diff[1] ** 2 + diff[2] ** 2  # (F, H, W)
    dist = np.sqrt(dist2)
    fg = dist > max(40.0, 2.5 * spread)
    min_px = max(6, int(0.001 * h * w))
    if fg.sum() < min_px * f * MIN_FOUND:
        return Detection()

    # colour: votes of the far half of the foreground (edges are blends with the background)
    px = s[:, fg & (dist >= np.median(dist[fg]))].T  # (N, 3)
    nearest = nearest_color(px, np.median(bg, axis=1))  # (N,)
    votes = np.bincount(nearest, minlength=len(PALETTE))
    k = int(np.argmax(votes))
    color = list(COLORS)[k]
    obj = np.median(px[nearest == k], axis=0)  # (3,) the object's actual colour

    # mask: more than halfway from the background towards the object, and not off towards another colour
    axis = (obj[:, None] - bg)[..., None, None]  # (3, F, 1, 1)
    length2 = np.maximum((axis ** 2).sum(0), 1.0)  # (F, 1, 1)
    t = (diff[0] * axis[0] + diff[1] * axis[1] + diff[2] * axis[2]) / length2  # (F, H, W)
    perp2 = dist2 - t * t * length2  # Pythagoras: the part of diff off the background-object axis
    near = perp2 < 0.25 * length2
    mask = (t > 0.5) & near & fg
    core = _open3(mask)

    cent, feats, areas, inside, windows = [], [], [], [], []
    for i in range(f):
        if core[i].sum() < min_px:
            continue
        y0, y1, x0, x1 = _blob(mask[i], core[i])
        inside.append(y0 > 0 and x0 > 0 and y1 < h and x1 < w)
        y0, x0 = max(y0 - 1, 0), max(x0 - 1, 0)  # one more pixel each way for partly covered edges
        win = (i, slice(y0, y1 + 1), slice(x0, x1 + 1))
        a = np.where(near[win], _soft(t[win]), 0.0)  # (h', w') occupancy
        total = a.sum()
        cent.append((i, x0 + (a.sum(0) * np.arange(a.shape[1])).sum() / total + 0.5,
                     y0 + (a.sum(1) * np.arange(a.shape[0])).sum() / total + 0.5))
        feats.append(shape_features(a))
        areas.append(total)
        windows.append(a)
    found = len(cent) / f
    if found < MIN_FOUND:
        return Detection(found=found)

    # direction: least-squares slope of the centroid track, as a net displacement in frame fractions
    ti, cx, cy = np.array(cent, np.float64).T
    if f > 1 and np.ptp(ti) > 0:
        dx, dy = np.polyfit(ti, cx, 1)[0] * (f - 1) / w, np.polyfit(ti, cy, 1)[0] * (f - 1) / h
    else:
        dx = dy = 0.0
    direction, dir_conf = None, 0.0
    if max(abs(dx), abs(dy)) >= MIN_MOVE:
        step = (int(np.sign(dx)), 0) if abs(dx) >= abs(dy) else (0, int(np.sign(dy)))
        direction = next(k for k, v in DIRECTIONS.items() if v == step)
        dir_conf = float(max(abs(dx), abs(dy)) / (abs(dx) + abs(dy)))

    # shape: frames where the object is whole and of typical size
    areas, inside = np.array(areas, np.float64), np.array(inside)
    good = inside & (np.abs(areas / np.median(areas) - 1) < 0.3)
    shape, shape_conf, fmed = None, 0.0, None
    if good.any():
        *fmed, width = (float(v) for v in np.median(np.array(feats)[good], axis=0))
        fmed = tuple(fmed)
        shape, shape_conf = _classify(fmed, width)
    return Detection(color, shape, direction, float(votes[k] / len(px)), shape_conf, dir_conf, found,
                     {"shape": fmed, "motion": (float(dx), float(dy)), "area": float(np.median(areas) / (h * w)),
                      "rgb": tuple(float(v) for v in obj)}, tuple(o for o, g in zip(windows, good) if g))


def score(pairs) -> dict:
    """pairs: [(Scene, uint8 frames (F, H, W, 3) or their Detection)] -> accuracies, per attribute and for
    all three at once, with counts; a None field counts as wrong."""
    rows = [(sc, fr if isinstance(fr, Detection) else detect(fr)) for sc, fr in pairs]
    n = max(len(rows), 1)
    hit = {a: [getattr(d, a) == getattr(sc, a) for sc, d in rows] for a in ("color", "shape", "direction")}
    out = {a: sum(v) / n for a, v in hit.items()}
    out["all"] = sum(all(x) for x in zip(*hit.values())) / n
    out["n"] = len(rows)
    out["not_found"] = sum(d.color is None for _, d in rows)
    for a in ("color", "shape"):
        per = {}
        for (sc, _), ok in zip(rows, hit[a]):
            per.setdefault(getattr(sc, a), []).append(ok)
        out[f"{a}_by_truth"] = {k: round(sum(v) / len(v), 3) for k, v in sorted(per.items())}
    out["shape_confusion"] = dict(Counter(f"{sc.shape}->{d.shape}" for sc, d in rows if sc.shape != d.shape))
    return out


# ----------------------------------------------------------------------------------------------------
# Distortion: how far the object's outline is from the ideal shape the synthetic world draws

@lru_cache(maxsize=None)
def _unit_shape(shape: str) -> tuple[float, float, float]:
    """(area, centroid x, centroid y) of an ideal shape in its own units (half its size; see shape_mask)."""
    g = (np.arange(2048) + 0.5) / 1024 - 1
    m = shape_mask(shape, g[None, :], g[:, None])
    return float(m.mean() * 4), float((m.sum(0) * g).sum() / m.sum()), float((m.sum(1) * g).sum() / m.sum())


def ideal_coverage(shape: str, half: float, cx: float, cy: float, h: int, w: int, ss: int = 8) -> np.ndarray:
    """float (h, w): the share of each pixel that the ideal `shape` covers, drawn `half` pixels in half-size with its
    centroid (not its box centre: a triangle's is low) at pixel coordinates (cx, cy); ss x ss samples a pixel.
    Only the shape's box is sampled."""
    _, ux, uy = _unit_shape(shape)
    out = np.zeros((h, w), np.float32)
    x0, x1 = max(int(cx - half * (1 + ux)) - 1, 0), min(int(np.ceil(cx + half * (1 - ux))) + 1, w)
    y0, y1 = max(int(cy - half * (1 + uy)) - 1, 0), min(int(np.ceil(cy + half * (1 - uy))) + 1, h)
    x = ((np.arange(x0 * ss, x1 * ss) + 0.5) / ss - cx) / half + ux  # sample centres, in the shape's units
    y = ((np.arange(y0 * ss, y1 * ss) + 0.5) / ss - cy) / half + uy
    inside = shape_mask(shape, x[None, :], y[:, None])
    out[y0:y1, x0:x1] = inside.reshape(y1 - y0, ss, x1 - x0, ss).mean(axis=(1, 3))
    return out


def window_distortion(a: np.ndarray, shape: str) -> float:
    """1 - IoU of one frame's object (soft occupancy `a`, cut at half as `detect` cuts its mask) against the ideal
    `shape` with the same centroid and area. The ideal is blurred and cut as `detect` sees a video, and only the
    pixels it covers wholly or not at all, and does not leave near the cut, are scored: the ones its outline
    crosses go either way under antialiasing. NaN where nothing is left to score. So it is 0 on the synthetic
    world's own renderings at any position and size (also after an mp4 round trip or `degrade`), while a 10%
    stretch of a star 27-39 pixels wide already shows (0.04-0.09; a circle drawn for a star: 0.2-0.3)."""
    # The blur spreads an edge of coverage c over three pixels; this ramp gives c back (exactly for a straight
    # edge), so the area and the centroid are those of the drawn shape, not of its blurred, cut image.
    cov = np.clip(2 * a - 0.5, 0, 1)
    if cov.sum() == 0:
        return float("nan")
    half = float(np.sqrt(cov.sum() / _unit_shape(shape)[0]))
    pad = int(np.ceil(2 * half)) + 2  # room for the ideal where the object is more compact than it
    obs, cov = np.pad(a >= 0.5, pad), np.pad(cov, pad)
    ys, xs = np.indices(cov.shape) + 0.5
    cx, cy = float((cov * xs).sum() / cov.sum()), float((cov * ys).sum() / cov.sum())
    cover = ideal_coverage(shape, half, cx, cy, *cov.shape)
    seen = _blur(cover)  # the ideal as `detect` sees it: blurred, then cut at half
    ideal = seen >= 0.5
    scored = ((cover == 0) | (cover == 1)) & (np.abs(seen - 0.5) > 0.125)
    union = ((obs | ideal) & scored).sum()
    return float(1 - (obs & ideal & scored).sum() / union) if union else float("nan")


def distortion(video: np.ndarray | Detection, shape: str) -> float:
    """Geometric distortion of the object in uint8 frames (F, H, W, 3) (or their Detection) against the ideal
    `shape` (the prompt's): the median over the frames where the object is whole of `window_distortion`, in
    [0, 1]. 0 on the synthetic world's own renderings; 1 where no whole object is seen (nothing of the shape
    is kept)."""
    det = video if isinstance(video, Detection) else detect(video)
    vals = [v for v in (window_distortion(a, shape) for a in det.objects) if np.isfinite(v)]
    return float(np.median(vals)) if vals else 1.0


def guard_score(pairs) -> dict:
    """pairs: [(a caption of the synthetic world, uint8 frames (F, H, W, 3))] -> adherence (the share of colours,
    shapes and directions right, over all the videos), distortion (the mean `distortion` against each caption's
    shape) and score = adherence - distortion: what the trainer's guard logs and keeps the best model by."""
    hits, dists = [], []
    for text, frames in pairs:
        color, shape, direction, _ = parse(text)
        d = detect(frames)
        hits += [d.color == color, d.shape == shape, d.direction == direction]
        dists.append(distortion(d, shape))
    adherence, dist = float(np.mean(hits)), float(np.mean(dists))
    return dict(adherence=adherence, distortion=dist, score=adherence - dist, n=len(dists))


def degrade(frames: np.ndarray, seed: int = 0, noise: float = 15.0, jitter: float = 15.0,
            blur: bool = True) -> np.ndarray:
    """A stand-in for an imperfect generator: slight blur, a per-video colour cast of up to +-jitter per
    channel, and Gaussian noise of std `noise` (uint8 units)."""
    rng = np.random.default_rng(seed)
    x = frames.astype(np.float32)
    if blur:
        x = np.moveaxis(_blur(np.moveaxis(x, -1, 0)), 0, -1)
    x += rng.uniform(-jitter, jitter, 3).astype(np.float32)
    x += noise * rng.standard_normal(x.shape, dtype=np.float32)
    return np.clip(x + 0.5, 0, 255).astype(np.uint8)


def main(argv=None):
    from cogrt.engine.video import read_mp4
    from .synthetic import read_metadata
    p = argparse.ArgumentParser(description="Prompt adherence (colour, shape, direction) of a dataset dir "
                                            "with metadata.jsonl, e.g. one written by train.synthetic.")
    p.add_argument("data_dir")
    p.add_argument("--degrade", action="store_true", help="blur + colour cast + noise 15 first (a robustness check)")
    a = p.parse_args(argv)
    pairs = [(sc, read_mp4(path)) for sc, path in read_metadata(a.data_dir)]
    if a.degrade:
        pairs = [(sc, degrade(fr, seed=i)) for i, (sc, fr) in enumerate(pairs)]
    res = score(pairs)
    print(json.dumps(res, indent=1))
    print(f"n={res['n']}  colour {res['color']:.1%}  direction {res['direction']:.1%}  shape {res['shape']:.1%}  "
          f"all {res['all']:.1%}")


if __name__ == "__main__":
    main()
