"""serve/watermark.py: AudioSeal's real architectures with random weights (the Hub is out of reach here), on
espeak-ng speech and real files: the residual's level, streaming against the whole clip, the lookahead against
the measured receptive field, and the detector's refusal to give a verdict from random weights."""

from __future__ import annotations

import argparse

import numpy as np
import pytest
import soundfile as sf
import soxr
import torch

from data_pipeline.audio import decode
from serve.watermark import (
    HOP,
    LOOKAHEAD,
    SAMPLE_RATE,
    STREAM_TOLERANCE,
    NoVerdict,
    Watermarker,
    WatermarkError,
    main,
)

RANDOM = "random-init:seed=0"


@pytest.fixture(scope="module")
def watermarker() -> Watermarker:
    return Watermarker.load(RANDOM, device="cpu", message=42)


@pytest.fixture(scope="module")
def clip(speech) -> np.ndarray:
    return speech[: int(1.5 * 24000)]


def snr_db(signal: np.ndarray, marked: np.ndarray) -> float:
    return float(10 * np.log10(np.mean(signal**2) / np.mean((marked - signal) ** 2)))


def test_the_watermark_is_small_and_resampled_input_keeps_its_rate(watermarker, clip):
    marked = watermarker.apply(clip)
    assert marked.shape == clip.shape and marked.dtype == np.float32
    assert 25 < snr_db(clip, marked) < 60  # present, ~35 dB under the speech
    assert watermarker.message == "0000000000101010"
    at_44k = soxr.resample(clip, 24000, 44100).astype(np.float32)
    marked_44k = watermarker.apply(at_44k, rate=44100)
    assert marked_44k.shape == at_44k.shape
    assert abs(snr_db(at_44k, marked_44k) - snr_db(clip, marked)) < 1.5


def test_stream_in_uneven_pieces_equals_the_whole_clip(watermarker, clip):
    whole = watermarker.apply(clip)
    stream, pieces, fed, behind = watermarker.stream(), [], 0, []
    for size in [1, 333, 9600, 7, 4800, 12000, 9600]:
        pieces.append(stream.feed(clip[fed : fed + size]))
        fed = min(fed + size, len(clip))
        behind.append(fed - sum(map(len, pieces)))
    pieces.append(stream.close())
    streamed = np.concatenate(pieces)
    assert fed == len(clip) and streamed.shape == whole.shape
    assert np.abs(streamed - whole).max() < STREAM_TOLERANCE
    assert 0.2 < watermarker.latency < max(behind[4:]) / 24000 < watermarker.latency + 0.02  # once past the start
    assert len(watermarker.stream().close()) == 0


def test_lookahead_covers_the_generators_receptive_field(watermarker):
    x = np.random.default_rng(0).normal(0, 0.05, 12 * HOP * 4).astype(np.float32)
    poked = x.copy()
    poked[len(x) // 2] += 0.5
    changed = np.flatnonzero(watermarker.residual(poked) != watermarker.residual(x))
    reach = len(x) // 2 - changed[0]  # how far before the poke outputs moved
    assert 2000 < reach <= LOOKAHEAD == 2560


def test_random_weights_give_no_verdict(watermarker, clip):
    with pytest.raises(NoVerdict, match="randomly initialised model: its verdicts mean nothing"):
        watermarker.detect(clip[:12000], 24000)


def test_detector_resamples_its_input(watermarker, clip):
    at_16k = soxr.resample(clip[:24000], 24000, SAMPLE_RATE).astype(np.float32)
    at_48k = soxr.resample(at_16k, SAMPLE_RATE, 48000).astype(np.float32)
    (p16, bits16), (p48, bits48) = watermarker._score(at_16k, SAMPLE_RATE), watermarker._score(at_48k, 48000)
    assert abs(p16 - p48) < 0.02 and bits16 == bits48 and len(bits16) == 16


def test_cli_detect_reads_a_file_and_refuses_a_verdict(tmp_path, clip, capsys):
    flac = tmp_path / "speech.flac"
    sf.write(flac, soxr.resample(clip[:12000], 24000, 44100), 44100)
    assert main(["--model", RANDOM, "--device", "cpu", "detect", str(flac)]) == 2
    assert "randomly initialised model" in capsys.readouterr().err
    assert main(["--model", RANDOM, "--device", "cpu", "detect", str(tmp_path / "none.wav")]) == 2
    assert "missing" in capsys.readouterr().err


def test_cli_embed_writes_the_watermarked_clip(tmp_path, watermarker, clip):
    source, out = tmp_path / "in.wav", tmp_path / "out.wav"
    sf.write(source, soxr.resample(clip[:24000], 24000, SAMPLE_RATE), SAMPLE_RATE, subtype="FLOAT")
    assert main(["--model", RANDOM, "--device", "cpu", "embed", str(source), str(out), "--message", "42"]) == 0
    written, rate = sf.read(out, dtype="float32")
    expected = watermarker.apply(decode(source))
    assert rate == 24000 and written.shape == expected.shape
    assert np.abs(written - expected).max() < 1e-4  # 16-bit PCM's step, far under the residual's ~1e-3
    assert snr_db(decode(source), written) < 45


def test_a_checkpoint_directory_loads_and_gives_a_verdict(tmp_path, watermarker, clip):
    """Files laid out as facebook/audioseal's (config under `xp.cfg`, pre-TorchScript names): the weights load
    into the same architecture, and weights not marked random get a verdict."""
    from omegaconf import OmegaConf

    for model, name in [(watermarker.generator, "generator_base.pth"), (watermarker.detector, "detector_base.pth")]:
        state = {k.replace(".inner_conv.", "."): v for k, v in model.state_dict().items()}
        torch.save({"xp.cfg": OmegaConf.create({"seanet": {"causal": False}}), "model": state}, tmp_path / name)
    loaded = Watermarker.load(str(tmp_path), device="cpu", message=42)
    assert not loaded.random and "message 0000000000101010" in loaded.describe()
    x16 = soxr.resample(clip, 24000, SAMPLE_RATE).astype(np.float32)
    assert np.array_equal(loaded.residual(x16), watermarker.residual(x16))
    verdict = loaded.detect(clip[:12000], 24000, threshold=0.5)
    assert 0 <= verdict.probability <= 1 and verdict.watermarked == (verdict.probability > 0.5)

    torch.save({"model": state, "note": argparse.Namespace(x=1)}, tmp_path / "detector_base.pth")
    with pytest.raises(WatermarkError, match="holds objects other than tensors"):
        Watermarker.load(str(tmp_path), device="cpu")


def test_bad_specs_are_refused():
    with pytest.raises(WatermarkError, match="use audioseal, audioseal-streaming"):
        Watermarker.load("no-such-model", device="cpu")
    with pytest.raises(ValueError, match="16 bits hold 0 to 65535"):
        Watermarker.load(RANDOM, device="cpu", message=1 << 16)
