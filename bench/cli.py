"""`cogrt bench WHAT ...`: each measurement of bench/ runs with its own options (`cogrt bench WHAT --help`)."""
from __future__ import annotations

import argparse

BENCHES = {"modes": "modes", "coldstart": "coldstart", "lora-switch": "lora_switch", "quality": "quality",
           "fp8-ablation": "fp8_ablation", "kernels": "kernels", "step": "step", "read": "read", "decode": "decode",
           "train-memory": "train_memory", "serve": "serve_load", "serve-overhead": "serve_overhead",
           "caches": "caches", "profile": "profile", "finetune": "finetune"}


def add_commands(sub) -> None:
    b = sub.add_parser("bench", help="measurements: modes against diffusers, cold start, LoRA switch, quality, "
                                     "kernels, one step, fine-tuning distortion, ...", add_help=False)
    b.add_argument("what", choices=sorted(BENCHES), help="which measurement; its own --help lists its options")
    b.add_argument("args", nargs=argparse.REMAINDER)
    b.set_defaults(func=cmd_bench)


def cmd_bench(a) -> int:
    import importlib
    importlib.import_module(f"cogrt.bench.{BENCHES[a.what]}").main(a.args)
    return 0
