"""The shard contract between the data pipeline and the trainer: its writer and its readers, in one place.

A dataset directory holds

    shards/shard-000000.tar ...   webdataset tars; one sample = one conversation window
    manifest.jsonl                one row per sample: key, shard, frames, seconds, speakers
    dataset.json                  the card: totals, hours, speakers, codec, ...

and one sample has the members `codes.npy` (uint16 [K, n_frames]), `segments.json` (speaker turns with
text and their frame range in `codes.npy`) and `meta.json` (source, codec). Shards are written to a
temporary name and renamed when complete, and the manifest only ever names complete shards, so a reader
never sees half a shard. Readers: `iter_shard` (raw samples of one tar, the trainer's stream), `read_window`
(a raw sample → `Window`, nothing unpickled), `read_samples` (a whole dataset, for scoring and tests).
"""

from __future__ import annotations

import io
import json
import os
import re
import tarfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import webdataset as wds
from webdataset.tariterators import group_by_keys, tar_file_iterator

MIMI_SAMPLE_RATE = 24_000
MIMI_FRAME_RATE = 12.5  # frames per second: one frame per 80 ms
MIMI_CODEC = {"name": "mimi", "n_codebooks": 32, "frame_rate": MIMI_FRAME_RATE, "sample_rate": MIMI_SAMPLE_RATE}
_SOURCE_ID = re.compile(r"[A-Za-z0-9_\-/]+")


def sample_key(source_id: str, window: int) -> str:
    """`{source_id}/{window:06d}`. Dots would end a webdataset key early, so source ids may not have them."""
    if not _SOURCE_ID.fullmatch(source_id):
        raise ValueError(f"source id {source_id!r}: use letters, digits, '_', '-' and '/' only (no dots)")
    return f"{source_id}/{window:06d}"


@dataclass
class Window:
    """One conversation window: the unit the trainer reads."""

    key: str
    codes: np.ndarray  # uint16 [K, n_frames]
    segments: list[dict]  # {speaker, text, start, end, frame_start, frame_end, words?, overlap?}, in order
    meta: dict = field(default_factory=dict)

    @property
    def num_frames(self) -> int:
        return int(self.codes.shape[1])


def check_window(window: Window, num_codebooks: int) -> None:
    """Raise ValueError, naming the sample, where codes and segments break the contract."""
    codes, name = window.codes, f"sample {window.key!r}"
    if codes.ndim != 2 or codes.shape[0] != num_codebooks:
        raise ValueError(f"{name}: codes have shape {codes.shape}, expected [{num_codebooks}, n_frames]")
    if not window.segments:
        raise ValueError(f"{name}: no segments")
    previous_end = 0
    for i, seg in enumerate(window.segments):
        missing = {"speaker", "text", "frame_start", "frame_end"} - set(seg)
        if missing:
            raise ValueError(f"{name}: segment {i} lacks {sorted(missing)}")
        if not previous_end <= seg["frame_start"] < seg["frame_end"] <= codes.shape[1]:
            raise ValueError(
                f"{name}: segment {i} spans frames [{seg['frame_start']}, {seg['frame_end']}) which is not an "
                f"ordered, non-empty range inside the {codes.shape[1]} frames of codes.npy"
            )
        previous_end = seg["frame_end"]


def check_codec(codec: dict, num_codebooks: int) -> list[str]:
    """What in a dataset card's `codec` block a model of `num_codebooks` codebooks cannot train on, one line
    each with its fix; empty when it can. The frame layout is Mimi's (12.5 frames/s of 24 kHz audio), so those
    rates are fixed; a field the card does not have is not checked (each sample's codes are, as they are read)."""
    problems = []
    n, rate, sample_rate = codec.get("n_codebooks"), codec.get("frame_rate"), codec.get("sample_rate")
    if n is not None and int(n) != num_codebooks:
        problems.append(
            f"its codes have {n} codebooks per frame and the model has {num_codebooks}: encode the audio with "
            f"{num_codebooks} Mimi codebooks (python -m data_pipeline writes them all)"
        )
    if rate is not None and float(rate) != MIMI_FRAME_RATE:
        problems.append(
            f"its frame rate is {rate} frames/s; the model's layout is Mimi's {MIMI_FRAME_RATE}: encode the audio "
            f"with Mimi (python -m data_pipeline)"
        )
    if sample_rate is not None and int(sample_rate) != MIMI_SAMPLE_RATE:
        problems.append(
            f"its codec reads {sample_rate} Hz audio; Mimi's is {MIMI_SAMPLE_RATE} Hz: encode the audio with "
            f"Mimi (python -m data_pipeline resamples to {MIMI_SAMPLE_RATE} Hz)"
        )
    name = codec.get("name")
    if name is not None and name != MIMI_CODEC["name"]:
        problems.append(f"its codec is {name!r}, not Mimi: encode the audio with Mimi (python -m data_pipeline)")
    return problems


# Every tar member's modification time: fixed, so that the same windows make the same shard bytes on every run
# (checksums, rsync and dataset hashes see an unchanged dataset), where the wall clock would differ per run.
SHARD_MTIME = 0.0


def _npy_bytes(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=False)
    return buffer.getvalue()


class ShardWriter:
    """Write windows into size-bounded shards, the manifest and the dataset card.

    with ShardWriter(out_dir, num_codebooks=32) as writer:
        for window in windows:
            writer.write(window)
    """

    def __init__(self, out_dir: str | Path, num_codebooks: int = 32, samples_per_shard: int = 256, codec=None):
        self.out_dir = Path(out_dir)
        self.shard_dir = self.out_dir / "shards"
        self.shard_dir.mkdir(parents=True, exist_ok=True)
        self.num_codebooks = num_codebooks
        self.samples_per_shard = samples_per_shard
        self.codec = {**MIMI_CODEC, "n_codebooks": num_codebooks, **(codec or {})}
        self._rows: list[dict] = []  # manifest rows of the open shard
        self._shard_index = 0
        self._tar: wds.TarWriter | None = None
        self._totals = {"samples": 0, "frames": 0, "seconds": 0.0, "segments": 0}
        self._manifest = open(self.out_dir / "manifest.jsonl", "w")

    def write(self, window: Window) -> None:
        check_window(window, self.num_codebooks)
        if self._tar is None:
            self._tar = wds.TarWriter(str(self._partial_path()), mtime=SHARD_MTIME)
        meta = {"codec": self.codec, **window.meta}
        self._tar.write(
            {
                "__key__": window.key,
                "codes.npy": _npy_bytes(window.codes.astype(np.uint16)),
                "segments.json": json.dumps(window.segments).encode(),
                "meta.json": json.dumps(meta).encode(),
            }
        )
        seconds = window.num_frames / self.codec["frame_rate"]
        self._rows.append(
            {
                "key": window.key,
                "shard": self._shard_name(),
                "frames": window.num_frames,
                "seconds": seconds,
                "speakers": len({s["speaker"] for s in window.segments}),
            }
        )
        self._totals["samples"] += 1
        self._totals["frames"] += window.num_frames
        self._totals["seconds"] += seconds
        self._totals["segments"] += len(window.segments)
        if len(self._rows) == self.samples_per_shard:
            self._finish_shard()

    def _shard_name(self) -> str:
        return f"shard-{self._shard_index:06d}.tar"

    def _partial_path(self) -> Path:
        return self.shard_dir / (self._shard_name() + ".partial")

    def _finish_shard(self) -> None:
        self._tar.close()
        os.replace(self._partial_path(), self.shard_dir / self._shard_name())
        for row in self._rows:
            self._manifest.write(json.dumps(row) + "\n")
        self._manifest.flush()
        self._tar, self._rows = None, []
        self._shard_index += 1

    def close(self) -> dict:
        if self._tar is not None:
            self._finish_shard()
        self._manifest.close()
        card = {
            **self._totals,
            "hours": self._totals["seconds"] / 3600,
            "shards": self._shard_index,
            "codec": self.codec,
        }
        (self.out_dir / "dataset.json").write_text(json.dumps(card, indent=2))
        return card

    def __enter__(self) -> ShardWriter:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def read_card(dataset_dir: str | Path) -> dict:
    """The dataset card (`dataset.json`: totals, codec, pipeline settings); {} for a directory without one."""
    path = Path(dataset_dir) / "dataset.json"
    return json.loads(path.read_text()) if path.exists() else {}


def read_manifest(dataset_dir: str | Path) -> list[dict]:
    path = Path(dataset_dir) / "manifest.jsonl"
    if not path.exists():
        raise FileNotFoundError(
            f"{path} not found: {dataset_dir} is not a dataset directory (run `python -m data_pipeline` "
            f"or point data.path at the folder holding shards/ and manifest.jsonl)"
        )
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def read_window(sample: dict) -> Window:
    """A raw webdataset sample (bytes per member) → Window. Nothing is unpickled."""
    missing = {"codes.npy", "segments.json"} - set(sample)
    if missing:
        raise ValueError(f"sample {sample.get('__key__')!r} lacks {sorted(missing)}")
    return Window(
        key=sample["__key__"],
        codes=np.load(io.BytesIO(sample["codes.npy"]), allow_pickle=False),
        segments=json.loads(sample["segments.json"]),
        meta=json.loads(sample["meta.json"]) if "meta.json" in sample else {},
    )


def iter_shard(path: Path) -> Iterator[dict]:
    """Raw samples of one shard, with a clear error for a truncated or corrupt file."""
    try:
        with open(path, "rb") as f:
            members = ({**member, "__url__": str(path)} for member in tar_file_iterator(f))
            yield from group_by_keys(members)
    except (OSError, ValueError, EOFError, tarfile.TarError) as error:
        raise RuntimeError(
            f"shard {path} is truncated or corrupt ({type(error).__name__}: {error}); write it again with the "
            f"data pipeline, or remove it and its rows from manifest.jsonl"
        ) from error


def read_samples(dataset_dir: str | Path) -> Iterator[tuple[str, dict[str, bytes]]]:
    """Every sample of a dataset directory in manifest order: (key, {"codes.npy": bytes, "segments.json": ...,
    "meta.json": ...}). For inspection, scoring and tests; training streams shards itself (csm_train.data)."""
    dataset_dir = Path(dataset_dir)
    for shard in dict.fromkeys(row["shard"] for row in read_manifest(dataset_dir)):
        for sample in iter_shard(dataset_dir / "shards" / shard):
            yield sample["__key__"], {name: sample[name] for name in ("codes.npy", "segments.json", "meta.json")}
