"""Conversations → frames, the way Sesame's generator lays out its context.

Each segment (one speaker turn) becomes

    text frames   BOS  "[{speaker}]{text}" tokens  EOS     (column K set)
    audio frames  one per Mimi frame (80 ms)               (columns 0..K-1 set)
    end of audio  one all-zero audio frame                  (columns 0..K-1 set, all codes 0)

and a conversation is its segments in order. This is also what transformers' CsmProcessor builds from
`<|begin_of_text|>[{speaker}]{text}<|end_of_text|><|AUDIO|><|audio_eos|>`. Every audio frame and every
end-of-audio frame is a training target unless its segment is marked as context only.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from csm_train.tokenizer import TextTokenizer

IGNORE_INDEX = -100  # a label that is not a target (transformers' and PyTorch's cross-entropy convention)


@dataclass
class Segment:
    speaker: int
    text: str
    codes: torch.Tensor | None = None  # [K, n_frames] Mimi codes; None: text only (the turn to generate)
    train: bool = True  # False: the segment's audio is context, not a target


@dataclass
class Frames:
    tokens: torch.Tensor  # [T, K+1] long: columns 0..K-1 codebooks, column K text
    tokens_mask: torch.Tensor  # [T, K+1] bool: which columns are set
    labels: torch.Tensor  # [T, K] long: the frame's codes where it is a target, else -100

    def __len__(self) -> int:
        return self.tokens.shape[0]


def segment_text_tokens(tokenizer: TextTokenizer, speaker: int, text: str) -> list[int]:
    return [tokenizer.bos_id, *tokenizer.encode(f"[{speaker}]{text}"), tokenizer.eos_id]


def segment_frames(segment: Segment, tokenizer: TextTokenizer, num_codebooks: int) -> Frames:
    K = num_codebooks
    text = torch.tensor(segment_text_tokens(tokenizer, segment.speaker, segment.text), dtype=torch.long)
    n_text = text.numel()
    if segment.codes is None:
        n_audio = 0
    else:
        if segment.codes.ndim != 2 or segment.codes.shape[0] != K:
            raise ValueError(
                f"segment of speaker {segment.speaker} ({segment.text[:40]!r}): codes have shape "
                f"{tuple(segment.codes.shape)}, expected [{K}, n_frames] (Mimi codebooks first)"
            )
        n_audio = segment.codes.shape[1] + 1  # + the all-zero end-of-audio frame

    T = n_text + n_audio
    tokens = torch.zeros(T, K + 1, dtype=torch.long)
    tokens_mask = torch.zeros(T, K + 1, dtype=torch.bool)
    labels = torch.full((T, K), IGNORE_INDEX, dtype=torch.long)
    tokens[:n_text, K] = text
    tokens_mask[:n_text, K] = True
    if n_audio:
        tokens[n_text : T - 1, :K] = segment.codes.T.long()  # the last frame stays all zero: end of audio
        tokens_mask[n_text:, :K] = True
        if segment.train:
            labels[n_text:] = tokens[n_text:, :K]
    return Frames(tokens, tokens_mask, labels)


def conversation_frames(segments: Sequence[Segment], tokenizer: TextTokenizer, num_codebooks: int) -> Frames:
    if not segments:
        raise ValueError("a conversation needs at least one segment")
    return concat_frames([segment_frames(s, tokenizer, num_codebooks) for s in segments])


def concat_frames(parts: Sequence[Frames]) -> Frames:
    return Frames(
        tokens=torch.cat([p.tokens for p in parts]),
        tokens_mask=torch.cat([p.tokens_mask for p in parts]),
        labels=torch.cat([p.labels for p in parts]),
    )


def collate(batch: Sequence[Frames], length: int | None = None) -> Frames:
    """Right-pad to `length` (default: the longest) into `[B, T, ...]`. Padding frames have no columns
    set and no targets; causal attention keeps real frames from seeing them."""
    length = length or max(len(f) for f in batch)
    too_long = [len(f) for f in batch if len(f) > length]
    if too_long:
        raise ValueError(f"conversations of {too_long} frames do not fit length={length}")
    K1 = batch[0].tokens.shape[1]
    out = Frames(
        tokens=torch.zeros(len(batch), length, K1, dtype=torch.long),
        tokens_mask=torch.zeros(len(batch), length, K1, dtype=torch.bool),
        labels=torch.full((len(batch), length, K1 - 1), IGNORE_INDEX, dtype=torch.long),
    )
    for i, f in enumerate(batch):
        out.tokens[i, : len(f)] = f.tokens
        out.tokens_mask[i, : len(f)] = f.tokens_mask
        out.labels[i, : len(f)] = f.labels
    return out
