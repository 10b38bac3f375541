"""The prompt of one request: its context turns fitted into the backbone's context with room for the answer.

Turns are laid out as Sesame's generator does (`csm_train.layout`) in this order: the voice's reference turn,
the conversation's earlier turns (oldest first), the request's own `context` turns, then the text to speak.
What does not fit in `limit - max_frames` positions goes in this order: the oldest conversation turns (as
CSM-Multi prunes a long conversation), then the oldest request context turns, then the voice's clip is cut short
(between words: at ASR word times when the profile has them, else at the share of characters matching the share
of audio kept), and last the voice itself. A text that does not fit even alone is refused.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from csm_train.layout import Segment, segment_text_tokens
from data_pipeline.shards import MIMI_FRAME_RATE
from serve.voices import Voice

MIN_VOICE_FRAMES = round(1.0 * MIMI_FRAME_RATE)  # a voice cut below a second no longer says who speaks


@dataclass
class Prompt:
    segments: list[Segment]  # the context turns, then the turn to speak (text only)
    frames: int  # prompt length in backbone positions
    context_turns: int  # how many context turns it kept
    pruned_turns: int  # conversation / context turns left out
    voice_frames: int  # frames of the voice's clip kept (0: none)
    voice_positions: int  # the voice's turn (text and clip) at the prompt's start, in positions (0: none)


class DoesNotFit(ValueError):
    pass


def segment_length(tokenizer, segment: Segment) -> int:
    audio = 0 if segment.codes is None else segment.codes.shape[1] + 1  # + the end-of-audio frame
    return len(segment_text_tokens(tokenizer, segment.speaker, segment.text)) + audio


def fit(
    tokenizer,
    text: str,
    speaker: int,
    voice: Voice | None,
    history: list[Segment],
    context: list[Segment],
    limit: int,
    max_frames: int,
) -> Prompt:
    answer = Segment(speaker, text)
    room = limit - max_frames - segment_length(tokenizer, answer)
    if room < 0:
        raise DoesNotFit(
            f"the input and an answer of up to {max_frames} frames need {limit - room} positions, the model's "
            f"context holds {limit}: shorten the input or max_audio_length_ms"
        )
    history, context, pruned = list(history), list(context), 0
    used = sum(segment_length(tokenizer, s) for s in [*history, *context])
    whole_voice = 0 if voice is None else segment_length(tokenizer, voice_segment(tokenizer, voice, speaker, None))
    while used + whole_voice > room and (history or context):  # turns go before the voice is cut
        dropped = (history or context).pop(0)
        used -= segment_length(tokenizer, dropped)
        pruned += 1
    voice_turn = None if voice is None else voice_segment(tokenizer, voice, speaker, room - used)
    segments = [*([voice_turn] if voice_turn else []), *history, *context]
    lengths = [segment_length(tokenizer, s) for s in [*segments, answer]]
    return Prompt(
        [*segments, answer],
        sum(lengths),
        len(segments),
        pruned,
        0 if voice_turn is None else voice_turn.codes.shape[1],
        0 if voice_turn is None else lengths[0],
    )


def voice_segment(tokenizer, voice: Voice, speaker: int, room: int | None) -> Segment | None:
    """The voice's clip as a context turn of `speaker` in at most `room` positions (None: any): whole, cut
    short, or None."""
    codes = torch.as_tensor(voice.codes.astype("int64"))
    whole = Segment(speaker, voice.transcript, codes, train=False)
    if room is None or segment_length(tokenizer, whole) <= room:
        return whole
    keep = room - len(segment_text_tokens(tokenizer, speaker, voice.transcript)) - 1  # the text only gets shorter
    if keep < MIN_VOICE_FRAMES:
        return None
    seconds = keep / MIMI_FRAME_RATE
    if voice.words:
        text = " ".join(word for word, _, end in voice.words if end <= seconds)
    else:
        words = voice.transcript.split()
        share = keep / codes.shape[1]
        text = " ".join(words[: math.floor(len(words) * share)])
    return Segment(speaker, text, codes[:, :keep], train=False) if text else None
