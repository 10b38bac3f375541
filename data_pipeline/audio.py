"""Stage 1 of the pipeline: find recordings and decode them into what every later stage expects — mono
float32 at 24 kHz (Mimi's rate), loudness-normalised — or a reason they can't be used.

Decoding goes through FFmpeg (PyAV): every container and codec it reads — WAV/FLAC/AIFF, MP3, Ogg
Vorbis/Opus, M4A/AAC/MP4, WebM/Matroska, ... — any rate and channel count. It is streamed: each decoded
block is downmixed and resampled (soxr's high-quality filter) as it comes, so memory holds only the 24 kHz
result, and decoding stops at `max_seconds` instead of reading an hours-long file whole. Loudness goes
through pyloudnorm (ITU-R BS.1770, the measure EBU R128 and podcast loudness targets use). A file that fails
is reported with a reason (`AudioError.reason`) that says what is wrong with it, which the pipeline records
in `failures.jsonl` before moving on.
"""

from __future__ import annotations

import hashlib
import os
import re
import unicodedata
import warnings
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import av
import numpy as np
import pyloudnorm
import soxr

from data_pipeline.shards import MIMI_SAMPLE_RATE

# What a directory walk picks up; a file list (see `discover`) may name any file FFmpeg reads.
AUDIO_EXTENSIONS = (
    ".wav", ".flac", ".mp3", ".ogg", ".oga", ".opus", ".aif", ".aiff",
    ".m4a", ".aac", ".mp4", ".webm", ".mka", ".mkv", ".wma", ".amr", ".au", ".caf",
)  # fmt: skip
MODEL_SAMPLE_RATE = 16_000  # what the speech models take: Silero VAD, Whisper, resemblyzer, pyannote, DNSMOS


class AudioError(ValueError):
    """A recording the pipeline cannot use; `reason` is the key it is counted under."""

    def __init__(self, path: Path, reason: str, detail: str):
        super().__init__(f"{path}: {reason}: {detail}")
        self.path, self.reason, self.detail = path, reason, detail


@dataclass
class Inputs:
    """The recordings of a run, in the stable order parts are cut from, and what was passed over."""

    root: Path  # ids are made from paths relative to it
    paths: list[Path]
    skipped: Counter = field(default_factory=Counter)  # extension → files a directory walk left out


def discover(input_dir: str | Path) -> Inputs:
    """`input_dir` is a directory, walked recursively for files with an audio extension, or a text file listing
    recordings one per line (blank lines and `#` comments skipped; relative paths are relative to the list), for
    corpora spread over many directories. Listed files are taken whatever their extension: decoding decides."""
    source = Path(input_dir)
    if source.is_file():
        lines = (line.strip() for line in source.read_text().splitlines())
        paths = [Path(os.path.normpath(source.parent / line)) for line in lines if line and not line.startswith("#")]
        return Inputs(source.parent, sorted(dict.fromkeys(paths)))
    if not source.is_dir():
        raise FileNotFoundError(f"input_dir {source} is neither a directory nor a file listing recordings")
    files = [p for p in source.rglob("*") if p.is_file() and not p.name.startswith(".")]
    audio = sorted(p for p in files if p.suffix.lower() in AUDIO_EXTENSIONS)
    skipped = Counter(p.suffix.lower() or "(none)" for p in files if p.suffix.lower() not in AUDIO_EXTENSIONS)
    return Inputs(source, audio, skipped)


def source_id(path: Path, root: Path) -> str:
    """A stable id no two recordings share: a readable stem (the path below `root`, its characters reduced to what
    webdataset keys carry: letters, digits, `_`, `-`, `/`) and a hash of the exact relative path, extension
    included. So `talk.wav` and `talk.flac`, `day 1.wav` and `day_1.wav`, `テスト.wav` and `データ.wav` differ:
    `talks/day_1-3f2a9c01b7`. A path outside `root` (a file list naming `/data/x.wav`) uses its absolute path."""
    relative = path.relative_to(root).as_posix() if path.is_relative_to(root) else path.as_posix().lstrip("/")
    stem = relative[: -len(Path(relative).suffix)] if Path(relative).suffix else relative
    readable = re.sub(r"[^A-Za-z0-9_\-/]", "_", _ascii(stem))
    return f"{readable}-{hashlib.sha256(relative.encode()).hexdigest()[:10]}"


def _ascii(text: str) -> str:
    return "".join(c for c in unicodedata.normalize("NFKD", text) if not unicodedata.combining(c))


def decode(path: Path, sample_rate: int = MIMI_SAMPLE_RATE, max_seconds: float | None = None) -> np.ndarray:
    """The first audio stream of any file FFmpeg reads → mono float32 at `sample_rate`, streamed block by block.
    Raises AudioError with reason `missing`, `empty`, `not_audio` (FFmpeg reads no audio in it), `corrupt` (an
    audio stream that fails to decode) or `too_long` (over `max_seconds`, by its header or while decoding)."""
    if not path.is_file():
        raise AudioError(path, "missing", "no such file")
    if path.stat().st_size == 0:
        raise AudioError(path, "empty", "the file is 0 bytes")
    try:
        container = av.open(str(path), metadata_errors="ignore")
    except av.error.FFmpegError as error:
        raise AudioError(path, "not_audio", f"FFmpeg does not read it as media ({error.strerror})") from None
    with container:
        if not container.streams.audio:
            found = ", ".join(s.type for s in container.streams) or "no streams"
            raise AudioError(path, "not_audio", f"FFmpeg reads it as {container.format.name} with {found}, no audio")
        stream = container.streams.audio[0]
        declared = container.duration / av.time_base if container.duration else 0.0
        if max_seconds is not None and declared > max_seconds:
            raise AudioError(path, "too_long", f"{declared:.0f} s by its header, above max_seconds={max_seconds:g}")
        # Keeps rate and channels; planar float (one row per channel) in blocks of about a second, which keeps
        # the per-block work (downmix, soxr) off the per-frame path (~1000 samples a frame in MP3/AAC).
        to_float = av.AudioResampler(format="fltp", frame_size=stream.rate or 48_000)
        blocks, resampler, seconds = [], None, 0.0
        try:
            for packet in [*container.demux(stream), None]:  # None: flush the last partial block
                frames = packet.decode() if packet is not None else [None]
                for block in (b for frame in frames for b in to_float.resample(frame)):
                    if resampler is None:
                        resampler = soxr.ResampleStream(block.sample_rate, sample_rate, 1, quality="HQ")
                    seconds += block.samples / block.sample_rate
                    if max_seconds is not None and seconds > max_seconds:
                        raise AudioError(path, "too_long", f"over max_seconds={max_seconds:g} (decoding stopped)")
                    blocks.append(resampler.resample_chunk(block.to_ndarray().mean(axis=0)))
        except av.error.FFmpegError as error:
            codec = stream.codec_context.name
            detail = f"FFmpeg failed decoding its {codec} stream after {seconds:.1f} s ({error.strerror})"
            raise AudioError(path, "corrupt", detail) from None
    if resampler is None and path.stat().st_size > 1024:  # more than a header: random bytes or another kind
        raise AudioError(path, "not_audio", f"FFmpeg's {container.format.name} reader finds no audio in its bytes")
    if resampler is None:
        raise AudioError(path, "empty", "no samples")
    blocks.append(resampler.resample_chunk(np.zeros(0, dtype=np.float32), last=True))
    return np.concatenate(blocks).astype(np.float32, copy=False)


def load_audio(
    path: str | Path,
    sample_rate: int = MIMI_SAMPLE_RATE,
    min_seconds: float = 1.0,
    max_seconds: float | None = None,
    target_lufs: float | None = -23.0,
) -> np.ndarray:
    """Decode (see `decode`) and normalise to `target_lufs` (None: keep the level). Raises AudioError with
    `decode`'s reasons, or `too_short` or `silent`."""
    path = Path(path)
    audio = decode(path, sample_rate, max_seconds)
    seconds = len(audio) / sample_rate
    if seconds < min_seconds:
        raise AudioError(path, "too_short", f"{seconds:.2f} s, below min_seconds={min_seconds}")
    if not np.isfinite(audio).all():
        raise AudioError(path, "corrupt", "non-finite samples")
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
    return soxr.resample(audio, MIMI_SAMPLE_RATE, MODEL_SAMPLE_RATE).astype(np.float32)
