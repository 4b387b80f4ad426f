"""ONNX export at the real size: how long `cogrt export onnx` takes for a real preset's transformer, how big the
graph is, and its peak GPU and host memory; then the graph checked with ONNX Runtime on one input.

Random weights at the real shapes (no checkpoint can be downloaded here), built directly on the device in the
export dtype, so that the peak is the export's own and not a load's.

The check runs the graph with ONNX Runtime's CUDA provider where onnxruntime-gpu is installed, at the exported
size. Otherwise it uses the CPU provider, at a small size (`--check-size`). The CPU provider has no bf16 kernels
(no bf16 Gemm), so a bf16 graph is first rewritten to fp32 (`upcast_graph`: the bf16 weights and casts become
fp32, nothing else changes). The reference is the same weights run by the engine in fp32 with TF32 off, so the two
differ by the order of fp32 operations only.

    python -m cogrt.bench.export_onnx --preset cogvideox-5b --size 49x480x720 --dtype bf16 --out /tmp/onnx5b
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import time
from pathlib import Path

import numpy as np
import torch


def upcast_graph(src: Path, dst: Path) -> Path:
    """A copy of the ONNX model at `src` with every bf16 tensor, cast and value type made fp32, at `dst` (its
    weights as external data beside it)."""
    import onnx
    from onnx import TensorProto, numpy_helper
    bf16, fp32 = TensorProto.BFLOAT16, TensorProto.FLOAT
    model = onnx.load(str(src))

    def tensor(t):
        if t.data_type == bf16:
            t.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(t).astype(np.float32), t.name))

    def graph(g):
        for t in g.initializer:
            tensor(t)
        for vi in list(g.input) + list(g.output) + list(g.value_info):
            if vi.type.tensor_type.elem_type == bf16:
                vi.type.tensor_type.elem_type = fp32
        for node in g.node:
            nodes(node)

    def nodes(node):
        for a in node.attribute:
            if a.type == onnx.AttributeProto.TENSOR:
                tensor(a.t)
            elif a.type == onnx.AttributeProto.GRAPH:
                graph(a.g)
            elif a.name == "to" and node.op_type == "Cast" and a.i == bf16:
                a.i = fp32
    graph(model.graph)
    for f in model.functions:
        for node in f.node:
            nodes(node)
        for vi in f.value_info:
            if vi.type.tensor_type.elem_type == bf16:
                vi.type.tensor_type.elem_type = fp32
    dst.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(dst), save_as_external_data=True, location=dst.name + ".data")
    return dst


def _size(text: str) -> tuple[int, int, int]:
    f, h, w = (int(x) for x in text.lower().split("x"))
    return f, h, w


def _numpy(t: torch.Tensor) -> np.ndarray:
    """For ONNX Runtime: numpy has no bf16, so a bf16 tensor goes as ml_dtypes' bfloat16 (the same bits)."""
    if t.dtype == torch.bfloat16:
        import ml_dtypes
        return t.float().cpu().numpy().astype(ml_dtypes.bfloat16)
    return t.cpu().numpy()


def check(path: Path, model, cfg, size: str, providers: list[str]) -> dict:
    """ONNX Runtime's output against the engine's on one input (batch 1, `size`)."""
    import onnxruntime as ort

    from cogrt.engine.export import TransformerGraph, transformer_inputs
    from cogrt.engine.request import GenerationRequest
    f, h, w = _size(size)
    req = GenerationRequest(prompt="", num_frames=f, height=h, width=w, image=b"" if cfg.is_i2v else None)
    dev = next(model.parameters()).device
    t0 = time.perf_counter()
    sess = ort.InferenceSession(str(path), providers=providers)
    load_s = time.perf_counter() - t0
    dtype = {"tensor(float)": torch.float32, "tensor(bfloat16)": torch.bfloat16,
             "tensor(float16)": torch.float16}[next(i for i in sess.get_inputs() if i.name == "latents").type]
    inputs = transformer_inputs(model, req, 1, dtype, dev)  # in the graph's dtype; the RoPE tables in fp32
    names = {i.name for i in sess.get_inputs()}
    t0 = time.perf_counter()
    got = sess.run(["noise_pred"], {k: _numpy(v) for k, v in inputs.items() if k in names})[0].astype(np.float32)
    run_s = time.perf_counter() - t0
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    with torch.no_grad():
        graph = TransformerGraph(model.float() if dtype == torch.float32 else model)  # what was exported
        ref = graph(**inputs).float().cpu().numpy()
    rel = float(np.abs(got - ref).max() / np.abs(ref).max())
    return dict(providers=sess.get_providers(), size=size, input_dtype=str(dtype), load_s=load_s, run_s=run_s,
                max_rel_err=rel, shape=list(got.shape))


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(prog="python -m cogrt.bench.export_onnx", description=__doc__.split("\n")[0])
    ap.add_argument("--preset", default="cogvideox-5b")
    ap.add_argument("--size", default="49x480x720", help="FRAMESxHEIGHTxWIDTH traced (the axes stay dynamic)")
    ap.add_argument("--dtype", default="bf16", choices=["fp32", "fp16", "bf16"])
    ap.add_argument("--out", required=True)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--check-size", default="9x64x64", help="the input the CPU provider runs")
    ap.add_argument("--no-check", action="store_true")
    ap.add_argument("--check-only", action="store_true", help="check the graph already in --out (the same seed)")
    ap.add_argument("--json", default=None)
    a = ap.parse_args(argv)

    from cogrt.bench.components import building
    from cogrt.engine.model import PRESETS, CogVideoXTransformer
    cfg = PRESETS[a.preset]
    dtype = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[a.dtype]
    dev = torch.device(a.device)
    with building(dev, dtype, 0):
        model = CogVideoXTransformer(cfg).eval()
    params_gib = sum(p.numel() * p.element_size() for p in model.parameters()) / 2**30
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
        torch.cuda.reset_peak_memory_stats(dev)
    out = Path(a.out)
    row = dict(preset=a.preset, size=a.size, dtype=a.dtype, weights="random", commit=os.environ.get("COGRT_COMMIT", "?"))
    if not a.check_only:
        row.update(_export(model, out, a, cfg, dtype, dev, params_gib))
        print(json.dumps(row, indent=1), flush=True)
    if not a.no_check:
        import onnxruntime as ort
        path = out / "transformer.onnx"
        if "CUDAExecutionProvider" in ort.get_available_providers():
            row["check"] = check(path, model, cfg, a.size, ["CUDAExecutionProvider"])
        else:
            if dtype != torch.float32:
                path = out / "fp32" / "transformer.onnx"
                if not (a.check_only and path.exists()):  # --check-only reuses an earlier call's upcast
                    t0 = time.perf_counter()
                    upcast_graph(out / "transformer.onnx", path)
                    row["upcast_s"] = time.perf_counter() - t0
            row["check"] = check(path, model, cfg, a.check_size, ["CPUExecutionProvider"])
        print(json.dumps(row["check"], indent=1), flush=True)
    if a.json:
        Path(a.json).write_text(json.dumps(row, indent=1))
    return row


def _export(model, out: Path, a, cfg, dtype, dev, params_gib: float) -> dict:
    from cogrt.engine.export import _request, export_transformer
    t0 = time.perf_counter()
    res = export_transformer(model, out, _request(a.size, cfg), dtype)
    total_s = time.perf_counter() - t0
    return dict(params_gib=params_gib, export_s=res["export_s"], export_save_check_s=total_s, bytes=res["bytes"],
                external_data=res["external_data"], dynamic=res["dynamic"],
                peak_gpu_gib=torch.cuda.max_memory_allocated(dev) / 2**30 if dev.type == "cuda" else None,
                peak_host_rss_gib=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
                torch=torch.__version__, gpu=torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu")


if __name__ == "__main__":
    main()
