"""The deployments' Serve options, in one place: build_app applies them, and `cogrt serve --emit-config` writes them
into the Serve config file (`serve deploy`), where they can be edited."""
from __future__ import annotations

import math

from .config import ServeConfig

APP = "cogrt"
IMPORT_PATH = "cogrt.serving.app:build_app"
POLICY = "cogrt.serving.autoscale:BacklogPolicy"
ROUTER = "cogrt.serving.routing:ChosenReplica"  # a job goes to the replica the dispatcher chose


def gpus(cfg: ServeConfig) -> float:
    if cfg.gpus_per_replica is not None:
        return cfg.gpus_per_replica
    if cfg.device is not None:
        return 0.0 if cfg.device == "cpu" else 1.0
    import torch
    return 1.0 if torch.cuda.is_available() else 0.0


def rank_resources(cfg: ServeConfig) -> tuple[float, float]:
    """(CPUs, GPUs) of each rank of a replica: the replica's GPUs are one a rank, its CPUs shared out."""
    n = cfg.ranks
    return cfg.cpus_per_replica / n, (1.0 if gpus(cfg) else 0.0) if n > 1 else gpus(cfg)


def deployment_options(cfg: ServeConfig) -> dict[str, dict]:
    cpus, gpus_each = rank_resources(cfg)
    actor = {"num_cpus": cpus, "num_gpus": gpus_each}
    if not actor["num_gpus"]:  # on the CPU a replica's math uses the cores it reserved, not every core's
        actor["runtime_env"] = {"env_vars": {"OMP_NUM_THREADS": str(max(1, math.ceil(cfg.cpus_per_replica)))}}
    generator = dict(
        name="Generator",
        max_ongoing_requests=1,  # one job at a time; the dispatcher sends one only to a free replica
        request_router_config={"request_router_class": ROUTER},
        ray_actor_options=actor,
        health_check_period_s=2.0,  # a dead replica is found, and replaced, within seconds
        health_check_timeout_s=60.0,
        graceful_shutdown_wait_loop_s=1.0,
        graceful_shutdown_timeout_s=min(cfg.job_timeout_s, 3600.0),  # a downscaled replica finishes its job first
    )
    if cfg.ranks > 1:  # the replica (rank 0) and its other ranks (serving/ranks.py), packed on one node
        bundle = {"CPU": cpus, **({"GPU": gpus_each} if gpus_each else {})}
        generator.update(placement_group_bundles=[bundle] * cfg.ranks, placement_group_strategy="STRICT_PACK")
    if cfg.autoscale:
        lo, hi = cfg.autoscale
        generator["autoscaling_config"] = dict(
            min_replicas=lo, max_replicas=hi, initial_replicas=max(lo, 1),
            target_ongoing_requests=1,  # minute-long jobs: one a replica
            upscale_delay_s=cfg.upscale_delay_s, downscale_delay_s=cfg.downscale_delay_s,
            downscale_to_zero_delay_s=cfg.downscale_delay_s,
            look_back_period_s=11.0,  # over Serve's metrics interval (10 s); the backlog policy reads the store
            policy={"policy_function": POLICY, "policy_kwargs": {"db": cfg.db, "jobs_per_replica": 1}})
    else:
        generator["num_replicas"] = cfg.replicas
    return {
        "Generator": generator,
        "Dispatcher": dict(name="Dispatcher", num_replicas=1, max_ongoing_requests=10000,
                           ray_actor_options={"num_cpus": 0.1}, health_check_period_s=2.0),
        "Ingress": dict(name="Ingress", num_replicas=1, max_ongoing_requests=10000, ray_actor_options={"num_cpus": 0.1}),
    }


def serve_config(cfg: ServeConfig, db: str | None = None, outputs: str | None = None) -> dict:
    """The Serve config file that runs this service (`serve deploy FILE`). Where it runs, the API keys come from
    $COGRT_API_KEYS, and the store and outputs from `db` and `outputs` if given, else from $COGRT_DB and
    $COGRT_OUTPUTS (a Secret and a ConfigMap on Kubernetes)."""
    args = dict(cfg.to_args(), api_key_hashes=[], db=db, outputs=outputs)
    deployments = deployment_options(cfg)
    if "autoscaling_config" in deployments["Generator"]:
        deployments["Generator"]["autoscaling_config"]["policy"]["policy_kwargs"]["db"] = db
    return {
        "proxy_location": "HeadOnly",
        "http_options": {"host": cfg.host, "port": cfg.port},
        "applications": [{"name": APP, "route_prefix": "/", "import_path": IMPORT_PATH, "args": args,
                          "deployments": list(deployments.values())}],
    }
