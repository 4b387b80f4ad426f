"""The memory savers (checkpointing, activation offload) change where activations live, never the gradients."""
import json

import pytest
import torch

from cogrt.bench import train_memory
from tests.test_train_lora import trained_lora_model


def lora_grads(model, x, text, t):
    model.zero_grad(set_to_none=True)
    model(x, text, t).square().mean().backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("variant", ["checkpointing", "offload", "offload+ff_chunks"])
def test_memory_savers_give_the_same_lora_gradients(checkpoint, variant):
    model = trained_lora_model(checkpoint("5b"), 4, 8.0)
    g = torch.Generator().manual_seed(0)
    x, text, t = torch.randn(2, 3, 16, 6, 10, generator=g), torch.randn(2, 226, 32, generator=g), torch.tensor([3, 900])
    plain = lora_grads(model, x, text, t)
    model.gradient_checkpointing, model.offload_activations = True, variant.startswith("offload")
    for block in model.blocks:  # 3 chunks of 271 tokens (226 text, 45 video): uneven, and across both streams
        block.ff_chunks = 3 if variant.endswith("ff_chunks") else 1
    saved = lora_grads(model, x, text, t)
    assert plain.keys() == saved.keys() and len(plain) > 0
    for n in plain:
        assert plain[n].abs().max() > 0, n  # every adapter gets a gradient, the first block's included
        torch.testing.assert_close(saved[n], plain[n], rtol=1e-5, atol=1e-7)


def test_train_memory_bench_runs_the_trainer(tmp_path):
    out = tmp_path / "r.json"
    res = train_memory.main(["--preset", "tiny-5b", "--frames", "9", "--height", "64", "--width", "64", "--steps", "3",
                             "--device", "cpu", "--offload-activations", "--ff-chunks", "2", "--json", str(out)])
    assert json.loads(out.read_text())["steps"] == 3 and len(res["losses"]) == 3
    assert all(0 < v < 10 for v in res["losses"])
