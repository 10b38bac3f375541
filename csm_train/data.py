"""Shards → packed training batches, split across ranks and workers, resumable exactly.

Order. Every (rank, dataloader worker) pair is a *slot*. In epoch e the shards are permuted with
`(seed, e)` and slot s reads shards `s, s + num_slots, ...` of that order, samples in stored order. Slots
never share a shard, so ranks and workers see disjoint data, and the order is a pure function of the seed.

Packing. Each sample (one conversation window) becomes frames in Sesame's layout (text tokenized here, at
load time). Rows of `max_seq_len` frames are filled from a look-ahead buffer of the next `lookahead`
samples: a row starts with the oldest buffered sample and is topped up best-fit with the longest ones that
still fit, which keeps padding to a few percent where first-come packing wastes ~15 % (bench/RESULTS.md).
A row records each frame's position within its own conversation and a document id, from which the step
builds a block-causal mask: no attention across conversations. The row's tail is padding without targets.

Resume. Positions are `(epoch, index)` in a slot's stream. Each batch carries its slot's position after
it: the oldest sample not yet trained on, plus the few later ones that were (packed ahead of it). The
trainer keeps that for every slot (`StreamState`), saves it in the checkpoint, and a restarted stream reads
from the oldest unconsumed sample, skipping the listed ones: its look-ahead buffer then holds exactly what
the uninterrupted stream's held, so nothing is repeated or lost and the rows come out identical.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import socket
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field, fields, replace
from pathlib import Path

import lightning as L
import numpy as np
import torch
import torch.distributed as dist
from torch.nn.attention.flex_attention import BlockMask, create_block_mask
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from csm_train.layout import Frames, Segment, collate, concat_frames, segment_frames
from csm_train.tokenizer import TextTokenizer
from data_pipeline.shards import Window, check_window, iter_shard, read_manifest, read_samples, read_window

log = logging.getLogger(__name__)

# A stream that reads this many samples in a row without one it can train on stops with an error: a dataset
# that does not fit the model (other codebook count, windows longer than max_seq_len) would otherwise loop
# forever, skipping samples and never stepping.
MAX_UNUSABLE_READS = 1000


class RateLimitedWarnings:
    """Warnings that may repeat once per sample: the first `first` of each kind are logged, then one line per
    `every_s` seconds counts what was left out since (with the latest), so a bad dataset cannot fill a disk."""

    def __init__(self, first: int = 5, every_s: float = 60.0):
        self.first, self.every_s = first, every_s
        self.counts: Counter = Counter()
        self._reported: dict[str, tuple[int, float]] = {}  # kind → (count, time) at its last logged line

    def warn(self, kind: str, detail: str) -> None:
        self.counts[kind] += 1
        count, now = self.counts[kind], time.monotonic()
        if count <= self.first:
            more = f" (further ones: a count every {self.every_s:.0f} s)" if count == self.first else ""
            log.warning("%s: %s%s", kind, detail, more)
            self._reported[kind] = (count, now)
        elif now - self._reported[kind][1] >= self.every_s:
            log.warning("%s: %d more (%d in all); the latest: %s", kind, count - self._reported[kind][0], count, detail)
            self._reported[kind] = (count, now)


Position = tuple[int, int]  # (epoch, index of the sample in the slot's stream for that epoch)


@dataclass
class SlotPosition:
    oldest_unconsumed: Position = (0, 0)
    consumed_after: tuple[Position, ...] = ()  # consumed samples beyond it (packed ahead by the look-ahead)


@dataclass
class StreamReport:
    """Where a slot's stream stands after a batch, and what went into it: the trainer keeps `position` and
    `consumed_after` (`StreamState`) so that a resumed stream starts exactly there."""

    slot: int
    num_slots: int
    worker: int  # the dataloader worker that produced the batch
    position: Position  # the oldest sample of the slot not yet trained on
    consumed_after: tuple[Position, ...]  # samples beyond it already packed into batches
    keys: list[str]  # the samples packed into this batch, row by row
    sample_positions: list[Position]  # their positions in the slot's stream
    skipped: int  # samples read and dropped since the last batch (cannot fit the model)
    truncated: int  # samples cut at a turn boundary to fit a row


@dataclass
class Batch:
    """Packed rows as the model takes them: `tokens`/`tokens_mask` `[B, T, K+1]`, `labels` `[B, T, K]` (-100: not a
    target), `input_pos` `[B, T]` (each frame's RoPE position within its own conversation), `doc_ids` `[B, T]`
    (which conversation of the row a frame belongs to, -1 padding: the block-causal mask). `stream` is the
    training stream's bookkeeping (None for validation batches)."""

    tokens: torch.Tensor
    tokens_mask: torch.Tensor
    labels: torch.Tensor
    input_pos: torch.Tensor
    doc_ids: torch.Tensor
    stream: StreamReport | None = None

    def to(self, device: torch.device | str) -> Batch:
        """The tensors on `device` (Lightning moves batches itself; benchmarks and scripts call this)."""
        tensors = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "stream"}
        return replace(self, **{name: tensor.to(device) for name, tensor in tensors.items()})


@dataclass
class StreamState:
    """Where the stream stands, as of the last batch trained on: each slot's position, the slot count it
    was made with, and the dataloader worker that produced the last batch (the DataLoader takes workers in
    turn, so a resumed stream must start with the next one)."""

    slots: dict[int, SlotPosition] = field(default_factory=dict)
    num_slots: int | None = None
    last_worker: int | None = None
    advanced: set[int] = field(default_factory=set)  # slots this process trained on since its start or load

    def update(self, report: StreamReport) -> None:
        self.slots[report.slot] = SlotPosition(tuple(report.position), tuple(map(tuple, report.consumed_after)))
        self.advanced.add(report.slot)
        self.num_slots, self.last_worker = report.num_slots, report.worker

    def state_dict(self) -> dict:
        slots = {
            str(k): [list(v.oldest_unconsumed), [list(p) for p in v.consumed_after]] for k, v in self.slots.items()
        }
        return {"slots": slots, "num_slots": self.num_slots, "last_worker": self.last_worker}

    def load_state_dict(self, state: dict) -> None:
        self.slots = {
            int(k): SlotPosition(tuple(oldest), tuple(tuple(p) for p in after))
            for k, (oldest, after) in state["slots"].items()
        }
        self.num_slots, self.last_worker = state["num_slots"], state["last_worker"]
        self.advanced = set()


def window_frames(window: Window, tokenizer: TextTokenizer, num_codebooks: int, max_frames: int) -> tuple[Frames, bool]:
    """Frames of a window, cut to `max_frames` at a turn boundary (the first turn's audio is cropped if it
    alone is too long). Returns (frames, truncated)."""
    parts, total = [], 0
    for seg in window.segments:
        codes = torch.from_numpy(window.codes[:, seg["frame_start"] : seg["frame_end"]].astype(np.int64))
        part = segment_frames(Segment(int(seg["speaker"]), seg["text"], codes), tokenizer, num_codebooks)
        if total + len(part) > max_frames:
            if not parts:  # keep the room for text + end-of-audio frame, crop the audio
                text_len = len(part) - codes.shape[1] - 1
                keep = max_frames - text_len - 1
                if keep < 1:
                    raise ValueError(f"sample {window.key!r}: the first turn's text alone exceeds {max_frames} frames")
                part = segment_frames(
                    Segment(int(seg["speaker"]), seg["text"], codes[:, :keep]), tokenizer, num_codebooks
                )
                parts.append(part)
            return concat_frames(parts), True
        parts.append(part)
        total += len(part)
    return concat_frames(parts), False


def _key_hash(key: str) -> float:
    """A sample's place in [0, 1): the same on every rank, run and resume."""
    return int(hashlib.sha256(key.encode()).hexdigest()[:8], 16) / 16**8


def held_out(key: str, fraction: float) -> bool:
    """Whether a sample's key hashes into the validation share: a sample never moves between the splits when
    others are added."""
    return fraction > 0 and _key_hash(key) < fraction


def validation_keys(keys, fraction: float) -> set[str]:
    """The validation split of a dataset: the keys `held_out` picks, or, in a set so small that it picks none
    (a 5-minute voice is a few windows), the one key that hashes lowest, so that the set is still validated."""
    keys = list(keys)
    chosen = {key for key in keys if held_out(key, fraction)}
    if fraction > 0 and keys and not chosen:
        chosen = {min(keys, key=_key_hash)}
    return chosen


def split_frames(
    path: str | Path, tokenizer: TextTokenizer, num_codebooks: int, max_frames: int, holdout: float, validation: bool
) -> list[Frames]:
    """Every sample of one split as frames (read whole: for fine-tuning sets, not pre-training corpora); samples
    that cannot fit are skipped, as the training stream skips them."""
    frames, warnings = [], RateLimitedWarnings()
    validation_split = validation_keys((row["key"] for row in read_manifest(path)), holdout)
    for key, raw in read_samples(path):
        if (key in validation_split) != validation:
            continue
        try:
            frames.append(window_frames(read_window({"__key__": key, **raw}), tokenizer, num_codebooks, max_frames)[0])
        except ValueError as error:
            warnings.warn("skipping sample that cannot fit", str(error))
    return frames


def positions_per_epoch(
    path: str | Path, tokenizer: TextTokenizer, num_codebooks: int, max_frames: int, holdout: float = 0.0
) -> int:
    """Training positions (frames) in one pass over the training split: what `epochs=` is turned into steps with."""
    return sum(map(len, split_frames(path, tokenizer, num_codebooks, max_frames, holdout, validation=False)))


class HeldOutSet(torch.utils.data.Dataset):
    """The validation split, one sample per row (no packing, no stream position: each validation reads it all)."""

    def __init__(self, path, tokenizer: TextTokenizer, num_codebooks: int, max_seq_len: int, holdout: float):
        self.max_seq_len = max_seq_len
        self.samples = split_frames(path, tokenizer, num_codebooks, max_seq_len, holdout, validation=True)
        if not self.samples:
            raise ValueError(
                f"data.holdout={holdout} keeps no sample of {path} for validation: raise it, or set 0 to not validate"
            )

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> Frames:
        return self.samples[index]

    def collate(self, samples: list[Frames]) -> Batch:
        return _collate_rows([[frames] for frames in samples], self.max_seq_len)


class RowPacker:
    """Fill rows of `length` frames from a look-ahead buffer of `lookahead` samples (see module doc)."""

    def __init__(self, length: int, lookahead: int):
        self.length, self.lookahead = length, lookahead
        self.buffer: list[tuple[Frames, str, Position]] = []

    def add(self, frames: Frames, key: str, position: Position) -> list[tuple[Frames, str, Position]] | None:
        """Buffer a sample; once the buffer is full, return the next row."""
        self.buffer.append((frames, key, position))
        if len(self.buffer) < self.lookahead:
            return None
        row = [self.buffer.pop(0)]
        room = self.length - len(row[0][0])
        while True:  # best fit: the longest buffered sample that fits (the oldest among equals)
            fits = [i for i, (f, _, _) in enumerate(self.buffer) if len(f) <= room]
            if not fits:
                return row
            chosen = self.buffer.pop(max(fits, key=lambda i: len(self.buffer[i][0])))
            row.append(chosen)
            room -= len(chosen[0])


def _collate_rows(rows: list[list[Frames]], length: int, stream: StreamReport | None = None) -> Batch:
    batch = collate([concat_frames(row) for row in rows], length=length)
    positions = torch.zeros(len(rows), length, dtype=torch.long)
    doc_ids = torch.full((len(rows), length), -1, dtype=torch.long)
    for i, row in enumerate(rows):
        start = 0
        for doc, frames in enumerate(row):
            positions[i, start : start + len(frames)] = torch.arange(len(frames))
            doc_ids[i, start : start + len(frames)] = doc
            start += len(frames)
    return Batch(batch.tokens, batch.tokens_mask, batch.labels, positions, doc_ids, stream)


def attention_mask(doc_ids: torch.Tensor, flex: bool = False) -> torch.Tensor | BlockMask:
    """Block-causal bool mask `[B, 1, T, T]`: a frame sees earlier frames of its own conversation. Padding
    (doc -1) sees earlier padding only, so no row of the attention is empty. With `flex`, the same rule as a
    FlexAttention `BlockMask` (`block_mask`); the dense mask stays the reference, and the only kind that KV
    caches and CPU backward take."""
    if flex:
        return block_mask(doc_ids)
    T = doc_ids.shape[1]
    causal = torch.ones(T, T, dtype=torch.bool, device=doc_ids.device).tril()
    same = doc_ids[:, :, None] == doc_ids[:, None, :]
    return (same & causal)[:, None]


def block_mask(doc_ids: torch.Tensor) -> BlockMask:
    """`attention_mask`'s rule as a FlexAttention `BlockMask`: it records which 128×128 tiles are empty
    (another conversation, the future) and which are full, so the kernel skips the first, computes the
    second unmasked, and evaluates the rule only on the tiles a document boundary or the diagonal cuts."""
    B, T = doc_ids.shape
    # A kernel may evaluate the rule past T in a row's last, partial tile (those scores are discarded): pad the
    # lookup to whole tiles so that such reads stay in bounds.
    docs = torch.nn.functional.pad(doc_ids, (0, -T % 128), value=-1)

    def block_causal(b, h, q, kv):
        return (q >= kv) & (docs[b, q] == docs[b, kv])

    return create_block_mask(block_causal, B, None, T, T, device=doc_ids.device)


class FrameStream(IterableDataset):
    """An endless, deterministic stream of packed batches from a dataset directory (see module doc)."""

    def __init__(
        self,
        dataset_dir: str | Path,
        tokenizer: TextTokenizer,
        num_codebooks: int,
        max_seq_len: int,
        batch_size: int,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        state: StreamState | None = None,
        lookahead: int = 64,
        holdout: float = 0.0,
        max_unusable_reads: int = MAX_UNUSABLE_READS,
    ):
        """`holdout`: the share of samples kept out for validation (`validation_keys`); the stream never yields them.
        `max_unusable_reads`: samples read in a row without a trainable one before the stream stops with an
        error saying why (the model and the dataset do not fit each other)."""
        self.dataset_dir = Path(dataset_dir)
        self.tokenizer = tokenizer
        self.num_codebooks = num_codebooks
        self.max_seq_len = max_seq_len
        self.batch_size = batch_size
        self.seed = seed
        self.rank, self.world_size = rank, world_size
        self.state = state or StreamState()
        self.lookahead = lookahead
        self.holdout = holdout
        self.max_unusable_reads = max_unusable_reads
        self.warnings = RateLimitedWarnings()
        self._unusable: Counter = Counter()  # reasons of the samples read since the last trainable one
        self._unusable_example: dict[str, str] = {}  # the first such sample of each reason
        manifest = read_manifest(self.dataset_dir)
        self.shard_sizes = Counter(row["shard"] for row in manifest)
        self.shards = sorted(self.shard_sizes)
        if not self.shards:
            raise ValueError(f"{self.dataset_dir}/manifest.jsonl lists no samples")
        self.validation_split = validation_keys((row["key"] for row in manifest), holdout)
        if holdout and len(self.validation_split) == len(manifest):
            raise ValueError(
                f"data.holdout={holdout} holds out all {len(manifest)} samples of {self.dataset_dir}: lower it, or "
                f"set data.holdout=0 to train on every sample without validation"
            )

    def _slot(self) -> tuple[int, int, int]:
        """(slot, number of slots, local worker id) of the calling worker."""
        info = get_worker_info()
        workers, worker = (info.num_workers, info.id) if info else (1, 0)
        num_slots = self.world_size * workers
        if num_slots > len(self.shards):
            raise ValueError(
                f"{len(self.shards)} shards cannot feed {self.world_size} ranks × {workers} workers without "
                f"sharing: write smaller shards or use fewer data.num_workers"
            )
        if self.state.num_slots not in (None, num_slots):
            raise ValueError(
                f"the saved data position was made with {self.state.num_slots} ranks × workers, this run has "
                f"{num_slots}: resume with the same world size and data.num_workers"
            )
        if self.state.last_worker is not None:  # DataLoader asks worker 0 first: let it play the next one
            worker = (worker + self.state.last_worker + 1) % workers
        return self.rank * workers + worker, num_slots, worker

    def slot_shards(self, slot: int, num_slots: int, epoch: int) -> list[str]:
        order = np.random.default_rng([self.seed, epoch]).permutation(len(self.shards))
        return [self.shards[i] for i in order[slot::num_slots]]

    def _samples(self, slot: int, num_slots: int) -> Iterator[tuple[Position, Window | None]]:
        """(position, window or None for a bad sample) from the saved position on, without the samples the
        saved position lists as already consumed."""
        saved = self.state.slots.get(slot, SlotPosition())
        (epoch, skip), done = saved.oldest_unconsumed, set(saved.consumed_after)
        while True:
            index = 0
            for shard in self.slot_shards(slot, num_slots, epoch):
                if skip >= index + self.shard_sizes[shard]:  # the whole shard was consumed before
                    index += self.shard_sizes[shard]
                    continue
                for raw in iter_shard(self.dataset_dir / "shards" / shard):
                    if index >= skip and (epoch, index) not in done and raw["__key__"] not in self.validation_split:
                        yield (epoch, index), self._window(raw)
                    index += 1
            epoch, skip = epoch + 1, 0

    def _frames(self, window: Window) -> tuple[Frames | None, bool]:
        try:
            return window_frames(window, self.tokenizer, self.num_codebooks, self.max_seq_len)
        except ValueError as error:
            self._skip("skipping sample that cannot fit", error)
            return None, False

    def _window(self, raw: dict) -> Window | None:
        try:
            window = read_window(raw)
            check_window(window, self.num_codebooks)
            return window
        except ValueError as error:
            self._skip("skipping bad sample", error)
            return None

    def _skip(self, kind: str, error: ValueError) -> None:
        self.warnings.warn(kind, str(error))
        self._unusable[kind] += 1
        self._unusable_example.setdefault(kind, str(error))

    def _check_progress(self, trainable: bool, slot: int) -> None:
        """Count samples read in a row without a trainable one; past `max_unusable_reads`, stop with the cause."""
        if trainable:
            self._unusable.clear()
            self._unusable_example.clear()
            return
        if sum(self._unusable.values()) < self.max_unusable_reads:
            return
        reasons = {  # kind → (what the samples are, the fix)
            "skipping sample that cannot fit": (
                f"cannot fit data.max_seq_len={self.max_seq_len} (a window's first turn needs its text and one audio "
                f"frame in one row)",
                f"raise data.max_seq_len, or run the data pipeline again with max_positions={self.max_seq_len} so "
                f"that its windows fit",
            ),
            "skipping bad sample": (
                f"break the shard contract for this model ({self.num_codebooks} codebooks)",
                "check the codec block of the dataset's dataset.json and run the data pipeline again for this model",
            ),
        }
        causes = "; ".join(
            f"{count} {reasons[kind][0]}, the first: {self._unusable_example[kind]} → {reasons[kind][1]}"
            for kind, count in self._unusable.most_common()
        )
        raise RuntimeError(
            f"dataset {self.dataset_dir}: {sum(self._unusable.values())} samples read in a row on rank {self.rank} "
            f"(slot {slot}) and not one the model can train on: {causes}"
        )

    def __iter__(self) -> Iterator[Batch]:
        slot, num_slots, worker = self._slot()
        packer = RowPacker(self.max_seq_len, self.lookahead)
        rows: list[list[tuple[Frames, str, Position]]] = []
        unconsumed: list[Position] = []  # read but not yet in a yielded batch, in read order
        consumed: set[Position] = set()  # in a yielded batch (or bad) and newer than the oldest unconsumed
        skipped = truncated = 0
        for position, window in self._samples(slot, num_slots):
            unconsumed.append(position)
            frames, cut = self._frames(window) if window is not None else (None, False)
            self._check_progress(frames is not None, slot)
            if frames is None:  # a bad sample is consumed as soon as it is read
                skipped += 1
                consumed.add(position)
                continue
            truncated += cut
            row = packer.add(frames, window.key, position)
            if row is not None:
                rows.append(row)
            if len(rows) < self.batch_size:
                continue
            consumed.update(p for row in rows for _, _, p in row)
            unconsumed = [p for p in unconsumed if p not in consumed]
            oldest = unconsumed[0] if unconsumed else (position[0], position[1] + 1)
            consumed = {p for p in consumed if p > oldest}
            report = StreamReport(
                slot=slot,
                num_slots=num_slots,
                worker=worker,
                position=tuple(oldest),
                consumed_after=tuple(sorted(consumed)),
                keys=[key for row in rows for _, key, _ in row],
                sample_positions=[tuple(p) for row in rows for _, _, p in row],
                skipped=skipped,
                truncated=truncated,
            )
            yield _collate_rows([[f for f, _, _ in row] for row in rows], self.max_seq_len, report)
            rows, skipped, truncated = [], 0, 0


class CSMDataModule(L.LightningDataModule):
    """Shards → `FrameStream` per rank; its position is part of every checkpoint (exact resume)."""

    def __init__(
        self,
        path: str,
        tokenizer: TextTokenizer,
        num_codebooks: int = 32,
        max_seq_len: int = 2048,
        batch_size: int = 1,
        num_workers: int = 0,
        seed: int = 0,
        synthetic_corpus: bool = False,
        pack_lookahead: int = 64,
        holdout: float = 0.0,
    ):
        """`holdout`: the share of samples (by a hash of their key) kept out of training for validation."""
        super().__init__()
        self.path, self.tokenizer, self.synthetic_corpus = path, tokenizer, synthetic_corpus
        self.num_codebooks, self.max_seq_len = num_codebooks, max_seq_len
        self.batch_size, self.num_workers, self.seed = batch_size, num_workers, seed
        self.pack_lookahead, self.holdout = pack_lookahead, holdout
        self.stream_state = StreamState()

    def prepare_data(self) -> None:
        """Write the synthetic corpus on first use (rank 0 only; Lightning calls this before other ranks read)."""
        path = Path(self.path)
        if self.synthetic_corpus and not (path / "manifest.jsonl").exists():
            from data_pipeline.synthetic import write_synthetic_corpus

            # The jobs of a sweep may all start here at once: each writes its own copy, the first rename wins.
            staging = path.with_name(f"{path.name}.{socket.gethostname()}-{os.getpid()}.partial")
            write_synthetic_corpus(staging, num_codebooks=self.num_codebooks)
            try:
                staging.rename(path)
            except OSError:  # another job's copy is in place (the same corpus: same seed), or debris
                shutil.rmtree(staging)
                if not (path / "manifest.jsonl").exists():
                    raise FileExistsError(
                        f"{path} is not a dataset (no manifest.jsonl): remove it and run again"
                    ) from None

    def train_dataloader(self) -> DataLoader:
        stream = FrameStream(
            self.path,
            self.tokenizer,
            num_codebooks=self.num_codebooks,
            max_seq_len=self.max_seq_len,
            batch_size=self.batch_size,
            seed=self.seed,
            rank=self.trainer.global_rank if self.trainer else 0,
            world_size=self.trainer.world_size if self.trainer else 1,
            state=self.stream_state,
            lookahead=self.pack_lookahead,
            holdout=self.holdout,
        )
        return DataLoader(stream, batch_size=None, num_workers=self.workers(stream), persistent_workers=False)

    def workers(self, stream: FrameStream) -> int:
        """`num_workers`, or fewer where the shards cannot feed that many: each worker of each rank reads its own
        shards (csm_train/data.py), and a 5-minute fine-tuning set is a single shard. Fewer shards than ranks is
        the stream's own error (`FrameStream._slot`)."""
        per_rank = len(stream.shards) // stream.world_size
        if self.num_workers > per_rank > 0:
            if stream.rank == 0:
                log.info("data.num_workers=%d → %d: %d shard(s) per rank", self.num_workers, per_rank, per_rank)
            return per_rank
        return self.num_workers

    def val_dataloader(self) -> DataLoader | list:
        if not self.holdout:
            return []  # no validation
        held = HeldOutSet(self.path, self.tokenizer, self.num_codebooks, self.max_seq_len, self.holdout)
        return DataLoader(held, batch_size=self.batch_size, collate_fn=held.collate)

    def state_dict(self) -> dict:
        """Every rank's stream position (each rank only sees its own slots), merged on all ranks."""
        state = self.stream_state.state_dict()
        if dist.is_available() and dist.is_initialized():
            gathered = [None] * dist.get_world_size()
            dist.all_gather_object(gathered, (state, sorted(self.stream_state.advanced)))
            # After a resume every rank holds every slot as restored; only the rank reading a slot knows where
            # it is now. So: the restored positions first, then each rank's own slots over them.
            slots = {k: v for s, _ in gathered for k, v in s["slots"].items()}
            slots.update({str(k): s["slots"][str(k)] for s, advanced in gathered for k in advanced})
            state = {**state, "slots": slots}
        return {"stream": state}

    def load_state_dict(self, state: dict) -> None:
        self.stream_state.load_state_dict(state["stream"])
