"""The synthetic world: deterministic, captions that say what the video shows, and splits that keep the
evaluation prompts and the held-out concepts out of base training."""
from __future__ import annotations

import itertools
import time

import numpy as np
import pytest

from cogrt.train.synthetic import (BASE_COLORS, BASE_SHAPES, BACKGROUNDS, COLORS, DIRECTIONS, N_HELDOUT, Scene,
                             background, caption, combos, parse, read_metadata, render, sample_scenes,
                             write_dataset)

SPLITS = ("train", "heldout", "concept")


def mixed(n=8, seed=0):
    return [s for split in SPLITS for s in sample_scenes(n, seed, split)]


def test_deterministic():
    for split in SPLITS:
        a, b = sample_scenes(30, 5, split), sample_scenes(30, 5, split)
        assert a == b and [caption(s) for s in a] == [caption(s) for s in b]
        assert sample_scenes(30, 6, split) != a
    s = sample_scenes(1, 5)[0]
    assert np.array_equal(render(s, 9, 64, 64), render(s, 9, 64, 64))


@pytest.mark.parametrize("shape", [(9, 64, 64), (5, 48, 80), (1, 32, 32)])
def test_render_shape_dtype(shape):
    v = render(sample_scenes(1, 0, "concept")[0], *shape)
    assert v.dtype == np.uint8 and v.shape == (*shape, 3)


def object_pixels(scene: Scene, video: np.ndarray) -> np.ndarray:
    """bool (F, H, W): pixels of (nearly) the object's own colour."""
    return (np.abs(video.astype(int) - COLORS[scene.color]) < 30).all(-1)


@pytest.mark.parametrize("f,h,w", [(17, 64, 64), (9, 48, 80), (9, 80, 48)])
def test_object_inside_and_moving(f, h, w):
    for s in mixed():
        v = render(s, f, h, w)
        bg = background(s.background, h, w)
        touched = (v != bg).any(-1)  # (F, H, W) every pixel the object changes
        assert not touched[:, 0].any() and not touched[:, -1].any(), caption(s)
        assert not touched[:, :, 0].any() and not touched[:, :, -1].any(), caption(s)
        area = touched.sum((1, 2))
        assert area.min() > 0.85 * area.max(), caption(s)  # never clipped
        m = object_pixels(s, v)
        ys, xs = [np.array([np.nonzero(fr)[k].mean() for fr in m]) for k in (0, 1)]
        dx, dy = DIRECTIONS[s.direction]
        along = (xs / w) * dx + (ys / h) * dy  # progress along the stated direction, frame fractions
        across = (xs / w) * dy + (ys / h) * dx
        assert np.all(np.diff(along) > 0), caption(s)
        assert abs(along[-1] - along[0] - s.speed) < 0.03, caption(s)
        assert np.ptp(across) < 0.01, caption(s)


def test_captions_parse_back():
    for s in mixed(20):
        text = caption(s)
        assert parse(text) == s.combo
        assert text.startswith("an " if s.color == "orange" else "a ")
    assert caption(Scene("red", "circle", "right", "black", 0.3, (0.3, 0.5), 0.4)) == \
        "a red circle moving right on a black background"
    for bad in ("a red circle", "a pink circle moving right on a black background", ""):
        with pytest.raises(ValueError):
            parse(bad)


def test_splits():
    heldout, train = set(combos("heldout")), set(combos("train"))
    assert len(heldout) == N_HELDOUT and not heldout & train
    assert heldout | train == set(itertools.product(BASE_COLORS, BASE_SHAPES, DIRECTIONS, BACKGROUNDS))
    drawn = sample_scenes(2000, 1, "train")
    assert not {s.combo for s in drawn} & heldout
    assert all(s.color != "purple" and s.shape != "star" for s in drawn)
    assert {s.color for s in drawn} == set(BASE_COLORS) and {s.shape for s in drawn} == set(BASE_SHAPES)
    ev = sample_scenes(N_HELDOUT, 2, "heldout")
    assert len({caption(s) for s in ev}) == N_HELDOUT and {s.combo for s in ev} == heldout
    concept = sample_scenes(300, 3, "concept")
    assert all(s.color == "purple" or s.shape == "star" for s in concept)
    assert {s.color for s in concept} >= {"purple"} and {s.shape for s in concept} >= {"star"}
    for s in drawn[:200] + concept[:200]:
        assert 0.22 <= s.size <= 0.32 and 0.35 <= s.speed <= 0.5


def test_render_fast():
    s = sample_scenes(1, 0, "concept")[0]
    render(s, 49, 128, 128)
    t = time.perf_counter()
    for _ in range(3):
        render(s, 49, 128, 128)
    assert (time.perf_counter() - t) / 3 < 0.5


def test_write_dataset(tmp_path):
    from cogrt.engine.video import read_mp4
    out = write_dataset(tmp_path / "d", 4, seed=0, frames=9, height=64, width=64, split="train")
    prompts = (out / "prompts.txt").read_text().splitlines()
    videos = (out / "videos.txt").read_text().splitlines()
    assert len(prompts) == len(videos) == 4
    assert prompts == [caption(s) for s in sample_scenes(4, 0, "train")]
    rows = read_metadata(out)
    assert [caption(s) for s, _ in rows] == prompts
    for (scene, path), rel in zip(rows, videos):
        assert path == out / rel and rel.startswith("videos/") and rel.endswith(".mp4")
        v = read_mp4(path)
        assert v.shape == (9, 64, 64, 3) and v.dtype == np.uint8
        assert np.abs(v.astype(int) - render(scene, 9, 64, 64)).mean() < 4  # what was rendered, encoded
