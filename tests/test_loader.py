"""The checkpoint readers: our parallel safetensors reader against the library's, and the T5 encoder built from
it against transformers' from_pretrained."""
from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file, save_file

from cogrt.engine import loader

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def odd_tensors(seed=0) -> dict[str, torch.Tensor]:
    """Every stored dtype we read, odd sizes (so tensors start at unaligned offsets), a scalar and an empty one."""
    g = torch.Generator().manual_seed(seed)
    return {"a": torch.randn(301, 77, generator=g).bfloat16(), "b": torch.tensor(3.5),
            "c": torch.randn(7, generator=g).half(), "d": torch.randint(0, 255, (5,), generator=g, dtype=torch.uint8),
            "e": torch.empty(0, 4), "f": torch.rand(3, generator=g) > 0.5,
            "g": torch.randint(-9, 9, (2, 3), generator=g, dtype=torch.int64),
            "h": torch.randn(33, generator=g).to(torch.float8_e4m3fn), "i": torch.randn(1000, 3, generator=g)}


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("chunk,workers", [(1 << 20, 1), (64, 3), (7, 2), (4096, 8)])
def test_read_safetensors_matches_the_library(tmp_path, device, chunk, workers):
    files = []
    for i in range(2):  # two shards, each read by its own set of threads
        files.append(tmp_path / f"w{i}.safetensors")
        save_file({f"{k}{i}": v for k, v in odd_tensors(i).items()}, files[-1])
    want = {k: v for f in files for k, v in load_file(f).items()}
    got = loader.read_safetensors(files, device, chunk=chunk, workers=workers)
    assert sorted(got) == sorted(want)
    for k, v in want.items():
        assert got[k].device.type == device and got[k].dtype == v.dtype and got[k].shape == v.shape, k
        bits = [t.reshape(-1).view(torch.uint8) for t in (got[k].cpu(), v)]
        assert torch.equal(*bits), k  # bitwise, fp8 included


def test_read_safetensors_names_a_truncated_file(tmp_path):
    f = tmp_path / "w.safetensors"
    save_file(odd_tensors(), f)
    f.write_bytes(f.read_bytes()[:-100])
    with pytest.raises(loader.CheckpointError, match="w.safetensors"):
        loader.read_safetensors([f])


def tiny_t5(tmp_path, tie_name="shared.weight", shard=None):
    """A random 2-layer T5 encoder saved by transformers (in `shard`-sized files, as the released T5-XXL is), and
    transformers' own load of it."""
    from transformers import T5Config, T5EncoderModel
    torch.manual_seed(0)
    model = T5EncoderModel(T5Config(vocab_size=99, d_model=32, d_kv=8, d_ff=48, num_layers=2, num_heads=4,
                                    feed_forward_proj="gated-gelu", is_encoder_decoder=False, use_cache=False))
    model.save_pretrained(tmp_path, **({"max_shard_size": shard} if shard else {}))
    if tie_name != "shared.weight":  # some exports keep the embedding under the encoder's name
        f = tmp_path / "model.safetensors"
        sd = load_file(f)
        sd[tie_name] = sd.pop("shared.weight", None) if "shared.weight" in sd else sd[tie_name]
        save_file(sd, f, metadata={"format": "pt"})
    return T5EncoderModel.from_pretrained(tmp_path).eval()


@pytest.mark.parametrize("tie_name", ["shared.weight", "encoder.embed_tokens.weight"])
def test_text_encoder_matches_from_pretrained(tmp_path, tie_name):
    ref = tiny_t5(tmp_path, tie_name)
    ours = loader.load_text_encoder(tmp_path, "cpu", torch.float32)
    ids = torch.randint(0, 99, (2, 11), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.equal(ours(ids)[0], ref(ids)[0])
    assert ours.encoder.embed_tokens.weight is ours.shared.weight


def test_sharded_text_encoder_matches_from_pretrained(tmp_path):
    ref = tiny_t5(tmp_path, shard="20KB")
    assert (tmp_path / "model.safetensors.index.json").is_file() and len(list(tmp_path.glob("*.safetensors"))) > 1
    ours = loader.load_text_encoder(tmp_path, "cpu", torch.float32)
    ids = torch.randint(0, 99, (1, 9), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        assert torch.equal(ours(ids)[0], ref(ids)[0])


def test_text_encoder_keeps_t5s_fp32_layers_in_fp16(tmp_path):
    tiny_t5(tmp_path)
    ours = loader.load_text_encoder(tmp_path, "cpu", torch.float16)
    dtypes = {n: p.dtype for n, p in ours.named_parameters()}
    assert all(d == torch.float32 for n, d in dtypes.items() if ".wo." in n)
    assert all(d == torch.float16 for n, d in dtypes.items() if ".wo." not in n)


def test_text_encoder_with_missing_weights_is_refused(tmp_path):
    tiny_t5(tmp_path)
    f = tmp_path / "model.safetensors"
    sd = load_file(f)
    del sd["encoder.final_layer_norm.weight"]
    save_file(sd, f, metadata={"format": "pt"})
    with pytest.raises(loader.CheckpointError, match="final_layer_norm"):
        loader.load_text_encoder(tmp_path, "cpu", torch.float32)
