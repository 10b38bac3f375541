"""The demo corpus: espeak-ng conversations in several formats whose truth (who, what, when) matches the audio,
planted broken files that fail for the stated reasons, and the same bytes on every build. Needs espeak-ng
(CI installs it); without it these tests fail, naming the fix."""

import json

import numpy as np
import pytest
import soundfile as sf

from data_pipeline.audio import AudioError, load_audio
from data_pipeline.demo_corpus import BROKEN, SENTENCES, write_demo_corpus

# conv_0000 … conv_0003 cover every format the corpus writes: name → (rate, channels, container)
FORMATS = {
    "conv_0000.wav": (24_000, 1, "WAV"),
    "conv_0001.flac": (16_000, 1, "FLAC"),
    "conv_0002.wav": (44_100, 2, "WAV"),
    "conv_0003.opus": (48_000, 1, "OGG"),
}


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo") / "corpus"
    return out, write_demo_corpus(out, num_conversations=len(FORMATS), seed=0)


def conversations(out):
    for truth_path in sorted((out / "truth").glob("conv_*.json")):
        truth = json.loads(truth_path.read_text())
        audio, rate = sf.read(out / "audio" / truth["audio"], dtype="float32", always_2d=True)
        yield truth_path.stem, truth, audio.mean(axis=1), rate


def rms(x: np.ndarray) -> float:
    return float(np.sqrt(np.mean(x**2)))


def test_files_and_formats(corpus):
    out, summary = corpus
    assert sorted(p.name for p in (out / "audio").iterdir()) == sorted([*FORMATS, *BROKEN])
    for name, (rate, channels, container) in FORMATS.items():
        info = sf.info(out / "audio" / name)
        assert (info.samplerate, info.channels, info.format) == (rate, channels, container), name
    assert summary["conversations"] == len(FORMATS) and summary["broken"] == BROKEN
    assert 4 * 12 < summary["seconds"] < 4 * 30


def test_truth_describes_a_conversation(corpus):
    out, _ = corpus
    for name, truth, audio, rate in conversations(out):
        turns = truth["turns"]
        assert abs(len(audio) / rate - truth["duration"]) < 0.03, name  # Opus pads a few ms
        assert 2 <= len(truth["voices"]) <= 3 and len(set(truth["voices"].values())) == len(truth["voices"])
        assert 4 <= len(turns) <= 8 and {t["speaker"] for t in turns} == set(truth["voices"])
        assert all(t["voice"] == truth["voices"][t["speaker"]] and t["text"] in SENTENCES for t in turns)
        assert all(a["speaker"] != b["speaker"] for a, b in zip(turns, turns[1:], strict=False)), name
        bounds = [0.0, *(x for t in turns for x in (t["start"], t["end"])), truth["duration"]]
        assert bounds == sorted(bounds) and bounds[1] > 0 and bounds[-2] < bounds[-1], name
        gaps = [b["start"] - a["end"] for a, b in zip(turns, turns[1:], strict=False)]
        assert all(0.3 - 1e-3 <= g <= 0.9 + 1e-3 for g in gaps), gaps


def test_rttm_matches_json(corpus):
    out, _ = corpus
    for name, truth, _, _ in conversations(out):
        rows = [line.split() for line in (out / "truth" / f"{name}.rttm").read_text().splitlines()]
        assert len(rows) == len(truth["turns"])
        for row, turn in zip(rows, truth["turns"], strict=True):
            assert row[:3] == ["SPEAKER", name, "1"] and row[7] == turn["speaker"]
            assert row[5:7] == ["<NA>", "<NA>"] and row[8:] == ["<NA>", "<NA>"]
            assert abs(float(row[3]) - turn["start"]) < 1e-3
            assert abs(float(row[4]) - (turn["end"] - turn["start"])) < 1e-3


def test_speech_exactly_inside_the_truth_turns(corpus):
    """Speech fills every truth turn up to its edges and nothing else: to within 20 ms (resampling filters
    and Opus smear edges by a few ms)."""
    out, _ = corpus
    for name, truth, audio, rate in conversations(out):
        margin = int(0.02 * rate)
        for turn in truth["turns"]:
            start, end = round(turn["start"] * rate), round(turn["end"] * rate)
            assert rms(audio[start:end]) > 0.03, (name, turn)  # speech, above -30 dBFS
            assert np.abs(audio[start : start + margin]).max() > 0.003, (name, turn)  # voiced from its start
            assert np.abs(audio[end - margin : end]).max() > 0.003, (name, turn)  # to its end
        edges = [0.0, *(x for t in truth["turns"] for x in (t["start"], t["end"])), truth["duration"]]
        for a, b in zip(edges[::2], edges[1::2], strict=True):  # lead, pauses, trail
            gap = audio[round(a * rate) + margin : round(b * rate) - margin]
            assert rms(gap) < 0.003 and np.abs(gap).max() < 0.02, (name, a, b)  # below -50 dBFS


def test_broken_files_fail_as_stated(corpus):
    out, _ = corpus
    audio = out / "audio"
    assert json.loads((out / "truth" / "broken.json").read_text()) == BROKEN
    assert (audio / "broken_empty.wav").stat().st_size == 0
    for name in ("broken_empty.wav", "broken_corrupt.flac", "broken_short.wav"):
        with pytest.raises(AudioError) as error:
            load_audio(audio / name)
        assert error.value.reason == BROKEN[name]
    assert sf.info(audio / "broken_short.wav").duration == pytest.approx(0.2)
    # near-silence decodes and has a loudness (so only the VAD can reject it)
    noise, rate = sf.read(audio / "broken_silence.wav", dtype="float32")
    assert len(noise) == 8 * rate and 0 < np.abs(noise).max() < 0.01
    assert np.isfinite(load_audio(audio / "broken_silence.wav")).all()


def test_same_seed_same_bytes(corpus, tmp_path):
    out, _ = corpus
    write_demo_corpus(tmp_path, num_conversations=len(FORMATS), seed=0)
    files = sorted(p.relative_to(out) for p in out.rglob("*") if p.is_file())
    assert files == sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*") if p.is_file())
    for file in files:
        assert (out / file).read_bytes() == (tmp_path / file).read_bytes(), file


def test_missing_espeak_names_the_fix(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(RuntimeError, match="apt-get install espeak-ng"):
        write_demo_corpus(tmp_path / "corpus")
