"""The adherence detector reads colour, shape and direction off ground-truth videos, clean, degraded as a
tiny generator's would be, and after an mp4 round trip; and claims nothing on noise."""
from __future__ import annotations

import json

import numpy as np
import pytest

from cogrt.train.adherence import Detection, degrade, detect, main, score
from cogrt.engine.video import read_mp4, write_mp4
from cogrt.train.synthetic import Scene, render, sample_scenes, write_dataset

SIZES = [(17, 64, 64), (49, 128, 128)]


@pytest.fixture(scope="module")
def scenes():
    """60 scenes: 20 each of train, heldout and concept (purple, star)."""
    return [s for k, split in enumerate(("train", "heldout", "concept")) for s in sample_scenes(20, 100 + k, split)]


@pytest.fixture(scope="module")
def videos(scenes):
    return {size: [render(s, *size) for s in scenes] for size in SIZES}


@pytest.fixture(scope="module")
def clean(videos):
    return {size: [detect(v) for v in vs] for size, vs in videos.items()}


def acc(res):
    return {k: round(res[k], 3) for k in ("color", "shape", "direction")}


@pytest.mark.parametrize("size", SIZES)
def test_clean(scenes, clean, size):
    res = score(list(zip(scenes, clean[size])))
    print(size, "clean", acc(res), res["shape_confusion"])
    assert res["color"] >= 0.98 and res["direction"] >= 0.98 and res["shape"] >= 0.9, res


@pytest.mark.parametrize("size", SIZES)
def test_degraded(scenes, videos, size):
    """Slight blur, a colour cast of up to +-15 per channel and Gaussian noise of std 15."""
    res = score([(s, degrade(v, seed=i, noise=15, jitter=15)) for i, (s, v) in enumerate(zip(scenes, videos[size]))])
    print(size, "noisy", acc(res), res["shape_confusion"])
    assert res["color"] >= 0.9 and res["direction"] >= 0.9 and res["shape"] >= 0.75, res


@pytest.mark.parametrize("size", SIZES)
def test_mp4_round_trip(scenes, videos, clean, size, tmp_path):
    n = 60 if size[1] <= 64 else 30  # (the large ones take longer to encode and detect)
    same = []
    for i, (v, a) in enumerate(zip(videos[size][:n], clean[size][:n])):
        write_mp4(v, tmp_path / f"{i}.mp4", fps=8)
        b = detect(read_mp4(tmp_path / f"{i}.mp4"))
        same.append((a.color, a.shape, a.direction) == (b.color, b.shape, b.direction))
    print(size, "mp4 unchanged", np.mean(same))
    assert np.mean(same) >= 0.95


def test_noise_claims_nothing():
    """The API: where no single coloured object is seen in at least half the frames, every field is None
    and every confidence 0; that is what pure noise (and a blank video) gives."""
    rng = np.random.default_rng(0)
    for f, h, w in SIZES:
        clips = [rng.integers(0, 256, (f, h, w, 3), dtype=np.uint8) for _ in range(3)]
        clips += [np.clip(rng.normal(128, 40, (f, h, w, 3)), 0, 255).astype(np.uint8) for _ in range(3)]
        clips += [np.full((f, h, w, 3), 60, np.uint8)]
        for v in clips:
            d = detect(v)
            assert d.color is None and d.shape is None and d.direction is None, d
            assert d.color_conf == d.shape_conf == d.direction_conf == 0.0


def test_still_object_has_no_direction():
    s = Scene("green", "square", "right", "checkered", 0.3, (0.5, 0.5), 0.0)
    d = detect(render(s, 17, 64, 64))
    assert (d.color, d.shape, d.direction) == ("green", "square", None) and d.found == 1.0
    assert d.color_conf > 0.9 and d.shape_conf > 0.5


def test_confident_on_truth(clean):
    for d in clean[(49, 128, 128)]:
        assert isinstance(d, Detection) and d.found == 1.0
        assert min(d.color_conf, d.shape_conf, d.direction_conf) > 0.3, d


def test_score_counts(scenes, videos, clean):
    pairs = list(zip(scenes[:3], videos[(17, 64, 64)][:3])) + [(scenes[3], clean[(17, 64, 64)][3])]
    wrong = Scene("yellow" if scenes[0].color != "yellow" else "red", *scenes[0].combo[1:],
                  scenes[0].size, scenes[0].start, scenes[0].speed)
    res = score(pairs + [(wrong, videos[(17, 64, 64)][0])])
    assert res["n"] == 5 and res["color"] == 0.8 and res["shape"] == res["direction"] == 1.0
    assert res["all"] == 0.8 and res["not_found"] == 0


def test_cli(tmp_path, capsys):
    d = write_dataset(tmp_path / "d", 3, seed=1, frames=9, height=64, width=64, split="heldout")
    main([str(d)])
    out = capsys.readouterr().out
    res = json.loads(out[:out.rindex("}") + 1])
    assert res["n"] == 3 and res["color"] == res["direction"] == res["shape"] == 1.0
