"""Training data before the VAE: the manifest of (caption, video) pairs, frame/size buckets, and decoding.

Everything here fails early and says where: a manifest error names the file and the counts or columns, and a
video that cannot be used raises `BadVideo` with its path, so that `train.precompute` can skip it and list
it instead of dying halfway through a long run.
"""
from __future__ import annotations

import csv
import json
import math
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

Bucket = tuple[int, int, int]  # (frames, height, width) in pixels


class DataError(ValueError):
    """The manifest or the bucket list is unusable; raised before any training starts."""


class BadVideo(Exception):
    """One video cannot be used (missing, unreadable, corrupt, too short). Carries the path and the reason."""

    def __init__(self, path, reason: str):
        super().__init__(f"{path}: {reason}")
        self.path, self.reason = Path(path), reason


@dataclass
class Record:
    caption: str
    video: Path
    image: Path | None = None  # an I2V conditioning image; the video's first frame where absent


# ----------------------------------------------------------------------------------------------------
# Manifests

def read_manifest(source: str | os.PathLike, caption_column: str | None = None, video_column: str | None = None,
                  image_column: str | None = None) -> list[Record]:
    """Records from a directory (prompts.txt + videos.txt [+ images.txt], the diffusers-example layout), a .csv
    or a .jsonl file. The *_column arguments name the .txt files for a directory, the columns/keys otherwise.
    Relative paths are relative to the manifest's folder."""
    src = Path(source).expanduser()
    if src.is_dir():
        records = _read_txt_dir(src, caption_column or "prompts.txt", video_column or "videos.txt",
                                image_column)
    elif not src.is_file():
        raise DataError(f"dataset not found: {src} (expected a directory with prompts.txt and videos.txt, "
                        f"a .csv or a .jsonl file)")
    elif src.suffix.lower() == ".csv":
        records = _read_rows(src, _csv_rows(src), caption_column or "caption", video_column or "video",
                             image_column)
    elif src.suffix.lower() in (".jsonl", ".json"):
        records = _read_rows(src, _jsonl_rows(src), caption_column or "caption", video_column or "video",
                             image_column)
    else:
        raise DataError(f"unsupported manifest {src}: expected a directory, a .csv or a .jsonl file")
    if not records:
        raise DataError(f"empty dataset: {src} lists no videos")
    return records


def _lines(path: Path) -> list[str]:
    """Lines without their newline; blank lines at the end are dropped (editors leave them)."""
    lines = path.read_text(encoding="utf-8").splitlines()
    while lines and not lines[-1].strip():
        lines.pop()
    return lines


def _resolve(root: Path, entry: str) -> Path:
    p = Path(entry.strip()).expanduser()
    return p if p.is_absolute() else root / p


def _read_txt_dir(root: Path, captions: str, videos: str, images: str | None) -> list[Record]:
    for name in (captions, videos):
        if not (root / name).is_file():
            raise DataError(f"{root} has no {name} (a dataset directory needs {captions} and {videos}, "
                            f"one entry per line)")
    cap, vid = _lines(root / captions), _lines(root / videos)
    if len(cap) != len(vid):
        raise DataError(f"{captions} has {len(cap)} lines but {videos} has {len(vid)} (in {root}); "
                        f"they must pair up line by line")
    img: list[str | None] = [None] * len(vid)
    if images is not None and not (root / images).is_file():
        raise DataError(f"{root} has no {images}")
    if (root / (images or "images.txt")).is_file():
        name = images or "images.txt"
        img = _lines(root / name)
        if len(img) != len(vid):
            raise DataError(f"{name} has {len(img)} lines but {videos} has {len(vid)} (in {root})")
    for i, v in enumerate(vid):
        if not v.strip():
            raise DataError(f"{root / videos} line {i + 1} is empty")
    return [Record(c.strip(), _resolve(root, v), _resolve(root, m) if m and m.strip() else None)
            for c, v, m in zip(cap, vid, img)]


def _csv_rows(path: Path):
    with open(path, newline="", encoding="utf-8-sig") as f:  # -sig: spreadsheets write a byte-order mark
        reader = csv.DictReader(f)
        rows = [r for r in reader if any(str(v or "").strip() for v in r.values())]
        return reader.fieldnames or [], [(i + 2, r) for i, r in enumerate(rows)]  # line 1 is the header


def _jsonl_rows(path: Path):
    rows, keys = [], set()
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            r = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{path} line {n} is not valid JSON: {e}") from e
        if not isinstance(r, dict):
            raise DataError(f"{path} line {n} is not a JSON object")
        rows.append((n, r))
        keys.update(r)
    return sorted(keys), rows


def _read_rows(path: Path, parsed, cap_col: str, vid_col: str, img_col: str | None) -> list[Record]:
    found, rows = parsed
    for col in (cap_col, vid_col) + ((img_col,) if img_col else ()):
        if rows and col not in found:
            raise DataError(f"{path} has no {col!r} column (found: {', '.join(map(str, found)) or 'none'})")
    img_col = img_col or ("image" if "image" in found else None)
    records = []
    for n, r in rows:
        if r.get(vid_col) is None or not str(r[vid_col]).strip():
            raise DataError(f"{path} line {n} has no {vid_col!r}")
        image = r.get(img_col) if img_col else None
        records.append(Record(str(r.get(cap_col) or "").strip(), _resolve(path.parent, str(r[vid_col])),
                              _resolve(path.parent, str(image)) if image and str(image).strip() else None))
    return records


# ----------------------------------------------------------------------------------------------------
# Buckets

def parse_buckets(spec: str | list) -> list[Bucket]:
    """"49x480x720,17x64x64" (or a list of triples) -> sorted, de-duplicated [(frames, height, width), ...].

    Frames must be 8N+1 (the VAE keeps the first frame and compresses the rest by 4, and an even number of
    4-frame groups keeps the latent frame count odd, as CogVideoX's were trained); sizes multiples of 16
    (VAE /8, then the 2x2 patch)."""
    items = [s for s in spec.split(",") if s.strip()] if isinstance(spec, str) else list(spec)
    if not items:
        raise DataError("no buckets given: expected FRAMESxHEIGHTxWIDTH[,...], e.g. 49x480x720")
    out = set()
    for item in items:
        try:
            f, h, w = (int(v) for v in (item.lower().split("x") if isinstance(item, str) else item))
        except (ValueError, TypeError) as e:
            raise DataError(f"bad bucket {item!r}: expected FRAMESxHEIGHTxWIDTH, e.g. 49x480x720") from e
        if f < 1 or (f - 1) % 8:
            raise DataError(f"bucket {f}x{h}x{w}: frames must be 8N+1 (9, 17, 25, 33, 41, 49, ...), got {f}")
        if h <= 0 or w <= 0 or h % 16 or w % 16:
            raise DataError(f"bucket {f}x{h}x{w}: height and width must be positive multiples of 16")
        out.add((f, h, w))
    return sorted(out)


def pick_bucket(n_frames: int, height: int, width: int, buckets: list[Bucket]) -> Bucket | None:
    """The bucket for a video: first the resolution with the closest aspect ratio (then the closest area, so
    a small clip is not blown up when a smaller bucket of the same shape exists), then the most frames that the
    clip can fill. None when the clip is shorter than every bucket."""
    fits = [b for b in buckets if b[0] <= n_frames]
    if not fits:
        return None
    aspect, area = math.log(height / width), math.log(height * width)

    def distance(b):  # rounded so that equal aspect ratios tie exactly
        return round(abs(math.log(b[1] / b[2]) - aspect), 6), abs(math.log(b[1] * b[2]) - area)
    best = min(fits, key=distance)
    return max(b for b in fits if b[1:] == best[1:])


# ----------------------------------------------------------------------------------------------------
# Decoding

def _open(path):
    """av.open with errors turned into BadVideo."""
    import av
    if not Path(path).is_file():
        raise BadVideo(path, "file not found")
    try:
        container = av.open(str(path))
    except (av.error.FFmpegError, OSError) as e:
        raise BadVideo(path, f"unreadable ({e.__class__.__name__}: {e})") from e
    if not container.streams.video:
        container.close()
        raise BadVideo(path, "no video stream")
    return container


def probe_video(path: str | os.PathLike) -> tuple[int, int, int]:
    """(frames, height, width) from the container's metadata, decoding only where the frame count is missing."""
    import av
    with _open(path) as c:
        stream = c.streams.video[0]
        h, w, n = stream.codec_context.height, stream.codec_context.width, stream.frames
        if not n:
            try:
                n = sum(1 for _ in c.decode(stream))
            except av.error.FFmpegError as e:
                raise BadVideo(path, f"corrupt stream ({e})") from e
    if not (n and h and w):
        raise BadVideo(path, f"no decodable frames (frames={n}, size={w}x{h})")
    return n, h, w


def decode_video(path: str | os.PathLike, frames: int, height: int, width: int,
                 total: int | None = None) -> torch.Tensor:
    """`frames` frames of the clip as float (F, 3, H, W) in [-1, 1], resized to cover (H, W) and centre-cropped.

    Frames are taken from the start with stride max(1, total // frames): a long clip is subsampled evenly over
    (nearly) its whole length rather than cut to its first second, and a clip with just enough frames keeps
    them consecutive. `total` is the clip's frame count (probed when absent); container metadata can be
    wrong, so a clip that ends early is re-read with its real count."""
    import av
    total = total or probe_video(path)[0]
    if total < frames:
        raise BadVideo(path, f"too short: {total} frames, need {frames}")
    stride = max(1, total // frames)  # (frames - 1) * stride + 1 <= total always holds
    last = (frames - 1) * stride
    out = torch.empty(frames, 3, height, width)
    seen = 0
    with _open(path) as c:
        stream = c.streams.video[0]
        stream.thread_type = "AUTO"
        try:
            for i, frame in enumerate(c.decode(stream)):
                seen = i + 1
                if i % stride == 0:
                    rgb = torch.from_numpy(frame.to_ndarray(format="rgb24"))  # (h, w, 3) uint8
                    out[i // stride] = resize_crop(rgb.permute(2, 0, 1)[None], height, width)[0]
                if i == last:
                    return out
        except av.error.FFmpegError as e:
            raise BadVideo(path, f"corrupt stream after {seen} frames ({e})") from e
    if seen < frames or seen >= total:  # the stride was right for `seen` frames, so this is no metadata error
        raise BadVideo(path, f"too short: decoded {seen} frames, need {frames}")
    return decode_video(path, frames, height, width, total=seen)


def decode_image(path: str | os.PathLike, height: int, width: int) -> torch.Tensor:
    """An image file as float (3, H, W) in [-1, 1], resized and cropped as the video frames are."""
    from PIL import Image, UnidentifiedImageError
    try:
        with Image.open(path) as im:
            rgb = np.asarray(im.convert("RGB"))  # (h, w, 3) uint8
    except (OSError, UnidentifiedImageError) as e:
        raise BadVideo(path, f"unreadable image ({e})") from e
    return resize_crop(torch.from_numpy(rgb).permute(2, 0, 1)[None], height, width)[0]


def resize_crop(x: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """uint8 (N, 3, h, w) -> float (N, 3, H, W) in [-1, 1]: scale so the shorter side (relative to the target)
    fits exactly, antialiased, then centre-crop the longer one. The VAE sees no padding and no distortion."""
    h, w = x.shape[-2:]
    s = max(height / h, width / w)
    nh, nw = max(height, round(h * s)), max(width, round(w * s))
    y = x.float()
    if (nh, nw) != (h, w):
        y = F.interpolate(y, size=(nh, nw), mode="bilinear", antialias=True, align_corners=False)
    top, left = (nh - height) // 2, (nw - width) // 2
    y = y[..., top:top + height, left:left + width]  # (N, 3, H, W)
    return (y / 127.5 - 1.0).clamp_(-1.0, 1.0)
