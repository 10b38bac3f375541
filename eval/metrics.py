"""The measurements behind the evaluation suites, each checked on inputs whose answer is known
(tests/test_eval_metrics.py): intelligibility (WER through Whisper), speaker similarity (d-vector cosine),
quality (DNSMOS, data_pipeline.quality), and bootstrap confidence intervals for every reported mean.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from data_pipeline.asr import normalize_text
from data_pipeline.audio import to_model_rate


@dataclass
class Estimate:
    """A mean with its 95% bootstrap confidence interval over `n` samples."""

    value: float
    low: float
    high: float
    n: int

    def as_dict(self) -> dict:
        return {"value": self.value, "ci95": [self.low, self.high], "n": self.n}


def bootstrap(values, resamples: int = 2000, seed: int = 0) -> Estimate:
    """The mean of `values` and the 2.5/97.5 percentiles of the means of `resamples` resamples."""
    values = np.asarray(values, dtype=np.float64)
    means = np.random.default_rng(seed).choice(values, (resamples, len(values))).mean(axis=1)
    return Estimate(
        float(values.mean()), float(np.percentile(means, 2.5)), float(np.percentile(means, 97.5)), len(values)
    )


def word_error_rates(references: list[str], hypotheses: list[str]) -> dict:
    """Corpus WER (all errors over all reference words) and the mean per-utterance WER with its interval
    (Seed-TTS-eval reports the latter), both after `normalize_text`."""
    import jiwer

    refs, hyps = [normalize_text(r) for r in references], [normalize_text(h) for h in hypotheses]
    per_utterance = [jiwer.wer(r, h) for r, h in zip(refs, hyps, strict=True)]
    return {"corpus": jiwer.wer(refs, hyps), "per_utterance": bootstrap(per_utterance), "values": per_utterance}


class WhisperJudge:
    """Transcribes 24 kHz audio with faster-whisper: the shipped tiny.en offline, `large-v3` for papers."""

    def __init__(self, model: str = "shipped:tiny.en", language: str = "en", device: str = "auto", beam_size: int = 5):
        from faster_whisper import WhisperModel

        from data_pipeline.asr import resolve_whisper_model
        from data_pipeline.device import resolve_device

        self.model_id, self.language, self.beam_size = model, language, beam_size
        self.model = WhisperModel(resolve_whisper_model(model), device=resolve_device(device), compute_type="auto")

    def transcribe(self, audio: np.ndarray) -> str:
        segments, _ = self.model.transcribe(to_model_rate(audio), language=self.language, beam_size=self.beam_size)
        return " ".join(s.text.strip() for s in segments)


class SpeakerSimilarity:
    """Cosine similarity of d-vectors (resemblyzer, shipped) between a reference voice and generated audio."""

    def __init__(self, device: str = "cpu"):
        from data_pipeline.diarize import DVectorEncoder

        self.encoder = DVectorEncoder(device)

    def __call__(self, references: list[np.ndarray], generated: list[np.ndarray]) -> np.ndarray:
        vectors = self.encoder.embed([to_model_rate(a) for a in [*references, *generated]])
        n = len(references)
        return (vectors[:n] * vectors[n:]).sum(axis=1)
