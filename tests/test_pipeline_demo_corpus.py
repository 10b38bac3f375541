"""The demo corpus: espeak-ng conversations in several formats whose truth (who, what, when) matches the audio,
planted broken files that fail for the stated reasons, and the same bytes on every build. Needs espeak-ng
(CI installs it); without it these tests fail, naming the fix."""

import json
from dataclasses import replace

import numpy as np
import pytest
import soundfile as sf
import soxr
from scipy import signal

from data_pipeline.audio import AudioError, load_audio
from data_pipeline.demo_corpus import (
    BACKCHANNELS,
    BROKEN,
    HARD,
    MIN_SELF_GAP,
    SENTENCES,
    plan_conversation,
    speak,
    write_demo_corpus,
)
from data_pipeline.score import score_recording, transcript
from data_pipeline.shards import MIMI_SAMPLE_RATE

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


# The hard style: seed 1's first two conversations are 3 speakers in studio sound and 4 over the telephone (FLAC,
# 16 kHz), with back-channels over turns and between them, overlaps, levels 12 dB apart, background noise.
@pytest.fixture(scope="module")
def hard(tmp_path_factory):
    out = tmp_path_factory.mktemp("hard") / "corpus"
    return out, write_demo_corpus(out, num_conversations=2, seed=1, broken=False, style="hard")


def at_24k(audio: np.ndarray, rate: int) -> np.ndarray:
    return soxr.resample(audio, rate, MIMI_SAMPLE_RATE, quality="HQ") if rate != MIMI_SAMPLE_RATE else audio


def test_hard_conversations_have_what_real_ones_have(hard):
    out, summary = hard
    sentence_gaps, backchannels_over = [], 0
    for name, truth, _, _ in conversations(out):
        turns, speakers = truth["turns"], set(truth["voices"])
        assert len(truth["voices"]) == {"conv_0000": 3, "conv_0001": 4}[name]
        assert len(set(truth["voices"].values())) == len(speakers) and {t["speaker"] for t in turns} == speakers
        assert [t["start"] for t in turns] == sorted(t["start"] for t in turns)
        for speaker in speakers:  # nobody talks over themselves
            own = [t for t in turns if t["speaker"] == speaker]
            assert all(b["start"] - a["end"] >= MIN_SELF_GAP - 1e-9 for a, b in zip(own, own[1:], strict=False))
        sentences = [t for t in turns if t["text"] in SENTENCES]
        assert all(a["speaker"] != b["speaker"] for a, b in zip(sentences, sentences[1:], strict=False))
        sentence_gaps += [b["start"] - a["end"] for a, b in zip(sentences, sentences[1:], strict=False)]
        for b in (t for t in turns if t["text"] in BACKCHANNELS):
            backchannels_over += any(a["start"] < b["start"] < a["end"] for a in sentences)
        channel = truth["channel"]
        assert channel["telephone"] == (name == "conv_0001") and 15 <= channel["snr_db"] <= 30
        assert set(channel["gain_db"]) == speakers and all(-12 <= g <= 0 for g in channel["gain_db"].values())
    overlaps = [-g for g in sentence_gaps if g < 0]
    # measured: 4 of 15 sentence turns start 0.88–1.15 s before the previous one ends, 2 within 0.3 s after it
    assert len(overlaps) == 4 and len(sentence_gaps) == 15 and 0.2 <= min(overlaps) and max(overlaps) <= 1.5
    assert sum(0 <= g <= 0.3 for g in sentence_gaps) == 2
    assert summary["backchannels"] == 7 and backchannels_over == 3  # the others fill a pause
    assert summary["overlapped_turns"] == 7  # 4 sentences + 3 back-channels


def test_hard_truth_is_exact(hard):
    """Each turn's own synthesised clip sits in the recording exactly at its truth time (cross-correlation peak
    at lag 0, to 1 ms), under the other speakers, the noise and the telephone channel, at its speaker's level."""
    out, _ = hard
    for i, (name, truth, audio, rate) in enumerate(conversations(out)):
        audio, plan = at_24k(audio, rate), plan_conversation(1, i, HARD)
        assert len(plan["turns"]) == len(truth["turns"])
        levels = {}
        for turn in plan["turns"]:
            clip = speak(BACKCHANNELS.get(turn["text"], turn["text"]), turn["voice"], turn["speed"])
            (t,) = [
                t
                for t in truth["turns"]
                if (t["speaker"], t["text"]) == (turn["speaker"], turn["text"])
                and round((t["end"] - t["start"]) * MIMI_SAMPLE_RATE) == len(clip)
            ]
            start, reach = round(t["start"] * MIMI_SAMPLE_RATE), MIMI_SAMPLE_RATE // 20  # search ±50 ms
            window = audio[start - reach : start + len(clip) + reach]
            correlation = signal.correlate(window, clip, mode="valid", method="fft")
            assert abs(int(np.argmax(correlation)) - reach) <= MIMI_SAMPLE_RATE // 1000, (name, t)
            levels.setdefault(turn["speaker"], []).append(correlation[reach] / np.dot(clip, clip))
        if not truth["channel"]["telephone"]:  # the band-pass takes a share of each voice's energy
            gains = {s: 20 * np.log10(np.median(v)) for s, v in levels.items()}
            relative = {s: gains[s] - truth["channel"]["gain_db"][s] for s in gains}
            assert max(relative.values()) - min(relative.values()) < 1.0, (name, gains)


def test_hard_noise_and_telephone_band(hard):
    """Background noise at the stated SNR between the turns; telephone recordings carry (almost) nothing above
    the 8 kHz rate's 4 kHz, studio ones do."""
    out, _ = hard
    for name, truth, audio, rate in conversations(out):
        audio, margin = at_24k(audio, rate), MIMI_SAMPLE_RATE // 50
        speech = np.zeros(len(audio), bool)
        for t in truth["turns"]:
            speech[round(t["start"] * MIMI_SAMPLE_RATE) - margin : round(t["end"] * MIMI_SAMPLE_RATE) + margin] = True
        snr = 10 * np.log10(np.mean(audio[speech] ** 2) / np.mean(audio[~speech] ** 2))
        power = np.abs(np.fft.rfft(audio)) ** 2
        above_4k = power[np.fft.rfftfreq(len(audio), 1 / MIMI_SAMPLE_RATE) > 4000].sum() / power.sum()
        if truth["channel"]["telephone"]:
            assert snr > truth["channel"]["snr_db"] and above_4k < 1e-4, (name, snr, above_4k)
        else:
            assert abs(snr - truth["channel"]["snr_db"]) < 1.0 and above_4k > 1e-2, (name, snr, above_4k)


def test_hard_same_seed_same_bytes(hard, tmp_path):
    out, _ = hard
    write_demo_corpus(tmp_path, num_conversations=2, seed=1, broken=False, style="hard")
    files = sorted(p.relative_to(out) for p in out.rglob("*") if p.is_file())
    assert files == sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*") if p.is_file())
    for file in files:
        assert (out / file).read_bytes() == (tmp_path / file).read_bytes(), file


def test_long_recording_knob():
    """`long_seconds` makes conversation 0 long (planned only: synthesising minutes is for long-input tests)."""
    plan = plan_conversation(1, 0, replace(HARD, long_seconds=240))
    assert sum(t["text"] in SENTENCES for t in plan["turns"]) == 96 and len(plan_conversation(1, 1, HARD)["turns"]) < 20


def test_scoring_overlapping_truth():
    """DER scores overlapping turns per speaker (the truth against itself: 0; one speaker missing over a
    shared stretch: its time missed); WER's words run in order of turn start."""
    from pyannote.metrics.diarization import DiarizationErrorRate

    turns = [
        {"speaker": "A", "text": "I think we should leave the house soon.", "start": 0.0, "end": 3.0},
        {"speaker": "C", "text": "Right.", "start": 1.0, "end": 1.5},
        {"speaker": "B", "text": "Thank you so much.", "start": 2.0, "end": 4.0},
    ]
    record = {"duration": 5.0, "turns": turns}
    own = [(t["start"], t["end"], t["speaker"]) for t in turns]
    assert score_recording(DiarizationErrorRate(collar=0.0), record, own) == 0.0
    assert score_recording(DiarizationErrorRate(collar=0.0), record, [own[0], own[2]]) == pytest.approx(0.5 / 5.5)
    same_span = {"duration": 2.0, "turns": [{**turns[0], "end": 1.0}, {**turns[2], "start": 0.0, "end": 1.0}]}
    assert score_recording(DiarizationErrorRate(collar=0.0), same_span, [(0.0, 1.0, "A")]) == 0.5
    shuffled = [turns[2], turns[0], turns[1]]
    assert transcript(shuffled) == "i think we should leave the house soon right thank you so much"
