"""Cache VAE latent moments and T5 embeddings once, so that training never runs the VAE or T5.

    python -m cogrt.train.precompute --data DIR_OR_FILE --model MODEL_DIR --out OUT --buckets 49x480x720

Layout of OUT (the trainer reads exactly this, through `LatentDataset`):

    index.jsonl                 one line per written sample: id, caption, frames, height, width, file, has_image
    samples/NNNNNN.safetensors  latent_mean, latent_logvar (C, F_latent, h, w); prompt_embeds (226, text_dim);
                                for I2V also image_mean, image_logvar (C, 1, h, w)
    summary.json                counts, skipped videos with reasons, VAE scaling, buckets, model

The moments (not a sample) are stored so that every epoch can draw a fresh latent from the VAE posterior.
Sample ids are manifest positions, so a rerun finds the samples it already wrote and skips them (each file
also records its caption and bucket, and is redone if those changed). Files are written to a temporary name
and renamed, so a killed run never leaves half a sample behind.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch.utils.data import Dataset, Sampler
from tqdm.auto import tqdm

from cogrt.engine.video import atomic_write

from .data import BadVideo, Bucket, DataError, Record, decode_image, decode_video, parse_buckets, pick_bucket, \
    probe_video, read_manifest


class PrecomputeError(RuntimeError):
    """Nothing usable came out of the dataset; the message lists why videos were skipped."""


@dataclass
class Summary:
    total: int
    written: int
    reused: int
    skipped: list[dict]
    vae_scaling_factor: float
    invert_scale_latents: bool
    model: str
    buckets: list[list[int]]
    is_i2v: bool
    out_dir: str = field(default="", repr=False)

    def describe(self) -> str:
        lines = [f"wrote {self.written} of {self.total} samples to {self.out_dir} "
                 f"({self.reused} already there), skipped {len(self.skipped)}"]
        lines += [f"  skipped {s['video']}: {s['reason']}" for s in self.skipped]
        return "\n".join(lines)


def _write_text(path: Path, text: str) -> None:
    atomic_write(path, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))


def sample_generator(seed: int, index: int) -> torch.Generator:
    """A CPU generator for one sample, independent of the others, so results do not depend on skips or order."""
    digest = hashlib.sha256(f"{seed}/{index}".encode()).digest()
    return torch.Generator("cpu").manual_seed(int.from_bytes(digest[:8], "little") & (2**63 - 1))


def _existing(path: Path, meta: dict) -> bool:
    """Whether a sample file from an earlier run holds this caption and bucket (a rerun's no-op)."""
    if not path.is_file():
        return False
    try:
        with safe_open(str(path), framework="pt") as f:
            return (f.metadata() or {}) == meta
    except Exception:  # unreadable: redo it
        return False


def encode_sample(pipe, record: Record, bucket: Bucket, total: int, i2v: bool, gen: torch.Generator,
                  video: torch.Tensor | None = None) -> dict:
    """One record -> its tensors, on the CPU, in the pipeline's dtype. Raises BadVideo for unusable inputs.

    `video` is the record's decoded clip when the caller decoded it ahead (precompute does, in threads)."""
    frames, height, width = bucket
    if video is None:
        video = decode_video(record.video, frames, height, width, total=total)  # (F, 3, H, W) in [-1, 1]
    vae = pipe.vae
    dev = next(vae.parameters()).device
    with torch.no_grad():
        x = video[None].permute(0, 2, 1, 3, 4).to(dev, vae.dtype)  # (1, 3, F, H, W): the VAE's layout
        dist = vae.encode(x).latent_dist
        out = {"latent_mean": dist.mean[0], "latent_logvar": dist.logvar[0]}  # (C, F_latent, h, w)
        out["prompt_embeds"] = pipe.encode_text([record.caption])[0]  # (226, text_dim)
        if i2v:
            # CogVideoX I2V training: the conditioning frame gets pixel noise of scale exp(N(-3, 0.5))
            first = decode_image(record.image, height, width) if record.image else video[0]  # (3, H, W)
            sigma = torch.exp(torch.normal(-3.0, 0.5, (1,), generator=gen))
            noisy = first + sigma * torch.randn(first.shape, generator=gen)
            img = noisy[None, :, None].to(dev, vae.dtype)  # (1, 3, 1, H, W): a one-frame video
            d = vae.encode(img).latent_dist
            out["image_mean"], out["image_logvar"] = d.mean[0], d.logvar[0]  # (C, 1, h, w)
    return {k: v.to("cpu", pipe.dtype).contiguous() for k, v in out.items()}


def precompute(manifest: str | os.PathLike | list[Record], model_dir: str | os.PathLike, out_dir: str | os.PathLike,
               buckets: str | list, device=None, dtype: torch.dtype | None = None, i2v: bool | None = None,
               seed: int = 0, vae_tiling: bool = False, progress: bool = False, workers: int = 4) -> Summary:
    """Encode every usable record of `manifest` into `out_dir` (layout in the module docstring).

    Bad or too-short videos and empty captions are skipped and listed in the summary; a run that writes
    nothing raises PrecomputeError. dtype defaults to the pipeline's (bf16 on CUDA, fp32 on the CPU), and
    the tensors are stored in it. i2v (store noisy first-frame moments) defaults to the model's kind.
    """
    from cogrt.engine.pipeline import load_pipeline
    records = manifest if isinstance(manifest, list) else read_manifest(manifest)
    if not records:
        raise DataError("empty dataset: no records")
    buckets = parse_buckets(buckets)
    out = Path(out_dir)

    # offload=True keeps the transformer (unused here) in host memory; only the VAE and T5 go to the device
    pipe = load_pipeline(model_dir, device=device, dtype=dtype, offload=True, compile=False)
    pipe.vae.to(pipe.device)
    pipe.text_encoder.to(pipe.device)
    if vae_tiling:
        pipe.vae.enable_tiling()
    i2v = pipe.cfg.is_i2v if i2v is None else i2v

    index, skipped, reused = [], [], 0
    todo = []  # (i, record, bucket, total, meta) still to encode, in manifest order
    for i, rec in enumerate(records):
        try:
            if not rec.caption.strip():
                raise BadVideo(rec.video, "empty caption")
            total, h, w = probe_video(rec.video)
            bucket = pick_bucket(total, h, w, buckets)
            if bucket is None:
                raise BadVideo(rec.video, f"too short: {total} frames, the shortest bucket needs "
                                          f"{min(b[0] for b in buckets)}")
        except BadVideo as e:
            skipped.append({"video": str(rec.video), "reason": e.reason})
            continue
        meta = {"caption": rec.caption, "video": str(rec.video), "bucket": "x".join(map(str, bucket)),
                "has_image": str(i2v)}
        if _existing(out / f"samples/{i:06d}.safetensors", meta):
            reused += 1
        else:
            todo.append((i, rec, bucket, total, meta))
        index.append({"id": f"{i:06d}", "caption": rec.caption, "frames": bucket[0], "height": bucket[1],
                      "width": bucket[2], "file": f"samples/{i:06d}.safetensors", "has_image": i2v,
                      "video": str(rec.video)})

    # Decoding is CPU work that PyAV does outside the GIL: threads decode ahead while the device encodes.
    failed = set()
    with ThreadPoolExecutor(workers) as ex:
        def decode(job):
            _, rec, (f, hh, ww), total, _ = job
            try:
                return decode_video(rec.video, f, hh, ww, total=total)
            except BadVideo as e:
                return e
        ahead = [ex.submit(decode, j) for j in todo[:2 * workers]]
        for k, job in enumerate(tqdm(todo, desc="precompute", unit="video", disable=not progress)):
            video = ahead[k].result()
            ahead[k] = None  # free the decoded clip once it is encoded
            if k + 2 * workers < len(todo):
                ahead.append(ex.submit(decode, todo[k + 2 * workers]))
            i, rec, bucket, total, meta = job
            try:
                if isinstance(video, BadVideo):
                    raise video
                tensors = encode_sample(pipe, rec, bucket, total, i2v, sample_generator(seed, i), video=video)
                atomic_write(out / f"samples/{i:06d}.safetensors",
                              lambda tmp: save_file(tensors, tmp, metadata=meta))
            except BadVideo as e:
                skipped.append({"video": str(rec.video), "reason": e.reason})
                failed.add(i)
    index = [e for e in index if int(e["id"]) not in failed]

    vcfg = pipe.vae.config
    summary = Summary(total=len(records), written=len(index), reused=reused, skipped=skipped,
                      vae_scaling_factor=float(vcfg.scaling_factor),
                      invert_scale_latents=bool(getattr(vcfg, "invert_scale_latents", False)),
                      model=str(model_dir), buckets=[list(b) for b in buckets], is_i2v=i2v, out_dir=str(out))
    out.mkdir(parents=True, exist_ok=True)
    _write_text(out / "index.jsonl", "".join(json.dumps(e) + "\n" for e in index))
    body = {k: v for k, v in asdict(summary).items() if k != "out_dir"}
    _write_text(out / "summary.json", json.dumps(body, indent=2) + "\n")
    if not index:
        reasons = "; ".join(f"{s['video']}: {s['reason']}" for s in skipped[:5])
        raise PrecomputeError(f"no usable samples among {len(records)} records (buckets "
                              f"{', '.join('x'.join(map(str, b)) for b in buckets)}): {reasons}"
                              + (f"; and {len(skipped) - 5} more" if len(skipped) > 5 else ""))
    return summary


# ----------------------------------------------------------------------------------------------------
# Reading the cache back

class LatentDataset(Dataset):
    """The samples of a precompute output directory; items are dicts of CPU tensors plus "bucket" (F, H, W)."""

    def __init__(self, root: str | os.PathLike, cache: bool = False):
        self.root = Path(root)
        self._cache: dict | None = {} if cache else None  # keep samples in memory after the first read
        if not (self.root / "index.jsonl").is_file():
            raise DataError(f"{self.root} has no index.jsonl: run `python -m cogrt.train.precompute` first")
        lines = (self.root / "index.jsonl").read_text(encoding="utf-8").splitlines()
        self.entries = [json.loads(line) for line in lines if line.strip()]
        if not self.entries:
            raise DataError(f"{self.root / 'index.jsonl'} lists no samples")
        summary = self.root / "summary.json"
        self.summary = json.loads(summary.read_text()) if summary.is_file() else {}
        self.buckets: list[Bucket] = [(e["frames"], e["height"], e["width"]) for e in self.entries]

    def __len__(self) -> int:
        return len(self.entries)

    def __getitem__(self, i: int) -> dict:
        e = self.entries[i]
        if self._cache is not None and i in self._cache:
            item = dict(self._cache[i])
        else:
            item = load_file(str(self.root / e["file"]))
            if self._cache is not None:
                self._cache[i] = dict(item)
        item.update(bucket=self.buckets[i], caption=e["caption"], id=e["id"])
        return item


def collate(items: list[dict]) -> dict:
    """Stack one bucket's items: tensors gain a batch dimension, "bucket" stays one tuple, the rest become lists."""
    buckets = {it["bucket"] for it in items}
    if len(buckets) != 1:
        raise ValueError(f"a batch mixes buckets {sorted(buckets)}: use BucketBatchSampler")
    out = {"bucket": buckets.pop()}
    for k, v in items[0].items():
        if k != "bucket":
            out[k] = torch.stack([it[k] for it in items]) if torch.is_tensor(v) else [it[k] for it in items]
    return out


class BucketBatchSampler(Sampler):
    """Batches of indices that share a bucket, in an order fixed by (seed, epoch).

    Each epoch shuffles within every bucket, cuts batches, then shuffles the batches. With world_size > 1
    every rank computes the same list and takes every world_size-th batch; the list is first padded by
    wrapping around (or, with drop_last, cut) to a multiple of world_size, so that all ranks step together.

    The position (epoch, batches yielded this epoch) is in state_dict(). The caller drives epochs with
    set_epoch(e), as with torch's DistributedSampler; set_epoch to the current epoch keeps the position (a
    resumed loop re-entering its epoch). Iterating a finished epoch again moves on to the next one, and a
    finished epoch is saved as (epoch + 1, 0), so a run resumed at an epoch boundary neither replays nor skips.
    A DataLoader with workers pulls a few batches ahead of training, so a trainer that wants the exact
    position can save its own {"epoch": e, "batch": steps_done_this_epoch}; load_state_dict takes either.
    """

    def __init__(self, dataset, batch_size: int, seed: int = 0, shuffle: bool = True, drop_last: bool = False,
                 rank: int = 0, world_size: int = 1):
        buckets = dataset.buckets if hasattr(dataset, "buckets") else list(dataset)
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is not in [0, {world_size})")
        self.groups: dict[Bucket, list[int]] = {}
        for i, b in enumerate(buckets):
            self.groups.setdefault(tuple(b), []).append(i)
        self.batch_size, self.seed, self.shuffle, self.drop_last = batch_size, seed, shuffle, drop_last
        self.rank, self.world_size = rank, world_size
        self.epoch, self.position = 0, 0
        self._cache: tuple[int, list] | None = None

    def _all_batches(self, epoch: int) -> list[list[int]]:
        rng = np.random.default_rng([self.seed, epoch])
        bs, batches = self.batch_size, []
        for b in sorted(self.groups):
            idx = np.array(self.groups[b])
            if self.shuffle:
                idx = rng.permutation(idx)
            chunks = [idx[j:j + bs].tolist() for j in range(0, len(idx), bs)]
            if self.drop_last and chunks and len(chunks[-1]) < bs:
                chunks.pop()
            batches += chunks
        if self.shuffle:
            batches = [batches[j] for j in rng.permutation(len(batches))]
        ws, n = self.world_size, len(batches)
        if ws > 1 and n % ws:
            if self.drop_last:
                batches = batches[:n - n % ws]
            else:
                batches += [batches[j % n] for j in range(ws - n % ws)]
        return batches

    def batches(self, epoch: int | None = None) -> list[list[int]]:
        """This rank's batches for an epoch (the current one by default), from the start."""
        epoch = self.epoch if epoch is None else epoch
        if self._cache is None or self._cache[0] != epoch:
            self._cache = (epoch, self._all_batches(epoch)[self.rank::self.world_size])
        return self._cache[1]

    def __iter__(self):
        if self.position >= len(self.batches()):  # this epoch is done: iterating again means the next one
            self.epoch, self.position = self.epoch + 1, 0
        mine = self.batches()
        while self.position < len(mine):
            self.position += 1
            yield mine[self.position - 1]

    def __len__(self) -> int:
        return len(self.batches())

    def set_epoch(self, epoch: int) -> None:
        if epoch != self.epoch:
            self.epoch, self.position = epoch, 0

    def state_dict(self) -> dict:
        epoch, batch = self.epoch, self.position
        if batch >= len(self.batches()):
            epoch, batch = epoch + 1, 0
        return {"epoch": epoch, "batch": batch, "seed": self.seed, "world_size": self.world_size}

    def load_state_dict(self, state: dict) -> None:
        """Continue from a saved position; the saved seed wins, so the order is the one that was interrupted.
        A different world_size maps the position through the global batch count (approximately)."""
        self.seed, self._cache = state.get("seed", self.seed), None
        self.epoch = int(state["epoch"])
        self.position = int(state["batch"]) * int(state.get("world_size", self.world_size)) // self.world_size


# ----------------------------------------------------------------------------------------------------

def main(argv=None) -> int:
    p = argparse.ArgumentParser(description="Cache VAE latents and T5 embeddings of a video dataset.")
    p.add_argument("--data", required=True, help="dataset dir (prompts.txt + videos.txt), .csv or .jsonl")
    p.add_argument("--model", required=True, help="CogVideoX checkpoint directory (diffusers layout)")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--buckets", required=True, help="FRAMESxHEIGHTxWIDTH[,...], e.g. 49x480x720")
    p.add_argument("--device", default=None)
    p.add_argument("--dtype", default=None, choices=("float32", "bfloat16", "float16"))
    p.add_argument("--i2v", default=None, action=argparse.BooleanOptionalAction,
                   help="store noisy first-frame latents (default: when the model is image-to-video)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--vae-tiling", action="store_true")
    p.add_argument("--caption-column", default=None)
    p.add_argument("--video-column", default=None)
    a = p.parse_args(argv)
    from cogrt.engine.loader import CheckpointError
    try:
        records = read_manifest(a.data, a.caption_column, a.video_column)
        summary = precompute(records, a.model, a.out, a.buckets, device=a.device,
                             dtype=getattr(torch, a.dtype) if a.dtype else None, i2v=a.i2v, seed=a.seed,
                             vae_tiling=a.vae_tiling, progress=True)
    except (DataError, PrecomputeError, CheckpointError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(summary.describe())
    return 0


if __name__ == "__main__":
    sys.exit(main())
