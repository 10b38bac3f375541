"""Pipeline stage 6: every rejected turn is counted under the reason that rejected it."""

import numpy as np

from data_pipeline.quality import QualityFilter
from data_pipeline.turns import Turn, Word


def turn(text: str, start: float, end: float, probability: float = 0.9) -> Turn:
    ws = text.split()
    step = (end - start) / len(ws)
    return Turn(0, [Word(w, start + i * step, start + (i + 1) * step, probability) for i, w in enumerate(ws)])


def test_each_rejection_has_its_reason():
    turns = {
        "keep": turn("we should go to the library this weekend", 0.0, 2.5),
        "too_short": turn("hi", 0.0, 0.2),
        "too_long": turn(" ".join(["word"] * 150), 0.0, 45.0),
        "too_few_chars_per_second": turn("so", 0.0, 3.0),
        "too_many_chars_per_second": turn("antidisestablishmentarianism internationalization", 0.0, 1.0),
        "low_asr_confidence": turn("we should go to the library", 0.0, 2.0, probability=0.2),
    }
    kept, rejected = QualityFilter().apply(list(turns.values()))
    assert kept == [turns["keep"]]
    assert rejected == {reason: 1 for reason in turns if reason != "keep"}


def test_mos_scorer_rejects_below_threshold_only_when_configured():
    sentence = turn("we should go to the library this weekend", 0.0, 2.5)
    scores = {"noisy": 1.8, "clean": 3.9}
    audio = {"noisy": np.zeros(10), "clean": np.ones(10)}
    scorer = QualityFilter(min_mos=3.0, mos=lambda a: scores["clean"] if a.any() else scores["noisy"])
    assert scorer.reason(sentence, audio["noisy"]) == "low_mos"
    assert scorer.reason(sentence, audio["clean"]) is None
    assert QualityFilter().reason(sentence, audio["noisy"]) is None  # no scorer: no MOS filter
