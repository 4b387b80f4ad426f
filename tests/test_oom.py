"""Running out of GPU memory gives an error that suggests the ways out, and leaves the model as it was."""
import pytest
import torch

from cogrt.engine import OutOfMemory, load_pipeline


def test_oom_suggests_tiling_and_offload(checkpoint, monkeypatch):
    pipe = load_pipeline(checkpoint("5b"))
    before = {k: v.clone() for k, v in pipe.transformer.state_dict().items()}

    def boom(*a, **k):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")

    monkeypatch.setattr(pipe.transformer, "forward", boom)
    with pytest.raises(OutOfMemory) as e:
        pipe.generate("a red circle", num_frames=9, height=64, width=64, num_inference_steps=2, seed=0)
    msg = str(e.value)
    assert "--vae-tiling" in msg and "--offload" in msg and "9x64x64" in msg
    after = pipe.transformer.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
