"""Voice profiles: a reference clip's Mimi codes and what it says, the context CSM clones a voice from.

An upload is decoded and loudness-normalised by the pipeline's own ingest (`data_pipeline.audio.load_audio`),
Mimi-encoded by the checkpoint's codec and stored under `voice_dir/<id>/` as `codes.npy` and `voice.json`. A
profile is written into a hidden temporary directory and renamed into place, so a process killed at any moment
(SIGKILL mid-upload included) leaves either the whole voice or none of it; leftovers are removed at the next
start. Ids are made here (`voice_<32 hex>`) and built-in names come from the config: nothing a client sends is
ever used as a path.

Without a transcript an upload is transcribed by the pipeline's ASR (`FasterWhisperASR`, Whisper tiny.en shipped
in a package by default; `asr: null` makes a transcript required instead), which also gives word times, so a
clip longer than the context can be cut between words. Profiles record the codec that made their codes; a
server with another codec skips them (their codes would mean nothing to it).
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import threading
import time
import uuid
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from data_pipeline.audio import load_audio, to_model_rate
from data_pipeline.shards import MIMI_SAMPLE_RATE

log = logging.getLogger(__name__)

UPLOADED_ID = re.compile(r"voice_[0-9a-f]{32}")
BUILTIN_NAME = re.compile(r"[a-z][a-z0-9_-]{0,31}")
TARGET_LUFS = -23.0  # the pipeline's ingest level (data_pipeline.audio.load_audio's default)


@dataclass
class Voice:
    id: str
    name: str
    created_at: int
    transcript: str
    codec: str  # the codec's weights id: codes from another codec are someone else's tokens
    builtin: bool = False
    words: list[tuple[str, float, float]] | None = None  # ASR's words with start/end seconds, when transcribed
    codes: np.ndarray = field(default=None, repr=False)  # [K, n] uint16 Mimi codes

    def public(self) -> dict:
        """OpenAI's voice object, plus what the profile holds."""
        return {
            "object": "audio.voice",
            "id": self.id,
            "name": self.name,
            "created_at": self.created_at,
            "type": "audio_sample",
            "builtin": self.builtin,
            "transcript": self.transcript,
            "frames": int(self.codes.shape[1]),
        }


class VoiceStore:
    """The voices of `root`, loaded at start and kept in memory (a 3-minute profile is ~150 KB of codes)."""

    def __init__(self, root: str | Path, codec_id: str):
        self.root, self.codec_id = Path(root), codec_id
        self.root.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._voices: dict[str, Voice] = {}
        for leftover in self.root.glob(".*"):  # a write or delete that a kill interrupted
            shutil.rmtree(leftover, ignore_errors=True)
        for directory in sorted(p for p in self.root.iterdir() if p.is_dir()):
            voice = self._read(directory)
            if voice is not None:
                self._voices[voice.id] = voice

    def _read(self, directory: Path) -> Voice | None:
        try:
            meta = json.loads((directory / "voice.json").read_text())
            codes = np.load(directory / "codes.npy", allow_pickle=False)
        except (OSError, ValueError) as error:
            log.warning("voice %s unreadable, skipped: %s", directory.name, error)
            return None
        if meta.get("codec") != self.codec_id:
            log.warning("voice %s was encoded by codec %s, this server's is %s: skipped", meta.get("id"),
                        meta.get("codec"), self.codec_id)  # fmt: skip
            return None
        return Voice(**meta, codes=codes)

    def list(self) -> list[Voice]:
        with self._lock:
            return sorted(self._voices.values(), key=lambda v: (not v.builtin, v.created_at, v.id))

    def get(self, key: str) -> Voice | None:
        """By id, or by name (a built-in's name is its id; among uploads of one name, the newest)."""
        with self._lock:
            if key in self._voices:
                return self._voices[key]
            named = [v for v in self._voices.values() if v.name == key]
        return max(named, key=lambda v: v.created_at) if named else None

    def add(self, name: str, transcript: str, codes: np.ndarray, words=None, builtin_id: str | None = None) -> Voice:
        voice_id = builtin_id or f"voice_{uuid.uuid4().hex}"
        voice = Voice(voice_id, name, int(time.time()), transcript, self.codec_id, builtin_id is not None, words,
                      codes.astype(np.uint16))  # fmt: skip
        staging = self.root / f".tmp-{voice_id}-{os.getpid()}"
        staging.mkdir()
        meta = {k: v for k, v in asdict(voice).items() if k != "codes"}
        _write_synced(staging / "codes.npy", lambda f: np.save(f, voice.codes, allow_pickle=False))
        _write_synced(staging / "voice.json", lambda f: f.write(json.dumps(meta, indent=1).encode()))
        os.rename(staging, self._path(voice_id))  # the voice appears whole, or not at all
        with self._lock:
            self._voices[voice_id] = voice
        return voice

    def delete(self, voice_id: str) -> bool:
        with self._lock:
            voice = self._voices.get(voice_id)
            if voice is None or voice.builtin:
                return False
            del self._voices[voice_id]
        doomed = self.root / f".deleted-{voice_id}-{os.getpid()}"
        os.rename(self._path(voice_id), doomed)  # gone at once; a kill before the rmtree leaves a hidden dir
        shutil.rmtree(doomed)
        return True

    def _path(self, voice_id: str) -> Path:
        if not (UPLOADED_ID.fullmatch(voice_id) or BUILTIN_NAME.fullmatch(voice_id)):
            raise ValueError(f"not a voice id: {voice_id!r}")
        return self.root / voice_id


def _write_synced(path: Path, write) -> None:
    with open(path, "wb") as f:
        write(f)
        f.flush()
        os.fsync(f.fileno())


class Transcriber:
    """The pipeline's ASR, loaded on the first upload that needs it (one model shared by all requests)."""

    def __init__(self, model: str):
        self.model = model
        self._asr = None
        self._lock = threading.Lock()

    def words(self, audio: np.ndarray) -> list[tuple[str, float, float]]:
        from data_pipeline.asr import FasterWhisperASR

        with self._lock:
            if self._asr is None:
                self._asr = FasterWhisperASR(self.model, device="cpu", compute_type="int8")
            found = self._asr.transcribe(to_model_rate(audio), [(0.0, len(audio) / MIMI_SAMPLE_RATE)])
        return [(w.text, w.start, w.end) for w in found]


def ingest(path: Path, min_seconds: float, max_seconds: float) -> np.ndarray:
    """An uploaded file → 24 kHz mono float32 at the pipeline's loudness; AudioError says why not."""
    return load_audio(path, min_seconds=min_seconds, max_seconds=max_seconds, target_lufs=TARGET_LUFS)


def make_builtin_voices(store: VoiceStore, voices: dict[str, dict], encode) -> None:
    """Speak each configured built-in voice's text with espeak-ng (`data_pipeline.demo_corpus.speak`, the demo
    corpus's voices) and store it, once: a later start finds it on disk."""
    from data_pipeline.demo_corpus import speak

    for name, spec in voices.items():
        if not BUILTIN_NAME.fullmatch(name):
            raise ValueError(f"built-in voice name {name!r}: lowercase letters, digits, _ and - only")
        if store.get(name) is not None and store.get(name).builtin:
            continue
        audio = speak(spec["text"], spec["espeak"], int(spec.get("speed", 160)))
        (codes,) = encode([audio])
        store.add(name, spec["text"], codes, builtin_id=name)
        log.info("built-in voice %s: espeak-ng %s, %.1f s", name, spec["espeak"], len(audio) / MIMI_SAMPLE_RATE)
