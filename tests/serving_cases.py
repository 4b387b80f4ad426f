"""What the serving tests share: one local Ray instance for the session (loopback only), apps of the real service
on the bundled tiny model, and small requests that run in a second or two on the CPU."""
from __future__ import annotations

import logging
import socket
import time
from pathlib import Path

import httpx
import pytest

from cogrt.engine.cli import BUNDLED_MODEL

KEY_A, KEY_B = "key-a-secret", "key-b-secret"
SMALL = {"size": "64x64", "seconds": "1", "num_inference_steps": "3", "guidance_scale": "6"}  # 9 frames
PROMPT = "a red circle moving right on a black background"
LORA = "cogrt-tiny-concepts-lora"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Service:
    """One running app: its base URL, settings, and a client per key."""

    def __init__(self, name: str, cfg, port: int):
        self.name, self.cfg, self.port = name, cfg, port
        self.url = f"http://127.0.0.1:{port}/{name}"

    def client(self, key: str | None = KEY_A) -> httpx.Client:
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        return httpx.Client(base_url=self.url, headers=headers, timeout=60)

    def create(self, key: str | None = KEY_A, **fields) -> httpx.Response:
        data = {"prompt": PROMPT, **SMALL, **{k: str(v) for k, v in fields.items()}}
        with self.client(key) as c:
            return c.post("/v1/videos", data=data)

    def wait(self, video_id: str, key: str | None = KEY_A, timeout: float = 120, until=("completed", "failed")):
        deadline = time.time() + timeout
        with self.client(key) as c:
            while time.time() < deadline:
                v = c.get(f"/v1/videos/{video_id}").json()
                if v.get("status") in until:
                    return v
                time.sleep(0.2)
        raise TimeoutError(f"{video_id} still {v.get('status')} after {timeout} s")


@pytest.fixture(scope="session")
def ray_serve():
    """A local Ray with Serve on a free loopback port; 4 logical CPUs, so that the deployments' fractions fit."""
    ray = pytest.importorskip("ray")
    from ray import serve
    port, metrics_port = free_port(), free_port()
    ray.init(num_cpus=4, include_dashboard=False, logging_level=logging.WARNING, log_to_driver=False,
             _node_ip_address="127.0.0.1", _metrics_export_port=metrics_port,
             _system_config={"metrics_report_interval_ms": 1000})
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    yield {"port": port, "metrics_port": metrics_port}
    serve.shutdown()
    ray.shutdown()


def run_app(ray_serve, tmp: Path, name: str, **overrides) -> Service:
    """The service on the bundled tiny model, with its own store and outputs under `tmp`, at /NAME."""
    from ray import serve

    from cogrt.serving.app import build_app
    from cogrt.serving.auth import hash_key
    from cogrt.serving.config import ServeConfig
    settings = dict(model=str(BUNDLED_MODEL), loras=str(BUNDLED_MODEL.parent), db=f"sqlite:///{tmp / 'jobs.db'}",
                    outputs=str(tmp / "outputs"), port=ray_serve["port"], api_key_hashes=[hash_key(KEY_A),
                                                                                         hash_key(KEY_B)],
                    gpus_per_replica=0, cpus_per_replica=0.5, device="cpu", lease_s=6.0, max_steps=400)
    settings.update(overrides)
    cfg = ServeConfig(**settings)
    serve.run(build_app(cfg.to_args()), name=name, route_prefix=f"/{name}")
    return Service(name, cfg, ray_serve["port"])


def generator_actors(app: str) -> list[str]:
    import ray
    return [a["name"] for a in ray.util.list_named_actors(all_namespaces=True)
            if a["name"].startswith(f"SERVE_REPLICA::{app}#Generator#")]


def replica_count(app: str) -> int:
    from ray import serve
    states = serve.status().applications[app].deployments["Generator"].replica_states
    return states.get("RUNNING", 0)
