"""Formatters against hand-checked expected files (tests/data/expected/)."""

from pathlib import Path

import pytest

from transcribe.core.engine.formats import FORMATTERS, render
from transcribe.core.engine.result import Result, Segment

EXPECTED = Path(__file__).parent / "data" / "expected"

SAMPLE = Result(
    text="你好，欢迎。Hello there. 两个小时以后 second line",
    segments=[
        Segment(0.0, 1.234, "你好，欢迎。", "Speaker1"),
        Segment(62.345, 65.0, "Hello there.", "Speaker2"),
        # 2 h 5 min: hours are not capped at 99 minutes; a newline in text stays on one line
        Segment(7500.999, 7503.001, "两个小时以后\nsecond line", "Speaker1"),
    ],
    speakers=["Speaker1", "Speaker2"], duration=7510.0, processing_time=1.0, rtf=0.0001, device="cpu",
    models={"asr": "x"},
)
EMPTY = Result(text="", segments=[], speakers=[], duration=5.0, processing_time=0.1, rtf=0.02, device="cpu",
               models={})


@pytest.mark.parametrize("fmt", ["txt", "srt", "vtt", "tsv"])
@pytest.mark.parametrize("name, result", [("sample", SAMPLE), ("empty", EMPTY)])
def test_matches_expected_file(fmt, name, result):
    assert render(result, fmt) == (EXPECTED / f"{name}.{fmt}").read_text(encoding="utf-8")


@pytest.mark.parametrize("result", [SAMPLE, EMPTY])
def test_json_round_trips(result):
    assert Result.from_json(render(result, "json")) == result


def test_segments_without_speakers_have_no_label():
    r = Result("a", [Segment(0, 1, "a")], [], 1, 0.1, 0.1, "cpu", {})
    assert render(r, "txt") == "a\n" and "[" not in render(r, "srt")


def test_every_format_has_a_formatter():
    from transcribe.config import OUTPUT_FORMATS

    assert set(FORMATTERS) == set(OUTPUT_FORMATS)
