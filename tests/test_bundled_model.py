"""The bundled tiny model: small enough for the repository, and the CLI's default model."""
import numpy as np

from engine import cli
from engine.loader import inspect_checkpoint


def test_bundled_model_is_complete_and_small():
    rep = inspect_checkpoint(cli.BUNDLED_MODEL)
    assert rep["missing"] == [] and rep["variant"] == "cogvideox-5b"
    size = sum(f.stat().st_size for f in cli.BUNDLED_MODEL.rglob("*") if f.is_file())
    assert size <= 25e6, size


def test_generate_without_model_uses_the_bundled_one(tmp_path):
    npy = tmp_path / "f.npy"
    rc = cli.main(["generate", "a red circle moving right on a black background", "--frames", "9", "--height", "64",
                   "--width", "64", "--steps", "3", "--seed", "0", "--device", "cpu", "-o", str(tmp_path / "o.mp4"),
                   "--frames-npy", str(npy)])
    assert rc == 0
    frames = np.load(npy)
    assert frames.shape == (9, 64, 64, 3) and frames.std() > 5  # a real picture, not a flat field
