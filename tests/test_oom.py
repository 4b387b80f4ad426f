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


def test_text_encoder_waits_on_the_host_when_the_decode_needs_its_room(checkpoint, monkeypatch):
    from cogrt.engine import pipeline as pipeline_module
    pipe = load_pipeline(checkpoint("5b"))
    kw = dict(num_frames=9, height=64, width=64, num_inference_steps=2, seed=0)
    want = pipe.generate("a red circle", **kw).frames
    assert not pipe.text_parked
    with monkeypatch.context() as m:  # not even the tiled decode fits: the text encoder leaves for the host
        m.setattr(pipeline_module, "free_memory", lambda device: 1)
        short = pipe.generate("a red circle", **kw).frames
    assert pipe.text_parked and next(pipe.text_encoder.parameters()).device.type == "cpu"
    again = pipe.generate("a red circle", **kw).frames  # and the next request brings it back first
    assert not pipe.text_parked
    assert (short == want).all() and (again == want).all()
