"""The pronunciation suites' scoring on synthetic "judge says" inputs: right and wrong pronunciations,
inside whole recognized sentences, are told apart; ties are undecided and count as wrong."""

import pytest

from eval.pronunciation import (
    CONSISTENCY_WORDS,
    HOMOGRAPHS,
    accuracy,
    judge,
    match_distance,
    parse_phonemes,
)


def test_parse_phonemes_drops_stress_marks():
    assert parse_phonemes("ð ə  l ˈɛ d p ˌaɪ p") == ["ð", "ə", "l", "ɛ", "d", "p", "aɪ", "p"]


def test_match_distance_finds_the_best_stretch():
    heard = parse_phonemes("ð ə l ɛ d p aɪ p s")
    assert match_distance(("l", "ɛ", "d"), heard) == 0
    assert match_distance(("l", "iː", "d"), heard) == 1  # one substitution
    assert match_distance(("x", "y"), []) == 2


@pytest.mark.parametrize("word", sorted(HOMOGRAPHS) + sorted(CONSISTENCY_WORDS))
def test_each_pronunciation_is_judged_as_itself_inside_a_sentence(word):
    variants = {**HOMOGRAPHS, **CONSISTENCY_WORDS}[word]
    for name, phonemes in variants.items():
        sentence = ["ð", "ə", *phonemes, "w", "ʌ", "z", "h", "ɪɹ"]  # "the <word> was here"
        assert judge(sentence, variants) == name


def test_homograph_accuracy_counts_wrong_and_undecided_samples():
    variants = HOMOGRAPHS["lead"]
    heard = [["l", "ɛ", "d"], ["l", "iː", "d"], ["l", "ɛ", "d"], ["s", "ʌ", "m"]]  # the last: word not spoken
    judged = [judge(h, variants) for h in heard]
    assert judged[:3] == ["metal", "guide", "metal"] and judged[3] is None
    result = accuracy(["metal", "metal", "metal", "metal"], judged)
    assert result.value == pytest.approx(0.5) and result.n == 4


def test_consistency_is_judged_against_the_contexts_pronunciation():
    variants = CONSISTENCY_WORDS["either"]
    context_says, continuation = "eye", parse_phonemes("aɪ ð ɚ w eɪ")
    assert judge(continuation, variants) == context_says
    assert judge(parse_phonemes("iː ð ɚ w eɪ"), variants) != context_says


def test_r_coloured_vowels_match_whether_written_as_one_symbol_or_split():
    # espeak-ng (and so the judge) writes "tear" before a vowel as "t ɪ ɹ": still the crying tear, not a tie
    assert judge(parse_phonemes("ə t ˈɪ ɹ ɪ n"), HOMOGRAPHS["tear"]) == "cry"
    assert judge(parse_phonemes("ə t ˈɛ ɹ ɪ n"), HOMOGRAPHS["tear"]) == "rip"
    assert judge(parse_phonemes("k ˈɑːɹ m əl"), CONSISTENCY_WORDS["caramel"]) == "two"
