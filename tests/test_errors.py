"""Bad input gives a clear error that names what is wrong, and leaves nothing half-written."""
from __future__ import annotations

import logging
import shutil

import numpy as np
import pytest
import torch

import cogrt.engine as engine
from helpers import random_image
from cogrt.engine.request import GenerationRequest
from cogrt.engine.video import read_mp4, write_mp4, write_npy

SMALL = dict(num_frames=9, height=64, width=64, num_inference_steps=1)


@pytest.fixture
def ckpt_copy(checkpoint, tmp_path):
    return shutil.copytree(checkpoint("5b"), tmp_path / "ckpt")


# ---------------------------------------------------------------------------------------------------
# checkpoints

def test_missing_directory(tmp_path):
    missing = tmp_path / "no-such-checkpoint"
    with pytest.raises(engine.CheckpointError, match="not found") as e:
        engine.load_pipeline(missing, device="cpu")
    assert str(missing) in str(e.value)


def test_missing_vae_config(ckpt_copy):
    (ckpt_copy / "vae" / "config.json").unlink()
    with pytest.raises(engine.CheckpointError) as e:
        engine.load_pipeline(ckpt_copy, device="cpu")
    assert str(ckpt_copy / "vae" / "config.json") in str(e.value)


def test_truncated_transformer_weights(ckpt_copy):
    f = ckpt_copy / "transformer" / "diffusion_pytorch_model.safetensors"
    data = f.read_bytes()
    f.write_bytes(data[: len(data) // 2])
    with pytest.raises(engine.CheckpointError) as e:
        engine.load_pipeline(ckpt_copy, device="cpu")
    assert str(f) in str(e.value)


def test_overwritten_transformer_header(ckpt_copy):
    f = ckpt_copy / "transformer" / "diffusion_pytorch_model.safetensors"
    data = bytearray(f.read_bytes())
    g = torch.Generator().manual_seed(3)
    data[:64] = torch.randint(0, 256, (64,), generator=g, dtype=torch.uint8).numpy().tobytes()
    f.write_bytes(bytes(data))
    with pytest.raises(engine.CheckpointError) as e:
        engine.load_transformer(ckpt_copy / "transformer")
    assert str(f) in str(e.value)


def test_pickle_only_transformer_is_refused(ckpt_copy):
    folder = ckpt_copy / "transformer"
    (folder / "diffusion_pytorch_model.safetensors").unlink()
    torch.save({"proj_out.weight": torch.randn(4, 4)}, folder / "diffusion_pytorch_model.bin")
    with pytest.raises(engine.CheckpointError, match="pickle") as e:
        engine.load_pipeline(ckpt_copy, device="cpu")
    assert "diffusion_pytorch_model.bin" in str(e.value)


def test_hub_id_without_network(monkeypatch, tmp_path):
    import huggingface_hub.constants
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)  # read at import time
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub-cache"))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub-cache"))
    monkeypatch.chdir(tmp_path)  # so that the id cannot be a relative directory
    with pytest.raises(engine.CheckpointError) as e:
        engine.load_pipeline("nonexistent-org/nonexistent-model", device="cpu")
    msg = str(e.value)
    assert "nonexistent-org/nonexistent-model" in msg
    assert "network" in msg and "download" in msg


# ---------------------------------------------------------------------------------------------------
# requests

@pytest.mark.parametrize("frames,lo,hi", [(10, 9, 17), (12, 9, 17), (8, 1, 9), (50, 49, 57)])
def test_bad_num_frames(pipeline, frames, lo, hi):
    with pytest.raises(ValueError, match=r"8N\+1") as e:
        pipeline("5b").generate("a cat", **{**SMALL, "num_frames": frames}, seed=0)
    assert f"{lo} or {hi}" in str(e.value)  # the nearest valid values
    assert f"got {frames}" in str(e.value)


@pytest.mark.parametrize("field", ["height", "width"])
def test_bad_resolution(pipeline, field):
    with pytest.raises(ValueError, match="multiple of 16") as e:
        pipeline("5b").generate("a cat", **{**SMALL, field: 70}, seed=0)
    assert field in str(e.value) and "70" in str(e.value)


def test_image_for_text_to_video_model(pipeline):
    with pytest.raises(ValueError, match="text-to-video") as e:
        pipeline("5b").generate("a cat", image=random_image(64, 64), **SMALL, seed=0)
    assert "image" in str(e.value)


@pytest.mark.parametrize("variant", ["5b-i2v", "1.5-5b-i2v"])
def test_no_image_for_image_to_video_model(pipeline, variant):
    with pytest.raises(ValueError, match="image-to-video") as e:
        pipeline(variant).generate("a cat", **SMALL, seed=0)
    assert "pass an image" in str(e.value)


def test_long_prompt_warns_once_with_the_part_that_was_cut(pipeline, caplog):
    g = torch.Generator().manual_seed(0)
    words = ["fox", "snow", "river", "light", "forest", "mountain", "sky", "wind"]
    prompt = " ".join(words[i] for i in torch.randint(0, len(words), (90,), generator=g).tolist())
    assert len(prompt) > 400  # ByT5 has a token per byte
    with caplog.at_level(logging.WARNING, logger="cogrt"):
        res = pipeline("5b").generate(prompt, **SMALL, seed=0)
    assert res.frames.shape == (9, 64, 64, 3)
    cut = [r for r in caplog.records if "was cut" in r.getMessage()]
    assert len(cut) == 1, caplog.text  # the prompt once, though CFG encodes it beside the negative one
    n = pipeline("5b").cfg.max_text_seq_length
    kept = len(prompt.encode()) - (n - 1)  # ByT5: a token a byte, and one place for the end-of-text token
    assert repr(prompt[-kept:]) in cut[0].getMessage() and "<pad>" not in cut[0].getMessage()


def test_short_prompt_does_not_warn(pipeline, caplog):
    with caplog.at_level(logging.WARNING, logger="cogrt"):
        pipeline("5b").encode_text(["a cat on a mat"])
    assert "cut" not in caplog.text


def test_unknown_mode(pipeline):
    with pytest.raises(ValueError, match="turbo") as e:
        pipeline("5b").generate("a cat", **SMALL, mode="turbo", seed=0)
    assert "exact" in str(e.value) and "valid modes" in str(e.value)


def test_bad_request_values():
    with pytest.raises(ValueError, match="num_inference_steps"):
        GenerationRequest("a cat", num_inference_steps=0)
    with pytest.raises(TypeError, match="prompt"):
        GenerationRequest(None)
    with pytest.raises(FileNotFoundError, match="missing.safetensors"):
        GenerationRequest("a cat", loras=[("missing.safetensors", 1.0)])


# ---------------------------------------------------------------------------------------------------
# video files

def smooth_frames(n, h, w, seed=0):
    """Random frames made of 16x16 colour blocks, which H.264 (and yuv420p) keep close to exact."""
    g = torch.Generator().manual_seed(seed)
    blocks = torch.randint(0, 256, (n, h // 16, w // 16, 3), generator=g, dtype=torch.uint8).numpy()
    return blocks.repeat(16, axis=1).repeat(16, axis=2)


def test_write_mp4_failure_leaves_nothing(monkeypatch, tmp_path):
    import av
    calls = {"n": 0}
    real = av.VideoFrame.from_ndarray

    def flaky(*a, **k):
        calls["n"] += 1
        if calls["n"] > 2:
            raise RuntimeError("encoder exploded")
        return real(*a, **k)

    monkeypatch.setattr(av.VideoFrame, "from_ndarray", flaky)
    out = tmp_path / "videos"
    out.mkdir()
    with pytest.raises(RuntimeError, match="encoder exploded"):
        write_mp4(smooth_frames(6, 64, 80), out / "clip.mp4", fps=8)
    assert calls["n"] == 3
    assert not (out / "clip.mp4").exists()
    assert list(out.iterdir()) == []


def test_write_mp4_failure_keeps_existing_file(monkeypatch, tmp_path):
    import av
    target = tmp_path / "clip.mp4"
    target.write_bytes(b"previous video")

    def broken(*a, **k):
        raise RuntimeError("encoder exploded")
    monkeypatch.setattr(av.VideoFrame, "from_ndarray", broken)
    with pytest.raises(RuntimeError):
        write_mp4(smooth_frames(3, 32, 32), target, fps=8)
    assert target.read_bytes() == b"previous video"
    assert [p.name for p in tmp_path.iterdir()] == ["clip.mp4"]


def test_write_mp4_round_trip(tmp_path):
    frames = smooth_frames(9, 64, 80, seed=4)
    path = write_mp4(frames, tmp_path / "sub" / "clip.mp4", fps=8)
    assert path == tmp_path / "sub" / "clip.mp4"
    back = read_mp4(path)
    assert back.shape == frames.shape and back.dtype == np.uint8
    assert np.abs(back.astype(np.float32) - frames.astype(np.float32)).mean() < 10
    assert [p.name for p in (tmp_path / "sub").iterdir()] == ["clip.mp4"]


def test_write_mp4_rejects_bad_frames(tmp_path):
    with pytest.raises(ValueError, match="uint8"):
        write_mp4(np.random.default_rng(0).random((3, 16, 16, 3)), tmp_path / "x.mp4", fps=8)
    assert list(tmp_path.iterdir()) == []


def test_write_npy_round_trip(tmp_path):
    frames = smooth_frames(3, 32, 48, seed=9)
    write_npy(frames, tmp_path / "f.npy")
    assert np.array_equal(np.load(tmp_path / "f.npy"), frames)
    assert [p.name for p in tmp_path.iterdir()] == ["f.npy"]
