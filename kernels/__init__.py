"""Triton kernels, each with a native PyTorch reference beside it and registered as a `torch.library` op
with a fake implementation, so that torch.compile can trace through them.

- `adaln`: fused LayerNorm + adaLN modulation of both streams into the joint sequence; gated residuals.
- `qk`: per-head QK LayerNorm + 3D RoPE on the video tokens, straight from the fused qkv projection.
- `attention`: a flash-attention forward for the joint sequence; the engine's `triton` attention backend.

`CogVideoXTransformer.set_fused_norms(True)` routes inference through them. They run on the CPU under
`TRITON_INTERPRET=1`, which is how CI tests them.
"""
