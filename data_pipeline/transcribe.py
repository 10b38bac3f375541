"""Stages 2–4 together: a decoded recording → words, each with its speaker.

`Transcriber` runs VAD → ASR → diarization on the recording resampled to 16 kHz (what all three models
take) and assigns every word to a speaker (turns.assign_speakers). `SidecarTranscripts` is the shortcut
for corpora that come transcribed and diarized: `{recording}.json` beside each recording holds
`{"words": [{"text", "start", "end", "speaker", "probability"?}, ...]}`.

Both raise `AudioError` with the reason the recording is counted under when there is nothing to keep.
"""

from __future__ import annotations

import json
import time
from collections import Counter
from pathlib import Path

import numpy as np

from data_pipeline.audio import AudioError, to_model_rate
from data_pipeline.turns import Word, assign_speakers

Labelled = list[tuple[Word, str]]


class Transcriber:
    def __init__(self, vad, asr, diarizer):
        self.vad, self.asr, self.diarizer = vad, asr, diarizer
        self.seconds: Counter = Counter()  # wall time per stage, for the throughput summary

    def __call__(self, path: Path, audio: np.ndarray) -> Labelled:
        audio16 = to_model_rate(audio)
        regions = self._timed("vad", self.vad, audio16)
        if not regions:
            raise AudioError(path, "no_speech", "the VAD found no speech")
        words = self._timed("asr", self.asr.transcribe, audio16, regions)
        if not words:
            raise AudioError(path, "no_words", "ASR returned no words for the speech regions")
        spans = self._timed("diarize", self.diarizer, audio16, regions)
        return assign_speakers(words, spans)

    def _timed(self, stage: str, fn, *args):
        start = time.perf_counter()
        result = fn(*args)
        self.seconds[stage] += time.perf_counter() - start
        return result


class SidecarTranscripts:
    def __init__(self):
        self.seconds: Counter = Counter()  # nothing is timed: reading JSON is free

    def __call__(self, path: Path, audio: np.ndarray) -> Labelled:
        sidecar = path.with_suffix(".json")
        if not sidecar.exists():
            raise AudioError(path, "no_transcript", f"no {sidecar.name} beside it (transcripts=sidecar)")
        try:
            words = json.loads(sidecar.read_text())["words"]
            return [
                (Word(w["text"], w["start"], w["end"], w.get("probability", 1.0)), str(w["speaker"])) for w in words
            ]
        except (json.JSONDecodeError, KeyError, TypeError) as error:
            detail = f"{sidecar.name}: {error!r}; expected the format in data_pipeline/transcribe.py"
            raise AudioError(path, "bad_transcript", detail) from error
