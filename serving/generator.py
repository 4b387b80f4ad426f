"""The generator deployment: one warmed-up engine pipeline per replica, which runs the jobs the dispatcher sends it.

A replica takes one job at a time. It reads the job from the store, builds the engine's GenerationRequest and makes
the one call into the engine (`pipe.run`). Meanwhile it renews the job's lease and reports progress, and at each
step it checks for a cancel or a passed deadline. The outputs are written whole, then the job is finished, fenced
by its attempt number, so a replica that lost its job writes nothing over it.

The dispatcher sends a job to a free replica that has its LoRA set fused already, where there is one, by naming
the replica (serving/routing.py routes the call there), so that the engine's switch only happens on a miss.
"""
from __future__ import annotations

import asyncio
import io
import json
import logging
import tempfile
import threading
import time
from pathlib import Path

from ray import serve

from cogrt.engine import OutOfMemory, load_pipeline
from cogrt.engine.loader import CheckpointError
from cogrt.engine.video import write_mp4

from . import metrics
from .config import ServeConfig
from .loras import LoraRegistry
from .schema import to_request
from .storage import Storage
from .store import JobStore

log = logging.getLogger(__name__)


class Stop(Exception):
    """Raised from the engine's step callback: the job was cancelled, or its deadline passed."""

    def __init__(self, code: str, message: str):
        super().__init__(message)
        self.code, self.message = code, message


def failure(e: BaseException) -> tuple[str, str]:
    """The job error (code, message) that an exception out of the engine becomes."""
    if isinstance(e, Stop):
        return e.code, e.message
    if isinstance(e, OutOfMemory):
        return "out_of_memory", str(e)
    if isinstance(e, (ValueError, TypeError, FileNotFoundError, CheckpointError)):
        return "invalid_request", str(e)
    return "internal_error", f"{type(e).__name__}: {e}"


def progress_of(stage: str, done: int, total: int) -> int:
    """0-100: the text encoding to 5, the denoising steps to 95, the decode to 99; 100 when written."""
    if stage == "text":
        return 5
    if stage == "denoise":
        return 5 + int(90 * done / max(total, 1))
    return 95


class Generator:
    def __init__(self, args: dict):
        t0 = time.perf_counter()
        self.cfg = ServeConfig.from_args(args)
        self.store, self.storage = JobStore(self.cfg.db), Storage(self.cfg.outputs)
        self.loras = LoraRegistry(self.cfg.loras)
        try:
            self.replica = serve.get_replica_context().replica_tag
        except Exception:  # outside Serve (a test's process)
            self.replica = "local"
        load = lambda: load_pipeline(self.cfg.model, device=self.cfg.device, mode=self.cfg.mode,  # noqa: E731
                                     warm_up=self.cfg.warm_up, cache_dir=self.cfg.compile_cache,
                                     parallel=self.cfg.parallel)
        self.ranks = None
        if self.cfg.ranks > 1:  # this replica spans several GPUs: it is rank 0 of them (serving/ranks.py)
            from .ranks import Ranks
            self.ranks = Ranks(args, self.cfg.ranks, self.replica)
            self.pipe = self.ranks.load(load)
        else:
            self.pipe = load()
        self.ready_s = time.perf_counter() - t0
        log.info("generator replica %s ready in %.1f s (load %s)", self.replica, self.ready_s,
                 {k: round(v, 2) for k, v in self.pipe.load_timings.items()})

    async def run(self, job_id: str, attempt: int, replica: str | None = None) -> dict:
        """`replica`: the replica the dispatcher chose, read by the router (serving/routing.py), not here. The engine
        fuses the job's LoRA set at its start, only when it differs from what is fused."""
        return await asyncio.to_thread(self.run_job, job_id, attempt)

    async def check_health(self) -> None:
        """Serve's health check: a replica whose other ranks are gone is rebuilt."""
        if self.ranks is not None and not await asyncio.to_thread(self.ranks.healthy):
            raise RuntimeError("a rank of this replica is gone")

    def info(self) -> dict:
        return {"replica": self.replica, "ready_s": self.ready_s, "load": self.pipe.load_timings}

    # ------------------------------------------------------------------------------------------------
    def run_job(self, job_id: str, attempt: int) -> dict:
        """Run the job on the engine, then hand its outputs to a writer thread and return: the replica is free for
        the next job while the mp4 is encoded, so the GPU does not wait for it. The job completes (and its lease
        ends) once the writer has put the files in place."""
        job = self.store.get(job_id, deleted=True)  # one deleted since its dispatch is cancelled at its first step
        if job is None or job["status"] != "in_progress" or job["attempt"] != attempt:
            return {"job": job_id, "status": "lost", "replica": self.replica}
        lease = _Lease(self.store, job_id, attempt, self.cfg.lease_s, self.replica)
        started = time.time()
        try:
            with tempfile.TemporaryDirectory(prefix="cogrt-job-") as tmp:
                params = json.loads(job["params"])
                image = str(self.storage.fetch(job["image"], tmp)) if job["image"] else None
                paths = {x["name"]: self.loras.path(x["name"]) for x in params["loras"]}
                req = to_request(params, paths, image)
                run = lambda: self.pipe.run(req, on_step=lambda stage, done, total: lease.step(  # noqa: E731
                    progress_of(stage, done, total), job["deadline_at"]))
                res = self.ranks.run(params, paths, image, run) if self.ranks else run()
        except BaseException as e:
            self._fail(job_id, attempt, lease, e)
            if not isinstance(e, Exception):
                raise
            return {"job": job_id, "status": "failed", "replica": self.replica}
        gpu = (started, time.time())  # when the engine had the job: the GPU is idle between one's end and the next
        threading.Thread(target=self._finish, args=(job, attempt, lease, res, gpu), daemon=True,
                         name=f"write-{job_id}").start()
        return {"job": job_id, "status": "writing", "replica": self.replica,
                "lora_switched": res.timings.get("lora", 0) > 0}

    def _fail(self, job_id: str, attempt: int, lease: "_Lease", e: BaseException) -> None:
        lease.stop()
        code, message = failure(e)
        if code == "internal_error":
            log.error("job %s failed", job_id, exc_info=e)
        self.store.finish(job_id, attempt, status="failed", error_code=code, error_message=message)
        metrics.get()["finished"].inc(tags={"state": "failed"})

    def _finish(self, job: dict, attempt: int, lease: "_Lease", res, gpu: tuple[float, float]) -> None:
        job_id = job["id"]
        t1 = time.perf_counter()
        try:
            video, thumb = self._write(job_id, res.frames, res.fps)
        except Exception as e:  # a full disk or an unreachable store: the job fails, the replica serves on
            self._fail(job_id, attempt, lease, e)
            return
        lease.stop()
        now = time.time()
        timings = dict(res.timings, write=time.perf_counter() - t1, queue_wait=(job["started_at"] or now)
                       - job["created_at"])
        steps = len(res.steps_computed) + len(res.steps_skipped)
        result = dict(timings=timings, seed=res.seed, mode=res.mode, replica=self.replica,
                      lora_switched=res.timings.get("lora", 0) > 0, steps_computed=len(res.steps_computed),
                      fraction_computed=len(res.steps_computed) / max(steps, 1), engine_started_at=gpu[0],
                      engine_ended_at=gpu[1],
                      peak_gpu_memory_gib=res.peak_memory_bytes / 2**30 if res.peak_memory_bytes else None)
        done = self.store.finish(job_id, attempt, status="completed", progress=100, video=video, thumbnail=thumb,
                                 completed_at=now, expires_at=now + self.cfg.retention_s, result=result,
                                 error_code=None, error_message=None)
        if not done:  # the job moved on without us (deleted, timed out, or given to another replica)
            self.storage.remove(video, thumb)
            return
        self._observe(result, res.timings)

    def _write(self, job_id: str, frames, fps: int) -> tuple[str, str]:
        """The mp4 and a first-frame JPEG, each whole under its key."""
        from PIL import Image
        scratch = self.storage.scratch()
        tmp = write_mp4(frames, Path(scratch) / f"{job_id}.mp4", fps, self.cfg.video_preset)
        video = self.storage.put_file(tmp, f"videos/{job_id}.mp4")
        buf = io.BytesIO()
        Image.fromarray(frames[0]).save(buf, format="JPEG", quality=90)
        thumb = self.storage.put_bytes(buf.getvalue(), f"videos/{job_id}.jpg")
        return video, thumb

    @staticmethod
    def _observe(result: dict, timings: dict) -> None:
        m = metrics.get()
        m["finished"].inc(tags={"state": "completed"})
        for stage in ("queue_wait", "text", "denoise", "decode", "write"):
            if stage in result["timings"]:
                m["stage"].observe(result["timings"][stage], tags={"stage": stage})
        m["computed"].observe(result["fraction_computed"])
        if result["lora_switched"]:
            m["lora_switches"].inc()
            m["lora_seconds"].observe(timings["lora"])
        if result["peak_gpu_memory_gib"] is not None:
            m["peak_memory"].observe(result["peak_gpu_memory_gib"])


class _Lease:
    """A running job's lease, renewed by a thread every quarter lease (the text encoding, a LoRA switch and the decode
    report no steps) and by each step's progress, which also learns of a cancel."""

    def __init__(self, store: JobStore, job_id: str, attempt: int, lease_s: float, replica: str):
        self.store, self.job, self.attempt, self.lease_s, self.replica = store, job_id, attempt, lease_s, replica
        self.cancel = False
        self.last = 0.0
        self._stop = threading.Event()
        self._beat(None)
        self._thread = threading.Thread(target=self._renew, daemon=True, name=f"lease-{job_id}")
        self._thread.start()

    def _beat(self, progress: int | None) -> None:
        ours, cancel = self.store.heartbeat(self.job, self.attempt, self.lease_s, progress, self.replica)
        self.cancel = self.cancel or cancel or not ours
        self.last = time.monotonic()

    def _renew(self) -> None:
        while not self._stop.wait(self.lease_s / 4):
            self._beat(None)

    def step(self, progress: int, deadline: float | None) -> None:
        if time.monotonic() - self.last >= 0.25:  # a store write at most 4 times a second
            self._beat(progress)
        if self.cancel:
            raise Stop("cancelled", "the job was cancelled")
        if deadline is not None and time.time() > deadline:
            raise Stop("deadline_exceeded", "the job ran past its deadline")

    def stop(self) -> None:
        self._stop.set()
