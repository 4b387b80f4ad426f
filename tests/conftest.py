"""Shared fixtures: tiny random checkpoints of every CogVideoX variant, written once per session."""
from __future__ import annotations

import os

if os.environ.get("PYTEST_XDIST_WORKER"):  # xdist's workers share the cores: one OpenMP thread each, so that their
    os.environ.setdefault("OMP_NUM_THREADS", "1")  # thread pools do not oversubscribe them (set before torch loads)

import pytest
import torch

if not torch.cuda.is_available():  # Triton kernels run in its interpreter on the CPU (set before triton loads)
    os.environ.setdefault("TRITON_INTERPRET", "1")

from cogrt.engine.random_model import tiny_config, write_random_checkpoint
from serving_cases import ray_serve  # noqa: F401,E402  (one local Ray for every serving test of the session)

VARIANTS = ("2b", "5b", "5b-i2v", "1.5-5b", "1.5-5b-i2v")


@pytest.hookimpl(tryfirst=True)  # before pytest-xdist's own, which reads the xdist_group marks added here
def pytest_collection_modifyitems(config, items):
    # In one process the modules on the session's local Ray run last: once started, Ray and Serve keep about a
    # sixth of a core busy until the session ends, which the CPU-bound tests after them would pay for (measured on
    # 2 cores). Under pytest-xdist (`make test`: --dist loadgroup) they are one group, run by one worker, with one
    # local Ray; that group is the longest unit of work, so it goes first, beside the other worker's tests.
    ray_modules = {item.module for item in items if "ray_serve" in getattr(item, "fixturenames", ())}
    ray_first = bool(os.environ.get("PYTEST_XDIST_WORKER"))
    items.sort(key=lambda item: (item.module in ray_modules) != ray_first)  # stable: each part keeps its order
    for item in items:
        if item.module in ray_modules:
            item.add_marker(pytest.mark.xdist_group("ray"))
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def poison_kernel_outputs(monkeypatch):
    """Kernel outputs start as NaN, so that an element a kernel fails to write fails the test."""
    from cogrt.kernels import alloc
    def poisoned(shape, like, dtype=None):
        dtype = dtype or like.dtype
        fill = float("nan") if dtype.is_floating_point else torch.iinfo(dtype).min  # int8 quant stops at ±127
        return torch.full(shape, fill, device=like.device, dtype=dtype)
    monkeypatch.setattr(alloc, "empty", poisoned)


@pytest.fixture(scope="session")
def checkpoint(tmp_path_factory):
    """checkpoint("5b") -> Path of a tiny-5b checkpoint in the diffusers layout (written once per session)."""
    cache = {}

    def get(variant: str):
        if variant not in cache:
            d = tmp_path_factory.mktemp(f"ckpt-{variant}")
            cache[variant] = write_random_checkpoint(d, f"tiny-{variant}")
        return cache[variant]
    return get


@pytest.fixture(scope="session")
def custom_checkpoint(tmp_path_factory):
    """custom_checkpoint("5b", num_layers=3) -> Path of a checkpoint of tiny_config(variant, **overrides)."""
    cache = {}

    def get(variant: str, **overrides):
        key = (variant, tuple(sorted(overrides.items())))
        if key not in cache:
            d = tmp_path_factory.mktemp(f"ckpt-{variant}-custom")
            cache[key] = write_random_checkpoint(d, tiny_config(variant, **overrides), seed=7)
        return cache[key]
    return get


@pytest.fixture(scope="session")
def pipeline(checkpoint):
    """pipeline("5b") -> an fp32 CPU engine.Pipeline, loaded once per session. Tests must not change it."""
    import cogrt.engine as engine
    cache = {}

    def get(variant: str):
        if variant not in cache:
            cache[variant] = engine.load_pipeline(checkpoint(variant), device="cpu", dtype=torch.float32)
        return cache[variant]
    return get
