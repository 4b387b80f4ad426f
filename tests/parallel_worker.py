"""One rank of a parallel run, started by tests/test_parallel.py through torchrun on the CPU (gloo): it generates
each case with the layout given and rank 0 saves the frames, for the test to hold against one process's."""
import json
import sys
from pathlib import Path

import numpy as np
import torch

from cogrt.engine import load_pipeline
from cogrt.engine.parallel import tiled_decode


def main(ckpt: str, out: str, layout: str, cases: str) -> None:
    pipe = load_pipeline(ckpt, device="cpu", dtype=torch.float32, parallel=layout)
    par = pipe.parallel
    for name, kw in json.loads(cases).items():
        kw["loras"] = [tuple(x) for x in kw.get("loras", [])]
        res = pipe.generate(**kw)
        if par.first:
            np.save(Path(out) / f"{name}.npy", res.frames)
            Path(out, f"{name}.json").write_text(json.dumps({"computed": res.steps_computed}))
    # the tiled VAE decode with its tiles dealt out: small tiles, so that a 64 x 64 video has nine
    vae = pipe.vae
    vae.enable_tiling(tile_sample_min_height=32, tile_sample_min_width=32, tile_overlap_factor_height=0.25,
                      tile_overlap_factor_width=0.25)
    vae.tile_latent_min_height = vae.tile_latent_min_width = 4
    z = torch.randn(1, vae.config.latent_channels, 3, 8, 8, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        video = tiled_decode(vae, z, par)
    if par.first:
        torch.save(video, Path(out) / "decode.pt")


if __name__ == "__main__":
    main(*sys.argv[1:5])
