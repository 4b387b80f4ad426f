"""Several GPUs (or CPU processes) per video: parallel layouts, chosen per pipeline.

- `cfg`: the two halves of the CFG batch (unconditional, conditional) on two ranks; their predictions are gathered
  before the guidance combine, so every rank steps the same latents.
- `ulysses=N`: the video tokens split across N ranks in contiguous shards; the 226 text tokens are replicated. Every
  token-wise part of a block (norms, modulation, FFN, gates) runs on the rank's own tokens. Around attention an
  all-to-all over heads gives each rank the whole sequence for H/N heads (DeepSpeed-Ulysses); its output goes back
  the same way. The text rows of the output, which each rank computed for its heads only, are all-gathered. N must
  divide the head count (2B has 30 heads: 2, 3, 5 or 6 ranks).
- The two combine: 4 ranks = `cfg` x `ulysses=2` (rank = cfg_rank * N + sp_rank).

Everything else runs as on one device, on every rank: the text is encoded once (rank 0) and broadcast; TeaCache's
decision depends on the timestep alone, so it is the same on every rank; a LoRA switch happens on every rank, as
every rank runs the same request. The tiled VAE decode deals its tiles out to the ranks and gathers them, so the
video equals the single-device tiled decode. Only rank 0 writes files.
"""
from __future__ import annotations

import atexit
import math
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.distributed._functional_collectives as funcol
from torch import nn

from .model import CogVideoXTransformer


@dataclass(frozen=True)
class Layout:
    cfg: int = 1  # 1, or 2: the CFG halves on two ranks
    ulysses: int = 1  # ranks that split the sequence

    @property
    def world(self) -> int:
        return self.cfg * self.ulysses

    @classmethod
    def parse(cls, text: str | None) -> "Layout":
        """"cfg", "ulysses=2", "cfg,ulysses=2" (or None: one device)."""
        cfg, ulysses = 1, 1
        for part in filter(None, (p.strip() for p in (text or "").split(","))):
            name, _, value = part.partition("=")
            if name == "cfg" and not value:
                cfg = 2
            elif name == "ulysses" and value.isdigit() and int(value) >= 1:
                ulysses = int(value)
            else:
                raise ValueError(f"unknown parallel layout {part!r}; use cfg, ulysses=N, or both (cfg,ulysses=2)")
        return cls(cfg, ulysses)

    def check(self, heads: int, guidance: bool = True) -> None:
        if heads % self.ulysses:
            ok = [n for n in range(2, heads + 1) if heads % n == 0][:6]
            raise ValueError(f"ulysses={self.ulysses} needs the head count ({heads}) to be a multiple of it; this "
                             f"model can split its sequence over {ok} ranks")


class Stopped(RuntimeError):
    """Raised on the other ranks when rank 0 stops a request (a cancel, a deadline)."""


class Parallel:
    """A pipeline's place in its process group: this rank's CFG half and sequence shard, and the groups to talk to."""

    def __init__(self, layout: Layout, device: torch.device):
        if not dist.is_initialized():
            raise RuntimeError("a parallel layout needs torch.distributed initialised (torchrun, `cogrt generate "
                               "--gpus N`, or a multi-GPU serving replica)")
        if dist.get_world_size() != layout.world:
            raise ValueError(f"the layout {layout} needs {layout.world} ranks; this process group has "
                             f"{dist.get_world_size()}")
        self.layout, self.device = layout, device
        self.rank = dist.get_rank()
        self.cfg_rank, self.sp_rank = divmod(self.rank, layout.ulysses)
        n = layout.ulysses
        # every rank creates every group, in the same order, as new_group requires
        self.sp_group = self.cfg_group = None
        for c in range(layout.cfg):
            g = dist.new_group([c * n + s for s in range(n)])
            if c == self.cfg_rank:
                self.sp_group = g
        for s in range(n):
            g = dist.new_group([c * n + s for c in range(layout.cfg)])
            if s == self.sp_rank:
                self.cfg_group = g

    @property
    def first(self) -> bool:
        return self.rank == 0

    # ------------------------------------------------------------------------------------------------
    def broadcast(self, t: torch.Tensor) -> torch.Tensor:
        """Rank 0's tensor on every rank (others pass one of the same shape and dtype)."""
        dist.broadcast(t, src=0)
        return t

    def agree(self, on_step):
        """`on_step` for every rank of a parallel request: at each call rank 0's verdict (did its callback raise?)
        goes to every rank, so that all stop at the same step, rank 0 with its own error and the others with
        Stopped, instead of leaving them waiting in a collective. One small broadcast a step."""
        def step(stage: str, done: int, total: int) -> None:
            err = None
            try:
                on_step(stage, done, total)
            except Exception as e:  # noqa: BLE001 (handed on below, on every rank)
                err = e
            stop = self.broadcast(torch.tensor([int(err is not None and self.first)], device=self.device))
            if bool(stop.item()):
                raise err if self.first else Stopped(f"rank 0 stopped the request at {stage} {done}/{total}")
        return step

    def cfg_gather(self, v: torch.Tensor) -> torch.Tensor:
        """Each CFG rank's half of the batch (B/2, ...) -> the whole batch, unconditional half first."""
        parts = [torch.empty_like(v) for _ in range(self.layout.cfg)]
        dist.all_gather(parts, v.contiguous(), group=self.cfg_group)
        return torch.cat(parts)

    def shards(self, n_tokens: int) -> list[tuple[int, int]]:
        """The contiguous [start, end) of each sequence rank's video tokens; they differ by at most one."""
        n = self.layout.ulysses
        base, extra = divmod(n_tokens, n)
        bounds = [0]
        for r in range(n):
            bounds.append(bounds[-1] + base + (r < extra))
        return list(zip(bounds, bounds[1:]))

    def gather_tokens(self, v: torch.Tensor, total: int) -> torch.Tensor:
        """Each sequence rank's video tokens (B, S_r, D) -> all of them (B, S, D), in rank order."""
        sizes = [e - s for s, e in self.shards(total)]
        parts = [v.new_empty(v.shape[0], n, v.shape[2]) for n in sizes]
        dist.all_gather(parts, v.contiguous(), group=self.sp_group)
        return torch.cat(parts, dim=1)


def _all_to_all(chunks: list[torch.Tensor], out_shapes: list[tuple], group) -> list[torch.Tensor]:
    """Send chunks[j] to rank j of `group`; receive from each rank j a tensor of out_shapes[j]. Functional
    collectives, so that a compiled block traces through them."""
    send = torch.cat([c.reshape(-1) for c in chunks])
    sizes = [math.prod(s) for s in out_shapes]
    recv = funcol.all_to_all_single(send, sizes, [c.numel() for c in chunks], group)
    return [r.view(s) for r, s in zip(recv.split(sizes), out_shapes)]


class UlyssesAttention(nn.Module):
    """Attention over the whole joint sequence from a rank's shard of it: q, k, v (B, H, n_text + S_r, d), where
    the text rows are every rank's and the video rows this rank's. The inner module attends, on the rank's heads.
    `n_text` and `total` (video tokens in all) are the call's, set by UlyssesTransformer before the blocks run."""

    def __init__(self, inner: nn.Module, par: Parallel):
        super().__init__()
        self.inner, self.par, self.n_text, self.total = inner, par, 0, 0

    def forward(self, q, k, v):
        par, n, t = self.par, self.par.layout.ulysses, self.n_text
        B, H, _, d = q.shape
        h = H // n
        mine = slice(par.sp_rank * h, (par.sp_rank + 1) * h)
        sizes = [e - s for s, e in par.shards(self.total)]

        def to_heads(x):  # (B, H, t + S_r, d) -> (B, H/n, t + S, d): all video tokens, this rank's heads
            vid = x[:, :, t:]
            got = _all_to_all([vid[:, j * h:(j + 1) * h] for j in range(n)], [(B, h, s, d) for s in sizes],
                              par.sp_group)
            return torch.cat([x[:, mine, :t], *got], dim=2)
        o = self.inner(to_heads(q), to_heads(k), to_heads(v))  # (B, H/n, t + S, d)
        # back: the text rows from every rank's heads, and this rank's video rows for every head
        text = funcol.all_gather_tensor(o[:, :, :t].contiguous(), 1, par.sp_group)  # (B, H, t, d), rank order
        bounds = par.shards(self.total)
        video = _all_to_all([o[:, :, t + s:t + e] for s, e in bounds], [(B, h, sizes[par.sp_rank], d)] * n,
                            par.sp_group)
        return torch.cat([text, torch.cat(video, dim=1)], dim=2)


class UlyssesTransformer(CogVideoXTransformer):
    """The transformer whose blocks run on this rank's shard of the video tokens (see the module docstring)."""

    par: Parallel

    def run_blocks(self, v, c, temb, rope=None, blocks=None):
        par, total = self.par, v.shape[1]
        start, end = par.shards(total)[par.sp_rank]
        for b in self.blocks:  # set only when they change: a compiled block recompiles for new values
            if (b.attend.n_text, b.attend.total) != (c.shape[1], total):
                b.attend.n_text, b.attend.total = c.shape[1], total
        local_rope = None if rope is None else tuple(r[start:end].contiguous() for r in rope)
        v, c = super().run_blocks(v[:, start:end].contiguous(), c, temb, local_rope, blocks)
        return par.gather_tokens(v, total), c


def split_sequence(model: CogVideoXTransformer, par: Parallel) -> None:
    """The runner's sequence-parallel transform: the block stack runs on this rank's shard of the video tokens,
    each block's attention wrapped to see the whole sequence. After the attention backend, before compile."""
    par.layout.check(model.cfg.num_heads)
    if par.layout.ulysses == 1:
        return
    model.__class__ = UlyssesTransformer  # the same module, its block stack run on a shard
    model.par = par
    for b in model.blocks:
        b.attend = UlyssesAttention(b.attend, par)


def init_from_env(device: str | None = None) -> torch.device:
    """Join the process group that torchrun's environment describes (NCCL on GPUs, gloo on the CPU) -> this rank's
    device."""
    import os
    cuda = torch.cuda.is_available() and device != "cpu"
    if cuda:
        dev = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        torch.cuda.set_device(dev)
    else:
        dev = torch.device("cpu")
    if not dist.is_initialized():
        dist.init_process_group("nccl" if cuda else "gloo", device_id=dev if cuda else None)
        # left to the interpreter's teardown, gloo's worker threads can outlive it and abort the process at exit
        # ("terminate called without an active exception", pytorch/pytorch#190489; seen once in the suite's
        # four-rank test)
        atexit.register(_leave)
    return dev


def _leave() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


# ----------------------------------------------------------------------------------------------------
def tiled_decode(vae, z: torch.Tensor, par: Parallel) -> torch.Tensor:
    """diffusers' AutoencoderKLCogVideoX.tiled_decode with its tiles dealt out to the ranks: tile k is decoded by
    rank k mod world, then broadcast, and every rank blends them as diffusers does. -> the decoded video."""
    _, _, frames, height, width = z.shape
    step_h = int(vae.tile_latent_min_height * (1 - vae.tile_overlap_factor_height))
    step_w = int(vae.tile_latent_min_width * (1 - vae.tile_overlap_factor_width))
    blend_h = int(vae.tile_sample_min_height * vae.tile_overlap_factor_height)
    blend_w = int(vae.tile_sample_min_width * vae.tile_overlap_factor_width)
    keep_h, keep_w = vae.tile_sample_min_height - blend_h, vae.tile_sample_min_width - blend_w
    fbs = vae.num_latent_frames_batch_size
    places = [(i, j) for i in range(0, height, step_h) for j in range(0, width, step_w)]
    world, rank = dist.get_world_size(), dist.get_rank()
    tiles = {}
    for k, (i, j) in enumerate(places):
        if k % world == rank:
            cache, parts = None, []
            for b in range(max(frames // fbs, 1)):  # the latent frames in batches, the conv cache carried along
                extra = frames % fbs
                start, end = fbs * b + (0 if b == 0 else extra), fbs * (b + 1) + extra
                tile = z[:, :, start:end, i:i + vae.tile_latent_min_height, j:j + vae.tile_latent_min_width]
                if vae.post_quant_conv is not None:
                    tile = vae.post_quant_conv(tile)
                tile, cache = vae.decoder(tile, conv_cache=cache)
                parts.append(tile)
            tiles[k] = torch.cat(parts, dim=2)
    for k in range(len(places)):  # every rank gets every tile: its shape first, then its values
        owner = k % world
        shape = torch.tensor(tiles[k].shape if owner == rank else [0] * 5, device=z.device)
        dist.broadcast(shape, src=owner)
        if owner != rank:
            tiles[k] = z.new_empty(shape.tolist())
        dist.broadcast(tiles[k], src=owner)
    rows_i = sorted({i for i, _ in places})
    cols_j = sorted({j for _, j in places})
    grid = [[tiles[places.index((i, j))] for j in cols_j] for i in rows_i]
    out_rows = []
    for r, row in enumerate(grid):
        out = []
        for c, tile in enumerate(row):
            if r > 0:
                tile = vae.blend_v(grid[r - 1][c], tile, blend_h)
            if c > 0:
                tile = vae.blend_h(row[c - 1], tile, blend_w)
            out.append(tile[:, :, :, :keep_h, :keep_w])
        out_rows.append(torch.cat(out, dim=4))
    return torch.cat(out_rows, dim=3)
