"""How the kernels and the engine are measured, in one place for bench/, the tests and the engine's `auto`
attention choice: CUDA-event timing, the relative error, and attention inputs shaped like a trained model's."""
from __future__ import annotations

import torch


def cuda_times(fn, warmup: int = 1, iters: int = 3) -> list[float]:
    """Milliseconds of each of `iters` calls of fn, timed with CUDA events after `warmup` untimed calls."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    out = []
    for _ in range(iters):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        b.synchronize()
        out.append(a.elapsed_time(b))
    return out


def rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    """‖got − want‖ / ‖want‖, in fp32."""
    got, want = got.float(), want.float()
    return ((got - want).norm() / want.norm()).item()


def realistic_qkv(B, H, N, d, seed=0, outliers=4.0, k_offset=2.0, device="cpu", dtype=torch.float32):
    """q and k as CogVideoX's QK LayerNorm leaves them: unit-variance rows times learned per-channel weights,
    a few of them outliers, plus a bias that gives K a large per-channel offset; v with per-channel means."""
    g = torch.Generator(device).manual_seed(seed)

    def normed(weight_outlier, bias_scale):
        w = torch.ones(H, 1, d, device=device)
        w[..., torch.randperm(d, generator=g, device=device)[:3]] = weight_outlier
        x = torch.nn.functional.layer_norm(torch.randn(B, H, N, d, generator=g, device=device), (d,))
        return x * w * 1.5 + bias_scale * torch.randn(H, 1, d, generator=g, device=device)
    q, k = normed(outliers, 0.3), normed(outliers ** 0.5, k_offset)
    v = torch.randn(B, H, N, d, generator=g, device=device) + 2 * torch.randn(1, H, 1, d, generator=g, device=device)
    return [t.to(dtype) for t in (q, k, v)]


def as_projection_views(q, k, v):
    """The same q, k, v (B, H, N, d) as strided views of one (B, N, 3, H, d) tensor, as the block passes them
    (views of its fused qkv projection)."""
    qkv = torch.stack([q, k, v], 2)  # (B, H, 3, N, d)
    return qkv.permute(0, 3, 2, 1, 4).contiguous().permute(0, 3, 2, 1, 4).unbind(2)


def sampled_error(out, q, k, v, rows: int = 256) -> float:
    """‖out − exact‖ / ‖exact‖ over a fixed sample of query rows, exact = fp32 math (the full N×N fp32 scores
    of a real shape would not fit)."""
    idx = torch.randperm(q.shape[2], generator=torch.Generator().manual_seed(0))[:rows].to(q.device)
    p = torch.softmax(q[:, :, idx].float() @ k.float().transpose(-1, -2) * q.shape[-1] ** -0.5, dim=-1)
    return rel_err(out[:, :, idx], p @ v.float())
