"""cogrt's engine: request → video for CogVideoX checkpoints in the diffusers layout."""
import logging

# torchao, which diffusers imports when it is installed, warns at import time about its optional CUDA extensions
# on machines without them, and torch about an API torchao still calls; none of it concerns a user of ours
for _name in ("torchao", "torch.utils._pytree", "diffusers.quantizers.torchao.torchao_quantizer"):
    logging.getLogger(_name).setLevel(logging.ERROR)

from .loader import CheckpointError, load_transformer
from .model import PRESETS, CogVideoXTransformer, ModelConfig
from .pipeline import OutOfMemory, Pipeline, load_pipeline
from .request import GenerationRequest, GenerationResult

__all__ = ["CheckpointError", "CogVideoXTransformer", "GenerationRequest", "GenerationResult", "ModelConfig",
           "OutOfMemory", "PRESETS", "Pipeline", "load_pipeline", "load_transformer"]
