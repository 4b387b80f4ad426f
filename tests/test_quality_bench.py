"""bench/quality.py: its metrics move the right way on known degradations, its table and plot are written from
rows, and one small sweep on the bundled tiny model runs end to end."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest

from cogrt.train.adherence import degrade
from cogrt.bench.quality import main, markdown, plot, psnr, ssim
from cogrt.train.synthetic import render, sample_scenes


@pytest.fixture(scope="module")
def video():
    return render(sample_scenes(1, 3, "train")[0], 9, 64, 64)  # uint8 (9, 64, 64, 3)


def test_identical_is_inf_and_ssim_one(video):
    assert psnr(video, video.copy()) == math.inf
    assert ssim(video, video.copy()) == pytest.approx(1.0)


def test_psnr_of_a_known_error(video):
    """Every value off by one: MSE 1, so 20 log10(255) = 48.13 dB."""
    off = np.where(video < 255, video + 1, video - 1).astype(np.uint8)
    assert psnr(video, off) == pytest.approx(20 * math.log10(255), abs=1e-9)


def test_one_equal_frame_does_not_make_the_video_inf(video):
    x = degrade(video, seed=0, noise=10, jitter=0, blur=False)
    x[0] = video[0]
    assert math.isfinite(psnr(video, x)) and psnr(video, x) > psnr(video, degrade(video, seed=0, noise=10, jitter=0,
                                                                                      blur=False))


def test_more_noise_scores_worse(video):
    mild, strong = (degrade(video, seed=1, noise=s, jitter=0, blur=False) for s in (3, 25))
    assert 30 < psnr(video, mild) < math.inf
    assert psnr(video, strong) < psnr(video, mild) - 10
    assert ssim(video, strong) < ssim(video, mild) < 1.0


ROWS = [dict(name="exact", psnr=math.inf, ssim=1.0, steps_frac=1.0, denoise_s=10.0, speedup=1.0, color=0.9,
             shape=0.7, direction=1.0),
        dict(name="teacache 0.2", psnr=34.2, ssim=0.97, steps_frac=0.44, denoise_s=4.6, speedup=2.17, color=0.9,
             shape=0.7, direction=1.0),
        dict(name="teacache 0.5", psnr=24.0, ssim=0.85, steps_frac=0.2, denoise_s=2.2, speedup=4.5, color=0.8,
             shape=0.6, direction=1.0)]


def test_markdown_table():
    lines = markdown(ROWS).splitlines()
    assert len(lines) == 2 + len(ROWS)
    assert all(line.count("|") == 10 for line in lines)
    assert "inf (reference)" in lines[2] and "| 44% |" in lines[3] and "| 34.2 |" in lines[3]


def test_plot_writes_a_png(tmp_path):
    from matplotlib.image import imread
    path = tmp_path / "q.png"
    plot(ROWS, path)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    img = imread(path)
    assert img.shape[0] > 300 and img.shape[1] > 500
    assert img[..., :3].std() > 0.05  # not blank


def test_sweep_end_to_end(tmp_path):
    """One prompt, 4 steps, 9 frames: exact is its own reference and runs every step; a threshold so high that
    nothing but the first and last step runs gives a different video from half the steps."""
    out = tmp_path / "q.json"
    main(["--n", "1", "--steps", "4", "--frames", "9", "--thresholds", "1000", "--json", str(out),
          "--plot", str(tmp_path / "q.png"), "--markdown"])
    meta = json.loads(out.read_text())
    exact, cached = meta["rows"]
    assert exact["name"] == "exact" and exact["psnr"] is None  # inf: identical
    assert exact["ssim"] == pytest.approx(1.0) and exact["steps_frac"] == 1.0 and exact["speedup"] == 1.0
    assert cached["name"] == "teacache 1000" and cached["steps_frac"] == 0.5
    assert 0 < cached["psnr"] < 100 and cached["ssim"] < 1.0 and cached["denoise_s"] > 0
    assert all(0 <= cached[k] <= 1 for k in ("color", "shape", "direction"))
    assert (tmp_path / "q.png").stat().st_size > 10_000
