"""Tile plans for the VAE decode: the fewest, largest tiles whose peak fits in the memory that is free.

diffusers' tiled decode cuts every frame into tiles of 240 x 360 pixels (30 x 45 latents) that overlap by 1/6 and
1/5, whatever memory is free. At 480 x 720 that is 3 x 3 tiles and 1.4 times the frame's pixels to decode, 1.1 s
more than the untiled decode (bench/RESULTS.md). A plan here is a grid instead: `rows` x `cols` tiles, each as
large as the grid allows, with the same overlap in latents as diffusers' (5 high, 9 wide) so that its blend hides
the seams as well. The pipeline takes the cheapest grid (fewest pixels decoded) whose estimated peak fits; 1 x 1
is the untiled decode. diffusers' own tiled_decode runs the plan: only its tile attributes are set.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

OVERLAP_H, OVERLAP_W = 5, 9  # latents: diffusers' 30 / 6 and 45 / 5
MAX_ROWS, MAX_COLS = 6, 8
SCALE = 8  # pixels per latent (CogVideoX's VAE)

# The decode's peak in bytes of reserved memory (what a memory cap counts: the caching allocator's segments, with
# their fragmentation), in bf16 and up to 49 frames, as PEAK_FIXED + PEAK_PER_PIXEL x the pixels of one tile. An
# upper envelope of ten settings measured with the real-size VAE on an H200, from 2.7 GiB (4 x 4 tiles) to 23.2 GiB
# (untiled, 480 x 720): bench/RESULTS.md, "The capped decode". The peak hardly shrinks with fewer frames (the decoder
# works two latent frames at a time: 3 latent frames untiled peaked at 11.1 GiB allocated, 13 at 14.7), so it is
# scaled only up, by frames / 49, and by the dtype's size.
PEAK_FIXED = 0.62 * 2**30
PEAK_PER_PIXEL = 71.65e3


@dataclass(frozen=True)
class TilePlan:
    rows: int
    cols: int
    tile_h: int  # latents; the whole height when rows == 1
    tile_w: int
    overlap_h: int  # latents; 0 when rows == 1
    overlap_w: int

    @property
    def tiled(self) -> bool:
        return self.rows * self.cols > 1

    def decoded_pixels(self, h: int, w: int) -> int:
        """Pixels decoded for one frame of h x w latents, overlaps counted (tiles at the edges are cut short)."""
        def spans(n, t, o):
            return sum(min(t, n - i) for i in range(0, n, t - o))
        return spans(h, self.tile_h, self.overlap_h) * spans(w, self.tile_w, self.overlap_w) * SCALE * SCALE

    def peak_bytes(self, frames: int, itemsize: int) -> float:
        px = self.tile_h * self.tile_w * SCALE * SCALE
        return (PEAK_FIXED + PEAK_PER_PIXEL * px) * max(1.0, frames / 49) * itemsize / 2

    def apply(self, vae) -> None:
        """Set diffusers' tile attributes so that its tiled_decode cuts exactly this grid."""
        if not self.tiled:
            vae.disable_tiling()
            return
        vae.enable_tiling()
        vae.tile_latent_min_height, vae.tile_latent_min_width = self.tile_h, self.tile_w
        vae.tile_sample_min_height, vae.tile_sample_min_width = SCALE * self.tile_h, SCALE * self.tile_w
        vae.tile_overlap_factor_height = self.overlap_h / self.tile_h
        vae.tile_overlap_factor_width = self.overlap_w / self.tile_w


def _side(n: int, parts: int, overlap: int) -> tuple[int, int] | None:
    """(tile, overlap) in latents that cut n latents into exactly `parts` tiles as diffusers' loop steps them, or
    None: where diffusers' float arithmetic would step or blend otherwise (it truncates t·(1 - f) and 8t·f), or
    where the tiles would be less than three overlaps long."""
    if parts == 1:
        return n, 0
    stride = math.ceil(n / parts)
    tile = stride + overlap
    if tile >= n or tile < 3 * overlap or len(range(0, n, stride)) != parts:  # past 1/3 overlap, most work is waste
        return None
    f = overlap / tile
    if int(tile * (1 - f)) != stride or int(SCALE * tile * f) != SCALE * overlap:
        return None
    return tile, overlap


def grid(h: int, w: int, rows: int, cols: int) -> TilePlan | None:
    """The plan of rows x cols tiles for h x w latents, if diffusers' loop cuts it so (see _side)."""
    def side(n, parts, overlap):  # a slightly wider overlap where the float arithmetic misses the exact one
        return next((t for extra in range(4) if (t := _side(n, parts, overlap + extra))), None)
    a, b = side(h, rows, OVERLAP_H), side(w, cols, OVERLAP_W)
    return TilePlan(rows, cols, a[0], b[0], a[1], b[1]) if a and b else None


def plans(h: int, w: int) -> list[TilePlan]:
    """Every grid up to MAX_ROWS x MAX_COLS that cuts h x w latents, the cheapest (fewest pixels decoded) first."""
    out = [p for r in range(1, MAX_ROWS + 1) for c in range(1, MAX_COLS + 1) if (p := grid(h, w, r, c))]
    return sorted(out, key=lambda p: (p.decoded_pixels(h, w), p.rows * p.cols))


def choose(h: int, w: int, frames: int, itemsize: int, free_bytes: float, tiled: bool | None = None,
           margin: float = 0.8) -> TilePlan | None:
    """The cheapest plan whose estimated peak is within `margin` of `free_bytes`; None if none is. `tiled`:
    True forces a tiled plan, False the untiled one, None (auto) either."""
    for p in plans(h, w):
        if tiled is not None and p.tiled != tiled:
            continue
        if p.peak_bytes(frames, itemsize) <= margin * free_bytes:
            return p
    return None
