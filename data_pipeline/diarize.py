"""Stage 4: speaker diarization — who speaks when — as `SpeakerSpan`s that stage 5 assigns words to.

Three backends behind one interface, `__call__(audio_16k, regions) -> list[SpeakerSpan]`:

* `SegmentationDiarizer` (diarizer=segmentation, the offline default, overlap-aware): pyannote's diarization
  recipe assembled from installed weights — the pyannote segmentation model shipped inside whisperx for local
  speaker activity (overlaps included), resemblyzer d-vectors per unit (a local speaker's track cut at its
  pauses), pyannote's clustering and reconstruction. Overlapped speech comes back as `background` spans.
  Needs the extras (scripts/install_extras.sh).
* `EmbeddingDiarizer` (diarizer=resemblyzer, offline, base install): the classic embed-and-cluster recipe.
  Speech regions from the VAD are cut into windows of `window_seconds` (hop `step_seconds`); each window gets
  a d-vector from resemblyzer's speaker encoder (it ships its weights); the vectors are clustered by
  agglomerative clustering on cosine distance, cut at `threshold` or at a known `num_speakers`. Each window
  speaks for the stretch of its region nearest its centre. Good for clean, turn-taking speech with no overlap.
* `PyannoteDiarizer` (production): a pyannote.audio 4 pipeline (`pyannote/speaker-diarization-3.1` with a
  Hub token, or a local directory) — segmentation + embeddings + clustering, overlap-aware
  (scripts/install_extras.sh installs it).

Measured side by side in bench/bench_diarizer.py (bench/RESULTS.md).
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np

from data_pipeline.audio import MODEL_SAMPLE_RATE
from data_pipeline.device import resolve_device
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


def whisperx_segmentation_path() -> Path:
    """The segmentation checkpoint the whisperx package ships (its VAD loads it; `pip install whisperx`, or
    scripts/install_extras.sh, puts it there)."""
    import importlib.util

    spec = importlib.util.find_spec("whisperx")
    if spec is None or spec.origin is None:
        raise ModuleNotFoundError(
            "diarizer=segmentation needs the segmentation model inside the whisperx package: run "
            "scripts/install_extras.sh (or diarizer=resemblyzer, which needs nothing extra)"
        )
    return Path(spec.origin).parent / "assets" / "pytorch_model.bin"


def load_segmentation_model(path: str | Path):
    """A pyannote PyanNet segmentation checkpoint, loaded without unpickling code.

    pyannote's `Model.from_pretrained` calls `torch.load(weights_only=False)`, which would run whatever a
    tampered checkpoint's pickle says. Here the file is read with `weights_only=True`, and only the classes
    this checkpoint format stores (besides tensors and containers) are allowed: omegaconf's containers of
    the hyper-parameters, pyannote's task specification (dataclass and enums), its introspection record,
    and torch's version string. The architecture is not taken from the file: it must say PyanNet, which is
    built here from its hyper-parameters and given the weights.
    """
    import collections
    import typing

    import torch
    from omegaconf.base import ContainerMetadata, Metadata
    from omegaconf.listconfig import ListConfig
    from omegaconf.nodes import AnyNode
    from pyannote.audio.core.model import Introspection
    from pyannote.audio.core.task import Problem, Resolution, Specifications
    from pyannote.audio.models.segmentation import PyanNet
    from torch.torch_version import TorchVersion

    allowed = [ListConfig, ContainerMetadata, Metadata, AnyNode, typing.Any, collections.defaultdict, list, dict, int]
    allowed += [Problem, Resolution, Specifications, Introspection, TorchVersion]
    with torch.serialization.safe_globals(allowed):
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    architecture = checkpoint["pyannote.audio"]["architecture"]
    if architecture["class"] != "PyanNet":
        raise ValueError(f"{path}: a {architecture['class']} checkpoint; expected a PyanNet segmentation model")
    model = PyanNet(**checkpoint["hyper_parameters"])
    model.specifications = checkpoint["pyannote.audio"]["specifications"]
    model.build()  # the task-dependent classifier, sized by the specifications
    model.load_state_dict(checkpoint["state_dict"])
    return model.eval()


class DVectorEmbedding:
    """`DVectorEncoder` behind the interface pyannote's diarization pipeline calls its speaker embedding
    through: `(waveforms [B, 1, samples], masks [B, frames]) -> [B, 256]`. Each chunk's samples where its
    mask (the local speaker's activity, resampled to samples) is on are joined and embedded; a speaker with
    less than `min_seconds` of speech gets NaN, which the pipeline's clustering leaves out (as pyannote's
    own embeddings do for too-short masks)."""

    sample_rate = MODEL_SAMPLE_RATE
    dimension = 256
    metric = "cosine"

    def __init__(self, encoder: DVectorEncoder, min_seconds: float = 0.4):
        self.encoder = encoder
        self.min_num_samples = int(min_seconds * MODEL_SAMPLE_RATE)

    def __call__(self, waveforms, masks=None) -> np.ndarray:
        waveforms = waveforms[:, 0].numpy()
        if masks is None:
            clips = list(waveforms)
        else:
            masks = masks.numpy()
            frame_of_sample = np.arange(waveforms.shape[1]) * masks.shape[1] // waveforms.shape[1]
            clips = [w[m[frame_of_sample] > 0.5] for w, m in zip(waveforms, masks, strict=True)]
        embeddings = np.full((len(clips), self.dimension), np.nan, dtype=np.float32)
        usable = [i for i, clip in enumerate(clips) if len(clip) >= self.min_num_samples]
        if usable:
            embeddings[usable] = self.encoder.embed([clips[i] for i in usable])
        return embeddings


def split_at_pauses(
    activations: np.ndarray, onset: float, min_pause: int, min_unit: int
) -> tuple[np.ndarray, np.ndarray]:
    """`(chunks, frames, local speakers)` activations → `(chunks, frames, units)` and each unit's host.

    Each local speaker's track is cut in the middle of its pauses of at least `min_pause` frames; each piece
    is a unit of its own (its activations there, zero elsewhere: a speaker's units add up to its track). A
    piece with fewer than `min_unit` active frames is a satellite: `hosts[c, u]` is the unit index of the
    nearest full piece of its track (-1 for full units); a track with no full piece stays whole. Chunks with
    fewer units are padded with silent ones, which pyannote leaves out."""
    chunks = []
    for chunk in activations:
        units, hosts = [], []
        for speaker in chunk.T:
            active = np.flatnonzero(speaker > onset)
            if len(active) == 0:
                continue
            pauses = np.flatnonzero(np.diff(active) > min_pause)
            cuts = [0, *((active[pauses] + active[pauses + 1] + 1) // 2), len(speaker)]
            pieces = list(zip(cuts[:-1], cuts[1:], strict=True))
            full = [i for i, (start, end) in enumerate(pieces) if np.sum(speaker[start:end] > onset) >= min_unit]
            if not full:
                pieces, full = [(0, len(speaker))], [0]
            first = len(units)
            for i, (start, end) in enumerate(pieces):
                unit = np.zeros_like(speaker)
                unit[start:end] = speaker[start:end]
                units.append(unit)
                hosts.append(-1 if i in full else first + min(full, key=lambda j: abs(j - i)))
        chunks.append((units, hosts))
    width = max(1, *(len(units) for units, _ in chunks))
    result = np.zeros((*activations.shape[:2], width), dtype=activations.dtype)
    all_hosts = np.full((len(activations), width), -1)
    for c, (units, hosts) in enumerate(chunks):
        if units:
            result[c, :, : len(units)] = np.stack(units, axis=1)
            all_hosts[c, : len(hosts)] = hosts
    return result, all_hosts


def offline_pipeline(
    segmentation,
    embedding: DVectorEmbedding,
    step: float,
    batch_size: int,
    split_pause: float | None = None,
    min_unit: float = 0.0,
    satellite_margin: float = 0.0,
):
    """pyannote.audio's own `SpeakerDiarization` recipe, run by the library's code (sliding-window local
    segmentation → one embedding per (chunk, local speaker) → clustering → reconstruction, with its
    overlap-aware and exclusive outputs), with models given as objects: its constructor only takes
    Hub/checkpoint references for the embedding and a PLDA, so the subclass sets what `apply` uses itself.
    Its "local speakers" are our units: `get_segmentations` cuts the model's tracks (`split_at_pauses`; no
    cut with `split_pause` None), and everything after it (speaker counting, embedding, clustering,
    reconstruction) works on any number of columns per chunk."""
    from pyannote.audio import Audio, Inference
    from pyannote.audio.core.pipeline import Pipeline
    from pyannote.audio.pipelines import SpeakerDiarization
    from pyannote.audio.pipelines.clustering import AgglomerativeClustering
    from pyannote.core import SlidingWindowFeature
    from pyannote.pipeline.parameter import ParamDict, Uniform

    class UnitClustering(AgglomerativeClustering):
        """pyannote's clustering of the units, then the satellites' rule (`SegmentationDiarizer`, step 2);
        `hosts` (from `split_at_pauses`) is set per recording by `get_segmentations`."""

        hosts: np.ndarray

        def __call__(self, embeddings, segmentations=None, **kwargs):
            hard, soft, centroids = super().__call__(embeddings, segmentations, **kwargs)
            for c, u in zip(*np.nonzero(self.hosts >= 0), strict=True):
                host = hard[c, self.hosts[c, u]]
                if not soft[c, u].max() - soft[c, u, host] > satellite_margin:  # NaN (too short to embed): host
                    hard[c, u] = host
            return hard, soft, centroids

    class OfflineSpeakerDiarization(SpeakerDiarization):
        def __init__(self):
            Pipeline.__init__(self)  # not SpeakerDiarization's: it would load the embedding and PLDA by name
            self.legacy, self.klustering, self.der_variant = False, "AgglomerativeClustering", {"collar": 0.0}
            duration = segmentation.specifications.duration
            self._segmentation = Inference(
                segmentation, duration=duration, step=step, skip_aggregation=True, batch_size=batch_size
            )
            self.segmentation = ParamDict(threshold=Uniform(0.1, 0.9), min_duration_off=Uniform(0.0, 1.0))
            self._embedding, self.embedding_batch_size = embedding, batch_size
            self.embedding_exclude_overlap = True  # a d-vector of two voices at once is neither's
            self._audio = Audio(sample_rate=MODEL_SAMPLE_RATE, mono="downmix")
            self.clustering = UnitClustering(metric="cosine")
            self._expects_num_speakers = False

        def get_segmentations(self, file, hook=None):
            segmentations = super().get_segmentations(file, hook=hook)
            frame = segmentation.receptive_field.step
            units, self.clustering.hosts = split_at_pauses(
                segmentations.data,
                self.segmentation.threshold,
                round(split_pause / frame) if split_pause else 10**9,
                round(min_unit / frame),
            )
            return SlidingWindowFeature(units, segmentations.sliding_window)

    return OfflineSpeakerDiarization()


class SegmentationDiarizer:
    """Overlap-aware offline diarization from installed weights: pyannote's diarization recipe
    (`offline_pipeline`) with the pyannote segmentation model that ships inside whisperx
    (`load_segmentation_model`: PyanNet, 5 s chunks, up to 3 local speakers, multilabel) and our resemblyzer
    d-vectors, clustered by units finer than pyannote's.

    1. Local segmentation on 5 s chunks every `step_seconds`: who of up to 3 local speakers is active in
       each ~17 ms frame, overlaps included (`onset` binarizes the model's activations).
    2. Units (`split_at_pauses`): each local speaker's track is cut at its pauses of `split_pause_seconds`
       or more. The model, trained on real speech, sometimes keeps two synthetic voices as one local
       speaker across a turn change (espeak-ng: 2 s of B, a pause, then A, in one chunk as one speaker);
       with one d-vector per track, clustering cannot undo that, with one per unit the two turns cluster
       apart. A piece with less than `min_unit_seconds` of speech (pyannote's own bar for a d-vector to
       take part in clustering: a fifth of the chunk) is a satellite of the nearest full piece of its
       track: it keeps its host's speaker unless its own d-vector is nearer another speaker's centroid by
       more than `satellite_margin` (cosine similarity). d-vectors of under a second of telephone speech
       are noisy: cutting every piece loose gave the real call's "Hello?" a third speaker (0.090 → 0.157).
    3. One d-vector per unit, from its frames without overlap; pyannote's agglomerative clustering
       (`method` linkage, cut at cosine `threshold`) of the full units makes global speakers, and every
       other unit goes to the nearest centroid (satellites as in step 2).
    4. pyannote's reconstruction: per frame, as many speakers as the segmentation counts, the most active
       first. Its exclusive version (one speaker per frame) is what words are assigned with.

    Measured (DER at collar 0; tuning sets easy seed 7 / hard seed 11 / pyannote's real call): whole tracks
    (`split_pause_seconds=null`) 0.071 / 0.270 / 0.090, units 0.027 / 0.239 / 0.090 at about the same cost.
    Re-segmentation after clustering (1.5 s windows to the nearest centroid, formerly an option) added nothing
    on top of units (0.027 / 0.239) and hurt the real call (0.151) at 2-3x the cost, so it is gone.

    Returns the exclusive spans, plus `background` spans where the segmentation heard a second speaker
    under them (overlapped speech: it marks the words overlapped and never takes them). Held-out numbers in
    bench/RESULTS.md ("Offline diarizer: segmentation vs windows").
    """

    def __init__(
        self,
        segmentation: str | None = None,
        step_seconds: float = 2.5,
        onset: float = 0.6,
        threshold: float = 0.25,
        method: str = "average",
        min_cluster_size: int = 1,
        split_pause_seconds: float | None = 0.2,
        min_unit_seconds: float = 1.0,
        satellite_margin: float = 0.1,
        num_speakers: int | None = None,
        min_speakers: int | None = None,
        max_speakers: int | None = None,
        batch_size: int = 32,
        device: str = "cpu",
    ):
        import os

        os.environ.setdefault("PYANNOTE_METRICS_ENABLED", "0")  # read when pyannote.audio is first imported
        with warnings.catch_warnings():  # "torchcodec is not installed correctly": audio is passed in memory
            warnings.filterwarnings("ignore", message=r"\s*torchcodec")
            try:
                import pyannote.audio  # noqa: F401
            except ModuleNotFoundError as error:
                raise ModuleNotFoundError(
                    "diarizer=segmentation needs pyannote.audio and whisperx: run scripts/install_extras.sh "
                    "(or diarizer=resemblyzer, which needs neither)"
                ) from error
        model = load_segmentation_model(segmentation or whisperx_segmentation_path())
        self.encoder = DVectorEncoder(device)
        embedding = DVectorEmbedding(self.encoder)
        self.pipeline = offline_pipeline(
            model, embedding, step_seconds, batch_size, split_pause_seconds, min_unit_seconds, satellite_margin
        )
        self.pipeline.instantiate(
            {
                "segmentation": {"threshold": onset, "min_duration_off": 0.0},
                "clustering": {"threshold": threshold, "method": method, "min_cluster_size": min_cluster_size},
            }
        )
        self.speakers = {"num_speakers": num_speakers, "min_speakers": min_speakers, "max_speakers": max_speakers}

    def __call__(self, audio: np.ndarray, regions: list[tuple[float, float]]) -> list[SpeakerSpan]:
        """`regions` (the VAD's) are not used: the segmentation model finds speech itself, with tighter
        boundaries (false alarm 0.011 against the VAD regions' 0.103 on the easy corpus, collar 0)."""
        import contextlib
        import io

        import torch

        waveform = {"waveform": torch.from_numpy(audio)[None], "sample_rate": MODEL_SAMPLE_RATE}
        speakers = {k: v for k, v in self.speakers.items() if v is not None}
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):  # clustering prints hints
            warnings.filterwarnings("ignore", message=r"\s*The detected number of speakers")
            output = self.pipeline(waveform, **speakers)
        full, exclusive = output.speaker_diarization, output.exclusive_speaker_diarization
        spans = [
            SpeakerSpan(str(speaker), float(segment.start), float(segment.end))
            for segment, _, speaker in exclusive.itertracks(yield_label=True)
        ]
        for speaker in full.labels():  # what the exclusive diarization gave another speaker: overlap
            for segment in full.label_timeline(speaker).extrude(exclusive.label_timeline(speaker)):
                spans.append(SpeakerSpan(str(speaker), float(segment.start), float(segment.end), background=True))
        return sorted(spans, key=lambda s: (s.start, s.background))


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
        self.pipeline.to(torch.device(resolve_device(device)))
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
