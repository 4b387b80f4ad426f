"""Several processes per video on the CPU (gloo, through torchrun): the `cfg` and `ulysses=2` layouts, and both
together on four processes, give the frames one process gives, within 1/255; with TeaCache on, with the probe
cache on and with a LoRA too.
The tiled VAE decode with its tiles dealt out to the ranks equals diffusers' own tiled decode."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from test_lora import make_lora

from cogrt.engine.caches.probe import ProbeCache
from cogrt.engine.request import GenerationRequest

WORKER = Path(__file__).with_name("parallel_worker.py")
BASE = dict(prompt="a lighthouse in a storm", num_frames=9, height=64, width=64, num_inference_steps=4, seed=3)


def cases(lora: Path) -> dict:
    return {"plain": dict(BASE),
            # a polynomial of the model's own (it has none published): some steps are skipped
            "teacache": dict(BASE, num_inference_steps=8, teacache=0.5, teacache_coefficients=[0, 0, 0, 0.5, 0]),
            "lora": dict(BASE, loras=[[str(lora), 1.0]])}


# `cfg` alone is the 2-process default of `cogrt generate --gpus 2`, tested below against one process too
@pytest.mark.parametrize("procs,layout", [(2, "ulysses=2"), (4, "cfg,ulysses=2")])
def test_layouts_match_one_process(checkpoint, pipeline, tmp_path, procs, layout):
    lora = make_lora(tmp_path / "l.safetensors", dim=32)
    todo = cases(lora) if procs == 4 else {"plain": cases(lora)["plain"]}  # the four ranks run every case
    if procs == 4:  # the probe cache decides on the whole CFG batch's numbers, split over two CFG ranks here
        seen = ProbeCache(0.0, 8)
        pipeline("5b").run(GenerationRequest(**dict(BASE, num_inference_steps=8)), cache=seen)
        todo["probe"] = dict(BASE, num_inference_steps=8, cache_threshold=float(np.median(seen.distances)))
    out = tmp_path / "out"
    out.mkdir()
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={procs}", str(WORKER),
           str(checkpoint("5b")), str(out), layout, json.dumps(todo)]
    res = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600, cwd=tmp_path)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    one = pipeline("5b")
    for name, kw in todo.items():
        kw = dict(kw, loras=[tuple(x) for x in kw.get("loras", [])])
        want = one.generate(**kw)
        got = np.load(out / f"{name}.npy")
        diff = np.abs(got.astype(int) - want.frames.astype(int)).max()
        assert got.shape == want.frames.shape and diff <= 1, (name, diff)
        assert json.loads((out / f"{name}.json").read_text())["computed"] == want.steps_computed, name
    for name in ("teacache", "probe"):
        if name in todo:  # some steps were skipped
            assert len(json.loads((out / f"{name}.json").read_text())["computed"]) < 8, name

    vae = one.vae
    tiling = (vae.use_tiling, vae.tile_sample_min_height, vae.tile_sample_min_width, vae.tile_latent_min_height,
              vae.tile_latent_min_width, vae.tile_overlap_factor_height, vae.tile_overlap_factor_width)
    try:
        vae.enable_tiling(tile_sample_min_height=32, tile_sample_min_width=32, tile_overlap_factor_height=0.25,
                          tile_overlap_factor_width=0.25)
        vae.tile_latent_min_height = vae.tile_latent_min_width = 4
        z = torch.randn(1, vae.config.latent_channels, 3, 8, 8, generator=torch.Generator().manual_seed(5))
        with torch.no_grad():
            want = vae.tiled_decode(z).sample
    finally:
        (vae.use_tiling, vae.tile_sample_min_height, vae.tile_sample_min_width, vae.tile_latent_min_height,
         vae.tile_latent_min_width, vae.tile_overlap_factor_height, vae.tile_overlap_factor_width) = tiling
    got = torch.load(out / "decode.pt")
    assert got.shape == want.shape and torch.equal(got, want)


def test_layouts_and_their_errors():
    from cogrt.engine.parallel import Layout
    assert Layout.parse("cfg,ulysses=2") == Layout(2, 2) and Layout.parse("ulysses=4").world == 4
    assert Layout.parse(None).world == 1
    with pytest.raises(ValueError, match="unknown parallel layout"):
        Layout.parse("tensor=2")
    with pytest.raises(ValueError, match=r"multiple of it; this model can split its sequence over \[2, 3, 5, 6"):
        Layout(1, 4).check(30)  # 2B's 30 heads
    Layout(1, 2).check(30)


def test_generate_on_two_processes_writes_once(checkpoint, pipeline, tmp_path):
    """`cogrt generate --gpus 2` starts the ranks itself (here processes on the CPU): the frames are one process's,
    and only rank 0 writes."""
    out = tmp_path / "out"
    out.mkdir()
    cmd = [sys.executable, "-m", "cogrt.engine.cli", "generate", BASE["prompt"], "--model", str(checkpoint("5b")),
           "--frames", "9", "--height", "64", "--width", "64", "--steps", "3", "--seed", "11", "--device", "cpu",
           "--dtype", "fp32", "--gpus", "2", "-o", str(out / "v.mp4"), "--frames-npy", str(out / "v.npy")]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=tmp_path,
                         env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert sorted(p.name for p in out.iterdir()) == ["v.mp4", "v.npy"]
    assert res.stdout.count("wrote ") == 1
    want = pipeline("5b").generate(BASE["prompt"], num_frames=9, height=64, width=64, num_inference_steps=3,
                                   seed=11).frames
    assert np.abs(np.load(out / "v.npy").astype(int) - want.astype(int)).max() <= 1
