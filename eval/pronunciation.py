"""Scoring for Sesame's two pronunciation suites, judged by a phoneme recognizer (Sesame used
facebook/wav2vec2-lv-60-espeak-cv-ft, whose output is espeak-ng IPA, space-separated, without stress marks):

* homograph disambiguation: the sentence's context decides which pronunciation of lead, bass, tear, wound
  or row is right;
* pronunciation continuation consistency: the context says aunt, data, envelope, ... one way, and the
  continuation must keep that way.

Either way a sample is judged by locating each candidate pronunciation in the recognized phonemes (the
best-matching stretch, by edit distance) and taking the closer one; a tie is undecided and counts as wrong.
Phonemes below are espeak-ng's (`espeak-ng -q --ipa --sep=' '`, stress removed), the judge's alphabet.
"""

from __future__ import annotations

from eval.metrics import Estimate, bootstrap

Phonemes = tuple[str, ...]

HOMOGRAPHS: dict[str, dict[str, Phonemes]] = {
    "lead": {"guide": ("l", "iː", "d"), "metal": ("l", "ɛ", "d")},
    "bass": {"music": ("b", "eɪ", "s"), "fish": ("b", "æ", "s")},
    "tear": {"cry": ("t", "ɪɹ"), "rip": ("t", "ɛɹ")},
    "wound": {"injury": ("w", "uː", "n", "d"), "wind": ("w", "aʊ", "n", "d")},
    "row": {"line": ("ɹ", "oʊ"), "quarrel": ("ɹ", "aʊ")},
}

CONSISTENCY_WORDS: dict[str, dict[str, Phonemes]] = {
    "aunt": {"ant": ("æ", "n", "t"), "ahnt": ("ɑː", "n", "t")},
    "data": {"day": ("d", "eɪ", "ɾ", "ə"), "dat": ("d", "æ", "ɾ", "ə")},
    "envelope": {"en": ("ɛ", "n", "v", "ə", "l", "oʊ", "p"), "on": ("ɑː", "n", "v", "ə", "l", "oʊ", "p")},
    "mobile": {"bul": ("m", "oʊ", "b", "əl"), "bile": ("m", "oʊ", "b", "aɪ", "l")},
    "route": {"root": ("ɹ", "uː", "t"), "rout": ("ɹ", "aʊ", "t")},
    "vase": {"vayce": ("v", "eɪ", "s"), "vahz": ("v", "ɑː", "z")},
    "either": {"ee": ("iː", "ð", "ɚ"), "eye": ("aɪ", "ð", "ɚ")},
    "adult": {"uh": ("ɐ", "d", "ʌ", "l", "t"), "ad": ("æ", "d", "ʌ", "l", "t")},
    "often": {"offen": ("ɔ", "f", "ə", "n"), "offten": ("ɔ", "f", "t", "ə", "n")},
    "caramel": {"three": ("k", "æ", "ɹ", "ə", "m", "əl"), "two": ("k", "ɑːɹ", "m", "əl")},
}


# espeak-ng writes an r-coloured vowel as one symbol ("t ɪɹ") but splits it before a vowel ("t ɪ ɹ ɪ n" for
# "tear in"); the judge, trained on espeak transcriptions, may output either. Both sides are compared split.
RHOTIC_VOWELS = ("ɪɹ", "ɛɹ", "ʊɹ", "ɑːɹ", "ɔːɹ", "oːɹ")


def split_rhotic(phonemes) -> list[str]:
    out = []
    for p in phonemes:
        out += [p[:-1], "ɹ"] if p in RHOTIC_VOWELS else [p]
    return out


def parse_phonemes(text: str) -> list[str]:
    """The recognizer's output ("l ˈɛ d ...") → phonemes without stress marks, r-coloured vowels split."""
    return split_rhotic(p for p in (token.strip("ˈˌ") for token in text.split()) if p)


def match_distance(target: Phonemes, phonemes: list[str]) -> int:
    """Edit distance between `target` and its best-matching stretch of `phonemes` (what comes before and after
    that stretch is free): semi-global alignment."""
    previous = [0] * (len(phonemes) + 1)  # matching may start anywhere
    for i, symbol in enumerate(target, 1):
        current = [i] + [0] * len(phonemes)
        for j, heard in enumerate(phonemes, 1):
            current[j] = min(previous[j - 1] + (symbol != heard), previous[j] + 1, current[j - 1] + 1)
        previous = current
    return min(previous)  # and may end anywhere


def judge(phonemes: list[str], variants: dict[str, Phonemes]) -> str | None:
    """The variant whose pronunciation the recognized `phonemes` contain most closely; None on a tie."""
    distances = {name: match_distance(split_rhotic(p), split_rhotic(phonemes)) for name, p in variants.items()}
    best = min(distances.values())
    winners = [name for name, d in distances.items() if d == best]
    return winners[0] if len(winners) == 1 else None


def accuracy(expected: list[str], judged: list[str | None]) -> Estimate:
    """Share of samples judged as the expected variant (undecided = wrong), with its bootstrap interval."""
    return bootstrap([float(e == j) for e, j in zip(expected, judged, strict=True)])
