"""The transcript: `Result` and its `Segment`s, with a JSON round-trip and FunASR's output mapping."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from typing import Any, Iterable


@dataclass(frozen=True)
class Segment:
    start: float  # seconds
    end: float  # seconds
    text: str
    speaker: str | None = None  # "Speaker1", "Speaker2"... or None without diarization

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Segment":
        return cls(start=float(d["start"]), end=float(d["end"]), text=str(d["text"]), speaker=d.get("speaker"))


@dataclass
class Result:
    text: str
    segments: list[Segment]
    speakers: list[str]
    duration: float  # seconds of audio
    processing_time: float  # seconds of wall time for the job (decode + generate)
    rtf: float  # processing_time / duration (0 for empty audio)
    device: str
    models: dict[str, str]  # role -> id or path
    timings: dict[str, float] = field(default_factory=dict)  # stage -> seconds
    source: str | None = None  # the input's original name

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def to_json(self, indent: int | None = 2) -> str:
        return json.dumps(self.to_dict(), ensure_ascii=False, indent=indent)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Result":
        return cls(
            text=d["text"],
            segments=[Segment.from_dict(s) for s in d["segments"]],
            speakers=list(d["speakers"]),
            duration=float(d["duration"]),
            processing_time=float(d["processing_time"]),
            rtf=float(d["rtf"]),
            device=d["device"],
            models=dict(d["models"]),
            timings={k: float(v) for k, v in d.get("timings", {}).items()},
            source=d.get("source"),
        )

    @classmethod
    def from_json(cls, text: str) -> "Result":
        return cls.from_dict(json.loads(text))


def speaker_label_map(spk_ids: Iterable[Any]) -> dict[Any, str]:
    """FunASR's numeric speaker ids -> "Speaker1".."SpeakerN", numbered in order of first appearance."""
    labels: dict[Any, str] = {}
    for spk in spk_ids:
        if spk is not None and spk not in labels:
            labels[spk] = f"Speaker{len(labels) + 1}"
    return labels


def segments_from_funasr(output: list[dict[str, Any]], duration: float) -> tuple[str, list[Segment], list[str]]:
    """Map `AutoModel.generate` output to (text, segments, speakers).

    - ``sentence_info`` entries give the segments: ``start``/``end`` in ms become seconds
      (``ms / 1000``), clamped to the audio's duration (FunASR's CIF timestamps can overshoot the
      end of the audio by a frame or two), ``text`` is kept as it is, ``spk`` goes through
      `speaker_label_map`.
    - No output (FunASR returns ``[]`` when VAD finds no speech) or empty text: empty result.
    - Text without ``sentence_info`` (no VAD model): one segment spanning the audio.
    """
    if not output:
        return "", [], []
    first = output[0]
    text = str(first.get("text", "") or "")
    sentences = first.get("sentence_info")
    if sentences is None:
        segs = [Segment(0.0, round(duration, 3), text)] if text.strip() else []
        return text, segs, []
    labels = speaker_label_map(s.get("spk") for s in sentences)
    end_of_audio = round(duration, 3)
    segments = [
        Segment(start=min(s["start"] / 1000, end_of_audio), end=min(s["end"] / 1000, end_of_audio),
                text=str(s.get("text", s.get("sentence", ""))), speaker=labels.get(s.get("spk")))
        for s in sentences
    ]
    return text, segments, list(labels.values())
