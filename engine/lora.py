"""LoRA files → weight deltas fused into the transformer's weights, and switched per request.

A diffusers-format LoRA has keys `transformer.<module>.lora_A.weight` (r, in) and `.lora_B.weight` (out, r).
The scale of each module's delta B @ A comes from the file, so that nobody passes a number by hand:
  - `lora_adapter_metadata` header (diffusers, and our trainer): alpha / r, exactly as `load_lora_weights`;
  - `lora_config` header (finetrainers): the same peft fields, alpha / r. diffusers ignores this header;
  - SAT's own key names (`...attention.query_key_value.matrix_A.0`): SAT's LoRA has alpha 1, so 1 / r;
  - none of these: 1.0, as diffusers does. A SAT LoRA exported to diffusers names by CogVideo's
    `export_sat_lora_weight.py` looks like this but needs 1 / r: read it with convention="sat", or write the
    header once with `cogrt convert-lora --from sat`, after which diffusers gets it right too.
The request's weight multiplies that scale.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from .loader import CheckpointError, engine_name, qkv_rows


@dataclass
class LoraFile:
    path: str
    pairs: dict[str, tuple[torch.Tensor, torch.Tensor]]  # diffusers module name -> (A (r, in), B (out, r))
    scales: dict[str, float]  # module name -> alpha / r
    convention: str = "diffusers"  # where the scales came from: diffusers | finetrainers | sat | none (1.0)

    @property
    def rank(self) -> int:
        return max(a.shape[0] for a, _ in self.pairs.values())


CONVENTIONS = ("auto", "diffusers", "sat")
# SAT's names inside one transformer layer -> (diffusers module, A or B)
_SAT = {f"attention.query_key_value.matrix_{m}.{j}": (f"attn1.to_{'qkv'[j]}", f"lora_{m}")
        for m in "AB" for j in range(3)}
_SAT.update({f"attention.dense.matrix_{m}.0": ("attn1.to_out.0", f"lora_{m}") for m in "AB"})


def _pattern_value(module: str, patterns: dict, default):
    """peft's rank_pattern / alpha_pattern: a key matches a module name or a dotted suffix of it."""
    for key, v in (patterns or {}).items():
        if module == key or module.endswith("." + key):
            return v
    return default


def _sat_pairs(sd: dict) -> dict[str, dict[str, torch.Tensor]]:
    """`[model.diffusion_model.]transformer.layers.{i}.<SAT name>` -> diffusers module names."""
    pairs: dict[str, dict[str, torch.Tensor]] = {}
    for k, t in sd.items():
        head, sep, tail = k.partition("transformer.layers.")
        idx, _, name = tail.partition(".")
        if sep and idx.isdigit() and name in _SAT:
            module, part = _SAT[name]
            pairs.setdefault(f"transformer_blocks.{idx}.{module}", {})[part] = t
    return pairs


def _diffusers_pairs(sd: dict) -> dict[str, dict[str, torch.Tensor]]:
    pairs: dict[str, dict[str, torch.Tensor]] = {}
    for k, t in sd.items():
        if not k.startswith("transformer."):
            continue
        for part in ("lora_A", "lora_B"):
            tag = f".{part}.weight"
            if k.endswith(tag):
                pairs.setdefault(k[len("transformer."):-len(tag)], {})[part] = t
    return pairs


def read_lora(path: str | Path, convention: str = "auto") -> LoraFile:
    """Read a LoRA file and the scale of each module (see the module docstring). `convention="sat"` forces
    SAT's 1 / r for a file whose keys were renamed to diffusers' without a header."""
    from safetensors import safe_open
    if convention not in CONVENTIONS:
        raise ValueError(f"unknown LoRA convention {convention!r}; use one of {CONVENTIONS}")
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"LoRA file not found: {path}")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            sd = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:
        raise CheckpointError(f"corrupt or unreadable LoRA file {path}: {e}") from e
    pairs = _sat_pairs(sd)
    sat_names = bool(pairs)
    if not sat_names:
        pairs = _diffusers_pairs(sd)
    if not pairs:
        raise CheckpointError(f"{path} has no 'transformer.*.lora_A/B.weight' keys (nor SAT's "
                              f"'transformer.layers.*.matrix_A/B.*'); found e.g. {sorted(sd)[:3]}")
    broken = [m for m, p in pairs.items() if len(p) != 2]
    if broken:
        raise CheckpointError(f"{path}: lora_A without lora_B (or the reverse) for {broken[:3]}")

    cfg, found = {}, "none"
    if sat_names or convention == "sat":
        found = "sat"
    elif "lora_adapter_metadata" in meta:
        raw = json.loads(meta["lora_adapter_metadata"])
        cfg, found = {k[len("transformer."):]: v for k, v in raw.items() if k.startswith("transformer.")}, "diffusers"
    elif "lora_config" in meta:
        cfg, found = json.loads(meta["lora_config"]), "finetrainers"  # a peft LoraConfig, unprefixed
    scales = {}
    for m, p in pairs.items():
        r = p["lora_A"].shape[0]
        if found == "sat":
            scales[m] = 1.0 / r
        elif "lora_alpha" in cfg:
            r_m = _pattern_value(m, cfg.get("rank_pattern"), cfg.get("r", r))
            scales[m] = _pattern_value(m, cfg.get("alpha_pattern"), cfg["lora_alpha"]) / r_m
        else:
            scales[m] = 1.0
    return LoraFile(str(path), {m: (p["lora_A"], p["lora_B"]) for m, p in pairs.items()}, scales, found)


def save_lora_file(path: str | Path, pairs: dict[str, tuple[torch.Tensor, torch.Tensor]], r: int,
                   alpha: float) -> Path:
    """Write diffusers LoRA keys for `pairs` (module -> (A, B)) with a `lora_adapter_metadata` header
    holding r and alpha, so that our engine and diffusers' `load_lora_weights` both apply alpha / r."""
    from safetensors.torch import save_file

    from .video import atomic_write
    sd = {}
    for m, (a, b) in pairs.items():
        sd[f"transformer.{m}.lora_A.weight"] = a.detach().float().cpu().contiguous()
        sd[f"transformer.{m}.lora_B.weight"] = b.detach().float().cpu().contiguous()
    targets = sorted({m.split(".", 2)[2].removeprefix("attn1.") for m in pairs})
    meta = {"transformer.r": r, "transformer.lora_alpha": alpha, "transformer.target_modules": targets,
            "transformer.init_lora_weights": True, "transformer.use_dora": False, "transformer.use_rslora": False}
    header = {"format": "pt", "lora_adapter_metadata": json.dumps(meta, sort_keys=True)}
    return atomic_write(path, lambda tmp: save_file(sd, tmp, metadata=header))


def write_lora(path: str | Path, lf: LoraFile) -> Path:
    """`lf` re-written with its scale in the standard header (e.g. a SAT LoRA: alpha 1). Every module must
    share one rank and one scale, since one header describes them all."""
    ranks = {a.shape[0] for a, _ in lf.pairs.values()}
    scales = set(lf.scales.values())
    if len(ranks) != 1 or len(scales) != 1:
        raise ValueError(f"{lf.path}: modules differ in rank {sorted(ranks)} or scale {sorted(scales)}; "
                         "one header cannot describe them")
    r = ranks.pop()
    return save_lora_file(path, lf.pairs, r, scales.pop() * r)


class LoraState:
    """The LoRA set fused into a model's weights now, and the original weights of the layers it touched.

    `switch(loras)` makes `loras` (a list of (LoraFile, weight)) the fused set. Every shape is checked before
    any weight is touched, so a bad file leaves the model as it was. Then only the layers that the old set
    or the new one touches are rewritten, each as original + sum(weight * alpha/r * B @ A), through `write`
    (`engine.quant.write_weight`, which re-quantizes a quantized layer in place). A request with the set
    that is fused already costs nothing.

    The originals stay in host memory, pinned where there is CUDA so that a restore copies at full speed.
    A layer's original is copied when a LoRA first touches it: from `source` (a mapping, layer name -> weight,
    such as loader.CheckpointWeights) where it has the layer, else from the layer itself. A quantized model has
    lost its originals, so the runner hands them over before it quantizes: as copies (`originals=`) or as a
    source to read them from.
    """

    def __init__(self, model: torch.nn.Module, write=None, originals: dict[str, torch.Tensor] | None = None,
                 source=None):
        self.model = model
        self.write = write or (lambda linear, w: linear.weight.copy_(w))
        self.originals = {} if originals is None else originals  # layer name -> host copy of its base weight
        self.source = source
        self.key: tuple = ()  # what is fused now: ((path, mtime, size, weight), ...)
        self.touched: set[str] = set()  # layers that hold a delta now

    def plan(self, loras: list[tuple[LoraFile, float]]) -> dict[str, list]:
        """Layer name -> [(rows, A, B, scale)], after checking every module and shape."""
        modules = dict(self.model.named_modules())
        dim = self.model.cfg.dim
        plan: dict[str, list] = {}
        for lf, weight in loras:
            for m, (a, b) in lf.pairs.items():
                target = modules.get(engine_name(m))
                if not isinstance(target, torch.nn.Linear):
                    raise CheckpointError(f"{lf.path}: LoRA targets {m!r}, which this model does not have")
                rows = qkv_rows(m, dim) or slice(0, target.out_features)
                want = (rows.stop - rows.start, target.in_features)
                if a.dim() != 2 or b.dim() != 2 or (b.shape[0], a.shape[1]) != want or a.shape[0] != b.shape[1]:
                    raise CheckpointError(f"{lf.path}: LoRA for {m!r} has A {tuple(a.shape)} and B {tuple(b.shape)}, "
                                          f"which do not fit the model's {want[0]}x{want[1]} weight")
                plan.setdefault(engine_name(m), []).append((rows, a, b, weight * lf.scales[m]))
        return plan

    def switch(self, loras: list[tuple[LoraFile, float]], key: tuple | None = None) -> None:
        key = lora_key([(lf.path, w) for lf, w in loras]) if key is None else key
        if key == self.key:
            return
        plan = self.plan(loras)
        modules = dict(self.model.named_modules())
        with torch.no_grad():
            for name in sorted(self.touched | set(plan)):
                linear = modules[name]
                if name not in self.originals:  # untouched until now, so its weight is the original
                    from_source = self.source is not None and name in self.source
                    self.originals[name] = host_copy(self.source[name] if from_source else linear.weight)
                orig = self.originals[name]
                dev = linear.weight.device
                if name not in plan:
                    self.write(linear, orig.to(dev, non_blocking=True))
                    continue
                w = orig.to(dev, torch.float32, non_blocking=True, copy=True)  # never a view of the original
                for rows, a, b, s in plan[name]:
                    w[rows] += s * (b.to(dev, torch.float32) @ a.to(dev, torch.float32))
                self.write(linear, w.to(orig.dtype))
        self.touched, self.key = set(plan), key


def host_copy(t: torch.Tensor) -> torch.Tensor:
    """A copy in host memory, pinned where CUDA is there (a 5B attention LoRA touches ~3 GB of weights)."""
    out = torch.empty(t.shape, dtype=t.dtype, pin_memory=torch.cuda.is_available())
    return out.copy_(t.detach())


def lora_key(loras) -> tuple:
    """Names a LoRA set by its files' paths, modification times and sizes, and the weights: a file rewritten
    in place gets a new key."""
    out = []
    for path, weight in loras:
        st = Path(path).stat()
        out.append((str(Path(path).resolve()), st.st_mtime_ns, st.st_size, float(weight)))
    return tuple(out)


class FusedLoras:
    """`with FusedLoras(model, loras):` the LoRAs fused for the block, the original weights after it."""

    def __init__(self, model: torch.nn.Module, loras: list[tuple[LoraFile, float]]):
        self.state = LoraState(model)
        self.state.switch(loras)

    def restore(self) -> None:
        self.state.switch([], key=())

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.restore()
