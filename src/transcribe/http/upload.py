"""An upload, chunk by chunk, from the multipart body straight into a job staged in tmp/.

The body is never held in memory: text fields are capped at `MAX_FIELD_BYTES`, the file part is written
to ``tmp/<job-id>.job/`` as it arrives and the size limit is enforced while it streams. The uploaded file
name is never used as a path: the job's audio is named from its sanitised stem and an extension that is
checked against `input.allowed_extensions` and the file's first bytes. Only after every field is valid
does `TaskDir.staging` rename the job into inbox/; any error removes it.
"""

from __future__ import annotations

import contextlib
import errno
from dataclasses import dataclass
from pathlib import PurePath
from typing import IO, Any, Callable, TypeVar

from python_multipart.multipart import (
    MultipartParseError,
    MultipartParser,
    parse_options_header,
)
from starlette.requests import ClientDisconnect, Request

from transcribe.core.fault_injection import crash_point
from transcribe.core.pool.jobs import JobOptions, safe_stem
from transcribe.core.pool.task_dir import StagedJob, TaskDir
from transcribe.http.errors import ApiError

MAX_FIELD_BYTES = 64 * 1024
MAX_PARTS = 64
SNIFF_BYTES = 12

T = TypeVar("T")


@dataclass
class UploadLimits:
    max_bytes: int
    allowed_extensions: list[str]


@dataclass
class Accepted:
    """A job renamed into inbox/, and what the request asked for (from `parse_fields`)."""

    job_id: str
    request: Any
    file_bytes: int


def sniff_container(head: bytes) -> str | None:
    """The audio/video container that `head` (the first bytes) starts, as an extension; None if none."""
    if head[:4] in (b"RIFF", b"RF64", b"BW64") and head[8:12] == b"WAVE":
        return ".wav"
    if head[:4] == b"fLaC":
        return ".flac"
    if head[:4] == b"OggS":
        return ".ogg"
    if head[:4] == b"\x1a\x45\xdf\xa3":
        return ".webm"
    if head[4:8] in (b"ftyp", b"moov", b"mdat", b"free", b"wide", b"skip"):
        return ".m4a"
    if head[:3] == b"ID3":
        return ".mp3"
    if len(head) >= 2 and head[0] == 0xFF and head[1] & 0xF6 == 0xF0:
        return ".aac"  # ADTS: 12 sync bits, layer 00
    if len(head) >= 2 and head[0] == 0xFF and head[1] & 0xE0 == 0xE0:
        return ".mp3"  # an MPEG audio frame header
    return None


def audio_name(filename: str | None, head: bytes, allowed: list[str]) -> str:
    """A safe name for the job's audio: the upload's stem, sanitised, and a checked extension."""
    shown = filename or "the upload"
    sniffed = sniff_container(head)
    if sniffed is None:
        raise ApiError(400, f"{shown!r} is not audio: its first bytes match no supported container (WAV, FLAC, "
                            f"Ogg/Opus, MP3, AAC, MP4/M4A, WebM)", param="file", code="audio_unrecognized")
    suffix = PurePath((filename or "").replace("\\", "/")).suffix.lower()
    ext = suffix or sniffed  # a name without extension (raw bytes from a client) takes the sniffed one
    if ext not in allowed:
        raise ApiError(400, f"{shown!r}: unsupported file type {ext}; supported: {', '.join(allowed)}",
                       param="file", code="audio_unsupported_format")
    return safe_stem(filename or "audio") + ext


class _MultipartSink:
    """python-multipart callbacks: fields into `fields`, the `file` part into a staged job."""

    def __init__(self, td: TaskDir, limits: UploadLimits, stack: contextlib.ExitStack) -> None:
        self.td, self.limits, self.stack = td, limits, stack
        self.fields: dict[str, list[str]] = {}
        self.staged: StagedJob | None = None
        self.file_bytes = 0
        self.saw_file = False
        self._parts = 0
        self._headers: dict[bytes, bytes] = {}
        self._header_field, self._header_value = bytearray(), bytearray()
        self._name: str | None = None
        self._filename: str | None = None
        self._is_file = False
        self._data = bytearray()  # a field's value, or the file's first bytes until they are sniffed
        self._out: IO[bytes] | None = None

    def callbacks(self) -> dict[str, Callable[..., None]]:
        return {"on_part_begin": self._part_begin, "on_header_field": self._header_field_data,
                "on_header_value": self._header_value_data, "on_header_end": self._header_end,
                "on_headers_finished": self._headers_finished, "on_part_data": self._part_data,
                "on_part_end": self._part_end}

    def _part_begin(self) -> None:
        self._parts += 1
        if self._parts > MAX_PARTS:
            raise ApiError(400, f"too many form fields (more than {MAX_PARTS})", code="too_many_fields")
        self._headers, self._data, self._out = {}, bytearray(), None

    def _header_field_data(self, data: bytes, start: int, end: int) -> None:
        self._header_field += data[start:end]

    def _header_value_data(self, data: bytes, start: int, end: int) -> None:
        self._header_value += data[start:end]

    def _header_end(self) -> None:
        self._headers[bytes(self._header_field).lower()] = bytes(self._header_value)
        self._header_field, self._header_value = bytearray(), bytearray()

    def _headers_finished(self) -> None:
        _, params = parse_options_header(self._headers.get(b"content-disposition", b""))
        self._name = params.get(b"name", b"").decode("utf-8", "replace")
        raw_filename = params.get(b"filename")
        self._filename = raw_filename.decode("utf-8", "replace") if raw_filename is not None else None
        self._is_file = self._name == "file"
        if self._is_file:
            if self.saw_file:
                raise ApiError(400, "send one `file` per request", param="file", code="too_many_files")
            self.saw_file = True

    def _part_data(self, data: bytes, start: int, end: int) -> None:
        chunk = data[start:end]
        if not self._is_file:
            self._data += chunk
            if len(self._data) > MAX_FIELD_BYTES:
                raise ApiError(400, f"field `{self._name}` is over {MAX_FIELD_BYTES} bytes", param=self._name,
                               code="field_too_large")
            return
        self.file_bytes += len(chunk)
        if self.file_bytes > self.limits.max_bytes:
            raise ApiError(413, f"the file is over the {self.limits.max_bytes / 2**20:g} MB upload limit "
                                f"(http.max_upload_mb)", param="file", code="file_too_large")
        if self._out is not None:
            self._write(chunk)
            return
        self._data += chunk
        if len(self._data) >= SNIFF_BYTES:
            self._open_audio()

    def _open_audio(self) -> None:
        name = audio_name(self._filename, bytes(self._data), self.limits.allowed_extensions)
        self.staged = self.stack.enter_context(self.td.staging(name))
        self._out = self.stack.enter_context(open(self.staged.audio, "wb"))
        self._write(self._data)
        self._data = bytearray()

    def _write(self, data: bytes | bytearray) -> None:
        assert self._out is not None
        crash_point("upload.write")  # the reliability tests' full disk
        self._out.write(data)

    def _part_end(self) -> None:
        if not self._is_file:
            try:
                value = self._data.decode("utf-8")
            except UnicodeDecodeError:
                raise ApiError(400, f"field `{self._name}` is not UTF-8 text", param=self._name,
                               code="invalid_value") from None
            self.fields.setdefault(self._name or "", []).append(value)
            return
        if self.file_bytes == 0:
            raise ApiError(400, "the uploaded file is empty (0 bytes)", param="file", code="audio_empty")
        if self._out is None:
            self._open_audio()  # shorter than SNIFF_BYTES: sniffing decides
        assert self._out is not None
        self._out.close()


def _boundary(request: Request) -> bytes:
    ctype, params = parse_options_header(request.headers.get("content-type", ""))
    if ctype != b"multipart/form-data" or not params.get(b"boundary"):
        raise ApiError(400, "send multipart/form-data with the audio in a `file` field "
                            "(curl -F file=@meeting.wav ...)", param="file", code="invalid_content_type")
    return params[b"boundary"]


async def receive_job(request: Request, td: TaskDir, limits: UploadLimits,
                      parse_fields: Callable[[dict[str, list[str]]], tuple[JobOptions, T]]) -> Accepted:
    """Stream the upload into a staged job; validate the fields; rename it into inbox/. `ApiError` if bad."""
    boundary = _boundary(request)
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limits.max_bytes + MAX_PARTS * MAX_FIELD_BYTES:
        raise ApiError(413, f"the upload ({int(declared) / 2**20:.0f} MB) is over the "
                            f"{limits.max_bytes / 2**20:g} MB limit (http.max_upload_mb)", param="file",
                       code="file_too_large")
    try:
        with contextlib.ExitStack() as stack:
            sink = _MultipartSink(td, limits, stack)
            parser = MultipartParser(boundary, sink.callbacks())
            async for chunk in request.stream():
                parser.write(chunk)
            parser.finalize()
            if not sink.saw_file or sink.staged is None:
                raise ApiError(400, "no `file` field: send the audio as multipart field `file`", param="file",
                               code="missing_file")
            options, request_info = parse_fields(sink.fields)
            sink.staged.options = options
            staged = sink.staged
        return Accepted(staged.job_id, request_info, sink.file_bytes)
    except MultipartParseError as e:
        raise ApiError(400, f"malformed multipart body: {e}", param="file", code="invalid_multipart") from None
    except ClientDisconnect:
        raise ApiError(400, "the client disconnected before the upload finished", param="file",
                       code="upload_incomplete") from None
    except OSError as e:
        if e.errno not in (errno.ENOSPC, errno.EDQUOT):
            raise
        # the staged upload is gone (staging removes it); nothing reached inbox/
        raise ApiError(507, f"the server's disk is full ({e.strerror}); retry later. Operators: free space on "
                            f"the filesystem of {td.root}", code="insufficient_storage",
                       headers={"Retry-After": "60"}) from None
