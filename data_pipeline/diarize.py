"""Stage 4: speaker diarization — who speaks when — as `SpeakerSpan`s that stage 5 assigns words to.

Two backends behind one interface, `__call__(audio_16k, regions) -> list[SpeakerSpan]`:

* `EmbeddingDiarizer` (default, offline): the classic embed-and-cluster recipe. Speech regions from the
  VAD are cut into windows of `window_seconds` (hop `step_seconds`); each window gets a d-vector from
  resemblyzer's speaker encoder (it ships its weights); the vectors are clustered by agglomerative
  clustering on cosine distance, cut at `threshold` or at a known `num_speakers`. Each window speaks for
  the stretch of its region nearest its centre. Good for clean, turn-taking speech with no overlap.
* `PyannoteDiarizer` (production): a pyannote.audio 4 pipeline (`pyannote/speaker-diarization-3.1` with a
  Hub token, or a local directory) — segmentation + embeddings + clustering, overlap-aware
  (scripts/install_extras.sh installs it).
"""

from __future__ import annotations

import warnings

import numpy as np

from data_pipeline.audio import MODEL_SAMPLE_RATE
from data_pipeline.turns import SpeakerSpan


def windows(regions: list[tuple[float, float]], window: float, step: float) -> list[tuple[float, float, float, float]]:
    """(start, end) of each embedding window and (own_start, own_end), the stretch it labels: regions
    shorter than a window are one window; longer ones are tiled, and neighbours split their overlap."""
    result = []
    for start, end in regions:
        if end - start <= window:
            result.append((start, end, start, end))
            continue
        count = int(np.ceil((end - start - window) / step)) + 1
        starts = np.linspace(start, end - window, count)
        centres = starts + window / 2
        bounds = [start, *((centres[:-1] + centres[1:]) / 2), end]
        result += [(s, s + window, bounds[i], bounds[i + 1]) for i, s in enumerate(starts)]
    return result


def cluster(embeddings: np.ndarray, threshold: float, num_speakers: int | None = None) -> np.ndarray:
    """Agglomerative clustering (average linkage, cosine distance) → labels numbered by first appearance."""
    if len(embeddings) == 1:
        return np.zeros(1, dtype=int)
    from sklearn.cluster import AgglomerativeClustering

    if num_speakers is not None:
        num_speakers = min(num_speakers, len(embeddings))
    labels = AgglomerativeClustering(
        n_clusters=num_speakers,
        distance_threshold=None if num_speakers else threshold,
        metric="cosine",
        linkage="average",
    ).fit_predict(embeddings)
    order = {label: i for i, label in enumerate(dict.fromkeys(labels))}
    return np.array([order[label] for label in labels])


def spans_from_labels(stretches: list[tuple[float, float]], labels: np.ndarray) -> list[SpeakerSpan]:
    """Adjacent stretches with one label become one span."""
    spans: list[SpeakerSpan] = []
    for (start, end), label in zip(stretches, labels, strict=True):
        speaker = f"SPEAKER_{label:02d}"
        if spans and spans[-1].speaker == speaker and start - spans[-1].end < 1e-6:
            spans[-1].end = end
        else:
            spans.append(SpeakerSpan(speaker, start, end))
    return spans


class DVectorEncoder:
    """resemblyzer's speaker encoder (GE2E d-vectors, 256-d; it ships its weights), batched: the diarizer
    embeds windows with it and the evaluation's speaker similarity compares voices with it."""

    def __init__(self, device: str = "cpu"):
        with warnings.catch_warnings():  # its webrtcvad imports the deprecated pkg_resources (we pin setuptools)
            warnings.filterwarnings("ignore", message="pkg_resources is deprecated")
            from resemblyzer import VoiceEncoder

        self.encoder = VoiceEncoder(device, verbose=False)

    def embed(self, clips: list[np.ndarray]) -> np.ndarray:
        """16 kHz clips → `[N, 256]` unit vectors: resemblyzer's `embed_utterance` (the L2-normed mean of
        1.6 s partial d-vectors), with every clip's partials in one forward pass."""
        import torch
        from resemblyzer.audio import wav_to_mel_spectrogram

        mels, owner = [], []
        for i, clip in enumerate(clips):
            wav_slices, mel_slices = self.encoder.compute_partial_slices(len(clip), rate=1.3, min_coverage=0.75)
            clip = np.pad(clip, (0, max(0, wav_slices[-1].stop - len(clip))))
            mel = wav_to_mel_spectrogram(clip)
            mels += [mel[s] for s in mel_slices]
            owner += [i] * len(mel_slices)
        with torch.inference_mode():
            partials = self.encoder(torch.from_numpy(np.stack(mels))).numpy()
        owner = np.array(owner)
        means = np.stack([partials[owner == i].mean(axis=0) for i in range(len(clips))])
        return means / np.linalg.norm(means, axis=1, keepdims=True)


class EmbeddingDiarizer:
    def __init__(
        self,
        threshold: float = 0.3,
        num_speakers: int | None = None,
        window_seconds: float = 1.5,
        step_seconds: float = 0.75,
        device: str = "cpu",
    ):
        self.encoder = DVectorEncoder(device)
        self.threshold, self.num_speakers = threshold, num_speakers
        self.window, self.step = window_seconds, step_seconds

    def __call__(self, audio: np.ndarray, regions: list[tuple[float, float]]) -> list[SpeakerSpan]:
        tiles = windows(regions, self.window, self.step)
        if not tiles:
            return []
        embeddings = self.encoder.embed(
            [audio[int(s * MODEL_SAMPLE_RATE) : int(e * MODEL_SAMPLE_RATE)] for s, e, _, _ in tiles]
        )
        labels = cluster(embeddings, self.threshold, self.num_speakers)
        return spans_from_labels([(own_start, own_end) for _, _, own_start, own_end in tiles], labels)


class PyannoteDiarizer:
    """A pyannote.audio 4 speaker-diarization pipeline: a Hub id (gated ones need their conditions accepted and
    a token: `token`, or huggingface_hub's own login / HF_TOKEN when null) or a local directory holding a
    pipeline `config.yaml`. It runs on the whole recording (it has its own segmentation; the VAD regions are not
    used). `exclusive` returns pyannote's non-overlapping diarization, the one meant for assigning words.
    pyannote 4 sends usage telemetry to pyannote.ai unless PYANNOTE_METRICS_ENABLED is set: this sets it to 0.
    """

    def __init__(
        self,
        pipeline: str = "pyannote/speaker-diarization-3.1",
        token: str | None = None,
        num_speakers: int | None = None,
        min_speakers: int | None = None,
        max_speakers: int | None = None,
        exclusive: bool = True,
        device: str = "auto",
    ):
        import os

        import torch

        os.environ.setdefault("PYANNOTE_METRICS_ENABLED", "0")  # read when pyannote.audio is first imported
        with warnings.catch_warnings():  # "torchcodec is not installed correctly": audio is passed in memory
            warnings.filterwarnings("ignore", message=r"\s*torchcodec")
            from pyannote.audio import Pipeline

        if pipeline.startswith(("/", ".")) and not os.path.exists(pipeline):  # else pyannote calls it a bad Hub id
            raise FileNotFoundError(f"diarizer.pipeline={pipeline}: no such pipeline directory or config.yaml")
        self.pipeline = Pipeline.from_pretrained(pipeline, token=token)
        if self.pipeline is None:
            raise ValueError(f"pyannote could not load {pipeline!r}: accept its conditions on the Hub and pass a token")
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        self.pipeline.to(torch.device(device))
        self.speakers = {"num_speakers": num_speakers, "min_speakers": min_speakers, "max_speakers": max_speakers}
        self.exclusive = exclusive

    def __call__(self, audio: np.ndarray, regions: list[tuple[float, float]]) -> list[SpeakerSpan]:
        import torch

        # In memory: pyannote's own decoder (torchcodec) is a CUDA build on PyPI.
        waveform = {"waveform": torch.from_numpy(audio)[None], "sample_rate": MODEL_SAMPLE_RATE}
        output = self.pipeline(waveform, **{k: v for k, v in self.speakers.items() if v is not None})
        annotation = output.exclusive_speaker_diarization if self.exclusive else output.speaker_diarization
        return [
            SpeakerSpan(str(speaker), float(segment.start), float(segment.end))
            for segment, _, speaker in annotation.itertracks(yield_label=True)
        ]
