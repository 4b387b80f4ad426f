"""Training checkpoints: trainable weights, optimizer, LR schedule, every RNG and the data position.

A checkpoint is written to a temporary folder and renamed into place, and `latest` names the newest one,
so a run killed while saving resumes from the previous complete checkpoint. Weights are safetensors; the
optimizer and RNG states go through `torch.save` and are read back with `weights_only=True`.
"""
from __future__ import annotations

import json
import random
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file


@dataclass
class TrainState:
    step: int


def _trainable(model: torch.nn.Module, method: str) -> dict[str, torch.Tensor]:
    if method == "full":
        return full_state_dict(model)
    return {n: p.detach().cpu().contiguous() for n, p in model.named_parameters() if p.requires_grad}


def full_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The whole model on the CPU, gathered from FSDP2 shards where the model is sharded."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
        sd = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        return {k: v.contiguous() for k, v in sd.items()}
    return {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}


def _optim_state(opt, model, method):
    if method == "full" and torch.distributed.is_available() and torch.distributed.is_initialized():
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict
        return get_optimizer_state_dict(model, opt, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    return opt.state_dict()


def save(out: Path, state: TrainState, model, opt, lr_sched, sampler, gen, method: str, rank: int, keep: int):
    weights = _trainable(model, method)
    optim = _optim_state(opt, model, method)
    if rank != 0:
        return None
    root = Path(out) / "checkpoints"
    final = root / f"step_{state.step:08d}"
    tmp = root / f".step_{state.step:08d}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_file(weights, str(tmp / "weights.safetensors"))
    torch.save({"optimizer": optim, "lr_scheduler": lr_sched.state_dict(),
                "torch_rng": torch.get_rng_state(), "gen": gen.get_state(),
                "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []},
               tmp / "state.pt")
    meta = {"step": state.step, "method": method, "sampler": sampler.state_dict(),
            "numpy_rng": _np_state(), "python_rng": _py_state()}
    (tmp / "meta.json").write_text(json.dumps(meta))
    shutil.rmtree(final, ignore_errors=True)
    tmp.rename(final)
    (root / "latest.tmp").write_text(final.name)
    (root / "latest.tmp").replace(root / "latest")
    for old in sorted(root.glob("step_*"))[:-keep] if keep else []:
        shutil.rmtree(old, ignore_errors=True)
    return final


def latest(out: Path) -> Path | None:
    f = Path(out) / "checkpoints" / "latest"
    if not f.is_file():
        return None
    p = f.parent / f.read_text().strip()
    return p if (p / "meta.json").is_file() else None


def load(path: Path, model, opt, lr_sched, sampler, gen, method: str, rank: int) -> TrainState:
    meta = json.loads((path / "meta.json").read_text())
    if meta["method"] != method:
        raise ValueError(f"{path} is a {meta['method']} checkpoint; this run trains {method}")
    weights = load_file(str(path / "weights.safetensors"))
    st = torch.load(path / "state.pt", weights_only=True, map_location="cpu")
    distributed = torch.distributed.is_available() and torch.distributed.is_initialized()
    if method == "full" and distributed:
        from torch.distributed.checkpoint.state_dict import (StateDictOptions, set_model_state_dict,
                                                             set_optimizer_state_dict)
        opts = StateDictOptions(full_state_dict=True)
        set_model_state_dict(model, weights, options=opts)
        set_optimizer_state_dict(model, opt, st["optimizer"], options=opts)
    else:
        params = dict(model.named_parameters())
        with torch.no_grad():
            for k, v in weights.items():
                if k in params:
                    params[k].copy_(v)
                else:  # full checkpoints hold buffers too
                    model.get_buffer(k).copy_(v)
        opt.load_state_dict(st["optimizer"])
    lr_sched.load_state_dict(st["lr_scheduler"])
    torch.set_rng_state(st["torch_rng"])
    if st["cuda_rng"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(st["cuda_rng"])
    gen.set_state(st["gen"])
    sampler.load_state_dict(meta["sampler"])
    np.random.set_state(_np_restore(meta["numpy_rng"]))
    random.setstate(_py_restore(meta["python_rng"]))
    return TrainState(step=meta["step"])


def _np_state():
    name, keys, pos, has_gauss, gauss = np.random.get_state()
    return [name, keys.tolist(), int(pos), int(has_gauss), float(gauss)]


def _np_restore(s):
    return (s[0], np.array(s[1], dtype=np.uint32), s[2], s[3], s[4])


def _py_state():
    v, internal, gauss = random.getstate()
    return [v, list(internal), gauss]


def _py_restore(s):
    return (s[0], tuple(s[1]), s[2])
