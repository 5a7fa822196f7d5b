"""transcribe: production speech transcription on FunASR."""

__version__ = "0.1.0"
