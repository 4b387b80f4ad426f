"""The wire schema: one pydantic model per endpoint's input and output, in the shape of the OpenAI videos API
(`client.videos.create`, `retrieve`, `list`, `delete`, `download_content`), with our extensions under keys of their
own. `to_request` turns a stored job's parameters into the engine's GenerationRequest."""
from __future__ import annotations

import json
import math
from typing import Any, Literal

from fastapi import UploadFile
from pydantic import BaseModel, ConfigDict, Field, field_validator

from cogrt.engine.request import GenerationRequest

Status = Literal["queued", "in_progress", "completed", "failed"]


class ApiError(Exception):
    """Every 4xx and 5xx goes out as {"error": {"code", "message", "param", "type"}}."""

    def __init__(self, status: int, code: str, message: str, param: str | None = None,
                 headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.code, self.message, self.param, self.headers = status, code, message, param, headers or {}

    def body(self) -> dict:
        kind = "invalid_request_error" if self.status < 500 else "server_error"
        return {"error": {"code": self.code, "message": self.message, "param": self.param, "type": kind}}


class ErrorDetail(BaseModel):
    code: str
    message: str
    param: str | None = None
    type: str


class ErrorResponse(BaseModel):
    error: ErrorDetail


class LoraRef(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str
    weight: float = 1.0

    @field_validator("weight")
    @classmethod
    def _finite(cls, v: float) -> float:
        if not math.isfinite(v):
            raise ValueError("weight must be a finite number")
        return v


class VideoCreateForm(BaseModel):
    """POST /v1/videos, a multipart form as the openai SDK sends it; our extensions are extra form fields (the
    SDK's `extra_body`). A field this service does not know is refused by name."""
    model_config = ConfigDict(extra="forbid")
    prompt: str = Field(description="what the video shows")
    input_reference: UploadFile | None = Field(None, description="the first frame (PNG, JPEG or WEBP), for "
                                                                 "image-to-video models")
    model: str | None = Field(None, description="a model from GET /v1/models (default: the one served)")
    seconds: str | None = Field(None, description="the video's length; GET /v1/models lists the valid ones")
    size: str | None = Field(None, description="WIDTHxHEIGHT; GET /v1/models lists the valid ones")
    negative_prompt: str = ""
    seed: int | None = Field(None, ge=0, lt=2**63)
    num_inference_steps: int | None = Field(None, description="denoising steps (default 50)")
    guidance_scale: float | None = Field(None, description="classifier-free guidance (default 6)")
    use_dynamic_cfg: bool = False
    mode: str | None = Field(None, description="exact, fp8, fast or an int8 mode: those the model serves")
    teacache_threshold: float | None = Field(None, description="TeaCache step skipping; higher skips more")
    cache: str | None = Field(None, description="step skipping at a calibrated quality level: safe, balanced or "
                                                "fast (GET /v1/models lists the model's)")
    frames: int | None = Field(None, description="8N+1 frames; overrides seconds")
    loras: str | None = Field(None, description='JSON list of {"name": ..., "weight": ...} from the registry')

    def lora_refs(self) -> list[LoraRef]:
        if not self.loras:
            return []
        try:
            raw = json.loads(self.loras)
        except json.JSONDecodeError as e:
            raise ApiError(400, "invalid_loras", f"loras must be a JSON list of {{\"name\", \"weight\"}}: {e}",
                           "loras") from e
        if not isinstance(raw, list):
            raise ApiError(400, "invalid_loras", "loras must be a JSON list of {\"name\", \"weight\"} objects",
                           "loras")
        try:
            return [LoraRef.model_validate(x) for x in raw]
        except ValueError as e:
            raise ApiError(400, "invalid_loras", f"loras: {e}".replace("\n", " "), "loras") from e


class VideoError(BaseModel):
    code: str
    message: str


class CogrtInfo(BaseModel):
    """Our fields of a video object: what ran and where its time went."""
    frames: int
    fps: int
    width: int
    height: int
    num_inference_steps: int
    seed: int | None = None
    mode: str | None = None
    loras: list[LoraRef] = []
    attempts: int = 0
    replica: str | None = None
    lora_switched: bool | None = None
    timings: dict[str, float] = {}  # queue_wait, text, denoise, decode, lora, write, total (seconds)
    steps_computed: int | None = None
    fraction_computed: float | None = None
    peak_gpu_memory_gib: float | None = None
    engine_started_at: float | None = None  # when the replica's engine took the job and let it go (epoch seconds)
    engine_ended_at: float | None = None


class Video(BaseModel):
    id: str
    object: Literal["video"] = "video"
    model: str
    status: Status
    progress: int
    created_at: int
    completed_at: int | None = None
    expires_at: int | None = None
    size: str
    seconds: str
    prompt: str
    error: VideoError | None = None
    remixed_from_video_id: str | None = None
    cogrt: CogrtInfo


class VideoList(BaseModel):
    object: Literal["list"] = "list"
    data: list[Video]
    first_id: str | None = None
    last_id: str | None = None
    has_more: bool


class VideoDeleted(BaseModel):
    id: str
    object: Literal["video.deleted"] = "video.deleted"
    deleted: bool = True


class ModelInfo(BaseModel):
    id: str
    object: Literal["model"] = "model"
    owned_by: str = "cogrt"
    created: int = 0
    variant: str
    image_to_video: bool
    fps: int
    sizes: list[str]
    seconds: list[str]
    frames: list[int]
    default_size: str
    default_seconds: str
    modes: list[str]
    cache_levels: list[str]
    loras: list[str]
    max_inference_steps: int


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelInfo]


class Health(BaseModel):
    status: str
    replicas: int | None = None
    backlog: int | None = None


def to_request(params: dict, lora_paths: dict[str, str], image: Any = None) -> GenerationRequest:
    """A stored job's parameters (catalog.resolve's output) -> the engine's request; LoRA names become the registry's
    local paths."""
    loras = tuple((lora_paths[x["name"]], float(x["weight"])) for x in params["loras"])
    return GenerationRequest(
        prompt=params["prompt"], negative_prompt=params["negative_prompt"], image=image,
        num_frames=params["frames"], height=params["height"], width=params["width"],
        num_inference_steps=params["num_inference_steps"], guidance_scale=params["guidance_scale"],
        use_dynamic_cfg=params["use_dynamic_cfg"], seed=params["seed"], loras=loras, mode=params["mode"],
        teacache=params["teacache_threshold"], cache=params.get("cache"))
