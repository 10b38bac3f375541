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

A recording whose process dies while working on it (out of memory, a kill) leaves its `{id}.started` mark
behind, counting the attempts: the next run tries it again (the kill may have come from outside: a preempted
node, `scancel`), and once `max_attempts` processes have died on it, it is recorded as failed (`killed`)
instead of killing every later run; a clean stop (Ctrl-C, SIGTERM) removes the mark. Each part holds a lock
(`work/part-NNNN.lock`) while it runs, and merge holds them all, so two runs on one output directory cannot
step on each other; the kernel drops a killed run's lock. A rerun over a finished dataset rewrites nothing:
files are replaced only where their bytes change.

Every stage is an object handed in (built from `conf/pipeline/` by `python -m data_pipeline`), so tests
and users swap backends without touching the driver. A `work/config.json` records the settings the cache
was made with; a run with different settings on the same output directory stops instead of mixing them.
"""

from __future__ import annotations

import filecmp
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
from contextlib import ExitStack
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
from tqdm import tqdm

from data_pipeline.audio import AUDIO_EXTENSIONS, AudioError, Inputs, discover, load_audio, source_id
from data_pipeline.codec import SAMPLES_PER_FRAME
from data_pipeline.files import ExclusiveLock, LockedError, atomic_write, write_if_changed
from data_pipeline.quality import QualityFilter
from data_pipeline.shards import MIMI_FRAME_RATE, MIMI_SAMPLE_RATE, ShardWriter, Window, sample_key
from data_pipeline.turns import Turn, merge_turns, split_windows

# Settings that do not change the output (of recordings that can be processed at all).
RUN_ONLY = ("input_dir", "output_dir", "num_parts", "max_errors", "max_attempts")


@dataclass
class PipelineConfig:
    input_dir: str
    output_dir: str
    num_parts: int = 1
    max_positions: int = 2048  # a training sequence
    max_gap: float = 1.5  # seconds of silence that end a turn
    min_seconds: float = 1.0  # shorter recordings are rejected at ingest
    max_seconds: float | None = 10_800.0  # longer ones too: a recording is held in memory whole (~1.5 GB per hour)
    samples_per_shard: int = 256
    max_errors: int = 3  # unexpected (non-audio) failures that stop a part
    max_attempts: int = 2  # processes that may die inside one recording before it is recorded as `killed`
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


def turn_audio(audio: np.ndarray, turn: Turn) -> np.ndarray:
    """The turn's samples, cut on Mimi frame boundaries (so its codes are Mimi's own, see codec.py)."""
    start = math.floor(turn.start * MIMI_FRAME_RATE) * SAMPLES_PER_FRAME
    end = min(len(audio), math.ceil(turn.end * MIMI_FRAME_RATE) * SAMPLES_PER_FRAME)
    return audio[start:end]


class Pipeline:
    def __init__(self, config: PipelineConfig, encoder, transcriber, quality: QualityFilter | None = None, inputs=None):
        """`inputs`: the recordings (`audio.Inputs`) when they come from elsewhere than `config.input_dir`, e.g.
        a Lhotse manifest; by default `discover(config.input_dir)`."""
        self.config, self.encoder, self.transcriber = config, encoder, transcriber
        self.filter = quality or QualityFilter()
        found: Inputs = inputs or discover(config.input_dir)
        self.root, self.inputs, self.skipped = found.root, found.paths, found.skipped
        self.out = Path(config.output_dir)
        self.work = self.out / "work"
        if not self.inputs:
            skipped = ", ".join(f"{n} {ext}" for ext, n in sorted(self.skipped.items())) or "nothing"
            raise ValueError(
                f"input_dir={config.input_dir} holds no audio file ({', '.join(AUDIO_EXTENSIONS)}; it holds "
                f"{skipped}): point it at the folder of recordings, or at a file listing them one per line"
            )
        self.ids = {path: source_id(path, self.root) for path in self.inputs}
        self._claim_work_dir()

    def _claim_work_dir(self) -> None:
        """The cache holds one configuration, and the parts one split: refuse to mix either."""
        self.work.mkdir(parents=True, exist_ok=True)
        record = self.work / "config.json"
        settings = {"config_hash": self.config.config_hash(), **self.config.settings()}
        if record.exists():
            made = json.loads(record.read_text())
            if made["config_hash"] != self.config.config_hash():
                raise ValueError(
                    f"{self.out} was made with other settings ({record}): resuming would mix two configurations."
                    " Use a new output_dir, or delete its work/ to start over."
                )
            split = made.get("num_parts", self.config.num_parts)
            if split != self.config.num_parts and (self.out / "parts").exists():
                raise ValueError(
                    f"{self.out}/parts was cut with num_parts={split}, not {self.config.num_parts}: run with "
                    f"num_parts={split}, or delete {self.out}/parts to split again (finished recordings in work/ "
                    "are kept)"
                )
        write_if_changed(record, json.dumps({**settings, "num_parts": self.config.num_parts}, indent=2))

    def part_inputs(self, part: int) -> list[Path]:
        return self.inputs[part :: self.config.num_parts]

    # -- phase 1 ---------------------------------------------------------------------------------------

    def process(self, path: Path) -> None:
        sid = self.ids[path]
        done, failed = self._cache(sid)
        if done.exists() or failed.exists():
            return
        started = self.work / f"{sid}.started"
        died = json.loads(started.read_text()) if started.exists() else {"attempts": 0}
        if died["attempts"] >= self.config.max_attempts:  # processes died inside it: do not die on it again
            detail = (f"{died['attempts']} processes died in it at stage {died['stage']} (out of memory? "
                      f"max_seconds bounds the length); delete {failed} to try it again")  # fmt: skip
            record = {"input": str(path), "stage": died["stage"], "reason": "killed", "error": detail}
            atomic_write(failed, json.dumps(record))
            started.unlink()
            return

        def mark(stage: str) -> str:  # where this attempt is, should its process die there
            atomic_write(started, json.dumps({"stage": stage, "attempts": died["attempts"] + 1}))
            return stage

        done.parent.mkdir(parents=True, exist_ok=True)
        self.transcriber.seconds.clear()
        seconds: Counter = Counter()
        stage, clock = mark("ingest"), time.perf_counter()
        try:
            audio = load_audio(path, min_seconds=self.config.min_seconds, max_seconds=self.config.max_seconds)
            seconds["ingest"] = time.perf_counter() - clock
            stage = mark("transcribe")
            turns = merge_turns(self.transcriber(path, audio), self.config.max_gap)
            stage, clock = mark("quality"), time.perf_counter()
            kept, rejected = self.filter.apply(turns, lambda turn: turn_audio(audio, turn))
            seconds["quality"] = time.perf_counter() - clock
            if not kept:
                reasons = ", ".join(f"{n} {reason}" for reason, n in sorted(rejected.items()))
                raise AudioError(path, "all_turns_rejected", f"the quality filters rejected all its turns: {reasons}")
            stage, clock = mark("encode"), time.perf_counter()
            windows = split_windows(kept, self.config.max_positions)
            codes = self.encoder.encode([turn_audio(audio, t) for w in windows for t in w])
            seconds["encode"] = time.perf_counter() - clock
        except AudioError as error:  # the recording's fault: cached, so a rerun skips it
            record = {"input": str(path), "stage": stage, "reason": error.reason, "error": str(error)}
            atomic_write(failed, json.dumps(record))
            return
        except Exception as error:  # a bug or the environment's fault: recorded, retried by the next run
            record = {"input": str(path), "stage": stage, "reason": f"error:{type(error).__name__}",
                      "error": "".join(traceback.format_exception(error))}  # fmt: skip
            atomic_write(self._error(sid), json.dumps(record))
            raise UnexpectedError(record) from error
        finally:  # every way out but a kill: exceptions, and SIGTERM (python -m data_pipeline makes it SystemExit)
            started.unlink(missing_ok=True)
        arrays, results, turn_index = {}, [], 0
        for w, window in enumerate(windows):
            segments, frame = [], 0
            window_codes = codes[turn_index : turn_index + len(window)]
            for turn, turn_codes in zip(window, window_codes, strict=True):
                n = turn_codes.shape[1]
                segments.append({
                    "speaker": turn.speaker, "text": turn.text, "start": turn.start, "end": turn.end,
                    "overlap": turn.overlap, "frame_start": frame, "frame_end": frame + n,
                    "words": [[x.text, x.start, x.end] for x in turn.words],
                })  # fmt: skip
                frame += n
            arrays[f"w{w}"] = np.concatenate(window_codes, axis=1)
            results.append({"key": sample_key(sid, w), "segments": segments})
            turn_index += len(window)
        meta = {"source": path.relative_to(self.root).as_posix() if path.is_relative_to(self.root) else str(path),
                "duration": len(audio) / MIMI_SAMPLE_RATE}  # fmt: skip
        timings = dict(seconds + self.transcriber.seconds)  # wall clock: kept out of the shards and the card
        npz = io.BytesIO()
        np.savez(npz, **arrays)
        atomic_write(done.with_suffix(".npz"), npz.getvalue())  # the codes first: the JSON marks done
        record = {"windows": results, "rejected": rejected, "meta": meta, "timings": timings}
        atomic_write(done, json.dumps(record))

    def _cache(self, sid: str) -> tuple[Path, Path]:
        base = self.work / sid
        return base.with_name(base.name + ".json"), base.with_name(base.name + ".failed.json")

    def _error(self, sid: str) -> Path:
        base = self.work / sid
        return base.with_name(base.name + ".error.json")

    # -- phase 2 ---------------------------------------------------------------------------------------

    def assemble(self, part: int) -> Path:
        """Write the part's shards from the cache into a scratch directory, then move into `parts/part-NNNN`
        only the files whose bytes differ (none, on a rerun over a finished part)."""
        part_dir = self.out / "parts" / f"part-{part:04d}"
        scratch = self.out / "parts" / f".part-{part:04d}.{os.getpid()}.tmp"
        shutil.rmtree(scratch, ignore_errors=True)
        codec = {"weights_id": getattr(self.encoder, "weights_id", "unknown")}
        writer = ShardWriter(scratch, samples_per_shard=self.config.samples_per_shard, codec=codec)
        rejected, failures, counts, keys = Counter(), [], Counter(), {}
        for path in self.part_inputs(part):
            sid = self.ids[path]
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
                    _check_unique(keys, window["key"], path)
                    writer.write(Window(window["key"], arrays[f"w{w}"], window["segments"], cached["meta"]))
        card = writer.close()
        card.update(
            {k: counts[k] for k in CARD_COUNTS},
            part=part,
            num_parts=self.config.num_parts,  # merge checks that every part was cut the same way
            failed=len(failures),
            rejected=dict(sorted(rejected.items())),
            skipped=dict(sorted(self.skipped.items())),  # files of input_dir left out by their extension
            config_hash=self.config.config_hash(),
            pipeline=self.config.settings(),
        )
        (scratch / "dataset.json").write_text(json.dumps(card, indent=2))
        (scratch / "failures.jsonl").write_text("".join(json.dumps(r) + "\n" for r in failures))
        _install(scratch, part_dir)
        return part_dir

    def run_part(self, part: int, progress: bool = True) -> Path:
        """Process the part's inputs, then assemble its shards. Inputs failing unexpectedly are listed in
        failures.jsonl and retried by the next run; `max_errors` of them stop the part (likely a setup
        problem, not bad recordings)."""
        with lock_part(self.out, part):
            errors = 0
            inputs = self.part_inputs(part)
            for path in tqdm(inputs, desc=f"part {part}: recordings", unit="file", disable=not progress):
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
            done, _ = self._cache(self.ids[path])
            if not done.exists():
                continue
            cached = json.loads(done.read_text())
            audio += cached["meta"]["duration"]
            seconds.update(cached["timings"])
        return {stage: {"seconds": t, "x_real_time": audio / t if t else None} for stage, t in seconds.items()}


def lock_part(out: Path, part: int) -> ExclusiveLock:
    """Part `part`'s lock, held while it runs and by merge: two processes never write one part."""
    (out / "work").mkdir(parents=True, exist_ok=True)
    try:
        return ExclusiveLock(out / "work" / f"part-{part:04d}.lock").acquire()
    except LockedError as error:
        raise RuntimeError(
            f"part {part} of {out} is in use by {error.holder} ({error.path} is locked): two runs on one output "
            "would overwrite each other's parts. Wait for it to end or stop it, or use another output_dir"
        ) from None


def _check_unique(keys: dict, key: str, source) -> None:
    """webdataset calls a shard with a repeated key corrupt, and a trainer would see one window twice."""
    if key in keys:
        raise ValueError(f"sample key {key!r} of {source} repeats the one of {keys[key]}: two recordings share an id")
    keys[key] = source


def _install(scratch: Path, target: Path) -> None:
    """Make `target` hold exactly `scratch`'s files, replacing only those whose bytes differ. The card
    (dataset.json, what marks a part finished) is removed first and moved in last, so a kill in between leaves
    a part that merge calls unfinished, never a finished-looking mix."""
    new = {p.relative_to(scratch) for p in scratch.rglob("*") if p.is_file()}
    old = {p.relative_to(target) for p in target.rglob("*") if p.is_file()} if target.exists() else set()
    changed = {f for f in new if f not in old or not filecmp.cmp(scratch / f, target / f, shallow=False)}
    if changed or old - new:
        (target / "dataset.json").unlink(missing_ok=True)
        for f in sorted(old - new):
            (target / f).unlink()
        for f in sorted(changed - {Path("dataset.json")}) + [Path("dataset.json")]:
            (target / f).parent.mkdir(parents=True, exist_ok=True)
            os.replace(scratch / f, target / f)
    shutil.rmtree(scratch)


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
    """Link the parts' shards into `shards/` and combine manifests, cards and failures, holding every part's lock.
    Files already right (a rerun over a merged dataset) are left as they are."""
    out = Path(output_dir)
    with ExitStack() as locks:
        for part in range(num_parts):
            locks.enter_context(lock_part(out, part))
        check_parts(out, num_parts)
        return _merge(out, num_parts)


def _merge(out: Path, num_parts: int) -> dict:
    shard_dir = out / "shards"
    shard_dir.mkdir(parents=True, exist_ok=True)
    rows, failures, cards, links, keys = [], [], [], {}, {}
    for part in range(num_parts):
        part_dir = out / "parts" / f"part-{part:04d}"
        for shard in sorted((part_dir / "shards").glob("*.tar")):
            links[f"part-{part:04d}-{shard.name}"] = shard
        for line in (part_dir / "manifest.jsonl").read_text().splitlines():
            row = json.loads(line)
            _check_unique(keys, row["key"], f"part {part}")
            rows.append({**row, "shard": f"part-{part:04d}-{row['shard']}"})
        failures += (part_dir / "failures.jsonl").read_text().splitlines()
        cards.append(json.loads((part_dir / "dataset.json").read_text()))
    for stale in set(os.listdir(shard_dir)) - set(links):
        (shard_dir / stale).unlink()
    for name, shard in links.items():
        if not (shard_dir / name).exists() or not os.path.samefile(shard_dir / name, shard):
            tmp = shard_dir / f".{name}.{os.getpid()}.tmp"
            os.link(shard, tmp)
            os.replace(tmp, shard_dir / name)
    totals = {k: sum(c[k] for c in cards) for k in ("samples", "frames", "seconds", "segments", "shards", "failed")}
    totals.update({k: sum(c[k] for c in cards) for k in CARD_COUNTS})
    rejected = sum((Counter(c["rejected"]) for c in cards), Counter())
    card = {
        **totals,
        "hours": totals["seconds"] / 3600,
        "input_hours": totals["input_seconds"] / 3600,
        "windows": totals["samples"],
        "rejected": dict(sorted(rejected.items())),
        "skipped": cards[0].get("skipped", {}),
        "codec": cards[0]["codec"],
        "config_hash": cards[0]["config_hash"],
        "pipeline": cards[0]["pipeline"],
    }
    write_if_changed(out / "manifest.jsonl", "".join(json.dumps(r) + "\n" for r in rows))
    write_if_changed(out / "failures.jsonl", "".join(f + "\n" for f in failures))
    write_if_changed(out / "dataset.json", json.dumps(card, indent=2))
    return card
