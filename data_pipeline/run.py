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

Every stage is an object handed in (built from `conf/pipeline/` by `python -m data_pipeline`), so tests
and users swap backends without touching the driver. A `work/config.json` records the settings the cache
was made with; a run with different settings on the same output directory stops instead of mixing them.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import os
import shutil
import sys
import time
import traceback
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
from tqdm import tqdm

from data_pipeline.audio import AUDIO_EXTENSIONS, SAMPLE_RATE, AudioError, discover, load_audio, source_id
from data_pipeline.codec import SAMPLES_PER_FRAME
from data_pipeline.quality import QualityFilter
from data_pipeline.shards import ShardWriter, Window, sample_key
from data_pipeline.turns import FRAME_RATE, Turn, merge_turns, split_windows

RUN_ONLY = ("input_dir", "output_dir", "num_parts", "max_errors")  # settings that do not change the output


@dataclass
class PipelineConfig:
    input_dir: str
    output_dir: str
    num_parts: int = 1
    max_positions: int = 2048  # a training sequence
    max_gap: float = 1.5  # seconds of silence that end a turn
    min_seconds: float = 1.0  # shorter recordings are rejected at ingest
    samples_per_shard: int = 256
    max_errors: int = 3  # unexpected (non-audio) failures that stop a part
    components: dict = field(default_factory=dict)  # the stages' settings (models, thresholds): part of the hash

    def settings(self) -> dict:
        """What decides the output; where the data lives and how the work is split do not."""
        return {k: v for k, v in asdict(self).items() if k not in RUN_ONLY}

    def config_hash(self) -> str:
        return hashlib.sha256(json.dumps(self.settings(), sort_keys=True).encode()).hexdigest()[:16]


# Counted per part and summed by merge. Speakers are told apart within a recording only (diarization labels
# are local), so `speakers` is the sum over recordings of their distinct speakers.
CARD_COUNTS = ("recordings", "input_seconds", "speakers")


class UnexpectedError(RuntimeError):
    """An input failed for a reason that is not the recording's (a bug, a missing model, out of memory)."""

    def __init__(self, record: dict):
        super().__init__(f"{record['input']} failed at stage {record['stage']}:\n{record['error']}")
        self.record = record


def _atomic_write(path: Path, data: bytes) -> None:
    # The temp name carries the pid: two processes writing the same file never share (or delete) a temp file.
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def turn_audio(audio: np.ndarray, turn: Turn) -> np.ndarray:
    """The turn's samples, cut on Mimi frame boundaries (so its codes are Mimi's own, see codec.py)."""
    start = math.floor(turn.start * FRAME_RATE) * SAMPLES_PER_FRAME
    end = min(len(audio), math.ceil(turn.end * FRAME_RATE) * SAMPLES_PER_FRAME)
    return audio[start:end]


class Pipeline:
    def __init__(self, config: PipelineConfig, encoder, transcriber, quality: QualityFilter | None = None):
        self.config, self.encoder, self.transcriber = config, encoder, transcriber
        self.filter = quality or QualityFilter()
        self.root, self.out = Path(config.input_dir), Path(config.output_dir)
        self.work = self.out / "work"
        self.inputs = discover(self.root)
        if not self.inputs:
            raise ValueError(
                f"input_dir={self.root} holds no audio file ({', '.join(sorted(AUDIO_EXTENSIONS))}): point it at "
                f"the folder of recordings"
            )
        self._claim_work_dir()

    def _claim_work_dir(self) -> None:
        self.work.mkdir(parents=True, exist_ok=True)
        record = self.work / "config.json"
        settings = json.dumps({"config_hash": self.config.config_hash(), **self.config.settings()}, indent=2)
        if not record.exists():
            _atomic_write(record, settings.encode())
        elif json.loads(record.read_text())["config_hash"] != self.config.config_hash():
            raise ValueError(
                f"{self.out} was made with other settings ({record}): resuming would mix two configurations."
                " Use a new output_dir, or delete its work/ to start over."
            )

    def part_inputs(self, part: int) -> list[Path]:
        return self.inputs[part :: self.config.num_parts]

    # -- phase 1 ---------------------------------------------------------------------------------------

    def process(self, path: Path) -> None:
        sid = source_id(path, self.root)
        done, failed = self._cache(sid)
        if done.exists() or failed.exists():
            return
        done.parent.mkdir(parents=True, exist_ok=True)
        self.transcriber.seconds.clear()
        seconds: Counter = Counter()
        stage, clock = "ingest", time.perf_counter()
        try:
            audio = load_audio(path, min_seconds=self.config.min_seconds)
            seconds["ingest"] = time.perf_counter() - clock
            stage = "transcribe"
            turns = merge_turns(self.transcriber(path, audio), self.config.max_gap)
            stage, clock = "quality", time.perf_counter()
            kept, rejected = self.filter.apply(turns, lambda turn: turn_audio(audio, turn))
            seconds["quality"] = time.perf_counter() - clock
            stage, clock = "encode", time.perf_counter()
            windows = split_windows(kept, self.config.max_positions)
            codes = self.encoder.encode([turn_audio(audio, t) for w in windows for t in w])
            seconds["encode"] = time.perf_counter() - clock
        except AudioError as error:  # the recording's fault: cached, so a rerun skips it
            record = {"input": str(path), "stage": stage, "reason": error.reason, "error": str(error)}
            _atomic_write(failed, json.dumps(record).encode())
            return
        except Exception as error:  # a bug or the environment's fault: recorded, retried by the next run
            record = {"input": str(path), "stage": stage, "reason": f"error:{type(error).__name__}",
                      "error": "".join(traceback.format_exception(error))}  # fmt: skip
            _atomic_write(self._error(sid), json.dumps(record).encode())
            raise UnexpectedError(record) from error
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
        timings = dict(seconds + self.transcriber.seconds)  # wall clock: kept out of the shards and the card
        npz = io.BytesIO()
        np.savez(npz, **arrays)
        _atomic_write(done.with_suffix(".npz"), npz.getvalue())  # the codes first: the JSON marks done
        record = {"windows": results, "rejected": rejected, "meta": meta, "timings": timings}
        _atomic_write(done, json.dumps(record).encode())

    def _cache(self, sid: str) -> tuple[Path, Path]:
        base = self.work / sid
        return base.with_name(base.name + ".json"), base.with_name(base.name + ".failed.json")

    def _error(self, sid: str) -> Path:
        base = self.work / sid
        return base.with_name(base.name + ".error.json")

    # -- phase 2 ---------------------------------------------------------------------------------------

    def assemble(self, part: int) -> Path:
        part_dir = self.out / "parts" / f"part-{part:04d}"
        if part_dir.exists():
            shutil.rmtree(part_dir)
        codec = {"weights_id": getattr(self.encoder, "weights_id", "unknown")}
        writer = ShardWriter(part_dir, samples_per_shard=self.config.samples_per_shard, codec=codec)
        rejected, failures = Counter(), []
        counts = Counter()
        for path in self.part_inputs(part):
            sid = source_id(path, self.root)
            done, failed = self._cache(sid)
            if not done.exists():
                record = json.loads((failed if failed.exists() else self._error(sid)).read_text())
                failures.append(record)
                rejected[f"{record['stage']}:{record['reason']}"] += 1
                continue
            cached = json.loads(done.read_text())
            rejected.update(cached["rejected"])
            counts["recordings"] += 1
            counts["input_seconds"] += cached["meta"]["duration"]
            counts["speakers"] += len({s["speaker"] for w in cached["windows"] for s in w["segments"]})
            with np.load(done.with_suffix(".npz"), allow_pickle=False) as arrays:
                for w, window in enumerate(cached["windows"]):
                    writer.write(Window(window["key"], arrays[f"w{w}"], window["segments"], cached["meta"]))
        card = writer.close()
        card.update(
            {k: counts[k] for k in CARD_COUNTS},
            part=part,
            num_parts=self.config.num_parts,  # merge checks that every part was cut the same way
            failed=len(failures),
            rejected=dict(sorted(rejected.items())),
            config_hash=self.config.config_hash(),
            pipeline=self.config.settings(),
        )
        (part_dir / "dataset.json").write_text(json.dumps(card, indent=2))
        (part_dir / "failures.jsonl").write_text("".join(json.dumps(r) + "\n" for r in failures))
        return part_dir

    def run_part(self, part: int, progress: bool = True) -> Path:
        """Process the part's inputs, then assemble its shards. Inputs failing unexpectedly are listed in
        failures.jsonl and retried by the next run; `max_errors` of them stop the part (likely a setup
        problem, not bad recordings)."""
        errors = 0
        for path in tqdm(self.part_inputs(part), desc=f"part {part}: recordings", unit="file", disable=not progress):
            try:
                self.process(path)
            except UnexpectedError as error:
                errors += 1
                print(f"warning: {error}", file=sys.stderr)
                if errors >= self.config.max_errors:
                    raise RuntimeError(
                        f"{errors} recordings failed unexpectedly (last one above): stopping part {part}."
                        " Fix the cause and run again; finished recordings are kept."
                    ) from error
        return self.assemble(part)

    def throughput(self) -> dict:
        """Per stage: wall seconds and audio seconds per second (× real time), over the cached inputs."""
        audio, seconds = 0.0, Counter()
        for path in self.inputs:
            done, _ = self._cache(source_id(path, self.root))
            if not done.exists():
                continue
            cached = json.loads(done.read_text())
            audio += cached["meta"]["duration"]
            seconds.update(cached["timings"])
        return {stage: {"seconds": t, "x_real_time": audio / t if t else None} for stage, t in seconds.items()}


def check_parts(out: Path, num_parts: int) -> None:
    """Every part 0..num_parts-1 finished, each cut from the inputs into num_parts, and no other part on disk:
    a merge with the wrong count would silently leave recordings out or mix two splits."""
    on_disk = {int(p.name.split("-")[1]) for p in (out / "parts").glob("part-*") if p.is_dir()}
    problems = []
    if on_disk - set(range(num_parts)):
        problems.append(f"parts {sorted(on_disk - set(range(num_parts)))} exist beyond num_parts={num_parts}")
    for part in range(num_parts):
        card = out / "parts" / f"part-{part:04d}" / "dataset.json"
        if not card.exists():
            problems.append(f"part {part} has not finished (no {card.relative_to(out)}): run it")
        elif json.loads(card.read_text()).get("num_parts", num_parts) != num_parts:
            split = json.loads(card.read_text())["num_parts"]
            problems.append(f"part {part} was cut for num_parts={split}: run it again with num_parts={num_parts}")
    if problems:
        raise ValueError(
            f"cannot merge {out} with num_parts={num_parts}: " + "; ".join(problems) + ". Merge with the num_parts "
            "the parts were run with, or run the missing parts first"
        )


def merge(output_dir: str | Path, num_parts: int) -> dict:
    """Link the parts' shards into `shards/` and combine manifests, cards and failures."""
    out = Path(output_dir)
    shard_dir = out / "shards"
    if shard_dir.exists():
        shutil.rmtree(shard_dir)
    shard_dir.mkdir(parents=True)
    check_parts(out, num_parts)
    rows, failures, cards = [], [], []
    for part in range(num_parts):
        part_dir = out / "parts" / f"part-{part:04d}"
        for shard in sorted((part_dir / "shards").glob("*.tar")):
            os.link(shard, shard_dir / f"part-{part:04d}-{shard.name}")
        for line in (part_dir / "manifest.jsonl").read_text().splitlines():
            row = json.loads(line)
            rows.append({**row, "shard": f"part-{part:04d}-{row['shard']}"})
        failures += (part_dir / "failures.jsonl").read_text().splitlines()
        cards.append(json.loads((part_dir / "dataset.json").read_text()))
    totals = {k: sum(c[k] for c in cards) for k in ("samples", "frames", "seconds", "segments", "shards", "failed")}
    totals.update({k: sum(c[k] for c in cards) for k in CARD_COUNTS})
    rejected = sum((Counter(c["rejected"]) for c in cards), Counter())
    card = {
        **totals,
        "hours": totals["seconds"] / 3600,
        "input_hours": totals["input_seconds"] / 3600,
        "windows": totals["samples"],
        "rejected": dict(sorted(rejected.items())),
        "codec": cards[0]["codec"],
        "config_hash": cards[0]["config_hash"],
        "pipeline": cards[0]["pipeline"],
    }
    (out / "manifest.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (out / "failures.jsonl").write_text("".join(f + "\n" for f in failures))
    (out / "dataset.json").write_text(json.dumps(card, indent=2))
    return card
