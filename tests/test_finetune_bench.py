"""Issue 21: the distortion score (0 on the synthetic world's renderings, rising with a warp), `cogrt bench
finetune` end to end at a toy size, and the trainer's guard with keep-best, on the bundled tiny model."""
from __future__ import annotations

import dataclasses
import json
import logging

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from cogrt.engine import loader
from cogrt.engine.cli import BUNDLED_MODEL as MODEL
from cogrt.train.adherence import detect, distortion
from cogrt.train.synthetic import COLORS, Scene, background, position, render, sample_scenes, shape_mask

TOY_VIDEO = dict(num_frames=9, height=64, width=64, num_inference_steps=2, guidance_scale=6.0, seed=0)


def warped(scene: Scene, frames: int, h: int, w: int, stretch: float = 1.0, shear: float = 0.0) -> np.ndarray:
    """`render`, with the shape stretched along x by `stretch` (and squeezed along y by as much, so its area
    stays) and sheared by `shear`; antialiased the same way (2 x 2 samples a pixel)."""
    out = np.repeat(background(scene.background, h, w)[None], frames, axis=0)
    half, ss = scene.size * min(h, w) / 2, 2
    col = np.array(COLORS[scene.color], np.float32)
    for i in range(frames):
        fx, fy = position(scene, i / (frames - 1))
        u = ((np.arange(w * ss) + 0.5) / ss - fx * w)[None, :] / half
        v = ((np.arange(h * ss) + 0.5) / ss - fy * h)[:, None] / half
        alpha = shape_mask(scene.shape, (u - shear * v) / stretch, v * stretch)
        alpha = alpha.reshape(h, ss, w, ss).mean(axis=(1, 3), dtype=np.float32)[..., None]
        out[i] = (out[i] + alpha * (col - out[i]) + 0.5).astype(np.uint8)
    return out


@pytest.mark.parametrize("size", [(5, 64, 64), (5, 128, 128), (5, 64, 96)])
def test_distortion_is_zero_on_the_ideal_renderings(size):
    scenes = [s for split in ("train", "heldout", "concept") for s in sample_scenes(8, 21, split)]
    assert {s.shape for s in scenes} == {"circle", "square", "triangle", "star"}
    values = [distortion(render(s, *size), s.shape) for s in scenes]
    assert max(values) == 0.0, values
    star = Scene("purple", "star", "right", "black", 0.3, (0.3, 0.5), 0.4)  # the helper draws the ideal too
    assert distortion(warped(star, *size), "star") == 0.0


@pytest.mark.parametrize("size", [(5, 64, 64), (5, 128, 128)])
def test_distortion_rises_with_a_warp(size):
    star = Scene("purple", "star", "up", "gray", 0.3, (0.5, 0.7), 0.4)
    stretched = [distortion(warped(star, *size, stretch=k), "star") for k in (1.25, 1.5, 2.0)]
    sheared = [distortion(warped(star, *size, shear=k), "star") for k in (0.25, 0.5, 1.0)]
    assert 0.05 < stretched[0] < stretched[1] < stretched[2], stretched
    assert 0.05 < sheared[0] < sheared[1] < sheared[2], sheared
    circle = distortion(render(dataclasses.replace(star, shape="circle"), *size), "star")
    assert circle > 0.15, circle  # a circle drawn for a star is far from it
    assert detect(warped(star, *size, stretch=1.25)).shape == "star"  # still a star to the detector: warped, not lost


def test_nothing_seen_is_fully_distorted():
    blank = np.full((5, 64, 64, 3), 40, np.uint8)
    assert distortion(blank, "star") == 1.0


def test_bench_finetune_toy_run(tmp_path):
    from cogrt.engine.cli import main
    out = tmp_path / "out"
    rc = main(["bench", "finetune", "--videos", "2", "--frames", "9", "--height", "32", "--width", "32",
               "--steps", "1,2", "--sample-steps", "2", "--eval-prompt", "a purple star moving up on a gray background",
               "--eval-seeds", "1", "--forget", "1", "--device", "cpu", "--out", str(out),
               "--work", str(tmp_path / "work")])
    assert rc == 0
    res = json.loads((out / "finetune.json").read_text())
    rows = res["rows"]
    assert [(r["run"], r["step"]) for r in rows] == [("base", 0)] + [
        (name, s) for name in ("full 0.0002", "full 1e-05", "lora 0.0001 (rank 32, alpha 16)") for s in (1, 2)]
    for r in rows:
        assert 0 <= r["distortion"] <= 1 and 0 <= r["concept"] <= r["shape"] <= 1
    trained = {(r["run"].split(" (")[0], r["step"]): r for r in rows[1:]}
    assert all(np.isfinite(r["forget_psnr"]) and r["s_per_step"] > 0 for r in trained.values())
    # forgetting: full fine-tuning at 2e-4 moves the weights 20x as far from the base as at 1e-5
    assert trained["full 0.0002", 2]["forget_psnr"] < trained["full 1e-05", 2]["forget_psnr"] - 5, trained
    assert {"data", "precompute", "evaluate base", "train full 0.0002 to 2"} <= set(res["timings"])
    assert len((out / "finetune.md").read_text().splitlines()) == 2 + len(rows)
    from PIL import Image
    assert Image.open(out / "finetune.png").size[0] > 500
    # a run split over calls joins back into one result
    merged = tmp_path / "merged"
    rc = main(["bench", "finetune", "--merge", str(out / "finetune.json"), str(out / "finetune.json"),
               "--out", str(merged)])
    assert rc == 0 and len(json.loads((merged / "finetune.json").read_text())["rows"]) == 1 + 2 * (len(rows) - 1)


@pytest.fixture(scope="module")
def latents(tmp_path_factory):
    """Two videos of the held-out concept, precomputed with the tiny model at the toy size."""
    from cogrt.bench.finetune import concept_scenes, write_videos
    from cogrt.train.precompute import precompute
    root = tmp_path_factory.mktemp("guard")
    records = write_videos(concept_scenes(2, 0, "purple", "star", set()), root / "videos", 9, 64, 64)
    precompute(records, MODEL, root / "latents", "9x64x64", device="cpu")
    return root / "latents"


def toy(latents, out, **kw):
    from cogrt.train.loop import TrainConfig
    base = dict(model=str(MODEL), data=str(latents), out=str(out), device="cpu", mixed_precision="no", log_every=1,
                guard_prompts=("a purple star moving up on a gray background",
                               "an orange circle moving right on a black background"),
                guard_args=dict(TOY_VIDEO), seed=0)
    return TrainConfig(**{**base, **kw})


def test_guard_logs_and_keeps_the_best(latents, tmp_path, caplog):
    from cogrt.train.loop import train
    caplog.set_level(logging.INFO, logger="cogrt.train.loop")
    out = tmp_path / "run"
    res = train(toy(latents, out, method="full", lr=2e-4, steps=4, guard_every=2, keep_best=True,
                    checkpoint_every=2, keep_checkpoints=0))  # a checkpoint at each guard, to compare best/ with
    logged = [json.loads(line) for line in (out / "guard.jsonl").read_text().splitlines()]
    assert [g["step"] for g in logged] == [2, 4] and logged == res["guard"]
    for g in logged:
        assert g["n"] == 2 and 0 <= g["adherence"] <= 1 and 0 <= g["distortion"] <= 1
        assert g["score"] == pytest.approx(g["adherence"] - g["distortion"])
    assert sum("guard at step" in r.getMessage() for r in caplog.records) == 2
    best = json.loads((out / "best" / "best.json").read_text())
    top = max(g["score"] for g in logged)
    assert best == res["best"] and best["score"] == top
    assert best["step"] == next(g["step"] for g in logged if g["score"] == top)  # the first to reach it
    # the weights in best/ are the model at that step: the run's own checkpoint of it
    kept = loader.load_transformer(out / "best" / "transformer", "cpu", torch.float32).state_dict()
    ckpt = load_file(str(out / "checkpoints" / f"step_{best['step']:08d}" / "weights.safetensors"))
    assert kept.keys() == ckpt.keys() and all(torch.equal(kept[k], ckpt[k]) for k in ckpt)


def test_guard_with_a_lora_leaves_the_base_weights_alone(latents, tmp_path):
    """The guard fuses the LoRA into the validation pipeline's weights, which are the trained model's own base:
    it must unfuse it, or training would go on from base + LoRA with the LoRA on top."""
    from cogrt.train.loop import train
    from cogrt.train.lora import base_state_dict
    model = loader.load_transformer(MODEL / "transformer", "cpu", torch.float32)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    res = train(toy(latents, tmp_path / "lora", method="lora", rank=8, alpha=8.0, lr=1e-2, steps=2, guard_every=1,
                    checkpoint_every=0), transformer=model)
    assert [g["step"] for g in res["guard"]] == [1, 2]
    assert any(v.abs().max() > 0 for k, v in load_file(res["export"]).items() if "lora_B" in k)  # it trained
    after = base_state_dict(model)
    assert after.keys() == before.keys() and all(torch.equal(before[k], after[k]) for k in before)


def test_guard_refuses_what_it_cannot_score(latents, tmp_path):
    from cogrt.train.loop import train
    with pytest.raises(ValueError, match="synthetic world"):
        train(toy(latents, tmp_path / "a", steps=1, guard_every=1, guard_prompts=("a cat playing the piano",)))
    with pytest.raises(ValueError, match="guard_every"):
        train(toy(latents, tmp_path / "b", steps=1, keep_best=True))
