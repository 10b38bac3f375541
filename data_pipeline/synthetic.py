"""A synthetic conversational dataset written straight through the shard writer, in a second: the trainer's
default data (`data=synthetic`) and its tests. The speech demo corpus (data_pipeline/demo_corpus.py) is
the real thing, run through the whole pipeline.

The "audio" is learnable: each character of a turn's text becomes a couple of frames whose codes are a
fixed function of (character, codebook, speaker). A model that reads the text and the speaker can predict
the codes, so the training loss falls far below chance, as it would on speech."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from data_pipeline.shards import MIMI_FRAME_RATE, ShardWriter, Window, sample_key

LINES = [
    "did you hear the news this morning",
    "no what happened",
    "they finally opened the new library downtown",
    "oh nice we should go this weekend",
    "i heard the reading room is beautiful",
    "let us meet there on saturday at ten",
    "sounds good i will bring coffee",
    "perfect see you then",
]
FRAMES_PER_CHAR = 2


def character_codes(text: str, speaker: int, num_codebooks: int) -> np.ndarray:
    """uint16 [K, FRAMES_PER_CHAR * len(text)]: a deterministic 'pronunciation' of each character."""
    chars = np.frombuffer(text.encode(), dtype=np.uint8).astype(np.int64)
    frame = np.repeat(chars, FRAMES_PER_CHAR) * 7 + np.tile(np.arange(FRAMES_PER_CHAR), len(chars)) * 131
    k = np.arange(num_codebooks)[:, None]
    return ((frame[None, :] * (k + 3) + speaker * 977 + k * 53) % 2048).astype(np.uint16)


def write_synthetic_corpus(
    out_dir: str | Path, num_conversations: int = 32, num_codebooks: int = 32, seed: int = 0, samples_per_shard: int = 8
) -> dict:
    """Two-speaker conversations of 3–6 turns drawn from `LINES`; returns the dataset card."""
    rng = np.random.default_rng(seed)
    writer = ShardWriter(out_dir, num_codebooks=num_codebooks, samples_per_shard=samples_per_shard)
    for c in range(num_conversations):
        speakers = rng.permutation(2)
        turns = rng.choice(len(LINES), size=int(rng.integers(3, 7)), replace=False)
        codes, segments, start = [], [], 0
        for i, line_index in enumerate(turns):
            speaker, text = int(speakers[i % 2]), LINES[line_index]
            turn_codes = character_codes(text, speaker, num_codebooks)
            n = turn_codes.shape[1]
            segments.append(
                {
                    "speaker": speaker,
                    "text": text,
                    "start": start / MIMI_FRAME_RATE,
                    "end": (start + n) / MIMI_FRAME_RATE,
                    "frame_start": start,
                    "frame_end": start + n,
                }
            )
            codes.append(turn_codes)
            start += n
        writer.write(
            Window(
                key=sample_key(f"demo/conversation_{c:04d}", 0),
                codes=np.concatenate(codes, axis=1),
                segments=segments,
                meta={"source": f"synthetic:{c}", "duration": start / MIMI_FRAME_RATE, "language": "en"},
            )
        )
    return writer.close()
