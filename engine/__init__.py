"""cogrt's engine: request → video for CogVideoX checkpoints in the diffusers layout."""
from .loader import CheckpointError, load_transformer
from .model import PRESETS, CogVideoXTransformer, ModelConfig
from .pipeline import OutOfMemory, Pipeline, load_pipeline
from .request import GenerationRequest, GenerationResult

__all__ = ["CheckpointError", "CogVideoXTransformer", "GenerationRequest", "GenerationResult", "ModelConfig",
           "OutOfMemory", "PRESETS", "Pipeline", "load_pipeline", "load_transformer"]
