"""Conversation → frames in Sesame's layout (transformers' processor is checked in test_convert.py)."""

import pytest
import torch

from csm_train import Segment, collate, conversation_frames
from csm_train.layout import segment_text_tokens

K = 32


def _codes(n, seed):
    return torch.randint(1, 2048, (K, n), generator=torch.Generator().manual_seed(seed))


def test_segment_layout_follows_sesame(text_tokenizer):
    codes = _codes(5, 0)
    frames = conversation_frames([Segment(1, "Hello there.", codes)], text_tokenizer, K)
    text = segment_text_tokens(text_tokenizer, 1, "Hello there.")
    assert text[0] == text_tokenizer.bos_id and text[-1] == text_tokenizer.eos_id
    assert text[1:-1] == text_tokenizer.encode("[1]Hello there.")
    n_text = len(text)
    assert len(frames) == n_text + 5 + 1
    # Text frames: only column K set.
    assert torch.equal(frames.tokens[:n_text, K], torch.tensor(text))
    assert frames.tokens_mask[:n_text, K].all() and not frames.tokens_mask[:n_text, :K].any()
    # Audio frames: columns 0..K-1 set to the codes, then one all-zero end-of-audio frame.
    assert torch.equal(frames.tokens[n_text : n_text + 5, :K], codes.T)
    assert (frames.tokens[-1] == 0).all() and frames.tokens_mask[n_text:, :K].all()
    assert not frames.tokens_mask[n_text:, K].any()
    # Targets: every audio frame and the end frame; text is never a target.
    assert (frames.labels[:n_text] == -100).all()
    assert torch.equal(frames.labels[n_text:], frames.tokens[n_text:, :K])


def test_conversation_concatenates_turns_and_marks_context(text_tokenizer):
    segments = [Segment(0, "Hi.", _codes(3, 1), train=False), Segment(1, "Hello!", _codes(4, 2)), Segment(0, "Say it.")]
    frames = conversation_frames(segments, text_tokenizer, K)
    lengths = [len(segment_text_tokens(text_tokenizer, s.speaker, s.text)) for s in segments]
    assert len(frames) == lengths[0] + 4 + lengths[1] + 5 + lengths[2]
    first = lengths[0] + 4
    assert (frames.labels[:first] == -100).all()  # context audio: conditioned on, not trained on
    assert (frames.labels[first + lengths[1] :][:5] != -100).all()
    assert not frames.tokens_mask[-lengths[2] :, :K].any()  # text-only final turn (to be generated)


def test_bad_codes_name_the_segment(text_tokenizer):
    with pytest.raises(ValueError, match=r"speaker 3 \('Bad shape'\).*\[32, n_frames\]"):
        conversation_frames([Segment(3, "Bad shape", torch.zeros(5, K, dtype=torch.long))], text_tokenizer, K)
    with pytest.raises(ValueError, match="at least one segment"):
        conversation_frames([], text_tokenizer, K)


def test_collate_pads_without_targets(text_tokenizer):
    a = conversation_frames([Segment(0, "One.", _codes(2, 3))], text_tokenizer, K)
    b = conversation_frames([Segment(1, "A longer turn here.", _codes(6, 4))], text_tokenizer, K)
    batch = collate([a, b])
    assert batch.tokens.shape == (2, len(b), K + 1) and batch.labels.shape == (2, len(b), K)
    assert not batch.tokens_mask[0, len(a) :].any() and (batch.labels[0, len(a) :] == -100).all()
    assert torch.equal(batch.tokens[1], b.tokens)
    with pytest.raises(ValueError, match="do not fit length=4"):
        collate([a, b], length=4)
