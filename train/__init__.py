"""LoRA and full fine-tuning that reuse the engine's model, loader and pipeline (see the training issue)."""
