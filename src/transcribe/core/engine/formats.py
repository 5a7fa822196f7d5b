"""Transcript file formats: json, txt, srt, vtt, tsv. One place for every formatter.

- txt: one line per segment, ``[Speaker1] text`` (no label without diarization).
- srt: ``00:01:02,345`` timestamps, cue text prefixed ``[Speaker1]``; vtt the same with ``.``.
  Hours are not capped at 99 minutes: 2 h 5 min is ``02:05:00,000``.
- tsv: ``start<TAB>end<TAB>speaker<TAB>text`` in integer milliseconds, like WhisperX.
An empty transcript gives a valid empty file of each format (vtt keeps its ``WEBVTT`` header).
"""

from __future__ import annotations

from transcribe.core.engine.result import Result, Segment


def _clock(seconds: float, sep: str) -> str:
    ms = int(round(max(seconds, 0.0) * 1000))
    h, rest = divmod(ms, 3_600_000)
    m, rest = divmod(rest, 60_000)
    s, ms = divmod(rest, 1000)
    return f"{h:02d}:{m:02d}:{s:02d}{sep}{ms:03d}"


def _one_line(text: str) -> str:
    return " ".join(text.split())


def _labelled(seg: Segment) -> str:
    text = _one_line(seg.text)
    return f"[{seg.speaker}] {text}" if seg.speaker else text


def to_json(result: Result) -> str:
    return result.to_json() + "\n"


def to_txt(result: Result) -> str:
    return "".join(_labelled(s) + "\n" for s in result.segments)


def to_srt(result: Result) -> str:
    cues = [f"{i}\n{_clock(s.start, ',')} --> {_clock(s.end, ',')}\n{_labelled(s)}\n"
            for i, s in enumerate(result.segments, 1)]
    return "\n".join(cues)


def to_vtt(result: Result) -> str:
    cues = [f"{_clock(s.start, '.')} --> {_clock(s.end, '.')}\n{_labelled(s)}\n" for s in result.segments]
    return "WEBVTT\n\n" + "\n".join(cues)


def to_tsv(result: Result) -> str:
    rows = ["start\tend\tspeaker\ttext\n"]
    rows += [f"{int(round(s.start * 1000))}\t{int(round(s.end * 1000))}\t{s.speaker or ''}\t{_one_line(s.text)}\n"
             for s in result.segments]
    return "".join(rows)


FORMATTERS = {"json": to_json, "txt": to_txt, "srt": to_srt, "vtt": to_vtt, "tsv": to_tsv}


def render(result: Result, fmt: str) -> str:
    return FORMATTERS[fmt](result)
