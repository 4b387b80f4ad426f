"""`cogrt export onnx`: the transformer and the VAE decoder as ONNX graphs, through PyTorch's own exporter
(`torch.onnx.export(..., dynamo=True)`, with onnxscript), opset 18.

The transformer graph takes every position-dependent table as an input, so that one graph serves every size:

| input | shape | dtype |
|---|---|---|
| `latents` | (batch, latent_frames, in_channels, latent_height, latent_width) | the export dtype |
| `text_embeds` | (batch, 226, text_embed_dim): T5's last hidden state | the export dtype |
| `timestep` | (batch,) | int64 |
| `rope_cos`, `rope_sin` | (video_tokens, head_dim): `cogrt.engine.model.rope_3d` (RoPE models) | float32 |
| `pos_embed` | (1, 226 + video_tokens, dim): the additive table (2B, and 5B-I2V's learned one) | the export dtype |
| `ofs` | (1,) (1.5-I2V) | the export dtype |
| output `noise_pred` | (batch, latent_frames, out_channels, latent_height, latent_width) | the export dtype |

video_tokens = latent_frames / patch_t · latent_height / 2 · latent_width / 2. Batch, latent frames, height and
width are dynamic (torch.export's automatic dims; the graph's metadata names them). For 1.5 the latent frames
must be even: the pipeline pads them at the front (`ModelConfig.latent_padding`). LoRAs are fused before the
export exactly as a served request fuses them (alpha/r times the weight).

The VAE decoder graph is the whole `decode` for one latent shape: diffusers' CogVideoX decoder walks the frames
in small batches, carrying each causal convolution's last frames over to the next batch (its frame cache), and
that loop depends on the frame count, so torch.export cannot keep those axes dynamic: the walk is unrolled for
the exported size (`--size`). Its output is the video in [-1, 1], (1, 3, frames, height, width).

Only the native path exports: a quantized mode, the Triton kernels or a compiled model are refused by name.
"""
from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import torch
from torch import nn

from .request import GenerationRequest

log = logging.getLogger(__name__)
OPSET = 18


class ExportError(ValueError):
    """What cannot be exported, and why."""


def check_native(pipe) -> None:
    t = pipe.transforms
    bad = [f"{k}={v}" for k, v in (("quant", t.quant), ("attention", t.attention), ("fused_norms", t.fused_norms),
                                   ("compile", t.compile)) if v not in (None, "sdpa", False)]
    if bad:
        raise ExportError(f"ONNX export runs the native path only (mode exact, sdpa attention, no fused kernels, no "
                          f"compile); this pipeline has {', '.join(bad)}. fp8/int8 quantization and the Triton "
                          f"kernels are not exportable: load with mode='exact', attention='sdpa', "
                          f"fused_norms=False, compile=False")


class TransformerGraph(nn.Module):
    """The transformer with its position tables as inputs (the table in the module docstring)."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, latents, text_embeds, timestep, rope_cos=None, rope_sin=None, pos_embed=None, ofs=None):
        rope = None if rope_cos is None else (rope_cos, rope_sin)
        return self.model(latents, text_embeds, timestep, ofs=ofs, positions=(rope, pos_embed))


class DecoderGraph(nn.Module):
    def __init__(self, vae):
        super().__init__()
        self.vae = vae

    def forward(self, latents):
        return self.vae.decode(latents).sample


def transformer_inputs(model, req: GenerationRequest, batch: int, dtype, device) -> dict:
    """Example inputs at the request's size: what the pipeline would hand the model."""
    cfg = model.cfg
    frames, _ = cfg.latent_frames(req.num_frames)
    h, w = req.height // 8, req.width // 8
    g = torch.Generator().manual_seed(0)
    out = dict(latents=torch.randn(batch, frames, cfg.in_channels, h, w, generator=g).to(device, dtype),
               text_embeds=torch.randn(batch, cfg.max_text_seq_length, cfg.text_embed_dim, generator=g).to(device, dtype),
               timestep=torch.full((batch,), 500, dtype=torch.long, device=device))
    rope, pos = model.positions(frames, h, w, device)
    if rope is not None:
        out["rope_cos"], out["rope_sin"] = rope
    if pos is not None:
        out["pos_embed"] = pos.to(dtype)
    if cfg.ofs_embed_dim:
        out["ofs"] = torch.full((1,), 2.0, device=device, dtype=dtype)
    return out


def _name_dims(model_proto, names: dict[str, str]) -> None:
    """Give the exporter's symbols (s0, s12...) the names in `names` wherever they appear in an input's or output's
    shape."""
    import re
    for vi in list(model_proto.graph.input) + list(model_proto.graph.output):
        for d in vi.type.tensor_type.shape.dim:
            if d.dim_param:
                d.dim_param = re.sub(r"\bs\d+\b", lambda m: names.get(m.group(0), m.group(0)), d.dim_param)


def _save(program, path: Path, meta: dict, dim_names, weight_bytes: int) -> dict:
    """Name the dims, write the metadata properties, save (external data over 2 GB), and check it fully."""
    import onnx
    path.parent.mkdir(parents=True, exist_ok=True)
    external = weight_bytes > 2**31 - 2**26  # protobuf's 2 GB limit, with room for the graph
    program.save(str(path), external_data=external)
    # names and metadata go into the saved file (the program builds a fresh proto each time it is asked); the
    # weights stay where the save put them
    proto = onnx.load(str(path), load_external_data=False)
    if dim_names:
        _name_dims(proto, dim_names(proto))
    onnx.helper.set_model_props(proto, {k: v if isinstance(v, str) else json.dumps(v) for k, v in meta.items()})
    onnx.save(proto, str(path))
    onnx.checker.check_model(str(path), full_check=True)
    files = [path] + ([path.with_name(path.name + ".data")] if external else [])
    return dict(path=str(path), bytes=sum(f.stat().st_size for f in files if f.exists()), external_data=external)


def _transformer_dim_names(proto) -> dict[str, str]:
    """The symbols torch.export gave the latents' and tables' axes -> readable names."""
    shapes = {vi.name: [d.dim_param for d in vi.type.tensor_type.shape.dim] for vi in proto.graph.input}
    names = {}
    for axis, name in zip((0, 1, 3, 4), ("batch", "latent_frames", "latent_height", "latent_width")):
        if shapes["latents"][axis]:
            names[shapes["latents"][axis]] = name
    for table in ("rope_cos", "rope_sin", "pos_embed"):
        axis = 1 if table == "pos_embed" else 0
        if table in shapes and shapes[table][axis]:
            names.setdefault(shapes[table][axis], "tokens" if table == "pos_embed" else "video_tokens")
    return names


def export_transformer(model, out: Path, req: GenerationRequest, dtype: torch.dtype, loras=()) -> dict:
    """`model`: a native (uncompiled, unquantized) transformer; its LoRAs, named in `loras`, already fused."""
    from torch.export import Dim
    model = model.to(dtype).eval()
    inputs = transformer_inputs(model, req, 2, dtype, next(model.parameters()).device)
    auto = Dim.AUTO  # torch.export works out which axes stay dynamic, and how the tables' length follows them
    dynamic = {"latents": {0: auto, 1: auto, 3: auto, 4: auto}, "text_embeds": {0: auto}, "timestep": {0: auto},
               "rope_cos": {0: auto}, "rope_sin": {0: auto}, "pos_embed": {1: auto}, "ofs": None}
    dynamic = {k: v for k, v in dynamic.items() if k in inputs}
    t0 = time.perf_counter()
    with torch.no_grad():
        program = torch.onnx.export(TransformerGraph(model), (), kwargs=inputs, dynamo=True, dynamic_shapes=dynamic,
                                    opset_version=OPSET, output_names=["noise_pred"], verbose=False)
    seconds = time.perf_counter() - t0
    cfg = model.cfg
    meta = {"cogrt.component": "transformer", "cogrt.variant": cfg.variant, "cogrt.dtype": str(dtype),
            "cogrt.loras": [list(x) for x in loras], "cogrt.config": cfg.to_diffusers(),
            "cogrt.inputs": {k: list(v.shape) for k, v in inputs.items()},
            "cogrt.shapes": "\n\n".join(__doc__.split("\n\n")[1:4])}
    res = _save(program, out / "transformer.onnx", meta, _transformer_dim_names, _bytes(model))
    dynamic_axes = _dynamic_axes(out / "transformer.onnx")
    return dict(res, export_s=seconds, dynamic=dynamic_axes)


def _bytes(module: nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in list(module.parameters()) + list(module.buffers()))


def _dynamic_axes(path: Path) -> dict:
    import onnx
    proto = onnx.load(str(path), load_external_data=False)
    return {vi.name: [d.dim_param or d.dim_value for d in vi.type.tensor_type.shape.dim]
            for vi in list(proto.graph.input) + list(proto.graph.output)}


def export_decoder(pipe, out: Path, req: GenerationRequest, dtype: torch.dtype) -> dict:
    vae = pipe.vae.to(dtype).eval()
    vae.disable_tiling()
    vae.disable_slicing()
    frames, extra = pipe.cfg.latent_frames(req.num_frames)
    z = torch.randn(1, vae.config.latent_channels, frames - extra, req.height // 8, req.width // 8,
                    generator=torch.Generator().manual_seed(0)).to(pipe.device, dtype)
    t0 = time.perf_counter()
    from .vae_cpu import native_convs
    with torch.no_grad(), native_convs(vae):
        program = torch.onnx.export(DecoderGraph(vae), (z,), dynamo=True, opset_version=OPSET, input_names=["latents"],
                                    output_names=["video"], verbose=False)
    seconds = time.perf_counter() - t0
    meta = {"cogrt.component": "vae-decoder", "cogrt.dtype": str(dtype), "cogrt.latents": list(z.shape),
            "cogrt.scaling_factor": float(vae.config.scaling_factor),
            "cogrt.shapes": "latents (1, 16, latent_frames, h, w): the denoised latents, channels second, divided by "
                            "the scaling factor; video (1, 3, frames, height, width) in [-1, 1]. One graph per size: "
                            "the decoder's frame-cache loop is unrolled for it"}
    res = _save(program, out / "vae_decoder.onnx", meta, None, _bytes(vae))
    return dict(res, export_s=seconds)


def export_onnx(pipe, out, component: str = "all", dtype: torch.dtype = torch.float32, size: str | None = None,
                loras=()) -> dict:
    """Export `pipe`'s transformer and/or VAE decoder into `out`; `loras` [(path, weight)] are fused first.
    `size` "FRAMESxHEIGHTxWIDTH" (default: the model's) is the traced size: the decoder's only one."""
    from .lora import lora_key, read_lora
    if component not in ("transformer", "vae-decoder", "all"):
        raise ExportError(f"unknown component {component!r}; valid: transformer, vae-decoder, all")
    check_native(pipe)
    cfg = pipe.cfg
    req = _request(size, cfg)
    out = Path(out)
    if loras:
        loras = tuple((str(p), float(w)) for p, w in loras)
        pipe.runner.switch_loras([(read_lora(p), w) for p, w in loras], lora_key(loras))
    done = {}
    if component in ("transformer", "all"):
        done["transformer"] = export_transformer(pipe.transformer, out, req, dtype, loras)
    if component in ("vae-decoder", "all"):
        done["vae_decoder"] = export_decoder(pipe, out, req, dtype)
    return done


def _request(size: str | None, cfg) -> GenerationRequest:
    image = b"" if cfg.is_i2v else None
    if size is None:
        req = GenerationRequest(prompt="", image=image)
    else:
        try:
            f, h, w = (int(x) for x in size.lower().split("x"))
        except ValueError as e:
            raise ExportError(f"--size must be FRAMESxHEIGHTxWIDTH, e.g. 49x480x720; got {size!r}") from e
        req = GenerationRequest(prompt="", num_frames=f, height=h, width=w, image=image)
    req.check_for(cfg)  # a size the model cannot take fails here, with the values it can
    return req


class OnnxTransformer:
    """An exported transformer run by ONNX Runtime, in the engine's place: `pipe.transformer = OnnxTransformer(
    path, pipe.transformer)` drives a whole generation through the graph (the model stays for its config and
    position tables)."""

    def __init__(self, path, model, providers=("CPUExecutionProvider",)):
        import onnxruntime as ort
        self.session = ort.InferenceSession(str(path), providers=list(providers))
        self.names = {i.name for i in self.session.get_inputs()}
        self.model, self.cfg = model, model.cfg

    def positions(self, *a, **k):
        return self.model.positions(*a, **k)

    def __call__(self, x, text, timestep, ofs=None, positions=None, cache=None):
        if cache is not None:
            raise ExportError("a step cache needs the engine's model: the ONNX graph is the whole block stack")
        if positions is None:
            positions = self.model.positions(x.shape[1], x.shape[3], x.shape[4], x.device)
        rope, pos = positions
        feed = dict(latents=x, text_embeds=text, timestep=timestep.long(), ofs=ofs, pos_embed=pos,
                    rope_cos=None if rope is None else rope[0], rope_sin=None if rope is None else rope[1])
        feed = {k: v.detach().cpu().numpy() for k, v in feed.items() if k in self.names}
        out = self.session.run(["noise_pred"], feed)[0]
        return torch.from_numpy(out).to(x.device, x.dtype)
