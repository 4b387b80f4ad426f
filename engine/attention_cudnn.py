"""`cudnn-fp8`: cuDNN's own fp8 flash attention (Hopper and newer), through the `cudnn` Python package
(nvidia-cudnn-frontend), which loads the libcudnn that torch already carries. A baseline to measure ours
against (bench/kernels.py); `auto` and the modes never pick it.

cuDNN takes e4m3 q, k, v with one scale per tensor, and on Hopper writes O in e4m3 too. Per-tensor scales
suit fp8 better than they would int8, since e4m3 is floating point: a head of small values keeps its
relative precision. What hurts fp8 attention in CogVideoX is the offsets, so, as in our triton-fp8:
- K is smoothed: its mean over tokens (per batch row, head and channel) is subtracted. Each score row then
  moves by a constant, which the softmax ignores.
- V is smoothed and scaled per channel: v' = (v − mean)/s, so that every channel spans e4m3's range. The
  rows of P sum to one, so o = (P·v')·s + mean.
`reference_fp8` emulates what the kernel rounds, in PyTorch, for the CPU tests.

The graph is built once per shape, device and thread, then reused with new pointers. Each thread has its own
cuDNN handle and workspace, so that calls on different streams never share a workspace.
"""
from __future__ import annotations

import threading

import torch

from .attention import register

FP8 = torch.float8_e4m3fn
FP8_MAX = 448.0
# cuDNN computes P = exp(S − rowmax) <= 1 and stores P·P_SCALE in e4m3 for the P·V matmul. Scaled to the top
# of e4m3's range, P keeps 3 mantissa bits down to 2⁻⁶/448 ≈ 3.5e-5 (a uniform row of 17,776 keys is 5.6e-5);
# smaller probabilities lose bits or flush to zero, as in any fp8 P·V.
P_SCALE = FP8_MAX
_local = threading.local()  # this thread's cuDNN handles and graphs


def _graph(shape, strides, device):
    """(graph, its tensors in execute order, workspace, handle, its fixed scalars) for fp8 q, k, v of this shape
    and layout."""
    cache = _local.__dict__.setdefault("graphs", {})
    key = (shape, strides, device)
    if key not in cache:
        import cudnn
        f8, f32 = cudnn.data_type.FP8_E4M3, cudnn.data_type.FLOAT
        handles = _local.__dict__.setdefault("handles", {})
        if device not in handles:
            handles[device] = cudnn.create_handle()
        handle = handles[device]
        g = cudnn.pygraph(io_data_type=f8, intermediate_data_type=f32, compute_data_type=f32, handle=handle)
        qkv = [g.tensor(name=n, dim=shape, stride=strides, data_type=f8) for n in "qkv"]
        scales = [g.tensor(name=n, dim=(1, 1, 1, 1), stride=(1, 1, 1, 1), data_type=f32)
                  for n in ("descale_q", "descale_k", "descale_v", "descale_s", "scale_s", "scale_o")]
        o, _, amax_s, amax_o = g.sdpa_fp8(*qkv, *scales, generate_stats=False, attn_scale=shape[-1] ** -0.5)
        o.set_output(True).set_dim(shape).set_stride(strides).set_data_type(f8)
        for a in (amax_s, amax_o):  # cuDNN always makes them; they are written, not used
            a.set_output(True).set_dim((1, 1, 1, 1)).set_stride((1, 1, 1, 1)).set_data_type(f32)
        g.build([cudnn.heur_mode.A, cudnn.heur_mode.FALLBACK])
        ws = torch.empty(g.get_workspace_size(), dtype=torch.uint8, device=device)
        # the fixed scales (descale_v, descale_s, scale_s, scale_o) and the amax outputs, made once, not per call
        fixed = tuple(torch.full((1, 1, 1, 1), x, dtype=torch.float32, device=device)
                      for x in (1.0, 1 / P_SCALE, P_SCALE, 1.0, 0.0, 0.0))
        cache[key] = (g, (*qkv, *scales, o, amax_s, amax_o), ws, handle, fixed)
    return cache[key]


def quantize(q, k, v):
    """-> q8, k8, v8 (e4m3, q's shape), descale_q, descale_k (1, 1, 1, 1), v_scale and v_mean (B, H, 1, d)."""
    # elementwise results keep their input's strides, and the block passes views of its qkv projection:
    # contiguous (B, H, N, d) copies give the one layout the graph is built for
    def per_tensor(x):
        s = FP8_MAX / x.abs().amax().float().clamp_min(1e-12)
        return (x.float() * s).clamp(-FP8_MAX, FP8_MAX).to(FP8).contiguous(), (1 / s).reshape(1, 1, 1, 1)
    q8, dq = per_tensor(q)
    k8, dk = per_tensor(k - k.mean(dim=2, keepdim=True, dtype=torch.float32))
    v_mean = v.mean(dim=2, keepdim=True, dtype=torch.float32)  # (B, H, 1, d)
    vc = v.float() - v_mean
    v_scale = (vc.abs().amax(dim=2, keepdim=True) / FP8_MAX).clamp_min(1e-12)
    v8 = (vc / v_scale).clamp(-FP8_MAX, FP8_MAX).to(FP8).contiguous()
    return q8, k8, v8, dq, dk, v_scale, v_mean


def attend_fp8(q8, k8, v8, descale_q, descale_k):
    """cuDNN's fp8 attention on prequantized e4m3 inputs (B, H, N, d), v with unit descale -> O (e4m3)."""
    if not (q8.is_contiguous() and k8.is_contiguous() and v8.is_contiguous()):
        raise ValueError("attend_fp8 takes contiguous (B, H, N, d) q8, k8 and v8, as quantize makes them")
    import cudnn
    dev = q8.device
    with torch.cuda.device(dev):  # cuDNN builds and runs on the current device
        g, tensors, ws, handle, (descale_v, descale_s, scale_s, scale_o, amax_s, amax_o) = _graph(
            tuple(q8.shape), tuple(q8.stride()), dev)
        o8 = torch.empty_like(q8)
        buffers = [q8, k8, v8, descale_q, descale_k, descale_v, descale_s, scale_s, scale_o, o8, amax_s, amax_o]
        cudnn.set_stream(handle, torch.cuda.current_stream(dev).cuda_stream)
        g.execute(dict(zip(tensors, buffers)), ws, handle=handle)
    return o8


def reference_fp8(q8, k8, v8, descale_q, descale_k):
    """What attend_fp8 computes, in PyTorch: e4m3 inputs, fp32 scores, P = exp(S − rowmax) stored in e4m3 at
    P_SCALE for the P·V matmul, the row sum taken in fp32, O rounded to e4m3."""
    s = (q8.float() * descale_q) @ (k8.float() * descale_k).transpose(-1, -2) * q8.shape[-1] ** -0.5
    p = torch.exp(s - s.amax(dim=-1, keepdim=True))
    o = ((p * P_SCALE).to(FP8).float() @ v8.float()) / P_SCALE / p.sum(dim=-1, keepdim=True)
    return o.clamp(-FP8_MAX, FP8_MAX).to(FP8)


@torch.library.custom_op("cogrt::cudnn_fp8_attention", mutates_args=())
def cudnn_fp8_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """softmax(q kᵀ/√d) v through cuDNN's fp8 kernel, for q, k, v (B, H, N, d); out in q's dtype. A custom op, so
    that the compiled blocks (fullgraph) trace around the cuDNN call."""
    if not q.is_cuda or torch.cuda.get_device_capability(q.device) < (9, 0):
        raise ValueError("cudnn-fp8 needs a Hopper or newer GPU")
    q8, k8, v8, dq, dk, v_scale, v_mean = quantize(q, k, v)
    o8 = attend_fp8(q8, k8, v8, dq, dk)
    return (o8.float() * v_scale + v_mean).to(q.dtype)


@cudnn_fp8_attention.register_fake
def _(q, k, v):
    return q.new_empty(q.shape)


@register("cudnn-fp8")
def cudnn_fp8(q, k, v):
    return cudnn_fp8_attention(q, k, v)
