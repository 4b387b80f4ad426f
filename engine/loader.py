"""Diffusers-layout checkpoints → our modules.

The transformer is built on the meta device and its weights are assigned straight from safetensors, so
nothing is allocated twice and no pickle is ever loaded. The VAE, T5, tokenizer and scheduler come from
diffusers / transformers, which own those components.
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import re
from pathlib import Path

import torch

from .model import CogVideoXTransformer, ModelConfig

COMPONENTS = ("transformer", "vae", "text_encoder", "tokenizer", "scheduler")


class CheckpointError(Exception):
    """A checkpoint is missing, unreadable or not a CogVideoX model. The message names the file."""


# ----------------------------------------------------------------------------------------------------
# Where the checkpoint is

def resolve(path_or_hub_id: str | os.PathLike) -> Path:
    """A local directory, or a hub id fetched with huggingface_hub where the network allows."""
    p = Path(path_or_hub_id).expanduser()
    if p.is_dir():
        return p
    s = str(path_or_hub_id)
    # "org/name" whose "org" is not a local folder; "models/x" beside an existing models/ is a missing path
    looks_like_hub_id = (re.fullmatch(r"[\w.-]+/[\w.-]+", s) is not None and not s.startswith(".")
                         and not p.parent.is_dir())
    if not looks_like_hub_id:
        raise CheckpointError(f"checkpoint directory not found: {p}")
    try:
        from huggingface_hub import snapshot_download
        return Path(snapshot_download(s, allow_patterns=["*.json", "*.safetensors", "*.model", "*.txt"]))
    except Exception as e:  # offline machines land here; say so plainly
        raise CheckpointError(
            f"{s!r} is not a local directory and could not be fetched from the Hugging Face hub "
            f"({type(e).__name__}: {e}). This machine may have no network access: download the checkpoint "
            f"elsewhere and pass its directory.") from e


def read_json(path: Path) -> dict:
    if not path.is_file():
        raise CheckpointError(f"missing file: {path}")
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"unreadable JSON in {path}: {e}") from e


def weight_files(folder: Path, stem: str = "diffusion_pytorch_model") -> list[Path]:
    """The safetensors files of one component, sharded or not."""
    index = folder / f"{stem}.safetensors.index.json"
    if index.is_file():
        shards = sorted(set(read_json(index).get("weight_map", {}).values()))
        files = [folder / s for s in shards]
        for f in files:
            if not f.is_file():
                raise CheckpointError(f"missing shard {f} (listed in {index})")
        return files
    single = folder / f"{stem}.safetensors"
    if single.is_file():
        return [single]
    found = sorted(folder.glob("*.safetensors"))
    if found:
        return found
    pickles = sorted(folder.glob("*.bin")) + sorted(folder.glob("*.pt")) + sorted(folder.glob("*.ckpt"))
    if pickles:
        raise CheckpointError(f"{pickles[0]} is a pickle checkpoint, which cogrt never loads (it can run code); "
                              f"convert it to safetensors first")
    raise CheckpointError(f"missing file: {single} (no *.safetensors in {folder})")


def check_safetensors(files: list[Path]) -> None:
    """Read each file's header (not its data), so that a corrupt file is named before anything loads."""
    from safetensors import safe_open
    for f in files:
        try:
            with safe_open(str(f), framework="pt") as fh:
                fh.keys()
        except Exception as e:
            raise CheckpointError(f"corrupt or unreadable safetensors file {f}: {e}") from e


_DTYPES = {"BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32, "F64": torch.float64,
           "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
           "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2}
# bytes per read, and parallel readers (bench/RESULTS.md, "Start-up with a real-size T5 and the parallel reader")
CHUNK, WORKERS = 32 << 20, 4


def read_safetensors(files: list[Path], device: str | torch.device = "cpu", chunk: int = CHUNK,
                     workers: int = WORKERS) -> dict[str, torch.Tensor]:
    """Every tensor of `files`, in its stored dtype, on `device`.

    safetensors' own loader copies tensor by tensor from a memory map, in one thread, through pageable memory, and
    slows to a crawl in a start, where imports in another thread hold the GIL. Here the library checks each file
    (header, offsets, size). Then `workers` threads read the data in `chunk`-byte pieces (the syscall releases the
    GIL) into their own pinned buffers. Each copies a piece to the tensors it overlaps, on its own CUDA stream,
    while it reads the next piece."""
    import concurrent.futures
    check_safetensors(files)
    device = torch.device(device)
    out = {}
    for f in files:
        begin, entries = _layout(f)
        jobs = []  # (first byte, end byte, the tensor's bytes) of this file's tensors
        for name, (dtype, shape, a, b) in entries.items():
            out[name] = torch.empty(shape, dtype=dtype, device=device)
            if b > a:
                jobs.append((begin + a, begin + b, out[name].view(-1).view(torch.uint8)))
        spans = _split(sorted(jobs, key=lambda j: j[0]), workers)
        with concurrent.futures.ThreadPoolExecutor(len(spans) or 1) as pool:
            for done in [pool.submit(_read_span, f, span, device, chunk) for span in spans]:
                done.result()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return out


def _layout(f: Path) -> tuple[int, dict]:
    """Where the data starts, and name -> (dtype, shape, first byte, end byte) relative to it. The format: an
    8-byte little-endian header size, that many bytes of JSON, then the data (safetensors' documented layout)."""
    try:
        with open(f, "rb") as fh:
            n = int.from_bytes(fh.read(8), "little")
            header = json.loads(fh.read(n))
        header.pop("__metadata__", None)
        return 8 + n, {k: (_DTYPES[v["dtype"]], tuple(v["shape"]), *v["data_offsets"]) for k, v in header.items()}
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise CheckpointError(f"corrupt or unreadable safetensors file {f}: {e}") from e


def _split(jobs: list, parts: int) -> list[list]:
    """Tensors sorted by offset -> up to `parts` runs of about equal bytes, each read front to back by one thread."""
    total = sum(b - a for a, b, _ in jobs)
    spans, size = [[]], 0
    for job in jobs:
        if size >= total / parts * len(spans) and len(spans) < parts:
            spans.append([])
        spans[-1].append(job)
        size += job[1] - job[0]
    return [s for s in spans if s]


def _read_span(f: Path, span: list, device: torch.device, chunk: int) -> None:
    """Read the file bytes of `span`'s tensors in pieces of up to `chunk` bytes, through two staging buffers
    (pinned, for CUDA) so that reading one piece overlaps copying the last."""
    cuda = device.type == "cuda"
    first, last = span[0][0], max(b for _, b, _ in span)
    size = min(chunk, last - first)
    slots = [torch.empty(size, dtype=torch.uint8, pin_memory=cuda) for _ in range(2)]
    copied = [None, None]  # the event after each slot's last copy: wait for it before reading into the slot again
    stream = torch.cuda.Stream(device) if cuda else None
    fd = os.open(f, os.O_RDONLY)
    try:
        i, pos = 0, first
        while pos < last:
            n = min(size, last - pos)
            if copied[i % 2] is not None:
                copied[i % 2].synchronize()
            buf = slots[i % 2][:n]
            got = os.preadv(fd, [memoryview(buf.numpy())], pos)
            if got != n:
                raise CheckpointError(f"corrupt or unreadable safetensors file {f}: {n - got} bytes missing at "
                                      f"byte {pos + got}")
            with torch.cuda.stream(stream) if cuda else contextlib.nullcontext():
                for a, b, dst in span:  # each tensor's bytes that fall in [pos, pos + n)
                    lo, hi = max(a, pos), min(b, pos + n)
                    if lo < hi:
                        dst[lo - a:hi - a].copy_(buf[lo - pos:hi - pos], non_blocking=cuda)
                if cuda:
                    copied[i % 2] = torch.cuda.Event()
                    copied[i % 2].record(stream)
            i, pos = i + 1, pos + n
        if cuda:
            stream.synchronize()
    finally:
        os.close(fd)


# ----------------------------------------------------------------------------------------------------
# diffusers names ↔ ours

_RENAMES = [  # (diffusers prefix, our prefix), first match wins
    ("patch_embed.proj.", "patch_proj."),
    ("patch_embed.text_proj.", "text_proj."),
    ("patch_embed.pos_embedding", "pos_embedding"),
    ("transformer_blocks.", "blocks."),
    ("norm_out.linear.", "norm_out."),
    ("norm_out.norm.", "norm_out_ln."),
]
_BLOCK_RENAMES = [
    ("norm1.linear.", "norm1."), ("norm1.norm.", "ln1."), ("norm2.linear.", "norm2."), ("norm2.norm.", "ln2."),
    ("attn1.norm_q.", "norm_q."), ("attn1.norm_k.", "norm_k."), ("attn1.to_out.0.", "out."),
    ("ff.net.0.proj.", "ff1."), ("ff.net.2.", "ff2."),
]
_QKV = ("to_q", "to_k", "to_v")


def engine_name(name: str) -> str:
    """Our parameter/module name for a diffusers one (q/k/v map to the fused `qkv`)."""
    for a, b in _RENAMES:
        if name.startswith(a):
            name = b + name[len(a):]
            break
    m = re.match(r"(blocks\.\d+\.)(.*)", name)
    if m:
        head, rest = m.groups()
        for a, b in _BLOCK_RENAMES:
            if rest.startswith(a):
                return head + b + rest[len(a):]
            if rest + "." == a:  # a module name rather than a parameter name
                return head + b[:-1]
        q = re.match(r"attn1\.(to_[qkv])(\.|$)(.*)", rest)
        if q:
            return head + "qkv" + q.group(2) + q.group(3)
    return name


def qkv_rows(name: str, dim: int) -> slice | None:
    """For a diffusers to_q/to_k/to_v name, the rows of the fused qkv weight it occupies."""
    m = re.search(r"attn1\.(to_[qkv])(\.|$)", name)
    if not m:
        return None
    i = _QKV.index(m.group(1))
    return slice(i * dim, (i + 1) * dim)


def to_engine_state_dict(sd: dict[str, torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """Rename diffusers keys, fuse q/k/v, and flatten 1.0's patch conv into a linear weight."""
    out: dict[str, torch.Tensor] = {}
    parts: dict[str, dict[str, torch.Tensor]] = {}
    for k in list(sd):
        t = sd.pop(k)  # drop our reference as we go so that fused tensors do not coexist with their parts
        if k == "patch_embed.pos_embedding" and not cfg.use_learned_positional_embeddings:
            continue  # a fixed sin-cos buffer some exports include; we compute it
        new = engine_name(k)
        if k == "patch_embed.proj.weight" and t.dim() == 4:
            t = t.reshape(t.shape[0], -1)  # (D, C, p, p) -> (D, C*p*p), the order patchify() produces
        m = re.search(r"attn1\.(to_[qkv])\.(weight|bias)$", k)
        if m:
            parts.setdefault(new, {})[m.group(1)] = t
            if len(parts[new]) == 3:
                qkv = parts.pop(new)
                out[new] = torch.cat([qkv[n] for n in _QKV], dim=0)
            continue
        out[new] = t
    if parts:
        raise CheckpointError(f"incomplete q/k/v projections for {sorted(parts)}")
    return out


def from_engine_state_dict(sd: dict[str, torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """Our state dict in diffusers' names and shapes (for exporting checkpoints that diffusers loads)."""
    inverse = {}
    names = _diffusers_names(cfg)
    for dn in names:
        inverse.setdefault(engine_name(dn), []).append(dn)
    out = {}
    for k, t in sd.items():
        for dn in inverse.get(k, []):
            rows = qkv_rows(dn, cfg.dim)
            v = t[rows] if rows is not None else t
            if dn == "patch_embed.proj.weight" and cfg.patch_size_t is None:
                v = v.reshape(v.shape[0], cfg.in_channels, cfg.patch_size, cfg.patch_size)
            out[dn] = v.contiguous()
    return out


def _diffusers_names(cfg: ModelConfig) -> list[str]:
    names = ["patch_embed.proj.weight", "patch_embed.text_proj.weight", "patch_embed.text_proj.bias",
             "time_embedding.linear_1.weight", "time_embedding.linear_1.bias",
             "time_embedding.linear_2.weight", "time_embedding.linear_2.bias", "norm_final.weight",
             "norm_final.bias", "norm_out.linear.weight", "norm_out.linear.bias", "norm_out.norm.weight",
             "norm_out.norm.bias", "proj_out.weight", "proj_out.bias"]
    if cfg.patch_bias or cfg.patch_size_t is not None:
        names.append("patch_embed.proj.bias")
    if cfg.use_learned_positional_embeddings:
        names.append("patch_embed.pos_embedding")
    if cfg.ofs_embed_dim:
        names += [f"ofs_embedding.linear_{i}.{w}" for i in (1, 2) for w in ("weight", "bias")]
    per_block = [f"{a}.{w}" for a in ("norm1.linear", "norm1.norm", "norm2.linear", "norm2.norm",
                                      "attn1.norm_q", "attn1.norm_k", "attn1.to_out.0", "ff.net.0.proj", "ff.net.2")
                 for w in ("weight", "bias")]
    per_block += [f"attn1.{p}.weight" for p in _QKV]
    if cfg.attention_bias:
        per_block += [f"attn1.{p}.bias" for p in _QKV]
    return names + [f"transformer_blocks.{i}.{n}" for i in range(cfg.num_layers) for n in per_block]


# ----------------------------------------------------------------------------------------------------
# Loading

def load_config(folder: Path) -> ModelConfig:
    path = folder / "config.json"
    try:
        return ModelConfig.from_diffusers(read_json(path))
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{path} is not a CogVideoX transformer config: {e}") from e


def load_transformer(folder: str | os.PathLike, device=None, dtype: torch.dtype | None = None) -> CogVideoXTransformer:
    folder = Path(folder)
    cfg = load_config(folder)
    sd = to_engine_state_dict(read_safetensors(weight_files(folder), device or "cpu"), cfg)
    return build_transformer(cfg, sd, dtype, source=folder)


def load_text_encoder(folder: str | os.PathLike, device=None, dtype: torch.dtype | None = None):
    """The T5 encoder, built on the meta device and given its weights by read_safetensors on `device`.

    transformers' from_pretrained reads a memory map to the CPU and the caller then copies it over: for T5-XXL
    (9.5 GB in bf16) that is seconds of every start before the first prompt can be encoded. The tied input
    embedding (`shared`, which `encoder.embed_tokens` is) may be stored under either name."""
    from transformers import T5Config, T5EncoderModel
    folder = Path(folder)
    try:
        config = T5Config.from_pretrained(folder)
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{folder / 'config.json'} is not a T5 config: {e}") from e
    with torch.device("meta"):
        model = T5EncoderModel(config)
    sd = read_safetensors(weight_files(folder, "model"), device or "cpu")
    if "shared.weight" not in sd and "encoder.embed_tokens.weight" in sd:
        sd["shared.weight"] = sd["encoder.embed_tokens.weight"]
    sd.pop("encoder.embed_tokens.weight", None)
    expected = {k for k in model.state_dict() if k != "encoder.embed_tokens.weight"}
    missing, extra = sorted(expected - set(sd)), sorted(set(sd) - expected)
    if missing or extra:
        raise CheckpointError(f"{folder}: weights do not match its T5 config (missing {missing[:5]}, "
                              f"unexpected {extra[:5]})")
    # in fp16, T5's feed-forward outputs overflow: transformers keeps those layers (`wo`) in fp32, and so do we
    fp32 = set(getattr(model, "_keep_in_fp32_modules", None) or []) if dtype == torch.float16 else set()
    for k, v in sd.items():
        want = torch.float32 if fp32 & set(k.split(".")) else dtype
        if want is not None and v.is_floating_point() and v.dtype != want:
            sd[k] = v.to(want)
    model.load_state_dict(sd, strict=False, assign=True)
    model.encoder.embed_tokens = model.shared  # one module in older transformers; tied after loading in newer
    left = [n for n, t in (*model.named_parameters(), *model.named_buffers()) if t.is_meta]
    if left:
        raise CheckpointError(f"{folder}: T5 tensors left unloaded: {left[:5]}")
    return model.eval().requires_grad_(False)


class CheckpointWeights:
    """Read-only, lazy access to a transformer checkpoint's weights under our names (`blocks.3.qkv.weight`), in
    `dtype`, on the CPU: what load_transformer assigned, read again from the file when asked.

    A quantized pipeline rebuilds LoRA-switched layers from their high-precision weights. Copying all of them to
    host memory at load (9.5 GB for 5B) costs seconds at every start; reading the few a LoRA touches from the
    file (in the page cache, after the load) costs that only at the first switch. A file that changed since the
    load is refused: its weights are no longer the ones in the model."""

    def __init__(self, folder: str | os.PathLike, cfg: ModelConfig, dtype: torch.dtype | None):
        from safetensors import safe_open
        self.dtype = dtype
        self.files = weight_files(Path(folder))
        self.stamps = {f: self._stamp(f) for f in self.files}
        self.where: dict[str, list[tuple[Path, str]]] = {}  # our name -> [(file, diffusers name)], q, k, v in order
        for f in self.files:
            with safe_open(str(f), framework="pt") as fh:
                for k in fh.keys():
                    self.where.setdefault(engine_name(k), []).append((f, k))
        for parts in self.where.values():
            parts.sort(key=lambda fk: (qkv_rows(fk[1], cfg.dim) or slice(0, 0)).start)

    @staticmethod
    def _stamp(f: Path) -> tuple[int, int]:
        st = f.stat()
        return st.st_mtime_ns, st.st_size

    def __contains__(self, name: str) -> bool:
        return name + ".weight" in self.where

    def __getitem__(self, name: str) -> torch.Tensor:
        """The weight of the linear layer `name` (e.g. `blocks.3.qkv`)."""
        from safetensors import safe_open
        parts = []
        for f, k in self.where[name + ".weight"]:
            if self._stamp(f) != self.stamps[f]:
                raise CheckpointError(f"{f} changed since the pipeline loaded it, so it no longer holds the model's "
                                      f"original weights; load the pipeline again")
            with safe_open(str(f), framework="pt") as fh:
                parts.append(fh.get_tensor(k))
        w = parts[0] if len(parts) == 1 else torch.cat(parts, dim=0)  # q, k, v rows -> the fused qkv
        return w.to(self.dtype) if self.dtype is not None else w


def build_transformer(cfg: ModelConfig, sd: dict[str, torch.Tensor], dtype=None, source="state dict"):
    with torch.device("meta"):
        model = CogVideoXTransformer(cfg)
    expected = set(model.state_dict())
    missing, extra = sorted(expected - set(sd)), sorted(set(sd) - expected)
    if missing or extra:
        raise CheckpointError(f"{source}: weights do not match the config "
                              f"(missing {missing[:5]}{'...' if len(missing) > 5 else ''}, "
                              f"unexpected {extra[:5]}{'...' if len(extra) > 5 else ''})")
    for k, v in model.state_dict().items():
        if sd[k].shape != v.shape:
            raise CheckpointError(f"{source}: {k} has shape {tuple(sd[k].shape)}, config wants {tuple(v.shape)}")
        if dtype is not None and sd[k].dtype != dtype:
            sd[k] = sd[k].to(dtype)
    model.load_state_dict(sd, strict=True, assign=True)
    return model.eval().requires_grad_(False)


def transformer_config(cfg: ModelConfig) -> dict:
    """The diffusers `transformer/config.json` for a config."""
    return {"_class_name": "CogVideoXTransformer3DModel", **cfg.to_diffusers(), "activation_fn": "gelu-approximate",
            "timestep_activation_fn": "silu", "dropout": 0.0, "norm_elementwise_affine": True}


def save_transformer(folder: str | os.PathLike, model: CogVideoXTransformer) -> Path:
    """Write our transformer as a diffusers `transformer/` folder (config.json + safetensors)."""
    from safetensors.torch import save_file
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    cfg = model.cfg
    sd = from_engine_state_dict({k: v.detach().cpu() for k, v in model.state_dict().items()}, cfg)
    save_file(sd, str(folder / "diffusion_pytorch_model.safetensors"))
    (folder / "config.json").write_text(json.dumps(transformer_config(cfg), indent=2))
    return folder


def inspect_checkpoint(path: str | os.PathLike) -> dict:
    """What `cogrt info` prints: variant, parameter counts and dtypes per component, and what is missing.

    Reads only JSON files and safetensors headers, never the weights.
    """
    from safetensors import safe_open
    root = resolve(path)
    report: dict = {"path": str(root), "missing": [], "components": {}}
    if not (root / "model_index.json").is_file():
        report["missing"].append("model_index.json")
    for comp in COMPONENTS:
        folder = root / comp
        if not folder.is_dir():
            report["missing"].append(f"{comp}/")
            continue
        info: dict = {}
        if comp == "tokenizer":
            info["files"] = sorted(p.name for p in folder.iterdir())
        elif comp == "scheduler":
            try:
                info["class"] = read_json(folder / "scheduler_config.json").get("_class_name")
            except CheckpointError:
                report["missing"].append(f"{comp}/scheduler_config.json")
        else:
            try:
                files = weight_files(folder, "model" if comp == "text_encoder" else "diffusion_pytorch_model")
                n, dtypes = 0, set()
                for f in files:
                    with safe_open(str(f), framework="pt") as fh:
                        for k in fh.keys():
                            sl = fh.get_slice(k)
                            n += math.prod(sl.get_shape())
                            dtypes.add(sl.get_dtype())
                info.update(parameters=n, dtypes=sorted(dtypes), files=len(files))
            except CheckpointError as e:
                report["missing"].append(str(e))
            except Exception as e:
                report["missing"].append(f"{comp}: unreadable safetensors ({e})")
            if not (folder / "config.json").is_file():
                report["missing"].append(f"{comp}/config.json")
            elif comp == "transformer":
                try:
                    cfg = load_config(folder)
                    report["variant"] = cfg.variant
                    report["config"] = cfg
                except CheckpointError as e:
                    report["missing"].append(str(e))
        report["components"][comp] = info
    return report
