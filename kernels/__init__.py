"""Triton kernels, each with a native PyTorch reference beside it and registered as a `torch.library` op
with a fake implementation, so that torch.compile can trace through them. They import nothing from the engine:
the engine registers them (its `triton` attention backends, and its fused blocks in engine/fused.py).

- `adaln`: fused LayerNorm + adaLN modulation of both streams into the joint sequence; gated residuals.
- `qk`: per-head QK LayerNorm + 3D RoPE on the video tokens, straight from the fused qkv projection.
- `attention`: flash attention for the joint sequence, in bf16/fp16 and in int8/fp8.
- `measure`: CUDA-event timing, the relative error, and realistic attention inputs, for bench/ and the tests.

They run on the CPU under `TRITON_INTERPRET=1`, which is how CI tests them.
"""
