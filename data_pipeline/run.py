"""The pipeline driver: recordings → dataset directory, resumable and split into parts.

Two phases per part, so that a run killed at any moment and started again ends byte-identical:

1. **process** each input of the part (decode → transcript → turns → quality → windows → Mimi codes) and
   cache its result under `work/` (`{id}.npz` codes + `{id}.json`, written to a temp name and renamed;
   the JSON lands last and marks the input done). Inputs already cached are skipped. A failing input is
   cached as `{id}.failed.json` with its stage and reason, and the run goes on.
2. **assemble** the part's shards from the cache, in input order, from scratch (cheap: no model runs).

`merge` then links every part's shards into `shards/` and writes the combined `manifest.jsonl`,
`dataset.json` and `failures.jsonl`. Parts are cut deterministically from the sorted inputs, so each can
run as its own process or SLURM array task.

Transcripts: this version reads them from a sidecar `{recording}.json` next to each recording
(`{"words": [{"text", "start", "end", "speaker", "probability"?}, ...]}`), for corpora that come
transcribed; the ASR and diarization backends produce the same words.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import os
import shutil
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from data_pipeline.audio import SAMPLE_RATE, AudioError, discover, load_audio, source_id
from data_pipeline.codec import SAMPLES_PER_FRAME
from data_pipeline.quality import QualityFilter
from data_pipeline.shards import ShardWriter, Window, sample_key
from data_pipeline.turns import FRAME_RATE, Turn, Word, merge_turns, split_windows


@dataclass
class PipelineConfig:
    input_dir: str
    output_dir: str
    num_parts: int = 1
    max_positions: int = 2048  # a training sequence
    max_gap: float = 1.5  # seconds of silence that end a turn
    min_seconds: float = 1.0  # shorter recordings are rejected at ingest
    samples_per_shard: int = 256
    quality: dict = field(default_factory=dict)  # QualityFilter fields

    def config_hash(self) -> str:
        settings = {k: v for k, v in asdict(self).items() if k not in ("input_dir", "output_dir", "num_parts")}
        return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:16]


def _atomic_write(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def read_sidecar(path: Path) -> list[tuple[Word, str]]:
    sidecar = path.with_suffix(".json")
    if not sidecar.exists():
        raise FileNotFoundError(f"no transcript {sidecar.name} beside {path.name}")
    words = json.loads(sidecar.read_text())["words"]
    return [(Word(w["text"], w["start"], w["end"], w.get("probability", 1.0)), str(w["speaker"])) for w in words]


def turn_audio(audio: np.ndarray, turn: Turn) -> np.ndarray:
    """The turn's samples, cut on Mimi frame boundaries (so its codes are Mimi's own, see codec.py)."""
    start = math.floor(turn.start * FRAME_RATE) * SAMPLES_PER_FRAME
    end = min(len(audio), math.ceil(turn.end * FRAME_RATE) * SAMPLES_PER_FRAME)
    return audio[start:end]


class Pipeline:
    def __init__(self, config: PipelineConfig, encoder):
        self.config, self.encoder = config, encoder
        self.root, self.out = Path(config.input_dir), Path(config.output_dir)
        self.work = self.out / "work"
        self.work.mkdir(parents=True, exist_ok=True)
        self.inputs = discover(self.root)
        self.filter = QualityFilter(**config.quality)

    def part_inputs(self, part: int) -> list[Path]:
        return self.inputs[part :: self.config.num_parts]

    # -- phase 1 ---------------------------------------------------------------------------------------

    def process(self, path: Path) -> None:
        sid = source_id(path, self.root)
        done, failed = self._cache(sid)
        if done.exists() or failed.exists():
            return
        done.parent.mkdir(parents=True, exist_ok=True)
        stage = "ingest"
        try:
            audio = load_audio(path, min_seconds=self.config.min_seconds)
            stage = "transcript"
            turns = merge_turns(read_sidecar(path), self.config.max_gap)
            stage = "quality"
            kept, rejected = self.filter.apply(turns)
            stage = "encode"
            windows = split_windows(kept, self.config.max_positions)
            codes = self.encoder.encode([turn_audio(audio, t) for w in windows for t in w])
        except (AudioError, FileNotFoundError, ValueError, KeyError) as error:
            reason = error.reason if isinstance(error, AudioError) else type(error).__name__
            record = {"input": str(path), "stage": stage, "reason": reason, "error": str(error)}
            _atomic_write(failed, json.dumps(record).encode())
            return
        arrays, results, turn_index = {}, [], 0
        for w, window in enumerate(windows):
            segments, frame = [], 0
            window_codes = codes[turn_index : turn_index + len(window)]
            for turn, turn_codes in zip(window, window_codes, strict=True):
                n = turn_codes.shape[1]
                segments.append({
                    "speaker": turn.speaker, "text": turn.text, "start": turn.start, "end": turn.end,
                    "frame_start": frame, "frame_end": frame + n,
                    "words": [[x.text, x.start, x.end] for x in turn.words],
                })  # fmt: skip
                frame += n
            arrays[f"w{w}"] = np.concatenate(window_codes, axis=1)
            results.append({"key": sample_key(sid, w), "segments": segments})
            turn_index += len(window)
        meta = {"source": str(path.relative_to(self.root)), "duration": len(audio) / SAMPLE_RATE}
        npz = io.BytesIO()
        np.savez(npz, **arrays)
        _atomic_write(done.with_suffix(".npz"), npz.getvalue())  # the codes first: the JSON marks done
        _atomic_write(done, json.dumps({"windows": results, "rejected": rejected, "meta": meta}).encode())

    def _cache(self, sid: str) -> tuple[Path, Path]:
        base = self.work / sid
        return base.with_name(base.name + ".json"), base.with_name(base.name + ".failed.json")

    # -- phase 2 ---------------------------------------------------------------------------------------

    def assemble(self, part: int) -> Path:
        part_dir = self.out / "parts" / f"part-{part:04d}"
        if part_dir.exists():
            shutil.rmtree(part_dir)
        codec = {"weights_id": getattr(self.encoder, "weights_id", "unknown")}
        writer = ShardWriter(part_dir, samples_per_shard=self.config.samples_per_shard, codec=codec)
        rejected, failures = Counter(), []
        for path in self.part_inputs(part):
            done, failed = self._cache(source_id(path, self.root))
            if failed.exists():
                record = json.loads(failed.read_text())
                failures.append(record)
                rejected[f"{record['stage']}:{record['reason']}"] += 1
                continue
            cached = json.loads(done.read_text())
            rejected.update(cached["rejected"])
            with np.load(done.with_suffix(".npz"), allow_pickle=False) as arrays:
                for w, window in enumerate(cached["windows"]):
                    writer.write(Window(window["key"], arrays[f"w{w}"], window["segments"], cached["meta"]))
        card = writer.close()
        card.update(rejected=dict(sorted(rejected.items())), config_hash=self.config.config_hash())
        (part_dir / "dataset.json").write_text(json.dumps(card, indent=2))
        (part_dir / "failures.jsonl").write_text("".join(json.dumps(r) + "\n" for r in failures))
        return part_dir

    def run_part(self, part: int) -> Path:
        for path in self.part_inputs(part):
            self.process(path)
        return self.assemble(part)


def merge(output_dir: str | Path, num_parts: int) -> dict:
    """Link the parts' shards into `shards/` and combine manifests, cards and failures."""
    out = Path(output_dir)
    shard_dir = out / "shards"
    if shard_dir.exists():
        shutil.rmtree(shard_dir)
    shard_dir.mkdir(parents=True)
    rows, failures, cards = [], [], []
    for part in range(num_parts):
        part_dir = out / "parts" / f"part-{part:04d}"
        if not (part_dir / "dataset.json").exists():
            raise FileNotFoundError(f"{part_dir} is incomplete: run part {part} again, then merge")
        for shard in sorted((part_dir / "shards").glob("*.tar")):
            os.link(shard, shard_dir / f"part-{part:04d}-{shard.name}")
        for line in (part_dir / "manifest.jsonl").read_text().splitlines():
            row = json.loads(line)
            rows.append({**row, "shard": f"part-{part:04d}-{row['shard']}"})
        failures += (part_dir / "failures.jsonl").read_text().splitlines()
        cards.append(json.loads((part_dir / "dataset.json").read_text()))
    totals = {k: sum(c[k] for c in cards) for k in ("samples", "frames", "seconds", "segments", "shards")}
    rejected = sum((Counter(c["rejected"]) for c in cards), Counter())
    card = {
        **totals,
        "hours": totals["seconds"] / 3600,
        "windows": totals["samples"],
        "rejected": dict(sorted(rejected.items())),
        "codec": cards[0]["codec"],
        "config_hash": cards[0]["config_hash"],
    }
    (out / "manifest.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (out / "failures.jsonl").write_text("".join(f + "\n" for f in failures))
    (out / "dataset.json").write_text(json.dumps(card, indent=2))
    return card
