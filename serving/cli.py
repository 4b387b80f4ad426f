"""`cogrt serve`: the video service on a local Ray instance (the bundled tiny model on the CPU by default, SQLite,
local outputs), or the equivalent Serve config file with --emit-config."""
from __future__ import annotations

import json
import logging
import os
import signal
import threading
from pathlib import Path

from cogrt.engine.cli import BUNDLED_MODEL

log = logging.getLogger(__name__)


def add_commands(sub) -> None:
    s = sub.add_parser("serve", help="the video service (OpenAI videos API) on Ray Serve")
    s.set_defaults(func=cmd_serve)
    s.add_argument("--model", default=str(BUNDLED_MODEL), help="diffusers-format checkpoint directory")
    s.add_argument("--model-name", default=None, help="the API's name for the model (default: the folder's)")
    s.add_argument("--mode", default="exact", help="the mode the generator replicas load (exact, fp8, ...)")
    s.add_argument("--device", default=None, help="default: cuda where there is one")
    s.add_argument("--replicas", type=int, default=1, help="generator replicas (a GPU each on a GPU host)")
    s.add_argument("--autoscale", default=None, metavar="MIN:MAX", help="scale the generator on the backlog")
    s.add_argument("--gpus-per-replica", type=int, default=None,
                   help="GPUs a generator replica spans (one rank each; default 1 with a GPU); with more than one, the "
                        "layout defaults as for `cogrt generate --gpus`")
    s.add_argument("--parallel", default=None, metavar="LAYOUT",
                   help="a replica's layout: cfg, ulysses=N, cfg,ulysses=N (on the CPU: that many processes)")
    s.add_argument("--cpus-per-replica", type=float, default=None,
                   help="default: 4 with a GPU (its host-side work: decode post-processing, the mp4), else 0.5")
    s.add_argument("--host", default="127.0.0.1")
    s.add_argument("--port", type=int, default=8000)
    s.add_argument("--db", default=None, help="SQLAlchemy URL of the job store (default: SQLite in $COGRT_STATE)")
    s.add_argument("--outputs", default=None, help="directory or fsspec URL for the videos")
    s.add_argument("--loras", default=None, help="LoRA registry: a directory or fsspec URL (default, for the "
                                                 "bundled model: the bundled LoRAs)")
    s.add_argument("--api-keys-file", default=None, help="one API key a line (also: $COGRT_API_KEYS, comma-separated)")
    s.add_argument("--insecure-no-auth", action="store_true", help="listen beyond loopback without API keys")
    s.add_argument("--max-queued-jobs", type=int, default=64)
    s.add_argument("--max-jobs-per-key", type=int, default=16)
    s.add_argument("--max-attempts", type=int, default=3)
    s.add_argument("--job-timeout", type=float, default=3600.0, help="seconds from a job's creation")
    s.add_argument("--retention", type=float, default=24 * 3600.0, help="seconds outputs are kept after completion")
    s.add_argument("--max-steps", type=int, default=200)
    s.add_argument("--video-preset", default="veryfast", help="libx264 preset of the mp4s (the write is on every "
                                                             "job's latency)")
    s.add_argument("--sizes", default=None, help="WxH,WxH,... the API accepts (default: from the model)")
    s.add_argument("--compile-cache", default=None)
    s.add_argument("--no-warm-up", dest="warm_up", action="store_false")
    s.add_argument("--emit-config", default=None, metavar="FILE", help="write the Serve config file and exit")


def config_from(a):
    from .auth import load_hashes
    from .config import ServeConfig
    gpu_host = a.device not in (None, "cpu") or (a.device is None and _cuda())
    loras = a.loras
    if loras is None and Path(a.model).resolve() == BUNDLED_MODEL.resolve():
        loras = str(BUNDLED_MODEL.parent)  # the bundled concept LoRA sits beside the bundled model
    parallel = a.parallel
    if parallel is None and (a.gpus_per_replica or 0) > 1:
        from cogrt.engine.cli import default_layout
        parallel = default_layout(a.gpus_per_replica)
    cfg = ServeConfig(
        parallel=parallel, model=a.model, model_name=a.model_name, mode=a.mode, device=a.device, loras=loras, db=a.db,
        outputs=a.outputs, host=a.host, port=a.port, insecure_no_auth=a.insecure_no_auth, replicas=a.replicas,
        autoscale=tuple(a.autoscale.split(":")) if a.autoscale else None, gpus_per_replica=a.gpus_per_replica,
        cpus_per_replica=a.cpus_per_replica or (4.0 if gpu_host else 0.5), warm_up=a.warm_up,
        compile_cache=a.compile_cache, max_queued_jobs=a.max_queued_jobs, max_jobs_per_key=a.max_jobs_per_key,
        max_attempts=a.max_attempts, job_timeout_s=a.job_timeout, retention_s=a.retention, max_steps=a.max_steps,
        video_preset=a.video_preset,
        sizes=a.sizes.split(",") if a.sizes else None,
        api_key_hashes=load_hashes(a.api_keys_file, env="") if a.api_keys_file else [])
    if cfg.gpus_per_replica is None:
        cfg.gpus_per_replica = 1.0 if gpu_host else 0.0
    return cfg


def cmd_serve(a) -> int:
    from .options import serve_config
    cfg = config_from(a)
    if a.emit_config:
        import yaml
        conf = serve_config(cfg, db=a.db, outputs=a.outputs)
        Path(a.emit_config).write_text(yaml.safe_dump(conf, sort_keys=False))
        print(f"wrote {a.emit_config}: `serve deploy {a.emit_config}` runs it on a Ray cluster")
        return 0
    from .auth import load_hashes
    cfg.check_bind(cfg.api_key_hashes + load_hashes())
    start(cfg)
    url = f"http://{cfg.host}:{cfg.port}"
    key = "$COGRT_API_KEY" if (cfg.api_key_hashes or os.environ.get("COGRT_API_KEYS")) else "none"
    print(f"cogrt is serving {cfg.name} at {url} (the playground: {url}/, the API: {url}/v1, ready: {url}/readyz)")
    print(f"try:\n  curl -s {url}/v1/videos -H 'Authorization: Bearer {key}' -F prompt='"
          f"a red circle moving right on a black background' -F seconds=1 -F num_inference_steps=20\n"
          f"  curl -s {url}/v1/videos/VIDEO_ID -H 'Authorization: Bearer {key}'\n"
          f"  curl -s {url}/v1/videos/VIDEO_ID/content -H 'Authorization: Bearer {key}' -o video.mp4", flush=True)
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    stop.wait()
    shutdown()
    return 0


def start(cfg, name: str = "cogrt", route_prefix: str = "/"):
    """A local Ray instance (loopback only, no dashboard) with the app running, once its replicas are up; returns
    the app's handle."""
    import ray
    from ray import serve

    from .app import build_app
    if not ray.is_initialized():
        ray.init(include_dashboard=False, logging_level=logging.WARNING, log_to_driver=False,
                 _node_ip_address="127.0.0.1", _system_config={"metrics_report_interval_ms": 1000})
    serve.start(http_options={"host": cfg.host, "port": cfg.port})
    log.debug("serve config: %s", json.dumps(cfg.to_args()))
    return serve.run(build_app(cfg.to_args()), name=name, route_prefix=route_prefix)


def shutdown() -> None:
    import ray
    from ray import serve
    serve.shutdown()
    ray.shutdown()


def _cuda() -> bool:
    import torch
    return torch.cuda.is_available()
