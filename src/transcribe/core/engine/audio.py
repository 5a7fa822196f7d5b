"""Decode an input file to 16 kHz mono float32, or raise a typed `AudioError` a user can act on.

wav/flac/ogg decode through soundfile exactly as FunASR itself reads a path when torchaudio is
absent (``sf.read(dtype="float32")``, channel mean, librosa resampling), so transcribing our
array gives FunASR's own output (the parity tests check it). Other containers (mp3, m4a, mp4, aac,
opus, webm) go through ffmpeg when it is installed.
"""

from __future__ import annotations

import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from transcribe.core.errors import (
    AudioDecodeError,
    AudioNotFoundError,
    AudioTooLargeError,
    EmptyAudioError,
    FFmpegMissingError,
    UnsupportedFormatError,
)

SAMPLE_RATE = 16000
SOUNDFILE_EXTENSIONS = (".wav", ".flac", ".ogg")
FFMPEG_EXTENSIONS = (".mp3", ".m4a", ".mp4", ".aac", ".opus", ".webm")
DEFAULT_EXTENSIONS = SOUNDFILE_EXTENSIONS + FFMPEG_EXTENSIONS


@dataclass(frozen=True)
class Audio:
    samples: np.ndarray  # float32, mono, 16 kHz
    source_rate: int
    channels: int

    @property
    def duration(self) -> float:
        return len(self.samples) / SAMPLE_RATE


def check_file(path: Path, allowed_extensions: tuple[str, ...] | list[str] = DEFAULT_EXTENSIONS,
               max_file_mb: float | None = None, *, extension: str | None = None) -> None:
    """Fail fast on what cannot be audio, before any decoding."""
    if not path.exists():
        raise AudioNotFoundError(f"audio file not found: {str(path)!r}")
    if not path.is_file():
        raise AudioNotFoundError(f"not a regular file: {str(path)!r}")
    ext = (extension if extension is not None else path.suffix).lower()
    if ext not in allowed_extensions:
        shown = ext or "(no extension)"
        raise UnsupportedFormatError(
            f"{path.name!r}: unsupported file type {shown}; supported: {', '.join(allowed_extensions)}"
        )
    size = path.stat().st_size
    if size == 0:
        raise EmptyAudioError(f"{path.name!r} is empty (0 bytes)")
    if max_file_mb is not None and size > max_file_mb * 2**20:
        raise AudioTooLargeError(
            f"{path.name!r} is {size / 2**20:.0f} MB, over input.max_file_mb={max_file_mb:g}"
        )


def load_audio(path: str | Path, allowed_extensions: tuple[str, ...] | list[str] = DEFAULT_EXTENSIONS,
               max_file_mb: float | None = None, *, extension: str | None = None) -> Audio:
    """Decode `path`; `extension` overrides the file's own (jobs keep the original name's)."""
    path = Path(path)
    check_file(path, allowed_extensions, max_file_mb, extension=extension)
    ext = (extension if extension is not None else path.suffix).lower()
    if ext in SOUNDFILE_EXTENSIONS:
        return _load_soundfile(path)
    return _load_ffmpeg(path)


def _load_soundfile(path: Path) -> Audio:
    import soundfile as sf

    try:
        data, rate = sf.read(str(path), dtype="float32", always_2d=True)
    except (sf.LibsndfileError, RuntimeError, ValueError) as e:
        detail = str(e).rsplit(": ", 1)[-1].strip().rstrip(".")  # libsndfile's reason, without our temp path
        raise AudioDecodeError(f"{path.name!r} is not a readable audio file ({detail})") from None
    if data.shape[0] == 0:
        raise EmptyAudioError(f"{path.name!r} holds no audio samples")
    channels = data.shape[1]
    # FunASR: torch.from_numpy(data).squeeze().mean(-1) — float32 mean over channels.
    mono = data[:, 0] if channels == 1 else data.mean(axis=-1, dtype=np.float32)
    return Audio(_resample(mono, rate), rate, channels)


def _resample(samples: np.ndarray, rate: int) -> np.ndarray:
    if rate == SAMPLE_RATE:
        return np.ascontiguousarray(samples, dtype=np.float32)
    import librosa  # FunASR's own resampler when torchaudio is absent

    return np.ascontiguousarray(librosa.resample(samples, orig_sr=int(rate), target_sr=SAMPLE_RATE),
                                dtype=np.float32)


def ffmpeg_path() -> str | None:
    """ffmpeg on PATH, else the static build of the `imageio-ffmpeg` package (``transcribe[ffmpeg]``)."""
    found = shutil.which("ffmpeg")
    if found:
        return found
    try:
        import imageio_ffmpeg
    except ImportError:
        return None
    try:
        return imageio_ffmpeg.get_ffmpeg_exe()
    except RuntimeError:  # the package without its binary for this platform
        return None


def _load_ffmpeg(path: Path) -> Audio:
    exe = ffmpeg_path()
    if exe is None:
        raise FFmpegMissingError(
            f"{path.name!r}: decoding {path.suffix or 'this format'} needs ffmpeg, which is not installed "
            f"(pip install 'transcribe[ffmpeg]', or apt-get install ffmpeg / brew install ffmpeg), "
            f"or convert the file to wav/flac first"
        )
    # An argument list, never a shell: the file name is data. "-i" takes it verbatim, even with a leading dash
    # prefixed by "file:" so ffmpeg does not read it as an option or protocol.
    cmd = [exe, "-nostdin", "-v", "error", "-i", f"file:{path}", "-f", "f32le", "-ac", "1",
           "-ar", str(SAMPLE_RATE), "-"]
    proc = subprocess.run(cmd, capture_output=True, check=False)
    if proc.returncode != 0:
        detail = proc.stderr.decode(errors="replace").strip().splitlines()
        raise AudioDecodeError(f"{path.name!r} could not be decoded by ffmpeg: {detail[-1] if detail else 'error'}")
    samples = np.frombuffer(proc.stdout, dtype="<f4").copy()
    if samples.size == 0:
        raise EmptyAudioError(f"{path.name!r} holds no audio samples")
    return Audio(samples, SAMPLE_RATE, 1)
