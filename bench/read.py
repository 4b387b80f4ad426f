"""Reading a checkpoint's weights onto the GPU: safetensors' own loader against engine.loader.read_safetensors,
at several reader counts and piece sizes, on the same files (in the page cache after the first pass).

    python -m cogrt.bench.read DIR/transformer --json read.json
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

from cogrt.engine import loader


def library(files, device):
    from safetensors import safe_open
    out = {}
    for f in files:
        with safe_open(str(f), framework="pt", device=str(device)) as fh:
            out.update({k: fh.get_tensor(k) for k in fh.keys()})
    return out


def timed(fn, device) -> tuple[float, int]:
    torch.cuda.synchronize(device)
    t0 = time.perf_counter()
    out = fn()
    torch.cuda.synchronize(device)
    seconds = time.perf_counter() - t0
    size = sum(t.numel() * t.element_size() for t in out.values())
    del out
    torch.cuda.empty_cache()
    return seconds, size


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("folder", help="a component folder: DIR/transformer or DIR/text_encoder")
    ap.add_argument("--configs", default="1x32,2x32,4x32,8x32,4x8,4x128", help="readers x MiB per piece")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--json")
    a = ap.parse_args(argv)
    dev = torch.device("cuda")
    folder = Path(a.folder)
    files = loader.weight_files(folder)  # any component: without its stem's files it takes every *.safetensors
    rows = {"safetensors (library)": lambda: library(files, dev)}
    for c in a.configs.split(","):
        w, mib = (int(x) for x in c.split("x"))
        rows[f"read_safetensors, {w} readers, {mib} MiB pieces"] = (
            lambda w=w, mib=mib: loader.read_safetensors(files, dev, chunk=mib << 20, workers=w))
    timed(rows["safetensors (library)"], dev)  # into the page cache first, so that every row reads from memory
    res = dict(gpu=torch.cuda.get_device_name(dev), torch=torch.__version__, folder=str(folder),
               command="python -m cogrt.bench.read " + " ".join(sys.argv[1:] if argv is None else argv), rows=[])
    for name, fn in rows.items():
        times = [timed(fn, dev) for _ in range(a.repeats)]
        best = min(t for t, _ in times)
        res["rows"].append(dict(row=name, seconds=best, gb_per_s=times[0][1] / best / 1e9, bytes=times[0][1]))
        print(f"{name:45s} {best:7.2f} s  {times[0][1] / best / 1e9:6.2f} GB/s", flush=True)
    if a.json:
        Path(a.json).write_text(json.dumps(res, indent=2))
    return res


if __name__ == "__main__":
    main()
