"""What one transcription may ask for beyond the configuration: `TranscribeOptions`.

One frozen value shared by the engine (`Transcriber.transcribe`), the job options of the pool
(`pool/jobs.py` validates with the same `option_problems`), the result cache's key and the
fallback's retries. Pure: no FunASR, no I/O.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Sequence

MAX_SPEAKERS = 64


@dataclass(frozen=True)
class TranscribeOptions:
    speakers: int | None = None  # the exact number of speakers (FunASR's preset_spk_num)
    min_speakers: int | None = None  # bounds on CAM++'s estimated count (engine/patches/cluster_bounds.py)
    max_speakers: int | None = None
    diarize: bool = True  # False: skip the speaker model for this job
    hotwords: tuple[str, ...] | None = None
    batch_size_s: int | None = None  # None: funasr.batch_size_s
    word_timestamps: bool = False  # each segment's tokens with their times

    @classmethod
    def of(cls, *, speakers: int | None = None, min_speakers: int | None = None, max_speakers: int | None = None,
           diarize: bool = True, hotwords: Sequence[str] | None = None, batch_size_s: int | None = None,
           word_timestamps: bool = False) -> "TranscribeOptions":
        return cls(speakers=speakers, min_speakers=min_speakers, max_speakers=max_speakers, diarize=diarize,
                   hotwords=tuple(hotwords) if hotwords else None, batch_size_s=batch_size_s,
                   word_timestamps=word_timestamps)

    @property
    def speaker_bounds(self) -> tuple[int, int] | None:
        """(min, max) when either bound is set; the other defaults to 1 or `MAX_SPEAKERS`."""
        if self.min_speakers is None and self.max_speakers is None:
            return None
        return (self.min_speakers or 1, self.max_speakers or MAX_SPEAKERS)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["hotwords"] = list(self.hotwords) if self.hotwords else None
        return d


def option_problems(*, speakers: int | None, min_speakers: int | None, max_speakers: int | None,
                    diarize: bool = True) -> list[str]:
    """What is wrong with a combination of speaker options, each saying how to fix it ([] if nothing)."""
    problems = []
    for name, value in (("speakers", speakers), ("min_speakers", min_speakers), ("max_speakers", max_speakers)):
        if value is not None and not 1 <= value <= MAX_SPEAKERS:
            problems.append(f"{name} must be between 1 and {MAX_SPEAKERS}, not {value}")
    if speakers is not None and (min_speakers is not None or max_speakers is not None):
        problems.append("give either speakers (the exact count) or min_speakers/max_speakers (bounds), not both")
    if min_speakers is not None and max_speakers is not None and min_speakers > max_speakers:
        problems.append(f"min_speakers ({min_speakers}) is more than max_speakers ({max_speakers})")
    if not diarize and (speakers is not None or min_speakers is not None or max_speakers is not None):
        problems.append("speaker counts need diarization: drop them or drop no-diarize (diarize: false)")
    return problems
