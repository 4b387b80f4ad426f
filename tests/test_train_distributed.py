"""Two processes on the CPU (gloo), as torchrun starts them: DDP for LoRA, FSDP2 for full training."""
import os
import subprocess
import sys

import pytest
from safetensors.torch import load_file

from cogrt.engine.loader import load_transformer
from cogrt.engine.random_model import write_random_checkpoint
from cogrt.train.precompute import precompute
from cogrt.train.synthetic import write_dataset


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("dist")
    data = write_dataset(root / "data", n=8, seed=1, frames=9, height=64, width=64)
    ckpt = write_random_checkpoint(root / "ckpt", "tiny-5b")
    precompute(data, ckpt, root / "latents", "9x64x64", device="cpu")
    return root, ckpt


def torchrun(root, *args):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m",
           "cogrt.engine.cli", "train", "--model", str(root / "ckpt"), "--data", str(root / "latents"), "--device", "cpu",
           "--mixed-precision", "no", "--batch-size", "2", "--log-every", "2", "--checkpoint-every", "4", *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env, cwd=root)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    return p.stdout + p.stderr  # the trainer's progress is logged, on stderr


@pytest.mark.parametrize("method", ["lora", "full"])
def test_two_process_training_runs_checkpoints_and_resumes(world, method):
    root, ckpt = world
    out = root / f"out_{method}"
    extra = ["--rank", "4"] if method == "lora" else ["--lr", "1e-3"]
    torchrun(root, "--method", method, "--out", str(out), "--steps", "6", *extra)
    log = torchrun(root, "--method", method, "--out", str(out), "--steps", "8", *extra)
    assert "resumed from" in log and "at step 6" in log  # the finished run's last checkpoint
    if method == "lora":
        sd = load_file(str(out / "pytorch_lora_weights.safetensors"))
        assert any(k.endswith("lora_B.weight") and v.abs().sum() > 0 for k, v in sd.items())
    else:
        trained, base = load_transformer(out / "transformer"), load_transformer(ckpt / "transformer")
        assert not all((a == b).all() for a, b in zip(trained.parameters(), base.parameters()))
