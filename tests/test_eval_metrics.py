"""The evaluation's measurements on inputs whose answer is known: real Whisper tiny.en (shipped) on
espeak-ng speech, resemblyzer on same- and different-voice pairs, bootstrap intervals on known data."""

import numpy as np
import pytest

from data_pipeline.asr import normalize_text
from data_pipeline.demo_corpus import speak
from eval.metrics import SpeakerSimilarity, WhisperJudge, bootstrap, word_error_rates

SENTENCES = [
    "We can take the train instead of driving.",
    "The meeting went better than I expected.",
    "Do you want to go for a walk after lunch?",
]


def test_normalize_text_is_whispers_english_normaliser():
    assert normalize_text("Hello, Mr. Smith! I've got twenty-one apples.") == "hello mister smith i have got 21 apples"


def test_word_error_rates_corpus_and_per_utterance():
    result = word_error_rates(["the cat sat", "a b c d"], ["The cat sat.", "a x c"])
    assert result["values"] == [0.0, 0.5]  # one substitution and one deletion of four words
    assert result["corpus"] == pytest.approx(2 / 7)
    assert result["per_utterance"].value == pytest.approx(0.25)


def test_bootstrap_interval_holds_the_mean_and_narrows_with_more_samples():
    rng = np.random.default_rng(0)
    small, large = bootstrap(rng.normal(1.0, 1.0, 20)), bootstrap(rng.normal(1.0, 1.0, 2000))
    for estimate in (small, large):
        assert estimate.low < estimate.value < estimate.high
    assert large.high - large.low < (small.high - small.low) / 5
    assert large.low < 1.0 < large.high


@pytest.mark.slow
def test_whisper_wer_is_low_on_clean_speech_and_rises_when_corrupted():
    judge = WhisperJudge()
    clean = [speak(text, "en+edward", 155) for text in SENTENCES]
    rng = np.random.default_rng(0)
    noisy = [a + rng.normal(0, 3 * a.std(), len(a)).astype(np.float32) for a in clean]  # SNR about -10 dB
    clean_wer = word_error_rates(SENTENCES, [judge.transcribe(a) for a in clean])["corpus"]
    noisy_wer = word_error_rates(SENTENCES, [judge.transcribe(a) for a in noisy])["corpus"]
    assert clean_wer < 0.1 and noisy_wer > clean_wer + 0.3, (clean_wer, noisy_wer)


@pytest.mark.slow
def test_speaker_similarity_ranks_same_voice_pairs_above_different_voices():
    similarity = SpeakerSimilarity()
    voices = ["en+edward", "en-us+f3", "en+Hugo"]
    first = [speak(SENTENCES[0], v, 155) for v in voices]
    second = [speak(SENTENCES[1], v, 155) for v in voices]
    same = similarity(first, second)
    different = similarity(first, second[1:] + second[:1])
    assert same.min() > different.max(), (same, different)
