"""Pipeline stage 5: words → speaker turns → windows that fit a training sequence."""

import pytest

from data_pipeline.turns import (
    SpeakerSpan,
    Turn,
    Word,
    assign_speakers,
    merge_turns,
    split_windows,
    turn_positions,
)


def words(text: str, start: float, step: float = 0.4) -> list[Word]:
    return [Word(w, start + i * step, start + i * step + step * 0.8) for i, w in enumerate(text.split())]


def test_words_go_to_the_most_overlapping_speaker_and_gaps_to_the_nearest():
    spans = [SpeakerSpan("SPK_B", 0.0, 1.0), SpeakerSpan("SPK_A", 1.0, 3.0), SpeakerSpan("SPK_B", 5.0, 6.0)]
    ws = [Word("hi", 0.1, 0.5), Word("there", 0.8, 1.5), Word("lost", 3.5, 3.8), Word("late", 4.6, 4.9)]
    assert [s for _, s in assign_speakers(ws, spans)] == ["SPK_B", "SPK_A", "SPK_A", "SPK_B"]
    with pytest.raises(ValueError, match="no diarization spans"):
        assign_speakers(ws, [])


def test_turns_merge_same_speaker_words_and_renumber_speakers_by_appearance():
    labelled = [(w, "zed") for w in words("hello how are you", 0.0)]
    labelled += [(w, "amy") for w in words("fine thanks", 2.0)]
    labelled += [(w, "zed") for w in words("great", 3.0)]
    labelled += [(w, "zed") for w in words("after a long pause", 8.0)]  # > max_gap: a new turn
    turns = merge_turns(labelled, max_gap=1.5)
    assert [(t.speaker, t.text) for t in turns] == [
        (0, "hello how are you"),
        (1, "fine thanks"),
        (0, "great"),
        (0, "after a long pause"),
    ]


def test_windows_fit_and_keep_turns_whole():
    turns = [Turn(i % 2, words(" ".join(["word"] * 20), start=i * 10.0)) for i in range(30)]
    size = turn_positions(turns[0])  # 8 s of audio: 100 frames + text + end frame
    windows = split_windows(turns, max_positions=512)
    assert all(sum(turn_positions(t) for t in w) <= 512 for w in windows)
    assert [t for w in windows for t in w] == turns  # every turn once, in order, none cut
    assert len(windows) == -(-30 // (512 // size))


def test_a_turn_longer_than_a_window_is_cut_at_word_boundaries():
    monologue = Turn(0, words(" ".join(f"w{i}" for i in range(600)), start=0.0))  # 240 s
    windows = split_windows([monologue], max_positions=2048)
    pieces = [t for w in windows for t in w]
    assert len(pieces) > 1 and all(turn_positions(t) <= 2048 for t in pieces)
    assert [w.text for t in pieces for w in t.words] == [w.text for w in monologue.words]
