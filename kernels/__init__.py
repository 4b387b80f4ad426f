"""Triton kernels, each with a native PyTorch reference beside it (see the kernels issue)."""
