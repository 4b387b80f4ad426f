"""The job store: every video job, durable, in one SQL table (SQLAlchemy Core over SQLite by default, PostgreSQL by
URL). A job is written here before its client hears of it, and every state change is one transaction.

States: queued → in_progress → completed | failed. Running jobs carry a lease (`attempt`, `lease_until`) that the
generator renews as it reports progress; the dispatcher requeues a job whose lease ran out (its replica died) until
`max_attempts`, then fails it. The attempt number fences writes: a replica that lost its job cannot overwrite it.
A deleted job disappears from the API at once; a running one is cancelled at its next step, then removed.
"""
from __future__ import annotations

import json
import secrets
import time
from typing import Any

from sqlalchemy import (Boolean, Column, Float, Index, Integer, MetaData, String, Table, Text, and_, create_engine,
                        event, func, select, update)
from sqlalchemy.exc import IntegrityError

ACTIVE = ("queued", "in_progress")
meta = MetaData()
jobs = Table(
    "jobs", meta,
    Column("id", String(64), primary_key=True),
    Column("owner", String(64), nullable=False, index=True),
    Column("idempotency_key", String(256)),
    Column("model", String(128), nullable=False),
    Column("status", String(16), nullable=False, index=True),
    Column("progress", Integer, nullable=False, default=0),
    Column("created_at", Float, nullable=False, index=True),
    Column("started_at", Float),
    Column("completed_at", Float),
    Column("expires_at", Float),
    Column("deadline_at", Float),
    Column("params", Text, nullable=False),  # the validated request, as the wire schema's JSON
    Column("lora_key", String(512), nullable=False, default=""),  # the LoRA set, for routing
    Column("attempt", Integer, nullable=False, default=0),
    Column("max_attempts", Integer, nullable=False, default=3),
    Column("lease_until", Float),
    Column("replica", String(128)),
    Column("error_code", String(64)),
    Column("error_message", Text),
    Column("result", Text),  # JSON: timings, steps, seed, mode, LoRAs, replica, switch, memory
    Column("video", Text),  # storage keys of the outputs and the uploaded first frame
    Column("thumbnail", Text),
    Column("image", Text),
    Column("cancel_requested", Boolean, nullable=False, default=False),
    Column("deleted", Boolean, nullable=False, default=False),
    Column("files_removed", Boolean, nullable=False, default=False),
)
Index(  # one job per (owner, Idempotency-Key)
    "jobs_idempotency", jobs.c.owner, jobs.c.idempotency_key, unique=True)


def new_id() -> str:
    return "video_" + secrets.token_hex(12)


def _sqlite_pragmas(dbapi_conn, _):
    cur = dbapi_conn.cursor()
    cur.execute("PRAGMA journal_mode=WAL")  # readers never block the writer: ingress, dispatcher and replicas share it
    cur.execute("PRAGMA synchronous=NORMAL")  # with WAL, a commit survives a process crash
    cur.execute("PRAGMA busy_timeout=30000")
    cur.close()


class JobStore:
    def __init__(self, url: str):
        self.url = url
        kw: dict[str, Any] = {"future": True}
        if url.startswith("sqlite"):
            kw["connect_args"] = {"timeout": 30, "check_same_thread": False}
        else:
            kw.update(pool_pre_ping=True, pool_size=4, max_overflow=4)
        self.engine = create_engine(url, **kw)
        if url.startswith("sqlite"):
            event.listen(self.engine, "connect", _sqlite_pragmas)
        meta.create_all(self.engine)

    def close(self) -> None:
        self.engine.dispose()

    # ------------------------------------------------------------------------------------------------
    def create(self, job: dict) -> tuple[dict, bool]:
        """Insert a queued job; with an idempotency key that this owner used before, return that job instead.
        -> (job, created)."""
        row = dict(job, status="queued", progress=0, attempt=0, cancel_requested=False, deleted=False,
                   files_removed=False)
        try:
            with self.engine.begin() as c:
                c.execute(jobs.insert().values(**row))
                return dict(c.execute(select(jobs).where(jobs.c.id == row["id"])).first()._mapping), True
        except IntegrityError:
            found = self.by_idempotency(job["owner"], job.get("idempotency_key"))
            if found is None:
                raise
            return found, False

    def by_idempotency(self, owner: str, key: str | None) -> dict | None:
        if not key:
            return None
        with self.engine.connect() as c:
            row = c.execute(select(jobs).where(and_(jobs.c.owner == owner, jobs.c.idempotency_key == key))).first()
        return dict(row._mapping) if row else None

    def get(self, job_id: str, owner: str | None = None, deleted: bool = False) -> dict | None:
        """The job, if it exists (and belongs to `owner`); `deleted` jobs too where asked for."""
        q = select(jobs).where(jobs.c.id == job_id)
        if not deleted:
            q = q.where(jobs.c.deleted.is_(False))
        if owner is not None:
            q = q.where(jobs.c.owner == owner)
        with self.engine.connect() as c:
            row = c.execute(q).first()
        return dict(row._mapping) if row else None

    def list(self, owner: str, after: str | None, limit: int, order: str) -> tuple[list[dict], bool]:
        """A page of the owner's jobs by creation time (ties by id), after the job `after`."""
        desc = order == "desc"
        keys = (jobs.c.created_at.desc(), jobs.c.id.desc()) if desc else (jobs.c.created_at, jobs.c.id)
        q = select(jobs).where(and_(jobs.c.owner == owner, jobs.c.deleted.is_(False)))
        with self.engine.connect() as c:
            if after:
                ref = c.execute(select(jobs.c.created_at, jobs.c.id).where(and_(
                    jobs.c.id == after, jobs.c.owner == owner))).first()
                if ref is None:
                    raise KeyError(after)
                t, i = ref
                if desc:
                    q = q.where((jobs.c.created_at < t) | ((jobs.c.created_at == t) & (jobs.c.id < i)))
                else:
                    q = q.where((jobs.c.created_at > t) | ((jobs.c.created_at == t) & (jobs.c.id > i)))
            rows = c.execute(q.order_by(*keys).limit(limit + 1)).all()
        return [dict(r._mapping) for r in rows[:limit]], len(rows) > limit

    def counts(self) -> dict[str, int]:
        """Jobs by state (deleted ones left out)."""
        with self.engine.connect() as c:
            rows = c.execute(select(jobs.c.status, func.count()).where(jobs.c.deleted.is_(False))
                             .group_by(jobs.c.status)).all()
        return {s: n for s, n in rows}

    def backlog(self) -> int:
        """Jobs waiting or running: the load the generator replicas scale on."""
        with self.engine.connect() as c:
            return c.execute(select(func.count()).where(jobs.c.status.in_(ACTIVE))).scalar_one()

    def queued(self) -> int:
        with self.engine.connect() as c:
            return c.execute(select(func.count()).where(jobs.c.status == "queued")).scalar_one()

    def active_for(self, owner: str) -> int:
        with self.engine.connect() as c:
            return c.execute(select(func.count()).where(and_(jobs.c.owner == owner,
                                                             jobs.c.status.in_(ACTIVE)))).scalar_one()

    # ------------------------------------------------------------------------------------------------
    def claim(self, lease_s: float, prefer: set[str] = frozenset(), bypass_s: float = 0.0,
              avoid: set[str] = frozenset()) -> dict | None:
        """Take the oldest queued job; while the oldest of all has waited less than `bypass_s`, rather the oldest
        whose LoRA set is in `prefer` (a free replica has it fused), else the oldest whose set is not in `avoid`
        (other replicas are running it). -> the job, now in_progress, attempt + 1, leased for lease_s.
        Compare-and-set, so two dispatchers never take the same job."""
        now = time.time()
        for _ in range(8):
            with self.engine.begin() as c:
                waiting = select(jobs.c.id, jobs.c.lora_key, jobs.c.created_at).where(
                    and_(jobs.c.status == "queued", jobs.c.deleted.is_(False))).order_by(jobs.c.created_at, jobs.c.id)
                oldest = c.execute(waiting.limit(1)).first()
                if oldest is None:
                    return None
                pick = oldest.id
                if now - oldest.created_at < bypass_s:
                    for cond in ((jobs.c.lora_key.in_(prefer),) if prefer and oldest.lora_key not in prefer else ()) \
                            + ((jobs.c.lora_key.notin_(avoid),) if avoid and oldest.lora_key in avoid else ()):
                        match = c.execute(waiting.where(cond).limit(1)).first()
                        if match:
                            pick = match.id
                            break
                done = c.execute(update(jobs).where(and_(jobs.c.id == pick, jobs.c.status == "queued")).values(
                    status="in_progress", attempt=jobs.c.attempt + 1, lease_until=now + lease_s,
                    started_at=func.coalesce(jobs.c.started_at, now)))
                if done.rowcount == 1:
                    return dict(c.execute(select(jobs).where(jobs.c.id == pick)).first()._mapping)
        return None

    def heartbeat(self, job_id: str, attempt: int, lease_s: float, progress: int | None = None,
                  replica: str | None = None) -> tuple[bool, bool]:
        """Renew a running job's lease (and its progress). -> (still ours, cancel requested)."""
        values: dict[str, Any] = {"lease_until": time.time() + lease_s}
        if progress is not None:
            values["progress"] = progress
        if replica is not None:
            values["replica"] = replica
        with self.engine.begin() as c:
            done = c.execute(update(jobs).where(self._ours(job_id, attempt)).values(**values))
            row = c.execute(select(jobs.c.cancel_requested).where(jobs.c.id == job_id)).first()
        return done.rowcount == 1, bool(row and row.cancel_requested)

    def finish(self, job_id: str, attempt: int, **values) -> bool:
        """completed or failed, if the job is still this attempt's; False otherwise (nothing written)."""
        values.setdefault("completed_at", time.time())
        values["lease_until"] = None
        if "result" in values and not isinstance(values["result"], str):
            values["result"] = json.dumps(values["result"])
        with self.engine.begin() as c:
            return c.execute(update(jobs).where(self._ours(job_id, attempt)).values(**values)).rowcount == 1

    def retry_or_fail(self, job_id: str, attempt: int, code: str, message: str) -> str | None:
        """After a replica failure: back to the queue while attempts remain, else failed. -> the new state, or None
        when the job had moved on already."""
        with self.engine.begin() as c:
            row = c.execute(select(jobs.c.max_attempts, jobs.c.cancel_requested).where(
                self._ours(job_id, attempt))).first()
            if row is None:
                return None
            if attempt < row.max_attempts and not row.cancel_requested:
                c.execute(update(jobs).where(self._ours(job_id, attempt)).values(
                    status="queued", lease_until=None, progress=0, error_code=code, error_message=message))
                return "queued"
            c.execute(update(jobs).where(self._ours(job_id, attempt)).values(
                status="failed", lease_until=None, completed_at=time.time(), error_code=code,
                error_message=f"{message} (after {attempt} attempt{'s' if attempt > 1 else ''})"))
            return "failed"

    def expired_leases(self, now: float | None = None) -> list[dict]:
        """Running jobs whose lease ran out: their replica stopped reporting."""
        now = time.time() if now is None else now
        with self.engine.connect() as c:
            rows = c.execute(select(jobs.c.id, jobs.c.attempt).where(and_(
                jobs.c.status == "in_progress", jobs.c.lease_until < now))).all()
        return [dict(r._mapping) for r in rows]

    def past_deadline(self, now: float | None = None) -> list[dict]:
        now = time.time() if now is None else now
        with self.engine.connect() as c:
            rows = c.execute(select(jobs.c.id, jobs.c.attempt, jobs.c.status).where(and_(
                jobs.c.status.in_(ACTIVE), jobs.c.deadline_at < now))).all()
        return [dict(r._mapping) for r in rows]

    def fail_now(self, job_id: str, code: str, message: str, status_from=ACTIVE) -> bool:
        """Fail a job whatever its attempt (deadline passed, or given up at startup)."""
        with self.engine.begin() as c:
            return c.execute(update(jobs).where(and_(jobs.c.id == job_id, jobs.c.status.in_(status_from))).values(
                status="failed", lease_until=None, completed_at=time.time(), error_code=code,
                error_message=message)).rowcount == 1

    # ------------------------------------------------------------------------------------------------
    def delete(self, job_id: str, owner: str) -> dict | None:
        """Remove a job from the owner's view: a queued one at once (-> its row, for its files); a running one is
        cancelled at its next step (the replica removes its files); a finished one's files go with it."""
        with self.engine.begin() as c:
            row = c.execute(select(jobs).where(and_(jobs.c.id == job_id, jobs.c.owner == owner,
                                                    jobs.c.deleted.is_(False)))).first()
            if row is None:
                return None
            row = dict(row._mapping)
            if row["status"] == "queued":
                c.execute(jobs.delete().where(and_(jobs.c.id == job_id, jobs.c.status == "queued")))
            else:
                c.execute(update(jobs).where(jobs.c.id == job_id).values(deleted=True, cancel_requested=True))
        return row

    def purge(self, job_id: str) -> None:
        with self.engine.begin() as c:
            c.execute(jobs.delete().where(jobs.c.id == job_id))

    def finished_deleted(self) -> list[dict]:
        """Deleted jobs that are no longer running: their files can go, then their rows."""
        with self.engine.connect() as c:
            rows = c.execute(select(jobs).where(and_(jobs.c.deleted.is_(True),
                                                     jobs.c.status.notin_(ACTIVE)))).all()
        return [dict(r._mapping) for r in rows]

    def expired(self, now: float | None = None) -> list[dict]:
        """Finished jobs past expires_at whose files are still there."""
        now = time.time() if now is None else now
        with self.engine.connect() as c:
            rows = c.execute(select(jobs).where(and_(jobs.c.expires_at < now, jobs.c.files_removed.is_(False),
                                                     jobs.c.status.notin_(ACTIVE)))).all()
        return [dict(r._mapping) for r in rows]

    def mark_files_removed(self, job_id: str) -> None:
        with self.engine.begin() as c:
            c.execute(update(jobs).where(jobs.c.id == job_id).values(files_removed=True))

    @staticmethod
    def _ours(job_id: str, attempt: int):
        return and_(jobs.c.id == job_id, jobs.c.attempt == attempt, jobs.c.status == "in_progress")
