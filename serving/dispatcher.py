"""The dispatcher deployment (one replica): moves jobs from the store to the generator replicas, and keeps the store
honest. Jobs wait in the store, not in Ray's queues: the dispatcher sends a job only when a generator replica is
free, so a replica that appears (the autoscaler's, or a replacement) takes work at once, and a backlog never sits
in a replica that might die.

Each pass of its loop:
- claims as many queued jobs as there are free replicas, preferring, for a while (`lora_bypass_s`), one whose LoRA
  set a free replica has fused, and sends each to the free replica it chose, by name (serving/routing.py);
- puts back in the queue a job whose replica died (the call failed) or whose lease ran out (nobody reports on it),
  until its attempts are spent, then fails it with the reason;
- fails jobs past their deadline, removes the files of deleted and expired jobs, and sets the gauges.
The ingress kicks it after every new job, so an idle replica starts a job moments after its 202.
"""
from __future__ import annotations

import asyncio
import logging
import time

from ray import serve

from . import metrics
from .config import ServeConfig
from .storage import Storage
from .store import JobStore

log = logging.getLogger(__name__)
TICK_S = 0.5  # the loop's pace without kicks
HOUSEKEEPING_S = 1.0
GENERATOR = "Generator"


class Dispatcher:
    def __init__(self, args: dict, generator):
        self.cfg = ServeConfig.from_args(args)
        self.store, self.storage = JobStore(self.cfg.db), Storage(self.cfg.outputs)
        self.gen = generator
        self.inflight: dict[str, asyncio.Task] = {}
        # the replicas believed free -> the LoRA set each has fused. A replica joins when its call returns and
        # leaves when a job is sent where Serve will route it; replicas that never ran a job are not in it.
        self.idle: dict[str, str] = {}
        self.inflight_sets: dict[str, str] = {}  # job -> its LoRA set, while it runs
        self._wake: asyncio.Event | None = None
        self._task: asyncio.Task | None = None
        self._replicas = (0.0, 0)  # (when read, RUNNING generator replicas)
        self._housekept = 0.0

    # ------------------------------------------------------------------------------------------------
    async def kick(self) -> None:
        """A job was queued: look now."""
        self._start()
        self._wake.set()

    async def status(self) -> dict:
        self._start()
        counts = await asyncio.to_thread(self.store.counts)
        return {"replicas": self._running_replicas(), "inflight": len(self.inflight), "jobs": counts,
                "backlog": counts.get("queued", 0) + counts.get("in_progress", 0)}

    async def check_health(self) -> None:
        """Serve calls this every few seconds: it also starts the loop in a fresh replica nobody has kicked yet."""
        self._start()
        if self._task.done() and self._task.exception() is not None:
            raise RuntimeError(f"the dispatch loop died: {self._task.exception()!r}")

    def _start(self) -> None:
        if self._task is None:
            self._wake = asyncio.Event()
            self._task = asyncio.get_running_loop().create_task(self._loop())

    # ------------------------------------------------------------------------------------------------
    async def _loop(self) -> None:
        while True:
            try:
                await asyncio.wait_for(self._wake.wait(), TICK_S)
            except asyncio.TimeoutError:
                pass
            self._wake.clear()
            try:
                if time.monotonic() - self._housekept >= HOUSEKEEPING_S:
                    self._housekept = time.monotonic()
                    await asyncio.to_thread(self._housekeeping)
                await self._dispatch()
            except Exception:  # a store hiccup must not end the loop: the next pass tries again
                log.exception("dispatch pass failed")

    async def _dispatch(self) -> None:
        free = self._running_replicas() - len(self.inflight)
        while free > 0:
            # a free replica's set first; else a set no other replica is running, so that each set stays on one
            running = set(self.inflight_sets.values())
            job = await asyncio.to_thread(self.store.claim, self.cfg.lease_s, set(self.idle.values()),
                                          self.cfg.lora_bypass_s, running)
            if job is None:
                return
            # to a free replica with its set fused if there is one, else to another free one; None: to whichever
            # replica is free (one the dispatcher has not met yet)
            sent = next((r for r, k in self.idle.items() if k == job["lora_key"]), next(iter(self.idle), None))
            self.idle.pop(sent, None)
            call = self.gen.run.remote(job["id"], job["attempt"], replica=sent)
            self.inflight_sets[job["id"]] = job["lora_key"]
            self.inflight[job["id"]] = asyncio.get_running_loop().create_task(self._follow(job, call, sent))
            free -= 1

    async def _follow(self, job: dict, call, sent: str | None) -> None:
        """Wait for a job's call; a call that fails means its replica failed: retry the job, or fail it."""
        try:
            out = await call
            if sent is not None and out["replica"] != sent:  # the router's contract (serving/routing.py), broken
                log.warning("job %s was sent to replica %s but ran on %s", job["id"], sent, out["replica"])
            self.idle[out["replica"]] = job["lora_key"]
        except Exception as e:
            state = await asyncio.to_thread(self.store.retry_or_fail, job["id"], job["attempt"], "replica_failed",
                                            f"the replica running the job stopped: {type(e).__name__}: "
                                            f"{str(e).splitlines()[0][:300] if str(e) else ''}")
            log.warning("job %s: replica call failed (%s); job now %s", job["id"], type(e).__name__, state)
            if state == "queued":
                metrics.get()["retries"].inc()
            elif state == "failed":
                metrics.get()["finished"].inc(tags={"state": "failed"})
        finally:
            self.inflight.pop(job["id"], None)
            self.inflight_sets.pop(job["id"], None)
            self._wake.set()

    def _running_replicas(self) -> int:
        """RUNNING generator replicas, from Serve's status (read at most once a second)."""
        when, n = self._replicas
        if time.monotonic() - when > 1.0:
            try:
                app = serve.get_replica_context().app_name
                dep = serve.status().applications[app].deployments[GENERATOR]
                n = dep.replica_states.get("RUNNING", 0)
            except Exception:
                log.exception("could not read the generator's replicas")
            self._replicas = (time.monotonic(), n)
        return n

    # ------------------------------------------------------------------------------------------------
    def _housekeeping(self) -> None:
        now = time.time()
        for job in self.store.expired_leases(now):
            if job["id"] in self.inflight:
                continue  # its call is still open: the call's own end decides
            state = self.store.retry_or_fail(job["id"], job["attempt"], "replica_lost",
                                             "no replica reported on the job within its lease")
            log.warning("job %s: lease ran out; job now %s", job["id"], state)
        for job in self.store.past_deadline(now):
            self.store.fail_now(job["id"], "deadline_exceeded", "the job ran past its deadline")
        for job in self.store.finished_deleted():
            self.storage.remove(job["video"], job["thumbnail"], job["image"])
            self.store.purge(job["id"])
        for job in self.store.expired(now):
            self.storage.remove(job["video"], job["thumbnail"], job["image"])
            self.store.mark_files_removed(job["id"])
        counts = self.store.counts()
        m = metrics.get()
        for state in ("queued", "in_progress", "completed", "failed"):
            m["jobs"].set(counts.get(state, 0), tags={"state": state})
        m["backlog"].set(counts.get("queued", 0) + counts.get("in_progress", 0))
