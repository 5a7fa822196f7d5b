"""Formatters against hand-checked expected files (tests/data/expected/)."""

from pathlib import Path

import pytest

from transcribe.core.engine.formats import FORMATTERS, SubtitleLayout, cue_lines, render
from transcribe.core.engine.result import Result, Segment, Word

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


@pytest.mark.parametrize("fmt", ["txt", "srt", "vtt", "tsv", "rttm"])
@pytest.mark.parametrize("name, result", [("sample", SAMPLE), ("empty", EMPTY)])
def test_matches_expected_file(fmt, name, result):
    assert render(result, fmt) == (EXPECTED / f"{name}.{fmt}").read_text(encoding="utf-8")


# Line limits: CJK wraps between characters, English between words, punctuation never starts a line,
# a word longer than the width stays whole, a segment past max_line_count lines becomes several cues
# (each with the label) sharing its time by characters; rttm names the file by the source's stem.
WRAP = Result(text="", segments=[
    Segment(0.0, 6.0, "今天我们讨论一下语音识别的最新进展，以及它在会议记录中的应用。", "Speaker1"),
    Segment(6.5, 10.0, "Then we switch to English, with a rather extraordinarily long word.", "Speaker2"),
    Segment(10.0, 11.0, "短句。", None),
], speakers=["Speaker1", "Speaker2"], duration=11.0, processing_time=1, rtf=0.1, device="cpu", models={},
    source="wrap test.wav")


@pytest.mark.parametrize("fmt", ["srt", "vtt", "rttm"])
def test_line_limits_match_expected_file(fmt):
    assert render(WRAP, fmt, SubtitleLayout(16, 2)) == (EXPECTED / f"wrapped.{fmt}").read_text(encoding="utf-8")


def test_no_limits_render_as_before_and_width_alone_keeps_one_cue():
    assert render(SAMPLE, "srt", SubtitleLayout()) == render(SAMPLE, "srt")
    [cue] = cue_lines(WRAP.segments[0], SubtitleLayout(max_line_width=20))
    assert len(cue) == 3 and all(len(line) <= 20 for line in cue) and not cue[1].startswith("，")
    assert "".join(cue).replace("[Speaker1] ", "") == WRAP.segments[0].text


def test_split_cues_take_their_times_from_word_timestamps():
    words = tuple(Word(ch, a, b) for ch, a, b in [("你", 0.0, 0.5), ("好", 0.5, 1.0), ("世", 1.0, 1.5), ("界", 1.5, 2.0),
                                                  ("再", 2.6, 3.0), ("见", 3.0, 3.2), ("朋", 3.2, 3.5),
                                                  ("友", 3.5, 3.9)])
    seg = Segment(0.0, 4.0, "你好世界。再见朋友。", "Speaker1", words)
    r = Result("", [seg], ["Speaker1"], 4.0, 0.1, 0.1, "cpu", {})
    assert render(r, "srt", SubtitleLayout(max_line_width=16, max_line_count=1)) == (
        "1\n00:00:00,000 --> 00:00:02,000\n[Speaker1] 你好世界。\n\n"
        "2\n00:00:02,600 --> 00:00:04,000\n[Speaker1] 再见朋友。\n")
    # words that do not spell the text (another tokenisation): times shared by characters instead
    odd = Segment(0.0, 4.0, seg.text, "Speaker1", words[:3])
    r.segments = [odd]
    assert "00:00:02,000 --> 00:00:04,000" in render(r, "srt", SubtitleLayout(max_line_width=16, max_line_count=1))


WORDED = Result(text="你好", segments=[Segment(0.0, 1.0, "你好。", "Speaker1", (Word("你", 0.0, 0.4),
                                                                                 Word("好", 0.4, 0.9)))],
                speakers=["Speaker1"], duration=1.0, processing_time=0.1, rtf=0.1, device="cpu", models={},
                fallback={"reason": "out_of_memory", "message": "m", "from": "cuda:0", "to": "cpu",
                          "batch_size_s": 300}, cached=True)


@pytest.mark.parametrize("result", [SAMPLE, EMPTY, WORDED])
def test_json_round_trips(result):
    assert Result.from_json(render(result, "json")) == result


def test_segments_without_speakers_have_no_label():
    r = Result("a", [Segment(0, 1, "a")], [], 1, 0.1, 0.1, "cpu", {})
    assert render(r, "txt") == "a\n" and "[" not in render(r, "srt")


def test_every_format_has_a_formatter():
    from transcribe.config import OUTPUT_FORMATS

    assert set(FORMATTERS) == set(OUTPUT_FORMATS)
