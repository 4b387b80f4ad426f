"""The service's settings: one dataclass, built by `cogrt serve` from its flags and handed to `build_app` as the
Serve config file's `args`, so that the command line and `serve deploy` run the same app."""
from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from pathlib import Path

from cogrt.engine.cli import BUNDLED_MODEL

LOOPBACK = ("127.0.0.1", "localhost", "::1")
DB_ENV, OUTPUTS_ENV = "COGRT_DB", "COGRT_OUTPUTS"  # where a cluster's Secret and ConfigMap put them


def state_dir() -> Path:
    """Where `cogrt serve` keeps its job store and outputs by default: $COGRT_STATE, else ~/.local/share/cogrt."""
    return Path(os.environ.get("COGRT_STATE", Path.home() / ".local" / "share" / "cogrt"))


@dataclass
class ServeConfig:
    model: str = str(BUNDLED_MODEL)  # a diffusers-format checkpoint directory
    model_name: str | None = None  # the API's name for it (default: the directory's name)
    mode: str = "exact"  # the mode the generator loads (requests may ask for the modes that share its weights)
    device: str | None = None  # default: cuda where there is one
    loras: str | None = None  # registry: a directory or fsspec URL of NAME.safetensors / NAME/ files
    db: str | None = None  # SQLAlchemy URL (default: $COGRT_DB, else SQLite in the state directory)
    outputs: str | None = None  # a directory or fsspec URL (default: $COGRT_OUTPUTS, else in the state directory)
    host: str = "127.0.0.1"
    port: int = 8000
    api_key_hashes: list[str] = field(default_factory=list)  # SHA-256 of each key (serving/auth.py)
    insecure_no_auth: bool = False  # allow a non-loopback bind without keys
    # the generator deployment
    replicas: int = 1
    autoscale: tuple[int, int] | None = None  # (min, max) replicas; min may be 0
    gpus_per_replica: float | None = None  # default: 1 where there is a GPU, else 0
    parallel: str | None = None  # a replica's layout over several GPUs (engine/parallel.py): cfg, ulysses=N, ...
    cpus_per_replica: float = 1.0
    warm_up: bool = True
    compile_cache: str | None = None
    upscale_delay_s: float = 5.0
    downscale_delay_s: float = 120.0
    # jobs
    max_queued_jobs: int = 64  # past it, POST /v1/videos answers 503
    max_jobs_per_key: int = 16  # queued + running, per API key; past it, 429
    max_attempts: int = 3  # a job whose replica dies is run again up to this many times in all
    job_timeout_s: float = 3600.0  # from its creation; past it the job stops at its next step and fails
    lease_s: float = 120.0  # a running job not heard of for this long is taken as lost
    retention_s: float = 24 * 3600.0  # outputs are deleted this long after completion (expires_at)
    video_preset: str = "veryfast"  # libx264's preset for the mp4s: the write is on every job's latency
    lora_bypass_s: float = 30.0  # how long a queued job may be passed over for one whose LoRAs a free replica has
    # request limits
    max_body_bytes: int = 20 << 20
    max_prompt_chars: int = 2000
    max_image_bytes: int = 10 << 20
    max_image_pixels: int = 4096 * 4096
    max_steps: int = 200
    sizes: list[str] | None = None  # WxH the API accepts (default: from the model, serving/catalog.py)

    def __post_init__(self):
        if self.autoscale is not None:
            lo, hi = self.autoscale = tuple(int(x) for x in self.autoscale)
            if not 0 <= lo <= hi or hi < 1:
                raise ValueError(f"--autoscale MIN:MAX needs 0 <= MIN <= MAX and MAX >= 1, got {lo}:{hi}")
        if self.gpus_per_replica and self.gpus_per_replica > 1 and self.ranks != self.gpus_per_replica:
            raise ValueError(f"{self.gpus_per_replica:g} GPUs a replica need a parallel layout of as many ranks "
                             f"(--parallel, e.g. cfg for 2); {self.parallel!r} has {self.ranks}")
        if self.replicas < 1:
            raise ValueError(f"--replicas must be at least 1, got {self.replicas}")
        state = state_dir()
        self.db = self.db or os.environ.get(DB_ENV) or f"sqlite:///{state / 'jobs.db'}"
        self.outputs = self.outputs or os.environ.get(OUTPUTS_ENV) or str(state / "outputs")
        if self.db.startswith("sqlite:///"):
            Path(self.db.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)

    @property
    def ranks(self) -> int:
        """The processes (a GPU each, on a GPU host) a generator replica spans."""
        from cogrt.engine.parallel import Layout
        return Layout.parse(self.parallel).world

    @property
    def name(self) -> str:
        return self.model_name or Path(self.model).name

    def check_bind(self, keys: list[str] | None = None) -> None:
        """Without keys (`keys`: all the service has, its environment's too) the service listens on loopback only,
        unless --insecure-no-auth says otherwise."""
        keys = self.api_key_hashes if keys is None else keys
        if not keys and self.host not in LOOPBACK and not self.insecure_no_auth:
            raise ValueError(f"refusing to listen on {self.host} without API keys: set COGRT_API_KEYS or "
                             f"--api-keys-file, or pass --insecure-no-auth")

    def to_args(self) -> dict:
        """The Serve config file's `args` for build_app."""
        out = dataclasses.asdict(self)
        out["autoscale"] = list(self.autoscale) if self.autoscale else None
        return out

    @classmethod
    def from_args(cls, args: dict) -> "ServeConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(args) - known
        if unknown:
            raise ValueError(f"unknown serve settings: {sorted(unknown)}")
        return cls(**args)
