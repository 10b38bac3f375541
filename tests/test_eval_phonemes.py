"""The pronunciation judge's recognizer on a seeded random model written in the real model's file layout:
it loads through the same path as facebook/wav2vec2-lv-60-espeak-cv-ft, says it is random, batches without
changing answers, and decodes CTC output exactly as the real tokenizer does."""

import json
import shutil

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from eval.phonemes import (
    RANDOM_MARKER,
    PhonemeRecognizer,
    ctc_collapse,
    decode_ids,
    recognizer_vocabulary,
    write_random_recognizer,
)
from eval.pronunciation import CONSISTENCY_WORDS, HOMOGRAPHS, parse_phonemes

# The Hub repo's tokenizer files, as they are there (transformers 4.x era: no do_phonemize, no delimiters).
HUB_TOKENIZER_CONFIG = {
    "unk_token": "<unk>",
    "bos_token": "<s>",
    "eos_token": "</s>",
    "pad_token": "<pad>",
    "phonemizer_lang": "en-us",
    "phonemizer_backend": "espeak",
    "do_lower_case": False,
    "special_tokens_map_file": "./special_tokens_map.json",
    "tokenizer_file": None,
    "name_or_path": "./",
    "tokenizer_class": "Wav2Vec2PhonemeCTCTokenizer",
}
HUB_SPECIAL_TOKENS_MAP = {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "pad_token": "<pad>"}


def noise(seconds: float, seed: int) -> np.ndarray:
    return (0.1 * np.random.default_rng(seed).standard_normal(int(24_000 * seconds))).astype(np.float32)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return write_random_recognizer(tmp_path_factory.mktemp("phoneme-recognizer"), seed=0)


@pytest.fixture(scope="module")
def recognizer(model_dir):
    return PhonemeRecognizer(str(model_dir), device="cpu", batch_size=2)


def test_random_recognizer_loads_through_the_normal_path_and_says_it_is_random(recognizer, model_dir):
    assert recognizer.is_random and recognizer.model_id == str(model_dir)
    assert json.loads((model_dir / "config.json").read_text())[RANDOM_MARKER] is True
    tokenizer = recognizer.tokenizer
    assert type(tokenizer).__name__ == "Wav2Vec2PhonemeCTCTokenizer" and not tokenizer.do_phonemize
    vocab = tokenizer.get_vocab()
    assert [vocab[t] for t in ("<s>", "<pad>", "</s>", "<unk>")] == [0, 1, 2, 3]  # the real ids; <pad> = blank
    assert tokenizer.pad_token_id == 1 and tokenizer.word_delimiter_token_id is None
    suite_phonemes = {
        p for words in (HOMOGRAPHS, CONSISTENCY_WORDS) for v in words.values() for ps in v.values() for p in ps
    }
    assert suite_phonemes <= set(vocab) and len(vocab) == len(recognizer_vocabulary())
    assert recognizer.model.config.vocab_size == len(vocab)
    assert recognizer.feature_extractor.return_attention_mask and recognizer.min_samples == 400


def test_recognize_returns_phonemes_from_the_vocabulary(recognizer):
    heard = recognizer.recognize([noise(0.8, 1), noise(0.5, 2)])
    assert len(heard) == 2 and any(heard)
    phonemes = set(recognizer_vocabulary()[4:])
    for sample in heard:
        assert all(isinstance(p, str) and p in phonemes for p in sample)
    assert len(heard[0]) <= 40 and len(heard[1]) <= 25  # at most one phoneme per 20 ms frame


def test_batched_results_equal_one_at_a_time(recognizer):
    audios = [noise(0.4, 3), noise(0.9, 4), noise(0.01, 5), noise(0.6, 6), noise(0.3, 7)]  # 0.01 s: no frame
    batched = recognizer.recognize(audios)
    assert batched == [recognizer.recognize([a])[0] for a in audios]
    assert batched[2] == [] and recognizer.recognize([]) == []
    assert recognizer.recognize(audios) == batched  # deterministic


def test_same_seed_same_files_other_seed_other_weights(model_dir, tmp_path):
    again = write_random_recognizer(tmp_path / "again", seed=0)
    for path in model_dir.iterdir():
        assert (again / path.name).read_bytes() == path.read_bytes(), path.name
    other = load_file(write_random_recognizer(tmp_path / "other", seed=1) / "model.safetensors")
    weights = load_file(model_dir / "model.safetensors")
    assert weights.keys() == other.keys() and not torch.equal(weights["lm_head.weight"], other["lm_head.weight"])


def test_a_directory_without_the_marker_is_not_random(recognizer, model_dir, tmp_path):
    copy = shutil.copytree(model_dir, tmp_path / "unmarked")
    config = json.loads((copy / "config.json").read_text())
    del config[RANDOM_MARKER]
    (copy / "config.json").write_text(json.dumps(config))
    unmarked = PhonemeRecognizer(str(copy), device="cpu")
    assert not unmarked.is_random
    audio = [noise(0.5, 8)]
    assert unmarked.recognize(audio) == recognizer.recognize(audio)


def test_the_hub_repos_file_layout_loads_the_same(recognizer, model_dir, tmp_path):
    """The real repo has the 2021 tokenizer_config.json (phonemizer settings, do_phonemize unset, which must
    not need the phonemizer package), a special_tokens_map.json, and pytorch_model.bin with weight-norm
    weights under their old names."""
    copy = shutil.copytree(model_dir, tmp_path / "hub-layout")
    (copy / "tokenizer_config.json").write_text(json.dumps(HUB_TOKENIZER_CONFIG))
    (copy / "special_tokens_map.json").write_text(json.dumps(HUB_SPECIAL_TOKENS_MAP))
    weights = load_file(copy / "model.safetensors")
    old_names = {"parametrizations.weight.original0": "weight_g", "parametrizations.weight.original1": "weight_v"}
    for new, old in old_names.items():
        weights = {k.replace(new, old): v for k, v in weights.items()}
    (copy / "model.safetensors").unlink()
    torch.save(weights, copy / "pytorch_model.bin")
    hub_layout = PhonemeRecognizer(str(copy), device="cpu")
    assert hub_layout.tokenizer.get_vocab() == recognizer.tokenizer.get_vocab()
    assert hub_layout.tokenizer.word_delimiter_token_id is None
    audio = [noise(0.5, 9), noise(0.7, 10)]
    assert hub_layout.recognize(audio) == recognizer.recognize(audio)


def test_an_unloadable_model_names_the_fix(tmp_path):
    with pytest.raises(OSError, match="huggingface-cli download facebook/wav2vec2-lv-60-espeak-cv-ft"):
        PhonemeRecognizer(str(tmp_path / "missing"))
    with pytest.raises(OSError, match="huggingface-cli"):
        PhonemeRecognizer(str(tmp_path))  # a directory without the files


def test_ctc_collapse_merges_repeats_and_drops_blanks():
    blank = 1
    assert ctc_collapse([5, 5, 5, 8, 8, 9], blank) == [5, 8, 9]
    assert ctc_collapse([5, 5, blank, 5, blank, blank, 8], blank) == [5, 5, 8]  # a blank separates a repeat
    assert ctc_collapse([blank, 5, blank, 8, 8, blank], blank) == [5, 8]
    assert ctc_collapse([blank, blank], blank) == [] and ctc_collapse([], blank) == []


def test_decoding_matches_the_real_tokenizers_output(recognizer):
    tokenizer = recognizer.tokenizer
    ids = tokenizer.convert_tokens_to_ids("l l <pad> ɛ ɛ d <pad> d ɑːɹ ɑːɹ".split())
    assert tokenizer.decode(ids) == "l ɛ d d ɑːɹ"  # what the real judge prints: phonemes, space-separated
    assert decode_ids(ids, tokenizer) == ["l", "ɛ", "d", "d", "ɑː", "ɹ"]  # r-coloured vowels split (pronunciation.py)
    rng = np.random.default_rng(0)
    phoneme_ids = [1, *range(4, len(tokenizer))]  # the blank, often, and every phoneme
    for _ in range(200):
        ids = rng.choice(phoneme_ids, size=rng.integers(1, 40)).tolist()
        assert decode_ids(ids, tokenizer) == parse_phonemes(tokenizer.decode(ids))
    assert decode_ids([], tokenizer) == []  # tokenizer.decode([]) raises in transformers 5.23


def test_special_tokens_and_word_delimiters_are_no_phonemes(model_dir, tmp_path):
    from transformers import Wav2Vec2PhonemeCTCTokenizer

    vocab = json.loads((model_dir / "vocab.json").read_text(encoding="utf-8"))
    vocab["|"] = len(vocab)  # a tokenizer with word boundaries, as facebook/wav2vec2-xlsr-53-espeak-cv-ft has
    (tmp_path / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    tokenizer = Wav2Vec2PhonemeCTCTokenizer(str(tmp_path / "vocab.json"), word_delimiter_token="|", do_phonemize=False)
    ids = tokenizer.convert_tokens_to_ids("<s> ð ə | | <pad> l iː d | <unk> </s>".split())
    assert tokenizer.decode(ids) == "<s> ð ə l iː d <unk> </s>"  # the tokenizer drops "|", keeps the rest
    assert decode_ids(ids, tokenizer) == ["ð", "ə", "l", "iː", "d"]
