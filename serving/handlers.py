"""The handlers of the video API: each turns a checked wire object into store and storage work and back. They know
nothing of HTTP routing (serving/app.py) and never touch tensors: the generator replicas reach the engine."""
from __future__ import annotations

import asyncio
import io
import json
import time
from typing import AsyncIterator

from .catalog import Card, resolve
from .config import ServeConfig
from .loras import LoraRegistry
from .schema import (ApiError, CogrtInfo, LoraRef, ModelList, Video, VideoCreateForm, VideoDeleted, VideoError,
                     VideoList)
from .storage import Storage
from .store import JobStore, new_id

IMAGE_TYPES = {"PNG": "png", "JPEG": "jpg", "WEBP": "webp"}
POLL_AFTER_MS = {"queued": 1000, "in_progress": 1000}


class VideoService:
    def __init__(self, cfg: ServeConfig, card: Card, store: JobStore, storage: Storage, loras: LoraRegistry):
        self.cfg, self.card, self.store, self.storage, self.loras = cfg, card, store, storage, loras

    # ------------------------------------------------------------------------------------------------
    def create(self, owner: str, form: VideoCreateForm, image: bytes | None, idempotency_key: str | None
               ) -> tuple[Video, bool]:
        """Check, store, and return the queued job (or the one this Idempotency-Key made). -> (video, created)."""
        if idempotency_key is not None and not 0 < len(idempotency_key) <= 256:
            raise ApiError(400, "invalid_idempotency_key", "Idempotency-Key must be 1 to 256 characters",
                           "Idempotency-Key")
        if idempotency_key:
            found = self.store.by_idempotency(owner, idempotency_key)
            if found is not None:
                return video(found), False
        kind = self._check_image(image) if image is not None else None
        params = resolve(self.card, form, self.loras.names(), image is not None, self.cfg.max_prompt_chars)
        if self.store.queued() >= self.cfg.max_queued_jobs:
            raise ApiError(503, "queue_full", f"the service has {self.cfg.max_queued_jobs} jobs waiting, its limit; "
                                              f"try again later", None, {"Retry-After": "10"})
        if self.store.active_for(owner) >= self.cfg.max_jobs_per_key:
            raise ApiError(429, "too_many_jobs", f"this key has {self.cfg.max_jobs_per_key} jobs queued or running, "
                                                 f"its limit; wait for one to finish", None, {"Retry-After": "10"})
        job_id = new_id()
        key = self.storage.put_bytes(image, f"inputs/{job_id}.{kind}") if image is not None else None
        now = time.time()
        lora_key = json.dumps([[x["name"], x["weight"]] for x in params["loras"]]) if params["loras"] else ""
        row, created = self.store.create(dict(
            id=job_id, owner=owner, idempotency_key=idempotency_key, model=self.card.name, created_at=now,
            deadline_at=now + self.cfg.job_timeout_s, params=json.dumps(params), lora_key=lora_key,
            max_attempts=self.cfg.max_attempts, image=key))
        if not created and key:
            self.storage.remove(key)
        return video(row), created

    def _check_image(self, data: bytes) -> str:
        """Check an uploaded first frame by its content (not its name) and its size. -> its file extension."""
        from PIL import Image
        if len(data) > self.cfg.max_image_bytes:
            raise ApiError(413, "image_too_large", f"input_reference is {len(data)} bytes; at most "
                                                   f"{self.cfg.max_image_bytes} are accepted", "input_reference")
        try:
            with Image.open(io.BytesIO(data)) as im:  # reads the header only: the size is known before any decode
                kind, (w, h) = im.format, im.size
                if kind not in IMAGE_TYPES:
                    raise ApiError(400, "invalid_image", f"input_reference is a {kind} image; send PNG, JPEG or "
                                                         f"WEBP", "input_reference")
                if w * h > self.cfg.max_image_pixels:
                    raise ApiError(413, "image_too_large", f"input_reference is {w}x{h} pixels; at most "
                                                           f"{self.cfg.max_image_pixels} pixels are accepted",
                                   "input_reference")
                im.load()  # a truncated or corrupt file fails here, not in the generator
        except ApiError:
            raise
        except Exception as e:
            raise ApiError(400, "invalid_image", f"input_reference is not an image this service reads (PNG, "
                                                 f"JPEG, WEBP): {type(e).__name__}", "input_reference") from e
        return IMAGE_TYPES[kind]

    # ------------------------------------------------------------------------------------------------
    def retrieve(self, owner: str, job_id: str) -> Video:
        return video(self._job(owner, job_id))

    def list(self, owner: str, after: str | None, limit: int, order: str) -> VideoList:
        if not 1 <= limit <= 100:
            raise ApiError(400, "invalid_limit", f"limit must be between 1 and 100; got {limit}", "limit")
        if order not in ("asc", "desc"):
            raise ApiError(400, "invalid_order", f"order must be asc or desc; got {order!r}", "order")
        try:
            rows, more = self.store.list(owner, after, limit, order)
        except KeyError:
            raise ApiError(404, "video_not_found", f"no video {after!r} to list after", "after") from None
        data = [video(r) for r in rows]
        return VideoList(data=data, first_id=data[0].id if data else None, last_id=data[-1].id if data else None,
                         has_more=more)

    def delete(self, owner: str, job_id: str) -> VideoDeleted:
        row = self.store.delete(job_id, owner)
        if row is None:
            raise not_found(job_id)
        if row["status"] == "queued":
            self.storage.remove(row["image"])
        elif row["status"] not in ("in_progress",):  # finished: its files go now; a running one's, when it stops
            self.storage.remove(row["video"], row["thumbnail"], row["image"])
        return VideoDeleted(id=job_id)

    def content(self, owner: str, job_id: str, variant: str) -> tuple[str, str, int]:
        """-> (storage key, media type, size) of a completed job's video or thumbnail."""
        job = self._job(owner, job_id)
        if variant not in ("video", "thumbnail"):
            raise ApiError(400, "invalid_variant", f"variant must be video or thumbnail; got {variant!r}", "variant")
        if job["status"] != "completed":
            raise ApiError(409 if job["status"] != "failed" else 400, "video_not_ready",
                           f"video {job_id} is {job['status']}; its content exists once it is completed", "video_id")
        if job["files_removed"]:
            raise ApiError(404, "video_expired", f"video {job_id} expired and its files were removed", "video_id")
        key = job["video"] if variant == "video" else job["thumbnail"]
        return key, "video/mp4" if variant == "video" else "image/jpeg", self.storage.size(key)

    async def events(self, owner: str, job_id: str, poll_s: float = 0.25) -> AsyncIterator[str]:
        """Server-sent events: `progress` whenever it moves, then the final video object as `done`."""
        self._job(owner, job_id)
        last = None
        while True:
            job = await asyncio.to_thread(self.store.get, job_id, owner)
            if job is None:
                yield _sse("error", {"error": {"code": "video_not_found", "message": f"video {job_id} was deleted"}})
                return
            if job["status"] in ("completed", "failed"):
                yield _sse("done", video(job).model_dump())
                return
            if (job["status"], job["progress"]) != last:
                last = (job["status"], job["progress"])
                yield _sse("progress", {"id": job_id, "status": job["status"], "progress": job["progress"]})
            await asyncio.sleep(poll_s)

    def models(self) -> ModelList:
        return ModelList(data=[self.card.info(self.loras.names())])

    def _job(self, owner: str, job_id: str) -> dict:
        job = self.store.get(job_id, owner)
        if job is None:
            raise not_found(job_id)
        return job


def not_found(job_id: str) -> ApiError:
    """Another key's job answers the same as a job that does not exist, so ids do not leak."""
    return ApiError(404, "video_not_found", f"no video {job_id!r}", "video_id")


def video(job: dict) -> Video:
    p = json.loads(job["params"])
    result = json.loads(job["result"]) if job["result"] else {}
    error = VideoError(code=job["error_code"], message=job["error_message"] or "") if job["status"] == "failed" \
        else None
    stamp = lambda t: int(t) if t is not None else None  # noqa: E731
    info = CogrtInfo(frames=p["frames"], fps=p["fps"], width=p["width"], height=p["height"],
                     num_inference_steps=p["num_inference_steps"], seed=result.get("seed", p["seed"]),
                     mode=result.get("mode", p["mode"]), loras=[LoraRef(**x) for x in p["loras"]],
                     attempts=job["attempt"], replica=result.get("replica", job["replica"]),
                     lora_switched=result.get("lora_switched"), timings=result.get("timings", {}),
                     steps_computed=result.get("steps_computed"), fraction_computed=result.get("fraction_computed"),
                     peak_gpu_memory_gib=result.get("peak_gpu_memory_gib"),
                     engine_started_at=result.get("engine_started_at"), engine_ended_at=result.get("engine_ended_at"))
    return Video(id=job["id"], model=job["model"], status=job["status"], progress=job["progress"],
                 created_at=int(job["created_at"]), completed_at=stamp(job["completed_at"]),
                 expires_at=stamp(job["expires_at"]), size=p["size"], seconds=p["seconds"], prompt=p["prompt"],
                 error=error, cogrt=info)


def _sse(event: str, data: dict) -> str:
    return f"event: {event}\ndata: {json.dumps(data)}\n\n"
