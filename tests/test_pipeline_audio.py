"""Pipeline stage 1: any format, rate and channel count in → mono 24 kHz at the target loudness out;
broken files out with a reason."""

import numpy as np
import pyloudnorm
import pytest
import soundfile as sf

from data_pipeline.audio import AudioError, discover, load_audio, source_id


def tone(seconds: float, rate: int, channels: int = 1, level: float = 0.1) -> np.ndarray:
    t = np.arange(int(seconds * rate)) / rate
    voiced = (np.sin(2 * np.pi * 3 * t) > 0).astype(np.float32)  # 3 Hz on/off, speech-like gating
    mono = level * np.sin(2 * np.pi * 220 * t) * voiced
    return np.stack([mono * (1 - 0.3 * c) for c in range(channels)], axis=1).astype(np.float32)


@pytest.mark.parametrize(
    ("name", "rate", "channels", "subtype"),
    [
        ("a.wav", 48000, 2, "PCM_16"),
        ("b.flac", 16000, 1, "PCM_24"),
        ("c.mp3", 44100, 2, "MPEG_LAYER_III"),
        ("d.ogg", 22050, 1, "VORBIS"),
        ("e.opus", 48000, 2, "OPUS"),
    ],
)
def test_formats_rates_and_channels_become_mono_24k_at_target_loudness(tmp_path, name, rate, channels, subtype):
    path = tmp_path / name
    container = "OGG" if name.endswith(".opus") else None  # .opus is Ogg; libsndfile needs telling on write
    sf.write(path, tone(3.0, rate, channels), rate, subtype=subtype, format=container)
    audio = load_audio(path)
    assert audio.dtype == np.float32 and audio.ndim == 1
    assert abs(len(audio) / 24000 - 3.0) < 0.1  # lossy codecs pad a few ms
    loudness = pyloudnorm.Meter(24000).integrated_loudness(audio.astype(np.float64))
    assert abs(loudness - (-23.0)) < 0.5
    assert np.abs(audio).max() <= 0.99


def test_loud_input_is_limited_not_clipped(tmp_path):
    sf.write(tmp_path / "quiet.wav", tone(2.0, 24000, level=0.001), 24000)
    audio = load_audio(tmp_path / "quiet.wav", target_lufs=-5.0)  # +big gain: the peak limiter engages
    assert np.abs(audio).max() <= 0.99 + 1e-6


@pytest.mark.parametrize(
    ("make", "reason"),
    [
        (lambda p: p.write_bytes(b""), "undecodable"),
        (lambda p: p.write_bytes(np.random.default_rng(0).bytes(5000)), "undecodable"),
        (lambda p: sf.write(p, np.zeros((0, 1), dtype=np.float32), 24000), "empty"),
        (lambda p: sf.write(p, tone(0.3, 24000), 24000), "too_short"),
        (lambda p: sf.write(p, np.zeros((48000, 1), dtype=np.float32), 24000), "silent"),
    ],
    ids=["zero_bytes", "garbage", "no_samples", "too_short", "silent"],
)
def test_broken_files_raise_a_reason_naming_the_file(tmp_path, make, reason):
    path = tmp_path / "broken.wav"
    make(path)
    with pytest.raises(AudioError, match=f"broken.wav: {reason}") as error:
        load_audio(path)
    assert error.value.reason == reason


def test_discover_and_source_ids_are_stable(tmp_path):
    for name in ("talks/day 1.flac", "talks/day2.WAV", "notes.txt", "a.b/c.mp3"):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_bytes(b"")
    found = discover(tmp_path)
    assert [p.relative_to(tmp_path).as_posix() for p in found] == ["a.b/c.mp3", "talks/day 1.flac", "talks/day2.WAV"]
    assert [source_id(p, tmp_path) for p in found] == ["a_b/c", "talks/day_1", "talks/day2"]
    with pytest.raises(FileNotFoundError, match="not a directory"):
        discover(tmp_path / "missing")
