"""Writing frames to mp4 (H.264 through PyAV) and .npy, never leaving a half-written file behind."""
from __future__ import annotations

import math
import os
import tempfile
from pathlib import Path

import numpy as np


def atomic_write(path: str | os.PathLike, write) -> Path:
    """Write to a temporary file beside `path`, then rename it into place only once it is complete. The file gets
    the mode any file the user writes gets (0666 less the umask), not the temporary file's 0600."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=path.suffix, dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, 0o666 & ~umask())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def umask() -> int:
    """The process's umask, read without changing it where Linux says it (os.umask can only set it, and setting
    it twice races with other threads creating files)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except OSError:
        pass
    old = os.umask(0o022)
    os.umask(old)
    return old


def write_mp4(frames: np.ndarray, path: str | os.PathLike, fps: int, preset: str = "medium") -> Path:
    """frames: uint8 (F, H, W, 3). Odd sizes are padded by one pixel, as yuv420p needs even ones. `preset` is
    libx264's speed/size trade; at CRF 18 the quality is the same for each (a server, which waits for the write,
    uses "veryfast": 3.5x faster than "medium" on 49 x 480 x 720, bench/RESULTS.md "The video service")."""
    import av
    if frames.dtype != np.uint8 or frames.ndim != 4 or frames.shape[-1] != 3:
        raise ValueError(f"expected uint8 frames of shape (F, H, W, 3), got {frames.dtype} {frames.shape}")
    h, w = frames.shape[1:3]
    frames = np.pad(frames, ((0, 0), (0, h % 2), (0, w % 2), (0, 0)), mode="edge")

    def write(tmp):
        with av.open(tmp, mode="w", format="mp4") as out:
            stream = out.add_stream("libx264", rate=fps)
            stream.width, stream.height = frames.shape[2], frames.shape[1]
            stream.pix_fmt = "yuv420p"
            stream.options = {"crf": "18", "preset": preset}
            for f in frames:
                out.mux(stream.encode(av.VideoFrame.from_ndarray(f, format="rgb24")))
            out.mux(stream.encode(None))
    return atomic_write(path, write)


def write_npy(frames: np.ndarray, path: str | os.PathLike) -> Path:
    def write(tmp):
        with open(tmp, "wb") as f:
            np.save(f, frames)
    return atomic_write(path, write)


def read_mp4(path: str | os.PathLike) -> np.ndarray:
    import av
    with av.open(str(path)) as f:
        return np.stack([fr.to_ndarray(format="rgb24") for fr in f.decode(video=0)])


def psnr(ref: np.ndarray, x: np.ndarray) -> float:
    """Mean over frames of the PSNR (dB) of uint8 videos (F, H, W, 3); inf only where the videos are identical."""
    mse = ((ref.astype(np.float64) - x.astype(np.float64)) ** 2).reshape(len(ref), -1).mean(1)  # (F,)
    if not mse.any():
        return math.inf
    # one equal frame among differing ones would make the mean inf: count it as the smallest error a uint8
    # frame can show (one value off by one)
    mse = np.maximum(mse, 1.0 / ref[0].size)
    return float(np.mean(10 * np.log10(255.0**2 / mse)))
