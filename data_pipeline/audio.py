"""Stage 1 of the pipeline: find recordings and decode them into what every later stage expects — mono
float32 at 24 kHz (Mimi's rate), loudness-normalised — or a reason they can't be used.

Decoding goes through libsndfile (soundfile): WAV/FLAC/AIFF, MP3, Ogg Vorbis and Ogg Opus, any rate and
channel count; resampling through soxr's high-quality filter; loudness through pyloudnorm (ITU-R BS.1770,
the measure EBU R128 and podcast loudness targets use). A file that fails is reported with a reason
(`AudioError.reason`), which the pipeline records in `failures.jsonl` before moving on.
"""

from __future__ import annotations

import re
import warnings
from pathlib import Path

import numpy as np
import pyloudnorm
import soundfile as sf
import soxr

from data_pipeline.shards import MIMI_SAMPLE_RATE

AUDIO_EXTENSIONS = (".wav", ".flac", ".mp3", ".ogg", ".opus", ".aiff", ".aif")
SAMPLE_RATE = MIMI_SAMPLE_RATE
MODEL_SAMPLE_RATE = 16_000  # what the speech models take: Silero VAD, Whisper, resemblyzer, pyannote, DNSMOS


class AudioError(ValueError):
    """A recording the pipeline cannot use; `reason` is the key it is counted under."""

    def __init__(self, path: Path, reason: str, detail: str):
        super().__init__(f"{path}: {reason}: {detail}")
        self.path, self.reason, self.detail = path, reason, detail


def discover(input_dir: str | Path) -> list[Path]:
    """Audio files under `input_dir`, recursively, in a stable order (the order partitions are cut from)."""
    root = Path(input_dir)
    if not root.is_dir():
        raise FileNotFoundError(f"input_dir {root} is not a directory")
    return sorted(p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in AUDIO_EXTENSIONS)


def source_id(path: Path, root: Path) -> str:
    """A stable id from the path below `root`: `talks/day1.flac` → `talks/day1`. Characters webdataset
    keys cannot carry (dots, spaces, ...) become `_`."""
    relative = path.relative_to(root).with_suffix("")
    return re.sub(r"[^A-Za-z0-9_\-/]", "_", relative.as_posix())


def load_audio(
    path: str | Path,
    sample_rate: int = SAMPLE_RATE,
    min_seconds: float = 1.0,
    target_lufs: float | None = -23.0,
) -> np.ndarray:
    """Decode, downmix, resample to `sample_rate` and normalise to `target_lufs` (None: keep the level).
    Raises AudioError with reason `undecodable`, `empty`, `too_short` or `silent`."""
    path = Path(path)
    try:
        audio, rate = sf.read(path, dtype="float32", always_2d=True)
    except (sf.LibsndfileError, RuntimeError, TypeError) as error:
        raise AudioError(path, "undecodable", f"{error}; is it audio in a format libsndfile reads?") from error
    if audio.size == 0:
        raise AudioError(path, "empty", "no samples")
    audio = audio.mean(axis=1)  # downmix
    if rate != sample_rate:
        audio = soxr.resample(audio, rate, sample_rate, quality="HQ").astype(np.float32)
    seconds = len(audio) / sample_rate
    if seconds < min_seconds:
        raise AudioError(path, "too_short", f"{seconds:.2f} s, below min_seconds={min_seconds}")
    if not np.isfinite(audio).all():
        raise AudioError(path, "undecodable", "non-finite samples")
    if target_lufs is None:
        return audio
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # pyloudnorm warns on clipping; we limit the peak below
        loudness = pyloudnorm.Meter(sample_rate).integrated_loudness(audio.astype(np.float64))
    if not np.isfinite(loudness):
        raise AudioError(path, "silent", "no measurable loudness (digital silence)")
    audio = audio * np.float32(10 ** ((target_lufs - loudness) / 20))
    peak = np.abs(audio).max()
    return audio / peak * 0.99 if peak > 0.99 else audio  # quiet files gain level, never clipping


def to_model_rate(audio: np.ndarray) -> np.ndarray:
    """24 kHz audio (the pipeline's, Mimi's) → 16 kHz float32 for the speech models."""
    return soxr.resample(audio, SAMPLE_RATE, MODEL_SAMPLE_RATE).astype(np.float32)
