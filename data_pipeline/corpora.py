"""Stages 2–4 for corpora that come transcribed and speaker-labelled, read from Lhotse manifests.

Lhotse (https://lhotse.readthedocs.io) prepares 60+ speech corpora — LibriTTS-R, Fisher, Switchboard, AMI,
Common Voice, ... — into two manifests: a RecordingSet (where each recording's audio is) and a SupervisionSet
(who says what, when). `LhotseTranscripts` turns them into the pipeline's input list (`inputs()`) and its
words-with-speakers (`__call__`), so ASR and diarization run only where the corpus lacks what they give; turns,
quality filters, Mimi and shards run as for any other input.

The Lhotse conventions relied on:

* A supervision's `start` and `duration` are seconds from the start of its recording (`recording_id`), and so
  are the `start`/`duration` of its word alignment (`supervision.alignment["word"]`, a list of AlignmentItem
  with `symbol` the word and `score` its confidence, if any).
* `channel` says which of the recording's channels the speaker is on (Fisher and Switchboard: one side of
  the call per channel). The pipeline decodes the whole file and downmixes every channel, as for any input, so
  the channel is not needed: every supervision of a recording is kept, and a two-channel telephone call
  becomes one conversation with both sides. (A recording naming only some of its file's channels still gets
  all of them.)
* `speaker` is the corpus's speaker id. Ids are local to a recording in the shards (the pipeline numbers
  speakers 0, 1, ... per recording), so the corpus's ids only tell the recording's speakers apart.

What is supported: a recording whose audio is one file (`type: file`, any number of channels in it), with no
transforms but resampling (the pipeline resamples anyway). Recordings whose audio is several files (AMI
`--mic ihm`: one per headset; use `--mic ihm-mix` or `sdm`), a URL, a command, bytes in memory or a Lhotse
Shar placeholder, and recordings with speed/volume/reverb transforms, are refused when the manifests are read,
naming them: the pipeline decodes each input file itself. Two recordings of one file are refused too (each
input is one recording).
"""

from __future__ import annotations

import os
import time
from collections import Counter, defaultdict
from pathlib import Path

import numpy as np
from lhotse import Recording, RecordingSet, SupervisionSegment, SupervisionSet, load_manifest

from data_pipeline.audio import AudioError, to_model_rate
from data_pipeline.transcribe import Labelled, Transcriber
from data_pipeline.turns import Word, assign_speakers

HARMLESS_TRANSFORMS = {"Resample"}  # the pipeline resamples every input itself; nothing else changes the audio


def _load(path: str | Path, kind: type[RecordingSet] | type[SupervisionSet]):
    """The manifest, read whole and checked to be `kind` (`from_file` reads jsonl lazily as whatever it holds:
    swapped manifests would fail later, obscurely)."""
    try:
        return load_manifest(path, kind)
    except ValueError as error:
        raise ValueError(f"{path} is not a Lhotse {kind.__name__} manifest (jsonl or jsonl.gz): {error}") from error


def _unsupported(recording: Recording) -> str | None:
    """Why the pipeline cannot read this recording's audio as one file, or None when it can."""
    if len(recording.sources) != 1:
        return f"{len(recording.sources)} audio sources (one file per channel); the pipeline reads one file"
    if recording.sources[0].type != "file":
        return f"a {recording.sources[0].type!r} source; the pipeline reads audio files"
    names = {t["name"] if isinstance(t, dict) else type(t).__name__ for t in recording.transforms or []}
    if names - HARMLESS_TRANSFORMS:
        return f"transforms {sorted(names - HARMLESS_TRANSFORMS)}, which change the audio its file holds"
    return None


def supervision_words(supervision: SupervisionSegment) -> list[Word]:
    """The supervision's words with their times in the recording.

    With a word alignment its times are the words'; the words themselves are the text's when it has as many
    (alignments are often of normalised text: upper case, no punctuation, which is worse training text).
    Without one the text's words are spread over the supervision, each getting a share of its span in
    proportion to its length in characters, back to back. Those times are approximate; what they decide is
    little: turns are the unit the pipeline keeps (a turn's audio runs from its first word's start to its last
    word's end, the supervision's span), and word times only matter where a pause longer than `max_gap` inside
    one speaker's speech would split a turn, or where a long turn is cut to fit a training window.
    """
    tokens = (supervision.text or "").split()
    alignment = [item for item in (supervision.alignment or {}).get("word", []) if item.symbol.strip()]
    if alignment:
        texts = tokens if len(tokens) == len(alignment) else [item.symbol for item in alignment]
        return [
            Word(text, item.start, item.end, 1.0 if item.score is None else item.score)
            for text, item in zip(texts, alignment, strict=True)
        ]
    shares = np.cumsum([0] + [len(token) for token in tokens]) / max(1, sum(len(token) for token in tokens))
    bounds = supervision.start + shares * supervision.duration
    return [Word(token, float(bounds[i]), float(bounds[i + 1])) for i, token in enumerate(tokens)]


class LhotseTranscripts:
    """Words and speakers from Lhotse manifests (jsonl or jsonl.gz, as Lhotse's recipes write them).

    A recording without a transcribed supervision is transcribed by `fallback` (a `Transcriber`: VAD, ASR and
    diarization), or fails with reason `no_transcript` when there is none. A recording transcribed without
    speakers (a supervision has no `speaker`: captions) gets them from the fallback's diarizer, run on the
    supervisions' spans, or fails with reason `no_speakers`.
    """

    def __init__(self, recordings: str | Path, supervisions: str | Path, fallback: Transcriber | None = None):
        self.fallback = fallback
        self.seconds: Counter = Counter()  # reading the manifests is free; a fallback's stages are timed
        recording_set = _load(recordings, RecordingSet)
        if not recording_set:
            raise ValueError(f"{recordings} holds no recordings: point lhotse.recordings at a RecordingSet manifest")
        refused = [(r.id, reason) for r in recording_set if (reason := _unsupported(r))]
        if refused:
            listed = "; ".join(f"{rid}: {reason}" for rid, reason in refused[:5])
            raise ValueError(
                f"{recordings}: {len(refused)} of {len(recording_set)} recordings cannot be read by the pipeline"
                f" ({listed}{'; ...' if len(refused) > 5 else ''}). See data_pipeline/corpora.py for what is"
                " supported; a Lhotse recipe often has a single-file option (AMI: --mic ihm-mix or sdm)"
            )
        # Paths as Lhotse resolves them: relative to the working directory.
        self.recordings: dict[Path, Recording] = {}
        for recording in recording_set:
            path = Path(recording.sources[0].source).resolve()
            if path in self.recordings:
                raise ValueError(
                    f"{recordings}: recordings {self.recordings[path].id} and {recording.id} are both {path};"
                    " the pipeline takes each file as one recording"
                )
            self.recordings[path] = recording
        self.supervisions: dict[str, list[SupervisionSegment]] = defaultdict(list)
        for supervision in _load(supervisions, SupervisionSet):
            self.supervisions[supervision.recording_id].append(supervision)

    def inputs(self) -> list[Path]:
        """The recordings' files, sorted: the order the pipeline cuts its parts from."""
        return sorted(self.recordings)

    @property
    def root(self) -> Path:
        """The deepest directory holding every input: the pipeline's `input_dir`, which ids and each sample's
        `source` are relative to."""
        return Path(os.path.commonpath([p.parent for p in self.recordings]))

    def __call__(self, path: Path, audio: np.ndarray) -> Labelled:
        recording = self.recordings[Path(path).resolve()]
        # By start: each supervision's words stay together, so overlapping speech does not shred into turns.
        supervisions = sorted(self.supervisions[recording.id], key=lambda s: (s.start, s.id))
        transcribed = [s for s in supervisions if (s.text or "").strip()]
        if not transcribed:
            if self.fallback is None:
                raise AudioError(path, "no_transcript", f"recording {recording.id} has no supervision with text")
            return self._run_fallback(path, audio)
        if any(s.speaker is None for s in transcribed):
            return self._diarized(path, audio, recording, transcribed)
        return [(word, s.speaker) for s in transcribed for word in supervision_words(s)]

    def _diarized(self, path: Path, audio: np.ndarray, recording: Recording, supervisions) -> Labelled:
        """Words from the supervisions, speakers from the fallback's diarizer over the supervisions' spans."""
        if self.fallback is None:
            raise AudioError(path, "no_speakers", f"recording {recording.id} has supervisions without a speaker")
        regions: list[tuple[float, float]] = []  # the diarizer takes sorted, disjoint speech regions
        for s in supervisions:
            if regions and s.start <= regions[-1][1]:
                regions[-1] = (regions[-1][0], max(regions[-1][1], s.end))
            else:
                regions.append((s.start, s.end))
        start = time.perf_counter()
        spans = self.fallback.diarizer(to_model_rate(audio), regions)
        self.seconds["diarize"] += time.perf_counter() - start
        return assign_speakers([word for s in supervisions for word in supervision_words(s)], spans)

    def _run_fallback(self, path: Path, audio: np.ndarray) -> Labelled:
        """The fallback's words and speakers, its stages' times counted as ours (the pipeline reads ours)."""
        self.fallback.seconds.clear()
        try:
            return self.fallback(path, audio)
        finally:
            self.seconds.update(self.fallback.seconds)
