"""Stage 6: quality filters on speaker turns. Each rejected turn gets one reason, the first that applies,
and the pipeline counts rejections by reason in `dataset.json`.

* duration: turns shorter than `min_seconds` are mostly diarization slivers (0.3 s keeps back-channels, "Yes.",
  "Mm-hmm.", 0.3–0.5 s: conversation, 3–4 % of the words of hard-style corpora); longer than `max_seconds` they
  are usually merged speakers or music;
* characters per second: far outside speech rates (~10–20 for English) the transcript does not match the
  audio (hallucinated text over silence, or words dropped over speech);
* ASR confidence: the mean word probability Whisper reports;
* overlap: with `max_overlap`, turns whose words are more than that fraction overlapped by another speaker
  (`Turn.overlap_fraction`, from the diarizer's overlap spans) — their audio carries two voices. Off by
  default: overlapped turns are kept, and marked (`overlap` seconds in segments.json);
* MOS: a speech-quality score (DNSMOS) when a scorer is configured.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from data_pipeline.turns import Turn


@dataclass
class QualityFilter:
    min_seconds: float = 0.3
    max_seconds: float = 30.0
    min_chars_per_second: float = 4.0
    max_chars_per_second: float = 30.0
    min_asr_confidence: float = 0.4
    max_overlap: float | None = None  # reject turns overlapped by another speaker over more than this fraction
    min_mos: float | None = None  # with `mos`: reject turns scoring below it
    mos: Callable[[np.ndarray], float] | None = None  # 24 kHz audio of the turn → score

    def reason(self, turn: Turn, audio: np.ndarray | None = None) -> str | None:
        """Why `turn` is rejected, or None to keep it."""
        seconds = turn.end - turn.start
        if seconds < self.min_seconds:
            return "too_short"
        if seconds > self.max_seconds:
            return "too_long"
        rate = len(turn.text.replace(" ", "")) / seconds
        if rate < self.min_chars_per_second:
            return "too_few_chars_per_second"
        if rate > self.max_chars_per_second:
            return "too_many_chars_per_second"
        if np.mean([w.probability for w in turn.words]) < self.min_asr_confidence:
            return "low_asr_confidence"
        if self.max_overlap is not None and turn.overlap_fraction > self.max_overlap:
            return "overlapped"
        if self.min_mos is not None and self.mos is not None and audio is not None and self.mos(audio) < self.min_mos:
            return "low_mos"
        return None

    def apply(
        self, turns: list[Turn], audio_of: Callable[[Turn], np.ndarray] | None = None
    ) -> tuple[list[Turn], Counter]:
        """(kept turns, rejections by reason)."""
        kept, rejected = [], Counter()
        for turn in turns:
            why = self.reason(turn, audio_of(turn) if audio_of is not None and self.mos is not None else None)
            if why is None:
                kept.append(turn)
            else:
                rejected[why] += 1
        return kept, rejected


class DNSMOS:
    """DNSMOS P.835 overall quality (1–5, higher is cleaner) of a 24 kHz turn, through the ONNX models that
    `speechmos` ships (Microsoft's DNS Challenge scorer; it works at 16 kHz on 9 s windows, and repeats
    shorter clips to fill one)."""

    def __init__(self, score: str = "ovrl_mos"):
        self.score = score

    def __call__(self, audio: np.ndarray) -> float:
        from speechmos import dnsmos

        from data_pipeline.audio import MODEL_SAMPLE_RATE, to_model_rate

        return float(dnsmos.run(np.clip(to_model_rate(audio), -1.0, 1.0), MODEL_SAMPLE_RATE)[self.score])
