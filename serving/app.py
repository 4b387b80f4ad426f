"""The HTTP app: routes only. Each route authenticates, hands the parsed request to a handler
(serving/handlers.py) and turns its answer or its ApiError into HTTP. `build_app(args)` assembles the three
deployments (ingress → dispatcher → generator); a Serve config file names it, and `cogrt serve` calls it."""
# no `from __future__ import annotations` here: Serve rebuilds the routes' signatures, and FastAPI must see the
# annotations as types, not strings
import asyncio
import logging
from pathlib import Path
from typing import Annotated

from fastapi import FastAPI, Form, Header, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
from ray import serve
from starlette.exceptions import HTTPException

from .auth import Keys, load_hashes
from .catalog import card_for
from .config import ServeConfig
from .handlers import POLL_AFTER_MS, VideoService
from .limits import BodyLimit, byte_range
from .loras import LoraRegistry
from .schema import ApiError, ErrorResponse, Health, ModelList, Video, VideoCreateForm, VideoDeleted, VideoList
from .storage import Storage
from .store import JobStore

log = logging.getLogger(__name__)
PLAYGROUND = Path(__file__).with_name("playground.html")
ERRORS = {c: {"model": ErrorResponse} for c in (400, 401, 404, 409, 413, 429, 503)}
app = FastAPI(title="cogrt", description="CogVideoX video generation: the OpenAI videos API, served by Ray Serve",
              version="1")


@app.exception_handler(ApiError)
async def _api_error(request: Request, e: ApiError):
    return JSONResponse(e.body(), status_code=e.status, headers=e.headers)


@app.exception_handler(RequestValidationError)
async def _invalid(request: Request, e: RequestValidationError):
    err = e.errors()[0]
    param = str(err["loc"][-1]) if err.get("loc") else None
    return JSONResponse(ApiError(400, "invalid_request", f"{param}: {err['msg']}", param).body(), status_code=400)


@app.exception_handler(HTTPException)
async def _http(request: Request, e: HTTPException):
    code = {404: "not_found", 405: "method_not_allowed"}.get(e.status_code, "http_error")
    return JSONResponse(ApiError(e.status_code, code, str(e.detail)).body(), status_code=e.status_code,
                        headers=getattr(e, "headers", None))


@app.exception_handler(Exception)
async def _crash(request: Request, e: Exception):
    log.exception("unhandled error on %s %s", request.method, request.url.path)
    return JSONResponse(ApiError(500, "internal_error", f"{type(e).__name__}: the server failed").body(),
                        status_code=500)


@serve.deployment
@serve.ingress(app)
class Ingress:
    def __init__(self, args: dict, dispatcher):
        self.cfg = ServeConfig.from_args(args)
        self.keys = Keys(sorted(set(self.cfg.api_key_hashes) | set(load_hashes())))
        self.cfg.check_bind(self.keys.hashes)  # a config file deployed beyond loopback without keys fails here
        self.videos = VideoService(self.cfg, card_for(self.cfg), JobStore(self.cfg.db), Storage(self.cfg.outputs),
                                   LoraRegistry(self.cfg.loras))
        self.dispatcher = dispatcher
        app.add_middleware(BodyLimit, limit=self.cfg.max_body_bytes)

    def _owner(self, request: Request) -> str:
        owner = self.keys.owner(request.headers.get("authorization"))
        if owner is None:
            raise ApiError(401, "invalid_api_key", "a valid API key is needed: Authorization: Bearer KEY", None,
                           {"WWW-Authenticate": "Bearer"})
        return owner

    @app.post("/v1/videos", status_code=202, response_model=Video, responses=ERRORS)
    async def create(self, request: Request, form: Annotated[VideoCreateForm, Form()],
                     idempotency_key: Annotated[str | None, Header(alias="Idempotency-Key")] = None):
        owner = self._owner(request)
        image = await form.input_reference.read() if form.input_reference is not None else None
        video, created = await asyncio.to_thread(self.videos.create, owner, form, image, idempotency_key)
        if created:
            self.dispatcher.kick.remote()
        return JSONResponse(video.model_dump(), status_code=202 if created else 200)

    @app.get("/v1/videos/{video_id}", response_model=Video, responses=ERRORS)
    async def retrieve(self, request: Request, video_id: str, response: Response):
        video = await asyncio.to_thread(self.videos.retrieve, self._owner(request), video_id)
        if video.status in POLL_AFTER_MS:  # read by the openai SDK's poll()
            response.headers["openai-poll-after-ms"] = str(POLL_AFTER_MS[video.status])
        return video

    @app.get("/v1/videos", response_model=VideoList, responses=ERRORS)
    async def list(self, request: Request, after: str | None = None, limit: int = 20, order: str = "desc"):
        return await asyncio.to_thread(self.videos.list, self._owner(request), after, limit, order)

    @app.delete("/v1/videos/{video_id}", response_model=VideoDeleted, responses=ERRORS)
    async def delete(self, request: Request, video_id: str):
        return await asyncio.to_thread(self.videos.delete, self._owner(request), video_id)

    @app.get("/v1/videos/{video_id}/content", responses={**ERRORS, 200: {"content": {"video/mp4": {}}},
                                                          206: {"content": {"video/mp4": {}}}, 416: {}})
    async def content(self, request: Request, video_id: str, variant: str = "video"):
        key, media, size = await asyncio.to_thread(self.videos.content, self._owner(request), video_id, variant)
        start, end, status = byte_range(request.headers.get("range"), size)
        headers = {"Accept-Ranges": "bytes", "Content-Length": str(end - start)}
        if status == 206:
            headers["Content-Range"] = f"bytes {start}-{end - 1}/{size}"
        storage = self.videos.storage

        async def body():
            for at in range(start, end, 1 << 20):
                yield await asyncio.to_thread(storage.read, key, at, min(at + (1 << 20), end))
        return StreamingResponse(body(), status_code=status, media_type=media, headers=headers)

    @app.get("/v1/videos/{video_id}/events", responses={**ERRORS, 200: {"content": {"text/event-stream": {}}}})
    async def events(self, request: Request, video_id: str):
        owner = self._owner(request)
        await asyncio.to_thread(self.videos.retrieve, owner, video_id)  # a 404 before the stream starts
        return StreamingResponse(self.videos.events(owner, video_id), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache"})

    @app.get("/v1/models", response_model=ModelList, responses=ERRORS)
    async def models(self, request: Request):
        self._owner(request)
        return await asyncio.to_thread(self.videos.models)

    @app.get("/healthz", response_model=Health)
    async def healthz(self):
        return Health(status="ok")

    @app.get("/readyz", response_model=Health, responses={503: {"model": Health}})
    async def readyz(self):
        """Ready once a generator replica has loaded and warmed up (Serve marks it RUNNING only then)."""
        s = await self.dispatcher.status.remote()
        health = Health(status="ready" if s["replicas"] else "starting", replicas=s["replicas"], backlog=s["backlog"])
        return JSONResponse(health.model_dump(), status_code=200 if s["replicas"] else 503)

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    async def playground(self):
        return HTMLResponse(PLAYGROUND.read_text())


def build_app(args: dict):
    """The application: Ingress (HTTP, CPU) → Dispatcher (one replica) → Generator (the engine, a GPU each)."""
    from .dispatcher import Dispatcher
    from .generator import Generator
    from .options import deployment_options
    cfg = ServeConfig.from_args(dict(args))
    opts = deployment_options(cfg)
    a = cfg.to_args()
    generator = serve.deployment(Generator).options(**opts["Generator"]).bind(a)
    dispatcher = serve.deployment(Dispatcher).options(**opts["Dispatcher"]).bind(a, generator)
    return Ingress.options(**opts["Ingress"]).bind(a, dispatcher)
