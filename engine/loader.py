"""Diffusers-layout checkpoints → our modules.

The transformer is built on the meta device and its weights are assigned straight from safetensors, so
nothing is allocated twice and no pickle is ever loaded. The VAE, T5, tokenizer and scheduler come from
diffusers / transformers, which own those components.
"""
from __future__ import annotations

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


def read_safetensors(files: list[Path], device: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
    from safetensors import safe_open
    out: dict[str, torch.Tensor] = {}
    for f in files:
        try:
            with safe_open(str(f), framework="pt", device=str(device)) as fh:
                for k in fh.keys():
                    out[k] = fh.get_tensor(k)
        except Exception as e:
            raise CheckpointError(f"corrupt or unreadable safetensors file {f}: {e}") from e
    return out


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
