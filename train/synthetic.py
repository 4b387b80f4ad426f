"""A synthetic world of captioned videos: one coloured shape moving in a straight line over a dark background.

It is the training data of the bundled tiny model, and its ground truth is what `train.adherence` scores
generated videos against. Everything is deterministic given a seed. The vocabulary is small on purpose,
so that a tiny model can learn it and a simple detector can check it:

    a red circle moving right on a black background
    an orange triangle moving up on a striped background

`purple` and `star` are never used by the base training split ("train"): they exist for a demo LoRA
("concept" split). 50 (colour, shape, direction, background) combinations of the base vocabulary are
reserved for evaluation ("heldout") and never occur in "train", so adherence is measured on prompts the
model has not seen, though it has seen every word.

    python -m cogrt.train.synthetic OUT --n 2000 --split train --frames 49 --height 128 --width 128
"""
from __future__ import annotations

import argparse
import hashlib
import itertools
import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

COLORS = {
    "red": (220, 40, 40), "green": (40, 180, 60), "blue": (50, 80, 230), "yellow": (240, 220, 40),
    "white": (245, 245, 245), "orange": (245, 140, 30), "cyan": (40, 210, 220),
    "purple": (150, 60, 200),  # held out of base training
}
SHAPES = ("circle", "square", "triangle", "star")  # star: held out of base training
HELD_OUT_COLORS = ("purple",)
HELD_OUT_SHAPES = ("star",)
BASE_COLORS = tuple(c for c in COLORS if c not in HELD_OUT_COLORS)
BASE_SHAPES = tuple(s for s in SHAPES if s not in HELD_OUT_SHAPES)
DIRECTIONS = {"left": (-1, 0), "right": (1, 0), "up": (0, -1), "down": (0, 1)}  # (dx, dy), y points down
# name -> (colour a, colour b, pattern). All dark or mid-dark, so that every object colour stands out.
BACKGROUNDS = {
    "black": ((12, 12, 12), (12, 12, 12), None),
    "gray": ((80, 80, 80), (80, 80, 80), None),
    "striped": ((24, 24, 40), (50, 50, 72), "stripes"),
    "checkered": ((26, 40, 30), (52, 66, 56), "checks"),
}
N_HELDOUT = 50

# Polygons in units of half the object size, centred on the object, y down; each fits in [-1, 1]^2.
_SQUARE = ((-1.0, -1.0), (1.0, -1.0), (1.0, 1.0), (-1.0, 1.0))
_TRIANGLE = ((0.0, -1.0), (1.0, 1.0), (-1.0, 1.0))
STAR_INNER = 0.45  # inner / outer radius: fat enough to survive 64x64 frames, thin enough to tell apart
_STAR = tuple((float(r * np.sin(a)), float(-r * np.cos(a)))
              for k in range(10) for r, a in [((1.0, STAR_INNER)[k % 2], k * np.pi / 5)])


@dataclass(frozen=True)
class Scene:
    color: str
    shape: str
    direction: str
    background: str
    size: float  # object extent, as a fraction of min(H, W)
    start: tuple[float, float]  # object centre at the first frame, (x, y) as fractions of (W, H)
    speed: float  # distance travelled over the whole video, as a fraction of the frame along the motion

    @property
    def combo(self) -> tuple[str, str, str, str]:
        return (self.color, self.shape, self.direction, self.background)


def caption(scene: Scene) -> str:
    art = "an" if scene.color[0] in "aeiou" else "a"
    return f"{art} {scene.color} {scene.shape} moving {scene.direction} on a {scene.background} background"


def parse(text: str) -> tuple[str, str, str, str]:
    """The (color, shape, direction, background) of a caption written by `caption`; ValueError otherwise."""
    w = text.strip().split()
    if len(w) != 9 or w[0] not in ("a", "an") or w[3] != "moving" or w[5:7] != ["on", "a"] or w[8] != "background":
        raise ValueError(f"not a synthetic caption: {text!r}")
    combo = (w[1], w[2], w[4], w[7])
    for word, vocab in zip(combo, (COLORS, SHAPES, DIRECTIONS, BACKGROUNDS)):
        if word not in vocab:
            raise ValueError(f"unknown word {word!r} in {text!r}")
    return combo


def _in_polygon(u: np.ndarray, v: np.ndarray, pts) -> np.ndarray:
    """Even-odd rule; u (1, w) and v (h, 1) broadcast to the (h, w) answer."""
    inside = np.zeros(np.broadcast_shapes(u.shape, v.shape), bool)
    for (x1, y1), (x2, y2) in zip(pts, pts[-1:] + pts[:-1]):
        if y1 == y2:
            continue
        inside ^= ((y1 > v) != (y2 > v)) & (u < (x2 - x1) * (v - y1) / (y2 - y1) + x1)
    return inside


def shape_mask(shape: str, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    if shape == "circle":
        return u * u + v * v <= 1.0
    return _in_polygon(u, v, {"square": _SQUARE, "triangle": _TRIANGLE, "star": _STAR}[shape])


def background(name: str, height: int, width: int) -> np.ndarray:
    """uint8 (H, W, 3). Textures have a period of min(H, W) / 8, so they look the same at every size."""
    a, b, pattern = BACKGROUNDS[name]
    y, x = np.mgrid[:height, :width]
    period = max(4.0, min(height, width) / 8)
    if pattern == "stripes":  # diagonal
        sel = ((x + y) / period) % 1.0 < 0.5
    elif pattern == "checks":
        sel = ((x // (period / 2) + y // (period / 2)) % 2).astype(bool)
    else:
        sel = np.zeros((height, width), bool)
    return np.where(sel[..., None], np.array(b, np.uint8), np.array(a, np.uint8))


def position(scene: Scene, t: float) -> tuple[float, float]:
    """Object centre at time t in [0, 1], as fractions of (W, H)."""
    dx, dy = DIRECTIONS[scene.direction]
    return scene.start[0] + dx * scene.speed * t, scene.start[1] + dy * scene.speed * t


def render(scene: Scene, frames: int, height: int, width: int, ss: int = 2) -> np.ndarray:
    """uint8 (F, H, W, 3): the object moves linearly by `speed` from `start`, antialiased by ss x ss supersampling.

    Only the window around the object is rasterised, so a 49x128x128 video takes a few milliseconds.
    """
    out = np.repeat(background(scene.background, height, width)[None], frames, axis=0)  # (F, H, W, 3)
    half = scene.size * min(height, width) / 2  # pixels
    col = np.array(COLORS[scene.color], np.float32)
    for i in range(frames):
        fx, fy = position(scene, i / (frames - 1) if frames > 1 else 0.0)
        cx, cy = fx * width, fy * height
        x0, x1 = max(int(cx - half) - 1, 0), min(int(np.ceil(cx + half)) + 1, width)
        y0, y1 = max(int(cy - half) - 1, 0), min(int(np.ceil(cy + half)) + 1, height)
        if x1 <= x0 or y1 <= y0:
            continue
        u = ((np.arange(x0 * ss, x1 * ss) + 0.5) / ss - cx) / half  # subsample centres, object units
        v = ((np.arange(y0 * ss, y1 * ss) + 0.5) / ss - cy) / half
        inside = shape_mask(scene.shape, u[None, :], v[:, None])  # (h*ss, w*ss)
        alpha = inside.reshape(y1 - y0, ss, x1 - x0, ss).mean(axis=(1, 3), dtype=np.float32)  # (h, w)
        win = out[i, y0:y1, x0:x1].astype(np.float32)
        out[i, y0:y1, x0:x1] = (win + alpha[..., None] * (col - win) + 0.5).astype(np.uint8)
    return out


def _digest(combo) -> str:
    """A stable hash (unlike hash(), which is salted per process)."""
    return hashlib.sha1("|".join(combo).encode()).hexdigest()


def combos(split: str) -> list[tuple[str, str, str, str]]:
    """The (color, shape, direction, background) combinations a split draws from, in a fixed order."""
    if split == "concept":
        return [c for c in itertools.product(COLORS, SHAPES, DIRECTIONS, BACKGROUNDS)
                if c[0] in HELD_OUT_COLORS or c[1] in HELD_OUT_SHAPES]
    base = sorted(itertools.product(BASE_COLORS, BASE_SHAPES, DIRECTIONS, BACKGROUNDS), key=_digest)
    if split == "heldout":
        return base[:N_HELDOUT]
    if split == "train":
        return base[N_HELDOUT:]
    raise ValueError(f"unknown split {split!r}: expected train, heldout or concept")


def sample_scenes(n: int, seed: int, split: str = "train", size=(0.22, 0.32), speed=(0.35, 0.5),
                  margin: float = 0.02) -> list[Scene]:
    """n scenes, the same for the same arguments. Combinations are drawn in a shuffled cycle, so every
    combination of the split appears once before any appears twice (n=50 on "heldout" gives each one once).

    The start is chosen so that the whole object, plus `margin`, stays inside the frame all video long, at
    any aspect ratio: the size is relative to min(H, W), so it is at most `size` of either side.
    """
    rng = np.random.default_rng(seed)
    pool = combos(split)
    order = np.concatenate([rng.permutation(len(pool)) for _ in range(-(-n // len(pool)))])[:n]
    scenes = []
    for k in order:
        color, shape, direction, bg = pool[k]
        s, sp = float(rng.uniform(*size)), float(rng.uniform(*speed))
        m = s / 2 + margin
        dx, dy = DIRECTIONS[direction]
        lo = [m + sp * (d < 0) for d in (dx, dy)]  # a centre that moves by sp*d stays in [m, 1 - m]
        hi = [1 - m - sp * (d > 0) for d in (dx, dy)]
        start = tuple(round(float(rng.uniform(a, b)), 4) for a, b in zip(lo, hi))
        scenes.append(Scene(color, shape, direction, bg, round(s, 4), start, round(sp, 4)))
    return scenes


def write_dataset(out_dir: str | os.PathLike, n: int, seed: int, frames: int = 49, height: int = 128,
                  width: int = 128, split: str = "train", fps: int = 8) -> Path:
    """The diffusers training-example layout: videos/NNNNNN.mp4, prompts.txt and videos.txt (one line per
    video, same order), plus metadata.jsonl with each video's scene, the ground truth for evaluation."""
    from cogrt.engine.video import write_mp4
    out = Path(out_dir)
    (out / "videos").mkdir(parents=True, exist_ok=True)
    prompts, paths, meta = [], [], []
    for i, scene in enumerate(sample_scenes(n, seed, split)):
        rel = f"videos/{i:06d}.mp4"
        write_mp4(render(scene, frames, height, width), out / rel, fps=fps)
        prompts.append(caption(scene))
        paths.append(rel)
        meta.append(json.dumps({"video": rel, "caption": prompts[-1], **asdict(scene), "split": split,
                                "frames": frames, "height": height, "width": width, "fps": fps}))
    for name, lines in (("prompts.txt", prompts), ("videos.txt", paths), ("metadata.jsonl", meta)):
        (out / name).write_text("".join(line + "\n" for line in lines))
    return out


def read_metadata(data_dir: str | os.PathLike) -> list[tuple[Scene, Path]]:
    """(scene, video path) per line of a dataset's metadata.jsonl."""
    d = Path(data_dir)
    rows = []
    for line in (d / "metadata.jsonl").read_text().splitlines():
        if line.strip():
            r = json.loads(line)
            scene = Scene(r["color"], r["shape"], r["direction"], r["background"], r["size"],
                          tuple(r["start"]), r["speed"])
            rows.append((scene, d / r["video"]))
    return rows


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("out")
    p.add_argument("--n", type=int, default=1000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--split", default="train", choices=("train", "heldout", "concept"))
    p.add_argument("--frames", type=int, default=49)
    p.add_argument("--height", type=int, default=128)
    p.add_argument("--width", type=int, default=128)
    a = p.parse_args(argv)
    print(write_dataset(a.out, a.n, a.seed, a.frames, a.height, a.width, a.split))


if __name__ == "__main__":
    main()
