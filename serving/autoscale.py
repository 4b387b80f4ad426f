"""The generator's autoscaling policy: replicas for the backlog in the job store, not for Ray's queues.

Jobs wait in the store until a replica is free (serving/dispatcher.py), so Serve's own signal, the requests
in flight to the generator, never exceeds the replicas there are and cannot ask for more. This policy runs in
Serve's controller instead and asks for one replica per `jobs_per_replica` jobs queued or running. Serve applies
`min_replicas`/`max_replicas` and the upscale and downscale delays to its answer, so a backlog grows the
deployment up to its maximum, and an empty store lets it fall back to the minimum (to zero, where that is 0).
"""
from __future__ import annotations

import math


class BacklogPolicy:
    """Made once in the controller with the policy's kwargs; called on every autoscaling tick."""

    def __init__(self, db: str | None = None, jobs_per_replica: int = 1):
        """`db`: the store's URL; None: the service's default ($COGRT_DB in the controller's environment)."""
        self.db, self.per = db, max(1, int(jobs_per_replica))
        self._store = None

    def __call__(self, ctx) -> tuple[int, dict]:
        if self._store is None:
            from .config import ServeConfig
            from .store import JobStore
            self._store = JobStore(ServeConfig(db=self.db, outputs="unused").db)
        try:
            backlog = self._store.backlog()
        except Exception as e:  # the store out of reach: keep what runs now
            return ctx.current_num_replicas, {"error": f"{type(e).__name__}: {e}"}
        return math.ceil(backlog / self.per), {"backlog": backlog}
