"""The transcript: `Result` and its `Segment`s, with a JSON round-trip and FunASR's output mapping."""

from __future__ import annotations

import json
import unicodedata
from dataclasses import asdict, dataclass, field
from typing import Any, Iterable


@dataclass(frozen=True)
class Word:
    """One token with its time: a character for Chinese, a word for English (FunASR's units)."""

    text: str
    start: float  # seconds
    end: float  # seconds

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Word":
        return cls(text=str(d["text"]), start=float(d["start"]), end=float(d["end"]))


@dataclass(frozen=True)
class Segment:
    start: float  # seconds
    end: float  # seconds
    text: str
    speaker: str | None = None  # "Speaker1", "Speaker2"... or None without diarization
    words: tuple[Word, ...] | None = None  # with word_timestamps only; absent from the JSON otherwise

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {"start": self.start, "end": self.end, "text": self.text, "speaker": self.speaker}
        if self.words is not None:
            d["words"] = [asdict(w) for w in self.words]
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Segment":
        words = d.get("words")
        return cls(start=float(d["start"]), end=float(d["end"]), text=str(d["text"]), speaker=d.get("speaker"),
                   words=None if words is None else tuple(Word.from_dict(w) for w in words))


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
    # Set when the job left its device: {"reason", "message", "from", "to", "batch_size_s"} (engine/fallback.py).
    fallback: dict[str, Any] | None = None
    cached: bool = False  # served from the result cache (timings are the original run's)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["segments"] = [s.to_dict() for s in self.segments]
        return d

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
            fallback=d.get("fallback"),
            cached=bool(d.get("cached", False)),
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


def _cjk_split(text: str) -> list[str]:
    """Whitespace-separated pieces, with each CJK character a piece of its own (CJK has no spaces)."""
    pieces: list[str] = []
    for word in text.split():
        run = ""
        for ch in word:
            if unicodedata.east_asian_width(ch) in ("W", "F"):
                pieces += [run, ch] if run else [ch]
                run = ""
            else:
                run += ch
        if run:
            pieces.append(run)
    return pieces


def words_from_sentence(sentence: dict[str, Any], end_of_audio: float) -> tuple[Word, ...]:
    """A sentence's tokens with their times ([start_ms, end_ms] in FunASR's ``timestamp``).

    The tokens are FunASR's ``raw_text``: space-separated tokens (``timestamp_sentence``), or the
    surface text without spaces (``_timestamp_sentences_from_surface``), where a CJK character or a
    word is one token. Whichever split has one token per timestamp is used; if neither has, tokens
    and times are paired by position, as FunASR's own sentence splitting pairs them, and the
    surplus of either is left out."""
    raw = str(sentence.get("raw_text", "") or "")
    stamps = sentence.get("timestamp") or []
    tokens = raw.split()
    if len(tokens) != len(stamps) and len(_cjk_split(raw)) == len(stamps):
        tokens = _cjk_split(raw)
    return tuple(Word(text=tok, start=min(ts[0] / 1000, end_of_audio), end=min(ts[1] / 1000, end_of_audio))
                 for tok, ts in zip(tokens, stamps))


def segments_from_funasr(output: list[dict[str, Any]], duration: float, *,
                         words: bool = False) -> tuple[str, list[Segment], list[str]]:
    """Map `AutoModel.generate` output to (text, segments, speakers).

    - ``sentence_info`` entries give the segments: ``start``/``end`` in ms become seconds
      (``ms / 1000``), clamped to the audio's duration (FunASR's CIF timestamps can overshoot the
      end of the audio by a frame or two), ``text`` is kept as it is, ``spk`` goes through
      `speaker_label_map`.
    - No output (FunASR returns ``[]`` when VAD finds no speech) or empty text: empty result.
    - Text without ``sentence_info`` (no VAD model): one segment spanning the audio.
    - ``words``: each segment also gets its tokens' times (`words_from_sentence`; needs
      ``return_raw_text=True`` in the generate call, which `build_generate_kwargs` adds).
    """
    if not output:
        return "", [], []
    first = output[0]
    text = str(first.get("text", "") or "")
    sentences = first.get("sentence_info")
    if sentences is None:
        segs = [Segment(0.0, round(duration, 3), text, words=() if words else None)] if text.strip() else []
        return text, segs, []
    labels = speaker_label_map(s.get("spk") for s in sentences)
    end_of_audio = round(duration, 3)
    segments = [
        Segment(start=min(s["start"] / 1000, end_of_audio), end=min(s["end"] / 1000, end_of_audio),
                text=str(s.get("text", s.get("sentence", ""))), speaker=labels.get(s.get("spk")),
                words=words_from_sentence(s, end_of_audio) if words else None)
        for s in sentences
    ]
    return text, segments, list(labels.values())
