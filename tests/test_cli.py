"""The `cogrt` command, run in-process through engine.cli.main."""
from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch

import cogrt.engine as engine
from cogrt.engine.cli import _lora_arg, _parser, main
from cogrt.engine.video import read_mp4


@pytest.fixture(scope="module")
def cli_checkpoint(tmp_path_factory):
    out = tmp_path_factory.mktemp("cli") / "model"
    assert main(["random-checkpoint", str(out), "--preset", "tiny-5b", "--seed", "0"]) == 0
    return out


def test_random_checkpoint_is_the_library_one(cli_checkpoint, checkpoint):
    ours = engine.load_transformer(cli_checkpoint / "transformer")
    ref = engine.load_transformer(checkpoint("5b") / "transformer")  # write_random_checkpoint(dir, "tiny-5b")
    assert ours.cfg == ref.cfg
    a, b = ours.state_dict(), ref.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_info(cli_checkpoint, capsys):
    assert main(["info", str(cli_checkpoint)]) == 0
    out = capsys.readouterr().out
    assert "cogvideox-5b" in out
    assert "2 layers" in out
    assert "complete" in out


def test_info_names_missing_component(cli_checkpoint, tmp_path, capsys):
    broken = shutil.copytree(cli_checkpoint, tmp_path / "broken")
    shutil.rmtree(broken / "vae")
    assert main(["info", str(broken)]) == 1
    out = capsys.readouterr().out
    assert "missing or broken" in out
    assert "vae/" in out
    assert "text_encoder/" not in out


def test_generate_writes_mp4_and_npy_equal_to_the_pipeline(cli_checkpoint, tmp_path, capsys):
    mp4, npy = tmp_path / "out.mp4", tmp_path / "out.npy"
    rc = main(["generate", "a lighthouse in a storm", "--model", str(cli_checkpoint), "--frames", "9",
               "--height", "64", "--width", "64", "--steps", "2", "--seed", "1", "--device", "cpu",
               "--dtype", "fp32", "-o", str(mp4), "--frames-npy", str(npy)])
    assert rc == 0
    assert "wrote" in capsys.readouterr().out
    frames = np.load(npy)
    assert frames.shape == (9, 64, 64, 3) and frames.dtype == np.uint8
    video = read_mp4(mp4)
    assert video.shape == (9, 64, 64, 3)

    pipe = engine.load_pipeline(cli_checkpoint, device="cpu", dtype=torch.float32)
    res = pipe.generate("a lighthouse in a storm", num_frames=9, height=64, width=64, num_inference_steps=2, seed=1)
    assert np.array_equal(frames, res.frames)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.mp4", "out.npy"]


@pytest.mark.parametrize("attention,tol", [("triton", 1), ("triton-fp8", 8)])
def test_generate_through_the_kernels(cli_checkpoint, tmp_path, attention, tol):
    """The shipped kernel combinations end to end: a Triton attention backend with the fused norms, against
    the default path; frames within `tol` of 255 (the fp8 backend quantizes q, k, v)."""
    npy = tmp_path / "k.npy"
    args = ["generate", "a lighthouse in a storm", "--model", str(cli_checkpoint), "--frames", "9", "--height", "64",
            "--width", "64", "--steps", "1", "--guidance", "1", "--seed", "1", "--device", "cpu", "--dtype", "fp32",
            "-o", str(tmp_path / "k.mp4"), "--frames-npy", str(npy)]  # no CFG: the interpreted kernels' grid halves
    assert main(args + ["--attention", attention, "--fused-norms"]) == 0
    fast = np.load(npy).astype(int)
    assert main(args) == 0
    exact = np.load(npy).astype(int)
    assert np.abs(fast - exact).max() <= tol


def test_generate_bad_frames_exits_2_and_writes_nothing(cli_checkpoint, tmp_path, capsys):
    out = tmp_path / "out.mp4"
    rc = main(["generate", "a cat", "--model", str(cli_checkpoint), "--frames", "10", "--height", "64",
               "--width", "64", "--steps", "1", "--device", "cpu", "-o", str(out)])
    assert rc == 2
    err = capsys.readouterr().err
    assert "cogrt: error:" in err and "8N+1" in err and "10" in err
    assert list(tmp_path.iterdir()) == []


def test_generate_missing_model_exits_2(tmp_path, capsys):
    rc = main(["generate", "a cat", "--model", str(tmp_path / "nope"), "-o", str(tmp_path / "o.mp4")])
    assert rc == 2
    assert str(tmp_path / "nope") in capsys.readouterr().err


def test_lora_arg():
    assert _lora_arg("a/b.safetensors:0.5") == ("a/b.safetensors", 0.5)
    assert _lora_arg("a/b.safetensors") == ("a/b.safetensors", 1.0)
    assert _lora_arg("C:\\loras\\x.safetensors") == ("C:\\loras\\x.safetensors", 1.0)
    args = _parser().parse_args(["generate", "p", "--lora", "x.safetensors:0.25", "--lora", "y.safetensors"])
    assert args.lora == [("x.safetensors", 0.25), ("y.safetensors", 1.0)]
