"""A job's state and result, read from the task directory: inbox/ (queued), processing/ (with the stage
from its worker's status file), done/<id>.json (the result), failed/<id>/error.json (the reason)."""

from __future__ import annotations

import asyncio
import math
import re
import time
from typing import Any

from fastapi.responses import JSONResponse, PlainTextResponse, Response

from transcribe.core.engine.formats import render
from transcribe.core.engine.result import Result
from transcribe.core.fsio import read_json_object
from transcribe.core.pool.jobs import JobRecord
from transcribe.core.pool.task_dir import ERROR_FILE, JOB_FILE, TaskDir
from transcribe.http.errors import ApiError

_JOB_ID = re.compile(r"^[\w-][\w.-]{0,199}$")
WAIT_INTERVAL_S = 0.1  # how often a waiting request looks for done/<id>.json or failed/<id>/
STATES = {"inbox": "queued", "processing": "processing", "done": "done", "failed": "failed"}


def check_job_id(job_id: str) -> str:
    if not _JOB_ID.match(job_id):
        raise ApiError(404, f"no job {job_id!r}", param="job_id", code="job_not_found")
    return job_id


def links(job_id: str) -> dict[str, str]:
    return {"self": f"/v1/jobs/{job_id}", "result": f"/v1/jobs/{job_id}/result?format=json"}


def worker_for(td: TaskDir, job_id: str) -> dict[str, Any]:
    """The status of the worker running `job_id` (its stage), or {}."""
    for path in td.workers.glob("*.json"):
        status = read_json_object(path)
        if status.get("job") == job_id:
            return status
    return {}


def job_state(td: TaskDir, job_id: str) -> dict[str, Any]:
    """What `GET /v1/jobs/{id}` answers. A job moving between folders while we look is looked up again."""
    for _ in range(3):
        where = td.find(check_job_id(job_id))
        if where is None:
            raise ApiError(404, f"no job {job_id!r} in this server's task directory", param="job_id",
                           code="job_not_found")
        state, path = where
        info: dict[str, Any] = {"id": job_id, "object": "transcription.job", "status": STATES[state],
                                "links": links(job_id)}
        if state == "done":
            result = read_json_object(path)
            if not result:
                continue
            return {**info, "source": result.get("source"), "duration": result.get("duration"),
                    "rtf": result.get("rtf"), "speakers": result.get("speakers")}
        if state == "failed":
            error = td.failure_info(job_id)
            return {**info, "attempts": error.get("attempts"), "error": {
                k: error.get(k) for k in ("reason", "error_type", "message", "retryable", "last_reason")}}
        job_dir = path
        try:
            record = JobRecord.from_json((job_dir / JOB_FILE).read_text(encoding="utf-8"))
        except FileNotFoundError:
            if not job_dir.exists():
                continue  # moved on while we looked
            record = None
        except (OSError, ValueError, KeyError):
            record = None
        if record is not None:
            info.update(source=record.original_name, created=record.created, attempts=record.attempts)
        if state == "processing":
            worker = worker_for(td, job_id)
            started = worker.get("job_started_ts")
            info.update(stage=worker.get("job_stage"), worker=worker.get("worker_id"),
                        elapsed_s=round(time.time() - started, 1) if started else None)
        return info
    raise ApiError(409, f"job {job_id!r} kept moving while being looked up; ask again", code="job_moving")


async def wait_for_outcome(td: TaskDir, job_id: str, timeout: float) -> str | None:
    """"done" or "failed" once the job lands there; None after `timeout` seconds. Two stat calls a turn."""
    deadline = time.monotonic() + timeout
    while True:
        if (td.done / f"{job_id}.json").is_file():
            return "done"
        if (td.failed / job_id / ERROR_FILE).is_file():
            return "failed"
        if time.monotonic() >= deadline:
            return None
        await asyncio.sleep(WAIT_INTERVAL_S)


def failure_error(td: TaskDir, job_id: str) -> ApiError:
    """A failed job as an error response: 400 for bad input (not retryable), 500 otherwise."""
    error = td.failure_info(job_id)
    bad_input = error.get("retryable") is False
    reason = str(error.get("reason") or "failed")
    return ApiError(400 if bad_input else 500, f"job {job_id} failed: {error.get('message') or reason}",
                    param="file" if bad_input else None, code=reason, extra={"job_id": job_id})


def verbose_json(result: Result, job_id: str, language: str | None) -> dict[str, Any]:
    """OpenAI's verbose_json plus speakers and this project's timings; `words` when the job had word
    timestamps (`timestamp_granularities[]=word`, or word_timestamps in the job's options)."""
    body = {
        "task": "transcribe", "language": language, "duration": result.duration, "text": result.text,
        "segments": [{"id": i, "start": s.start, "end": s.end, "text": s.text, "speaker": s.speaker}
                     for i, s in enumerate(result.segments)],
        "speakers": result.speakers, "job_id": job_id, "processing_time": result.processing_time,
        "rtf": result.rtf, "timings": result.timings, "device": result.device, "models": result.models,
        "usage": usage(result),
    }
    if any(s.words is not None for s in result.segments):
        body["words"] = [{"word": w.text, "start": w.start, "end": w.end}
                         for s in result.segments for w in (s.words or ())]
    return body


def usage(result: Result) -> dict[str, Any]:
    return {"type": "duration", "seconds": math.ceil(result.duration)}


def result_response(td: TaskDir, job_id: str, fmt: str, language: str | None = None) -> Response:
    """The finished job's result in `fmt`, or the failure as an error."""
    where = td.find(check_job_id(job_id))
    if where is None:
        raise ApiError(404, f"no job {job_id!r} in this server's task directory", param="job_id",
                       code="job_not_found")
    if where[0] == "failed":
        raise failure_error(td, job_id)
    if where[0] != "done":
        raise ApiError(409, f"job {job_id} is {STATES[where[0]]}, not done yet; poll GET /v1/jobs/{job_id}",
                       code="job_not_finished", extra={"job_id": job_id})
    result = Result.from_json(where[1].read_text(encoding="utf-8"))
    headers = {"X-Transcribe-Job-Id": job_id}
    if fmt == "json":
        return JSONResponse({"text": result.text, "usage": usage(result), "job_id": job_id}, headers=headers)
    if fmt == "verbose_json":
        return JSONResponse(verbose_json(result, job_id, language), headers=headers)
    if fmt == "text":
        return PlainTextResponse(result.text + "\n", headers=headers)
    media = {"srt": "application/x-subrip", "vtt": "text/vtt"}[fmt]
    # the file the worker committed beside the JSON, rendered with the job's own layout (line limits), when
    # the job asked for this format; otherwise rendered here from the result
    committed = td.done / f"{job_id}.{fmt}"
    body = committed.read_text(encoding="utf-8") if committed.is_file() else render(result, fmt)
    return Response(body, media_type=f"{media}; charset=utf-8", headers=headers)
