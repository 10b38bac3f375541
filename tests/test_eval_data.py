"""The evaluation suites' sentence data (eval/data/): sizes and balance, ids, the word once per sentence as a bare
whole word; and, with the real espeak-ng, that every forced pronunciation in espeak_variants.json comes out as its
variant's phonemes, and that every sentence read with its expected pronunciation is judged as that pronunciation
(no other word in it matches a pronunciation of the suite's word)."""

import re
import subprocess
from collections import Counter

import pytest

from data_pipeline.demo_corpus import VOICES
from eval.pronunciation import CONSISTENCY_WORDS, HOMOGRAPHS, judge, match_distance, parse_phonemes, split_rhotic
from eval.suite_data import espeak_variants, load_suite_data

WORDS = {**HOMOGRAPHS, **CONSISTENCY_WORDS}
MARK = "quiz."  # a one-word clause read after each text: its line in espeak-ng's output splits the texts apart
MARK_PHONEMES = ["k", "w", "ɪ", "z"]  # the same in en-us and British voices


def phonemize(texts: list[str], voice: str, jobs: int = 2) -> list[list[str]]:
    """espeak-ng's phonemes (stress removed) of each text, with a few espeak-ng processes reading many lines each.
    espeak-ng writes one line per clause; the marker clause after each text tells where a text ends. `-s 449`:
    the rate changes only the (discarded) audio, and synthesis is what takes the time; above 450 it is slower."""
    chunks = [texts[i::jobs] for i in range(jobs)]
    procs = [
        subprocess.Popen(
            ["espeak-ng", "-q", "--ipa", "--sep= ", "-s", "449", "-v", voice],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        for _ in chunks
    ]
    results: list = [None] * len(texts)
    for j, (proc, chunk) in enumerate(zip(procs, chunks, strict=True)):
        out, _ = proc.communicate("".join(f"{t}\n{MARK}\n" for t in chunk))
        assert proc.returncode == 0
        items, current = [], []
        for line in out.splitlines():
            phonemes = parse_phonemes(line)
            if phonemes == MARK_PHONEMES:
                items.append(current)
                current = []
            else:
                current += phonemes
        assert len(items) == len(chunk) and not current
        results[j::jobs] = items
    return results


def occurrences(word: str, text: str) -> int:
    return len(re.findall(rf"\b{word}\b", text, flags=re.IGNORECASE))


def force(text: str, word: str, spelling: str) -> str:
    """`text` with `word` replaced by its phoneme-mnemonic spelling, as the consistency suite speaks a context."""
    return re.sub(rf"\b{word}\b", spelling, text, count=1, flags=re.IGNORECASE)


def test_homographs_are_five_words_by_two_pronunciations_by_twenty():
    rows = load_suite_data("homographs")
    assert len(rows) == 200
    expected = {(w, v): 20 for w, variants in HOMOGRAPHS.items() for v in variants}
    assert Counter((r["word"], r["variant"]) for r in rows) == expected


def test_consistency_is_ten_words_by_two_pronunciations_by_ten():
    rows = load_suite_data("consistency")
    assert len(rows) == 200
    expected = {(w, v): 10 for w, variants in CONSISTENCY_WORDS.items() for v in variants}
    assert Counter((r["word"], r["variant"]) for r in rows) == expected
    assert all(r["context"] != r["text"] for r in rows)


@pytest.mark.parametrize("name", ["homographs", "consistency", "wer", "prompts"])
def test_ids_are_unique_and_sorted(name):
    ids = [r["id"] for r in load_suite_data(name)]
    assert len(set(ids)) == len(ids) and ids == sorted(ids)


def test_ids_name_the_word_and_variant():
    for r in load_suite_data("homographs") + load_suite_data("consistency"):
        assert re.fullmatch(rf"{r['word']}-{r['variant']}-\d\d", r["id"])


def test_unknown_suite_names_the_available_ones():
    with pytest.raises(FileNotFoundError, match="homographs"):
        load_suite_data("nonexistent")


def test_the_word_is_in_every_sentence_once_and_bare():
    sentences = [(r["word"], r["text"]) for r in load_suite_data("homographs")]
    sentences += [(r["word"], r[f]) for r in load_suite_data("consistency") for f in ("context", "text")]
    assert len(set(sentences)) == 600  # no sentence twice
    for word, text in sentences:
        assert occurrences(word, text) == 1, text
        assert not re.search(rf"\b{word}\w", text, flags=re.IGNORECASE), text  # no "leads", "rows", "adulthood"
        assert 6 <= len(text.split()) <= 18, text
    for word, text in sentences[:200]:
        others = [w for w in HOMOGRAPHS if w != word and re.search(rf"\b{w}", text, flags=re.IGNORECASE)]
        assert not others, text


def test_wer_sentences_and_prompts():
    rows = load_suite_data("wer")
    assert len(rows) == 100 and len({r["text"] for r in rows}) == 100
    for r in rows:
        assert 5 <= len(r["text"].split()) <= 20, r["text"]
        assert not [w for w in WORDS if re.search(rf"\b{w}", r["text"], flags=re.IGNORECASE)], r["text"]
    prompts = load_suite_data("prompts")
    assert len(prompts) == 4 and len({p["voice"] for p in prompts}) == 4
    assert all(p["voice"] in VOICES and 10 <= len(p["text"].split()) <= 16 for p in prompts)


def test_espeak_variants_spell_every_pronunciation():
    spellings = espeak_variants()
    assert spellings["voice"].startswith("en-us")
    assert {w: set(v) for w, v in spellings["words"].items()} == {w: set(v) for w, v in WORDS.items()}
    assert all(re.fullmatch(r"\[\[[^\[\] ]+\]\]", s) for v in spellings["words"].values() for s in v.values())


# The judge's alphabet is espeak-ng's American English: the spellings give exactly the variants' phonemes in en-us
# voices (the default one and the demo corpus's), alone and inside sentences.
@pytest.mark.parametrize("voice", sorted({espeak_variants()["voice"], *(v for v in VOICES if v.startswith("en-us"))}))
def test_forced_pronunciations_give_the_variants_phonemes(voice):
    entries = [(w, v, s) for w, variants in espeak_variants()["words"].items() for v, s in variants.items()]
    carriers = ["{}", "I heard {} twice.", "They kept saying {}."]
    texts = [c.format(s) for _, _, s in entries for c in carriers]
    heard = phonemize(texts, voice)
    for i, (word, variant, spelling) in enumerate(entries):
        alone, *in_sentences = heard[i * len(carriers) : (i + 1) * len(carriers)]
        assert alone == split_rhotic(WORDS[word][variant]), (spelling, alone)
        for phonemes in in_sentences:
            assert match_distance(split_rhotic(WORDS[word][variant]), phonemes) == 0, (spelling, phonemes)
            assert judge(phonemes, WORDS[word]) == variant, (spelling, phonemes)


# The consistency suite speaks a context in a prompt's voice; the British ones (en+...) have their own phonemes
# (əʊ for oʊ, a for æ), not the judge's en-us ones, but each word's two spellings must still sound different.
@pytest.mark.parametrize("voice", sorted({p["voice"] for p in load_suite_data("prompts")}))
def test_forced_pronunciations_differ_in_every_prompt_voice(voice):
    words = espeak_variants()["words"]
    entries = [(w, v, s) for w, variants in words.items() for v, s in variants.items()]
    heard = dict(zip([(w, v) for w, v, _ in entries], phonemize([s for _, _, s in entries], voice), strict=True))
    for word, variants in words.items():
        first, second = (heard[word, v] for v in variants)
        assert first and second and first != second, (word, first, second)


def test_every_sentence_with_its_pronunciation_forced_is_judged_as_it():
    """A sentence whose other words contain the other pronunciation (say, "led" beside lead-guide, "want"
    beside aunt-ant) would tie and count as wrong however well the word is said; "tear" before a vowel is
    linked (t ɪ ɹ ɪ n), which ties too, so the data never puts it there."""
    words = espeak_variants()["words"]
    samples = [(r["id"], r["word"], r["variant"], r["text"]) for r in load_suite_data("homographs")]
    for r in load_suite_data("consistency"):
        samples += [(r["id"], r["word"], r["variant"], r[f]) for f in ("context", "text")]
    heard = phonemize([force(text, w, words[w][v]) for _, w, v, text in samples], espeak_variants()["voice"])
    wrong = [(i, text) for (i, w, v, text), p in zip(samples, heard, strict=True) if judge(p, WORDS[w]) != v]
    assert not wrong
