"""The FastAPI application: OpenAI's `/v1/audio/transcriptions`, jobs, health and metrics."""

from __future__ import annotations

import asyncio
import hmac
from typing import Any, Awaitable, Callable

from fastapi import Depends, FastAPI, Query, Request
from fastapi.responses import JSONResponse, Response
from loguru import logger
from prometheus_client import CONTENT_TYPE_LATEST

from transcribe import __version__
from transcribe.config import Config
from transcribe.core.pool.task_dir import TaskDir
from transcribe.core.status import collect_status
from transcribe.http.errors import ApiError, install_error_handlers
from transcribe.http.fields import RESPONSE_FORMATS, TranscriptionRequest, parse_fields
from transcribe.http.metrics import HttpMetrics, RequestCounter
from transcribe.http.results import (
    check_job_id,
    job_state,
    links,
    result_response,
    wait_for_outcome,
)
from transcribe.http.upload import Accepted, UploadLimits, receive_job


def require_key(api_keys: list[str]) -> Callable[[Request], Awaitable[None]]:
    """A dependency: `Authorization: Bearer KEY` must match one of `api_keys` (none configured: open)."""
    keys = [k.encode() for k in api_keys]

    async def check(request: Request) -> None:
        if not keys:
            return
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        given = token.strip().encode()
        matched = False
        for key in keys:  # every key compared, in constant time: no early exit to time
            matched |= hmac.compare_digest(given, key)
        if scheme.lower() != "bearer" or not matched:
            raise ApiError(401, "missing or wrong API key: send `Authorization: Bearer KEY` with a key from "
                                "http.api_keys", code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})
    return check


def create_app(cfg: Config) -> FastAPI:
    td = TaskDir.from_config(cfg).ensure()
    settings = cfg.http
    limits = UploadLimits(int(settings.max_upload_mb * 2**20), cfg.input.allowed_extensions)
    metrics = HttpMetrics(cfg, td)
    app = FastAPI(title="transcribe", version=__version__, redoc_url=None,
                  description="OpenAI-compatible speech transcription with speakers (docs/http.md)")
    install_error_handlers(app)
    app.add_middleware(RequestCounter, metrics=metrics)
    auth = [Depends(require_key(settings.api_keys))]

    async def accept(request: Request) -> Accepted:
        """Admission control, then the upload into inbox/."""
        try:
            # a scan of the folders (off the event loop), of the two that hold waiting and running jobs only
            waiting = await asyncio.to_thread(td.counts, ("inbox", "processing"))
            depth = waiting["inbox"] + waiting["processing"]
            if depth >= settings.max_queue_depth:
                raise ApiError(503, f"the queue is full ({depth} jobs waiting or running, http.max_queue_depth="
                                    f"{settings.max_queue_depth}); retry later", code="queue_full",
                               headers={"Retry-After": str(_retry_after(depth))})
            accepted = await receive_job(request, td, limits, parse_fields)
        except ApiError as e:
            metrics.jobs.labels(outcome="rejected").inc()
            logger.info("HTTP upload rejected ({}): {}", e.status, e.message)
            raise
        metrics.jobs.labels(outcome="accepted").inc()
        metrics.upload_bytes.inc(accepted.file_bytes)
        logger.info("HTTP job {} queued ({} bytes)", accepted.job_id, accepted.file_bytes)
        return accepted

    @app.post("/v1/audio/transcriptions", dependencies=auth)
    async def transcriptions(request: Request) -> Response:
        """OpenAI's transcription call: upload, wait for the result (http.sync_timeout_s), answer it."""
        accepted = await accept(request)
        job_id, req = accepted.job_id, accepted.request
        assert isinstance(req, TranscriptionRequest)
        outcome = await wait_for_outcome(td, job_id, settings.sync_timeout_s)
        if outcome is None:
            metrics.jobs.labels(outcome="timeout").inc()
            raise ApiError(504, f"job {job_id} is still running after {settings.sync_timeout_s:g} s "
                                f"(http.sync_timeout_s); it goes on: poll GET /v1/jobs/{job_id}, then GET "
                                f"/v1/jobs/{job_id}/result?format={req.response_format}", code="sync_timeout",
                           headers={"Location": f"/v1/jobs/{job_id}"}, extra={"job_id": job_id})
        metrics.jobs.labels(outcome=outcome).inc()
        return result_response(td, job_id, req.response_format, req.language)

    @app.post("/v1/jobs", status_code=202, dependencies=auth)
    async def create_job(request: Request) -> JSONResponse:
        """Queue a transcription and return its id at once (same form as /v1/audio/transcriptions)."""
        accepted = await accept(request)
        body = {"id": accepted.job_id, "object": "transcription.job", "status": "queued",
                "links": links(accepted.job_id)}
        return JSONResponse(body, status_code=202, headers={"Location": f"/v1/jobs/{accepted.job_id}"})

    @app.get("/v1/jobs/{job_id}", dependencies=auth)
    def get_job(job_id: str) -> dict[str, Any]:
        """queued | processing (with the stage) | done | failed (with the reason)."""
        return job_state(td, job_id)

    @app.get("/v1/jobs/{job_id}/result", dependencies=auth)
    def get_result(job_id: str, format: str = Query("json", description=" | ".join(RESPONSE_FORMATS))) -> Response:
        if format not in RESPONSE_FORMATS:
            raise ApiError(400, f"format {format!r} is not one of {', '.join(RESPONSE_FORMATS)}", param="format",
                           code="invalid_value")
        return result_response(td, check_job_id(job_id), format)

    @app.get("/healthz")
    def healthz() -> JSONResponse:
        """200 when at least one worker is ready (or busy), else 503."""
        info = collect_status(cfg)
        workers = {str(w["worker_id"]): w["state"] for w in info["workers"]}
        ready = any(state in ("ready", "busy") for state in workers.values())
        body = {"status": "ready" if ready else "not_ready", "workers": workers, "queue": info["counts"]}
        return JSONResponse(body, status_code=200 if ready else 503)

    @app.get("/metrics", dependencies=auth)
    def prometheus_metrics() -> Response:
        return Response(metrics.render(), media_type=CONTENT_TYPE_LATEST)

    return app


def _retry_after(depth: int) -> int:
    """Seconds a client should wait before retrying a full queue: grows with the backlog, 5 s to 5 min."""
    return max(5, min(300, depth // 10))
