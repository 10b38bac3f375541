"""Stage 5: ASR words + diarization spans → speaker turns → conversation windows that fit a training
sequence.

A window's size is counted the way the trainer lays it out (csm_train/layout.py): per turn, its text
frames (BOS, "[speaker]text", EOS) + one frame per 80 ms of audio + the end-of-audio frame. Text is only
tokenized at training time, so the pipeline sizes it with `estimate_text_frames` (one token per 3 bytes,
generous for Llama-3.2's BPE, which averages about 4 on English); the trainer cuts at a turn boundary
(and counts it) in the rare case a window still overflows.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

from data_pipeline.shards import MIMI_FRAME_RATE


@dataclass
class Word:
    text: str
    start: float
    end: float
    probability: float = 1.0
    overlap: float = 0.0  # seconds of the word during which another speaker talks (assign_speakers sets it)


@dataclass
class SpeakerSpan:
    """A diarization segment: who speaks from `start` to `end` (seconds). A `background` span is a speaker
    heard under another's span (overlapped speech): it makes the other's words overlapped, never gets words."""

    speaker: str
    start: float
    end: float
    background: bool = False


@dataclass
class Turn:
    speaker: int | str
    words: list[Word] = field(default_factory=list)

    @property
    def start(self) -> float:
        return self.words[0].start

    @property
    def end(self) -> float:
        return self.words[-1].end

    @property
    def text(self) -> str:
        return " ".join(w.text.strip() for w in self.words)

    @property
    def overlap(self) -> float:
        """Seconds of the turn's words during which another speaker talks (overlapped speech)."""
        return round(sum(w.overlap for w in self.words), 3)

    @property
    def overlap_fraction(self) -> float:
        """`overlap` over the seconds of the turn's words."""
        spoken = sum(w.end - w.start for w in self.words)
        return self.overlap / spoken if spoken > 0 else 0.0


def estimate_text_frames(turn: Turn) -> int:
    """BOS + EOS + "[N]" + ~1 token per 3 bytes of text (Llama-3.2's BPE averages ~4 on English)."""
    return 2 + 3 + math.ceil(len(turn.text.encode()) / 3)


def audio_frames(turn: Turn) -> int:
    return math.ceil((turn.end - turn.start) * MIMI_FRAME_RATE)


def turn_positions(turn: Turn, text_frames: Callable[[Turn], int] = estimate_text_frames) -> int:
    """Training positions a turn occupies: text, audio, and the end-of-audio frame."""
    return text_frames(turn) + audio_frames(turn) + 1


def assign_speakers(words: list[Word], spans: list[SpeakerSpan]) -> list[tuple[Word, str]]:
    """Each word goes to the speaker whose (non-background) spans overlap it most; a word in no span
    (diarization gaps) to the speaker of the nearest span. Each word's `overlap` is set to the seconds of it
    during which any span of another speaker (background or not) runs: overlapped speech."""
    main = [span for span in spans if not span.background]
    if not main:
        raise ValueError("no diarization spans: cannot assign words to speakers")
    labelled = []
    for word in words:
        shares: dict[str, float] = {}
        for span in main:
            shared = min(word.end, span.end) - max(word.start, span.start)
            if shared > 0:
                shares[span.speaker] = shares.get(span.speaker, 0.0) + shared
        if shares:
            speaker = max(shares, key=lambda s: (shares[s], s))
        else:
            middle = (word.start + word.end) / 2
            speaker = min(main, key=lambda s: (max(s.start - middle, middle - s.end), s.speaker)).speaker
        others = [(s.start, s.end) for s in spans if s.speaker != speaker]
        word.overlap = round(covered(others, word.start, word.end), 3)
        labelled.append((word, speaker))
    return labelled


def covered(intervals: list[tuple[float, float]], start: float, end: float) -> float:
    """Seconds of [start, end] inside the union of `intervals`."""
    total, reach = 0.0, start
    for a, b in sorted((max(a, start), min(b, end)) for a, b in intervals if b > start and a < end):
        if b > reach:
            total += b - max(a, reach)
            reach = b
    return total


def merge_turns(labelled: list[tuple[Word, str]], max_gap: float = 1.5) -> list[Turn]:
    """Consecutive words of one speaker form a turn; a pause longer than `max_gap` seconds starts a new one.
    Speakers are renumbered 0, 1, ... in order of first appearance (ids are local to a recording)."""
    numbers: dict[str, int] = {}
    turns: list[Turn] = []
    for word, speaker in labelled:
        number = numbers.setdefault(speaker, len(numbers))
        if turns and turns[-1].speaker == number and word.start - turns[-1].end <= max_gap:
            turns[-1].words.append(word)
        else:
            turns.append(Turn(number, [word]))
    return turns


def split_long_turn(turn: Turn, max_positions: int, text_frames: Callable[[Turn], int]) -> list[Turn]:
    """A turn too long for one window is cut at word boundaries, as late as possible each time."""
    pieces, current = [], Turn(turn.speaker)
    for word in turn.words:
        candidate = Turn(turn.speaker, [*current.words, word])
        if current.words and turn_positions(candidate, text_frames) > max_positions:
            pieces.append(current)
            current = Turn(turn.speaker, [word])
        else:
            current = candidate
    pieces.append(current)
    return pieces


def split_windows(
    turns: list[Turn], max_positions: int = 2048, text_frames: Callable[[Turn], int] = estimate_text_frames
) -> list[list[Turn]]:
    """Group consecutive turns into windows of at most `max_positions` training positions, never cutting a
    turn that fits in a window by itself."""
    windows: list[list[Turn]] = [[]]
    used = 0
    for whole in turns:
        for turn in split_long_turn(whole, max_positions, text_frames):
            size = turn_positions(turn, text_frames)
            if used + size > max_positions and windows[-1]:
                windows.append([])
                used = 0
            windows[-1].append(turn)
            used += size
    return [w for w in windows if w]
