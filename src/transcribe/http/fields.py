"""The form fields of a transcription request -> validated `JobOptions` + what the response needs.

OpenAI's fields are accepted (`model`, `language`, `prompt`, `response_format`, `temperature`,
`timestamp_granularities[]`: `word` turns on word timestamps); `prompt` becomes hotwords when `hotwords` is not given. The extensions
`speakers`, `min_speakers`, `max_speakers`, `diarize`, `hotwords`, `priority` go to `JobOptions` by those names
(`OPTION_FIELDS`). Anything else is a 400 naming the field.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from pydantic import ValidationError

from transcribe.core.pool.jobs import JobOptions
from transcribe.http.errors import ApiError

RESPONSE_FORMATS = ("json", "text", "srt", "vtt", "verbose_json")
GRANULARITIES = ("segment", "word")
OPTION_FIELDS = ("speakers", "min_speakers", "max_speakers", "diarize", "priority")
IGNORED_FIELDS = ("model", "temperature")  # accepted for compatibility: the configured models answer
KNOWN_FIELDS = (*OPTION_FIELDS, *IGNORED_FIELDS, "response_format", "language", "prompt", "hotwords", "stream",
                "timestamp_granularities[]", "timestamp_granularities")
_WORDS = re.compile(r"[\s,]+")


@dataclass(frozen=True)
class TranscriptionRequest:
    response_format: str
    language: str | None


def _one(fields: dict[str, list[str]], name: str) -> str | None:
    values = fields.get(name)
    if not values:
        return None
    if len(values) > 1:
        raise ApiError(400, f"give `{name}` once (it was sent {len(values)} times)", param=name,
                       code="duplicate_field")
    return values[0].strip()


def _words(values: list[str]) -> list[str]:
    return [w for v in values for w in _WORDS.split(v) if w]


def parse_fields(fields: dict[str, list[str]]) -> tuple[JobOptions, TranscriptionRequest]:
    """Validate every field; `ApiError` 400 with `param` set to the first bad one."""
    unknown = sorted(set(fields) - set(KNOWN_FIELDS))
    if unknown:
        raise ApiError(400, f"unknown field `{unknown[0]}`; accepted: file, {', '.join(KNOWN_FIELDS)}",
                       param=unknown[0], code="unknown_parameter")
    fmt = (_one(fields, "response_format") or "json").lower()
    if fmt not in RESPONSE_FORMATS:
        raise ApiError(400, f"response_format {fmt!r} is not one of {', '.join(RESPONSE_FORMATS)}",
                       param="response_format", code="invalid_value")
    if (_one(fields, "stream") or "false").lower() not in ("false", "0", ""):
        raise ApiError(400, "streaming responses are not supported: leave `stream` unset", param="stream",
                       code="unsupported_parameter")
    granularities = _words(fields.get("timestamp_granularities[]", []) + fields.get("timestamp_granularities", []))
    unknown_granularity = next((g for g in granularities if g not in GRANULARITIES), None)
    if unknown_granularity is not None:
        raise ApiError(400, f"timestamp_granularities {unknown_granularity!r} is not one of "
                       f"{', '.join(GRANULARITIES)}", param="timestamp_granularities", code="invalid_value")
    if "word" in granularities and fmt != "verbose_json":
        # as OpenAI's API: word timestamps come back only in verbose_json
        raise ApiError(400, "timestamp_granularities=word needs response_format=verbose_json",
                       param="timestamp_granularities", code="invalid_value")
    for name in IGNORED_FIELDS:
        _one(fields, name)
    language = _one(fields, "language") or None
    if language is not None and len(language) > 32:
        raise ApiError(400, "language must be a short code such as `zh` or `en`", param="language",
                       code="invalid_value")

    raw: dict[str, object] = {name: value for name in OPTION_FIELDS if (value := _one(fields, name))}
    hotword_source = "hotwords" if fields.get("hotwords") else "prompt"
    hotwords = _words(fields.get(hotword_source, []))
    if hotwords:
        raw["hotwords"] = hotwords
    if "word" in granularities:
        raw["word_timestamps"] = True
    try:
        options = JobOptions.model_validate(raw)
    except ValidationError as e:
        err = e.errors()[0]
        message = str(err["msg"]).removeprefix("Value error, ")
        if err["loc"]:
            name = str(err["loc"][0])
        else:  # a rule across fields (speakers with min_speakers...): name the first field it mentions
            name = next((f for f in raw if f in message), "speakers")
        param = hotword_source if name == "hotwords" else name
        raise ApiError(400, f"{param}: {message}" if err["loc"] else message, param=param,
                       code="invalid_value") from None
    return options, TranscriptionRequest(fmt, language)
