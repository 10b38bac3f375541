"""Pipeline stage 1: any format, rate and channel count in → mono 24 kHz at the target loudness out;
broken files out with a reason that is true; ids that never collide."""

import tracemalloc
from pathlib import Path

import av
import numpy as np
import pyloudnorm
import pytest
import soundfile as sf
from conftest import write_with_ffmpeg

from data_pipeline.audio import AudioError, decode, discover, load_audio, source_id
from data_pipeline.shards import sample_key


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


@pytest.mark.parametrize(
    ("name", "codec", "container", "rate"),
    [("f.m4a", "aac", "ipod", 44100), ("g.aac", "aac", "adts", 48000), ("h.webm", "libopus", "webm", 48000),
     ("i.mp4", "aac", "mp4", 32000)],
)  # fmt: skip
def test_ffmpeg_formats_decode_too(tmp_path, name, codec, container, rate):
    write_with_ffmpeg(tmp_path / name, codec, container, rate, tone(3.0, rate, channels=2).T)
    audio = load_audio(tmp_path / name)
    assert audio.dtype == np.float32 and abs(len(audio) / 24000 - 3.0) < 0.1
    loudness = pyloudnorm.Meter(24000).integrated_loudness(audio.astype(np.float64))
    assert abs(loudness - (-23.0)) < 0.5


def test_decoding_stops_at_max_seconds_with_bounded_memory(tmp_path):
    """A long recording is refused by its header, and one whose header says nothing (a live WebM stream) is refused
    while decoding, having held no more than max_seconds of audio."""
    sf.write(tmp_path / "long.wav", tone(60.0, 48000, channels=2), 48000)
    with pytest.raises(AudioError, match=r"long.wav: too_long: 60 s by its header, above max_seconds=10"):
        load_audio(tmp_path / "long.wav", max_seconds=10)
    live = {"live": "1"}  # no duration in the header
    write_with_ffmpeg(tmp_path / "long.webm", "libopus", "webm", 48000, tone(60.0, 48000, channels=2).T, live)
    tracemalloc.start()
    with pytest.raises(AudioError, match=r"too_long: over max_seconds=10 \(decoding stopped\)"):
        decode(tmp_path / "long.webm", max_seconds=10)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert peak < 10 * 24000 * 4 * 2  # 10 s of 24 kHz float32 (and headroom), not 60 s at 48 kHz stereo
    assert len(decode(tmp_path / "long.webm", max_seconds=None)) == pytest.approx(60 * 24000, abs=2400)


def test_loud_input_is_limited_not_clipped(tmp_path):
    sf.write(tmp_path / "quiet.wav", tone(2.0, 24000, level=0.001), 24000)
    audio = load_audio(tmp_path / "quiet.wav", target_lufs=-5.0)  # +big gain: the peak limiter engages
    assert np.abs(audio).max() <= 0.99 + 1e-6


@pytest.mark.parametrize(
    ("make", "reason"),
    [
        (lambda p: p.write_bytes(b""), "empty: the file is 0 bytes"),
        (lambda p: p.write_bytes(np.random.default_rng(0).bytes(5000)), "not_audio: FFmpeg does not read it"),
        (lambda p: p.write_text("meeting notes " * 100), "not_audio: FFmpeg does not read it as media"),
        (lambda p: sf.write(p, np.zeros((0, 1), dtype=np.float32), 24000), "empty: no samples"),
        (lambda p: sf.write(p, tone(0.3, 24000), 24000), "too_short"),
        (lambda p: sf.write(p, np.zeros((48000, 1), dtype=np.float32), 24000), "silent"),
        (lambda p: None, "missing: no such file"),
    ],
    ids=["zero_bytes", "garbage", "text", "no_samples", "too_short", "silent", "missing"],
)
def test_broken_files_raise_a_reason_naming_the_file(tmp_path, make, reason):
    path = tmp_path / "broken.wav"
    make(path)
    with pytest.raises(AudioError, match=f"broken.wav: {reason}") as error:
        load_audio(path)
    assert error.value.reason == reason.split(":")[0]


def test_random_bytes_named_like_audio_are_not_audio(tmp_path):
    """FFmpeg picks a reader from the name (.flac) and finds nothing in it: not 'empty', not a pipe."""
    (tmp_path / "noise.flac").write_bytes(np.random.default_rng(0).bytes(16_384))
    with pytest.raises(AudioError, match="noise.flac: not_audio: FFmpeg's flac reader finds no audio"):
        load_audio(tmp_path / "noise.flac")
    mp4 = tmp_path / "video.mp4"  # a container with no audio stream
    with av.open(str(mp4), "w", format="mp4") as out:
        stream = out.add_stream("mpeg4", rate=5)
        stream.width, stream.height, stream.pix_fmt = 32, 32, "yuv420p"
        for i in range(5):
            frame = av.VideoFrame.from_ndarray(np.full((32, 32, 3), i * 40, dtype=np.uint8), format="rgb24")
            for packet in stream.encode(frame):
                out.mux(packet)
        for packet in stream.encode(None):
            out.mux(packet)
    with pytest.raises(AudioError, match=r"video.mp4: not_audio: FFmpeg reads it as .*mp4.* with video, no audio"):
        load_audio(mp4)


def test_discover_lists_skipped_files_and_source_ids_are_stable(tmp_path):
    for name in ("talks/day 1.flac", "talks/day2.WAV", "notes.txt", "a.b/c.mp3", "talks/e.m4a", "cover.jpg"):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_bytes(b"")
    found = discover(tmp_path)
    names = ["a.b/c.mp3", "talks/day 1.flac", "talks/day2.WAV", "talks/e.m4a"]
    assert [p.relative_to(tmp_path).as_posix() for p in found.paths] == names
    assert found.skipped == {".txt": 1, ".jpg": 1}
    ids = [source_id(p, tmp_path) for p in found.paths]
    assert [i.rsplit("-", 1)[0] for i in ids] == ["a_b/c", "talks/day_1", "talks/day2", "talks/e"]
    assert ids == [source_id(tmp_path / n, tmp_path) for n in names]  # stable: a hash of the path, not a counter
    with pytest.raises(FileNotFoundError, match="neither a directory nor a file listing"):
        discover(tmp_path / "missing")


def test_source_ids_never_collide():
    """Names that reduce to the same readable stem keep distinct ids: the hash is of the exact relative path."""
    root = Path("/corpus")
    twins = [("テスト.wav", "データ.wav"), ("talk.wav", "talk.flac"), ("day 1.wav", "day_1.wav")]
    twins.append(("a/b.wav", "a_b.wav"))
    for first, second in twins:
        a, b = source_id(root / first, root), source_id(root / second, root)
        assert a != b and sample_key(a, 0) and sample_key(b, 0)  # both are valid webdataset keys
    assert source_id(root / "café.wav", root).startswith("cafe-")


def test_a_file_list_names_recordings_anywhere(tmp_path):
    (tmp_path / "elsewhere").mkdir()
    sf.write(tmp_path / "elsewhere" / "x.wav", tone(2.0, 24000), 24000)
    listing = tmp_path / "lists" / "train.txt"
    listing.parent.mkdir()
    listing.write_text(f"# recordings\n../elsewhere/x.wav\n\n{tmp_path}/elsewhere/x.wav\n/nowhere/y.flac\n")
    found = discover(listing)
    assert found.root == listing.parent and found.paths == [Path("/nowhere/y.flac"), tmp_path / "elsewhere" / "x.wav"]
    assert source_id(found.paths[0], found.root).startswith("nowhere/y-")
