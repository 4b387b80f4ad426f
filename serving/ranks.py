"""A generator replica over several GPUs: the replica is rank 0, and ranks 1..N-1 are Ray actors in the replica's
placement group (Serve reserves N bundles, a GPU each, packed on one node). All N join one torch.distributed group
(NCCL on GPUs, gloo on the CPU) and load the same pipeline with the replica's parallel layout; every job runs on
all of them: the replica hands the job's parameters to the other ranks, then runs it itself.

A rank that dies takes the replica down with it: rank 0 would otherwise wait in a collective for a rank that is
gone. Serve then sees the replica fail, the dispatcher retries the job, and Serve builds a new replica (with new
ranks, which Ray ends with their owner).
"""
from __future__ import annotations

import logging
import os
import socket
import threading

import ray

log = logging.getLogger(__name__)


def _rank_env(rank: int, world: int, addr: str, port: int) -> None:
    os.environ.update(MASTER_ADDR=addr, MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK="0")  # each rank sees its one GPU as device 0


@ray.remote
class RankWorker:
    """Rank r of a replica: loads the pipeline, then runs each job the replica hands it."""

    def __init__(self, rank: int, world: int, addr: str, port: int, args: dict):
        _rank_env(rank, world, addr, port)
        self.args = args

    def load(self) -> float:
        from cogrt.engine import load_pipeline

        from .config import ServeConfig
        cfg = ServeConfig.from_args(self.args)
        self.pipe = load_pipeline(cfg.model, device=cfg.device, mode=cfg.mode, warm_up=cfg.warm_up,
                                  cache_dir=cfg.compile_cache, parallel=cfg.parallel)
        return sum(self.pipe.load_timings.values())

    def run(self, params: dict, lora_paths: dict, image: str | None) -> bool:
        from .schema import to_request
        self.pipe.run(to_request(params, lora_paths, image))
        return True

    def ping(self) -> bool:
        return True


class Ranks:
    """Rank 0's view of the other ranks."""

    def __init__(self, args: dict, world: int, replica: str):
        from ray.util.placement_group import get_current_placement_group
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        from .config import ServeConfig
        from .options import rank_resources
        cfg = ServeConfig.from_args(args)
        self.world = world
        with socket.socket() as s:  # a free port on this node for the group's rendezvous
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        addr = "127.0.0.1"  # the bundles are packed on this node
        _rank_env(0, world, addr, port)
        group = get_current_placement_group()
        cpus, gpus = rank_resources(cfg)
        self.workers = [RankWorker.options(
            name=f"cogrt-rank-{replica}-{r}", namespace="serve", num_cpus=cpus, num_gpus=gpus,
            scheduling_strategy=PlacementGroupSchedulingStrategy(
                placement_group=group, placement_group_bundle_index=r) if group else None,
        ).remote(r, world, addr, port, args) for r in range(1, world)]

    def load(self, load_rank0):
        """Every rank loads at once (joining the process group waits for all of them). -> rank 0's pipeline."""
        futures = [w.load.remote() for w in self.workers]
        pipe = load_rank0()
        ray.get(futures)
        return pipe

    def run(self, params: dict, lora_paths: dict, image: str | None, run_rank0):
        """The job on every rank; -> rank 0's result, or rank 0's error. The other ranks stop where rank 0 stops
        (engine.parallel.Parallel.agree), so their own errors then say nothing new. A rank that dies meanwhile
        ends this process."""
        futures = [w.run.remote(params, lora_paths, image) for w in self.workers]
        done = threading.Event()
        threading.Thread(target=self._watch, args=(futures, done), daemon=True).start()
        try:
            return run_rank0()
        finally:
            done.set()
            for ref in futures:
                try:
                    ray.get(ref)
                except ray.exceptions.RayTaskError:
                    pass

    def _watch(self, futures, done: threading.Event) -> None:
        pending = list(futures)
        while pending and not done.is_set():
            ready, pending = ray.wait(pending, timeout=0.5)
            for ref in ready:
                try:
                    ray.get(ref)
                except ray.exceptions.RayActorError as e:
                    log.error("a rank of this replica died mid-job (%s); the replica goes down with it, so that "
                              "Serve rebuilds it and the job is retried", e)
                    os._exit(1)
                except ray.exceptions.RayTaskError:
                    pass  # it stopped with rank 0

    def healthy(self) -> bool:
        try:
            ray.get([w.ping.remote() for w in self.workers], timeout=30)
            return True
        except Exception:  # noqa: BLE001
            return False
