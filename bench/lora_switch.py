"""LoRA switch time: how long our runner takes to make another LoRA set the fused one (pipe.runner.switch_loras).

    python -m cogrt.bench.lora_switch --preset cogvideox-5b --mode fp8 --json lora.json --results bench/RESULTS.md
    python -m cogrt.bench.lora_switch --device cpu --preset tiny-5b --mode int8-weight-only --rank 4

Two random rank-`--rank` attention LoRAs (to_q, to_k, to_v, to_out.0 of every block) are written with
save_lora_file and read once (a request reads its files before it waits for the pipeline). Then, `--repeats`
times: none -> A, A -> A (the fused set again: should cost nothing), A -> B, B -> none. Each switch rewrites the
touched layers from their pinned host originals plus the deltas, re-quantized in place in a quantized mode.
Reported: the median of each, every sample, and the layers rewritten (our q/k/v are one fused layer).
Weights are random and the VAE and T5 tiny: only the transformer's layers take part.

Target (H100, 5B, rank 128): <= 1 s a switch.
"""
from __future__ import annotations

import argparse
import json
import shlex
import statistics
import sys
import tempfile
from pathlib import Path

import torch

TARGET_S = 1.0
SWITCHES = ("none->A", "A->A", "A->B", "B->none")


def random_lora(path: Path, cfg, rank: int, seed: int, scale: float = 0.01) -> Path:
    """A rank-`rank` LoRA on every attention projection of cfg's blocks; `scale` sets B's size, so its effect."""
    from cogrt.engine.lora import save_lora_file
    g = torch.Generator().manual_seed(seed)
    d = cfg.dim
    pairs = {f"transformer_blocks.{i}.attn1.{m}": (torch.randn(rank, d, generator=g) / d**0.5,
                                                   torch.randn(d, rank, generator=g) * scale)
             for i in range(cfg.num_layers) for m in ("to_q", "to_k", "to_v", "to_out.0")}
    return save_lora_file(path, pairs, r=rank, alpha=rank)


def snapshot(linear) -> list[torch.Tensor]:
    """A layer's stored weight: a plain tensor, or a quantized one's data and scales."""
    w = linear.weight
    inner = w.__tensor_flatten__()[0] if hasattr(w, "__tensor_flatten__") else None
    return [t.detach().clone() for t in ([getattr(w, n) for n in inner] if inner else [w])]


def main(argv=None) -> dict:
    argv = sys.argv[1:] if argv is None else list(argv)
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--preset", default="cogvideox-5b")
    ap.add_argument("--mode", default="fp8")
    ap.add_argument("--rank", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--model", help="a checkpoint directory: load_pipeline from it, so the originals are read from "
                                    "the file at a layer's first switch (the first none->A sample) and pinned then")
    ap.add_argument("--json")
    ap.add_argument("--results", help="append the table and the command to this markdown file (bench/RESULTS.md)")
    a = ap.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="cogrt-lora-") as tmp:  # two 5B rank-128 files: 0.5 GB each
        return run(a, argv, Path(tmp))


def run(a, argv, tmp: Path) -> dict:
    from cogrt.bench.components import append_results, engine_transformer, environment, random_components, weights_note
    from cogrt.engine import modes
    from cogrt.engine.lora import lora_key, read_lora
    from cogrt.engine.pipeline import assemble
    dev = torch.device(a.device)
    dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
    if a.model:
        from cogrt.engine.pipeline import load_pipeline
        pipe = load_pipeline(a.model, dev, dtype, mode=a.mode, cache_dir=tmp / "compile")
        cfg, weights = pipe.cfg, f"the checkpoint in {a.model}; originals read from it at the first switch"
    else:
        c = random_components(a.preset, dev, dtype, a.seed, real_vae_t5=False)
        ours = engine_transformer(c.transformer, c.cfg, dtype, copy=False)
        c.transformer = None  # our module holds the weights now
        # keep_originals: pinned copies of the high-precision weights a switch rebuilds from, made at load
        pipe = assemble(ours, c.vae, c.text_encoder, c.tokenizer, c.scheduler_config, dev, dtype, a.mode,
                        modes.transforms_for(a.mode, dev), cache_dir=tmp / "compile", keep_originals=True)
        cfg, weights = c.cfg, weights_note(c.cfg, False) + "; originals pinned at load"
    paths = {n: random_lora(tmp / f"{n}.safetensors", cfg, a.rank, a.seed + k) for k, n in enumerate("AB")}
    sets = {n: ([(read_lora(p), 1.0)], lora_key([(p, 1.0)])) for n, p in paths.items()}
    sets["none"] = ([], lora_key([]))

    times = {s: [] for s in SWITCHES}
    layer = pipe.transformer.blocks[0].qkv
    base, fused, layers = snapshot(layer), None, 0
    for _ in range(a.repeats):
        for s in SWITCHES:
            times[s].append(pipe.runner.switch_loras(*sets[s.split("->")[1]]))  # it syncs the device
            layers = max(layers, len(pipe.runner.loras.touched))
            fused = snapshot(layer) if s == "A->A" else fused
    # the switches did what they are timed for: A changed the weights, and none put the originals back exactly
    changed, restored = not all(map(torch.equal, base, fused)), all(map(torch.equal, base, snapshot(layer)))
    if not (changed and restored):
        raise RuntimeError(f"LoRA switching did not change the weights ({changed=}) or restore them ({restored=})")

    meta = dict(environment(dev), preset=a.preset, mode=a.mode, transforms=pipe.transforms.describe(), rank=a.rank,
                repeats=a.repeats, weights=weights, layers_rewritten=layers,
                lora_file_mib=paths["A"].stat().st_size / 2**20, target_s=TARGET_S,
                command="python -m cogrt.bench.lora_switch " + shlex.join(argv),
                switches={s: dict(median_s=statistics.median(v), samples_s=v) for s, v in times.items()})
    rows = ["| switch | median s | samples s | target s |", "|---|---|---|---|"]
    for s, r in meta["switches"].items():
        rows.append(f"| {s} | {r['median_s']:.3f} | {', '.join(f'{x:.3f}' for x in r['samples_s'])} | "
                    f"{'0' if s == 'A->A' else f'{TARGET_S:g}'} |")
    table = "\n".join(rows)
    print(table)
    print(f"layers rewritten: {layers} (fused q/k/v and out of {cfg.num_layers} blocks); "
          f"LoRA file {meta['lora_file_mib']:.0f} MiB")
    if a.json:
        Path(a.json).write_text(json.dumps(meta, indent=2))
    if a.results:
        append_results(a.results, f"LoRA switch: {a.model or a.preset}, {a.mode}, rank {a.rank} attention LoRA "
                       f"({layers} layers rewritten)", meta, table)
    return meta


if __name__ == "__main__":
    main()
