"""Stage 2: voice activity detection — where in a recording someone speaks.

Silero VAD (it ships its model inside the `silero-vad` package, so it runs offline) on 16 kHz audio. The
regions drive the rest: ASR transcribes only them (Whisper invents text over long silences), and the
offline diarizer embeds only them. A recording with no speech region fails with reason `no_speech`.
"""

from __future__ import annotations

import numpy as np
import torch

from data_pipeline.audio import MODEL_SAMPLE_RATE


class SileroVAD:
    def __init__(
        self,
        threshold: float = 0.5,
        min_speech_seconds: float = 0.25,
        min_silence_seconds: float = 0.1,
        pad_seconds: float = 0.1,
    ):
        from silero_vad import load_silero_vad

        self.model = load_silero_vad()
        self.threshold, self.min_speech, self.min_silence, self.pad = (
            threshold,
            min_speech_seconds,
            min_silence_seconds,
            pad_seconds,
        )

    def __call__(self, audio: np.ndarray) -> list[tuple[float, float]]:
        """16 kHz mono float32 → speech regions `[(start, end), ...]` in seconds, sorted, disjoint."""
        from silero_vad import get_speech_timestamps

        regions = get_speech_timestamps(
            torch.from_numpy(audio),
            self.model,
            threshold=self.threshold,
            sampling_rate=MODEL_SAMPLE_RATE,
            min_speech_duration_ms=int(self.min_speech * 1000),
            min_silence_duration_ms=int(self.min_silence * 1000),
            speech_pad_ms=int(self.pad * 1000),
        )
        return [(r["start"] / MODEL_SAMPLE_RATE, r["end"] / MODEL_SAMPLE_RATE) for r in regions]


def merge_regions(regions: list[tuple[float, float]], max_seconds: float = 30.0) -> list[tuple[float, float]]:
    """Join neighbouring regions into chunks of at most `max_seconds` (Whisper's window), as whisperx does:
    fewer, longer chunks batch better and give the decoder context across short pauses."""
    chunks: list[tuple[float, float]] = []
    for start, end in regions:
        while end - start > max_seconds:  # a region longer than the window is cut into windows
            chunks.append((start, start + max_seconds))
            start += max_seconds
        if chunks and end - chunks[-1][0] <= max_seconds:
            chunks[-1] = (chunks[-1][0], end)
        else:
            chunks.append((start, end))
    return chunks
