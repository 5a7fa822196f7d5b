"""Transcript file formats: json, txt, srt, vtt, tsv, rttm. One place for every formatter.

- txt: one line per segment, ``[Speaker1] text`` (no label without diarization).
- srt: ``00:01:02,345`` timestamps, cue text prefixed ``[Speaker1]``; vtt the same with ``.``.
  Hours are not capped at 99 minutes: 2 h 5 min is ``02:05:00,000``.
  `SubtitleLayout` limits a cue's lines: ``max_line_width`` characters per line (wrapped between
  words, or between any two CJK characters, which have no spaces; punctuation never starts a
  line; a word longer than the width stays whole; the speaker label counts toward the width),
  ``max_line_count`` lines per cue (a longer segment becomes several cues, each starting with the
  speaker label, timed by the segment's word timestamps when it has them, else by sharing its time
  in proportion to their spoken characters).
- tsv: ``start<TAB>end<TAB>speaker<TAB>text`` in integer milliseconds, like WhisperX.
- rttm: NIST RTTM for diarization tools, one ``SPEAKER <file> 1 <start> <dur> <NA> <NA> <speaker>
  <NA> <NA>`` line per segment with a speaker (seconds, 3 decimals; <file> is the source's stem,
  spaces replaced by ``_``). Without diarization it is empty.
An empty transcript gives a valid empty file of each format (vtt keeps its ``WEBVTT`` header).
"""

from __future__ import annotations

import unicodedata
from dataclasses import dataclass
from pathlib import Path

from transcribe.core.engine.result import Result, Segment


@dataclass(frozen=True)
class SubtitleLayout:
    max_line_width: int | None = None  # characters per line
    max_line_count: int | None = None  # lines per cue

    @property
    def limited(self) -> bool:
        return bool(self.max_line_width or self.max_line_count)


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


def _units(text: str) -> list[tuple[str, bool]]:
    """Breakable units of `text`, each with whether a space came before it: a word, or one CJK
    character (CJK has no spaces: a line may break between any two); punctuation sticks to what
    precedes it, so no line starts with it."""
    units: list[tuple[str, bool]] = []
    word, word_spaced, spaced = "", False, False
    for ch in text:
        if ch.isspace():
            if word:
                units.append((word, word_spaced))
                word = ""
            spaced = True
        elif unicodedata.category(ch).startswith("P") and not spaced and (word or units):
            if word:
                word += ch
            else:
                units[-1] = (units[-1][0] + ch, units[-1][1])
        elif unicodedata.east_asian_width(ch) in ("W", "F"):
            if word:
                units.append((word, word_spaced))
                word = ""
            units.append((ch, spaced))
            spaced = False
        else:
            if not word:
                word_spaced, spaced = spaced, False
            word += ch
    if word:
        units.append((word, word_spaced))
    return units


def cue_lines(seg: Segment, layout: SubtitleLayout) -> list[list[str]]:
    """The segment's text (with its speaker label) as cues of lines within `layout`'s limits."""
    label = f"[{seg.speaker}]" if seg.speaker else ""
    width, count = layout.max_line_width, layout.max_line_count
    cues: list[list[str]] = [[]]
    line, has_text = label, False
    for unit, spaced in _units(_one_line(seg.text)):
        sep = " " if line and (spaced or not has_text) else ""
        if width and has_text and len(line) + len(sep) + len(unit) > width:
            cues[-1].append(line)
            if count and len(cues[-1]) >= count:
                cues.append([])
            line = f"{label} {unit}" if label and not cues[-1] else unit
        else:
            line += sep + unit
        has_text = True
    cues[-1].append(line)
    return [c for c in cues if c]


def _spoken(text: str) -> str:
    """The characters that are speech: no spaces, no punctuation (brackets of a label included)."""
    return "".join(ch for ch in text if not ch.isspace() and not unicodedata.category(ch).startswith("P"))


def _char_times(seg: Segment) -> list[tuple[float, float]] | None:
    """For each spoken character of the segment, the times of the word it is in; None unless the
    segment has words that spell exactly its spoken characters."""
    if not seg.words:
        return None
    times = [(w.start, w.end) for w in seg.words for _ in _spoken(w.text)]
    return times if len(times) == len(_spoken(seg.text)) else None


def _cues(seg: Segment, layout: SubtitleLayout | None) -> list[tuple[float, float, str]]:
    """(start, end, text) per cue. A segment split in several cues takes each cue's time from its
    words' timestamps when it has them (``word_timestamps``), else shares its time in proportion to
    the cues' spoken characters."""
    if layout is None or not layout.limited:
        return [(seg.start, seg.end, _labelled(seg))]
    cues = cue_lines(seg, layout)
    label = len(_spoken(seg.speaker)) if seg.speaker else 0  # the label repeats per cue: not speech
    sizes = [len(_spoken("".join(cue))) - label for cue in cues]
    total, clock = sum(sizes), _char_times(seg)
    out, done = [], 0
    for i, (cue, size) in enumerate(zip(cues, sizes)):
        first, last = i == 0, i == len(cues) - 1
        if clock is not None and size:
            start, end = clock[done][0], clock[done + size - 1][1]
        else:
            start = seg.start + (seg.end - seg.start) * done / (total or 1)
            end = seg.start + (seg.end - seg.start) * (done + size) / (total or 1)
        done += size
        out.append((seg.start if first else round(start, 3), seg.end if last else round(end, 3), "\n".join(cue)))
    return out


def to_json(result: Result, layout: SubtitleLayout | None = None) -> str:
    return result.to_json() + "\n"


def to_txt(result: Result, layout: SubtitleLayout | None = None) -> str:
    return "".join(_labelled(s) + "\n" for s in result.segments)


def to_srt(result: Result, layout: SubtitleLayout | None = None) -> str:
    cues = [c for s in result.segments for c in _cues(s, layout)]
    return "\n".join(f"{i}\n{_clock(start, ',')} --> {_clock(end, ',')}\n{text}\n"
                     for i, (start, end, text) in enumerate(cues, 1))


def to_vtt(result: Result, layout: SubtitleLayout | None = None) -> str:
    cues = [c for s in result.segments for c in _cues(s, layout)]
    return "WEBVTT\n\n" + "\n".join(f"{_clock(start, '.')} --> {_clock(end, '.')}\n{text}\n"
                                     for start, end, text in cues)


def to_tsv(result: Result, layout: SubtitleLayout | None = None) -> str:
    rows = ["start\tend\tspeaker\ttext\n"]
    rows += [f"{int(round(s.start * 1000))}\t{int(round(s.end * 1000))}\t{s.speaker or ''}\t{_one_line(s.text)}\n"
             for s in result.segments]
    return "".join(rows)


def rttm_file_id(source: str | None) -> str:
    return "_".join(Path(source).stem.split()) if source and Path(source).stem.strip() else "audio"


def to_rttm(result: Result, layout: SubtitleLayout | None = None) -> str:
    file_id = rttm_file_id(result.source)
    return "".join(f"SPEAKER {file_id} 1 {s.start:.3f} {max(s.end - s.start, 0.0):.3f} <NA> <NA> {s.speaker} "
                   "<NA> <NA>\n" for s in result.segments if s.speaker)


FORMATTERS = {"json": to_json, "txt": to_txt, "srt": to_srt, "vtt": to_vtt, "tsv": to_tsv, "rttm": to_rttm}


def render(result: Result, fmt: str, layout: SubtitleLayout | None = None) -> str:
    """`result` in format `fmt`; `layout` limits srt/vtt lines (the other formats ignore it)."""
    return FORMATTERS[fmt](result, layout)
