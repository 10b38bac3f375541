"""Text tokenizers: a transformers tokenizer from a local directory (as Llama-3.2's is used offline), the
byte-level fallback, and a clear error for a missing one."""

import pytest

from csm_train.layout import segment_text_tokens
from csm_train.tokenizer import ByteTokenizer, load_tokenizer


def test_local_tokenizer_directory_loads_and_sizes_the_vocabulary(hf_tokenizer, tmp_path):
    hf_tokenizer.save_pretrained(tmp_path / "tok")
    tokenizer = load_tokenizer(str(tmp_path / "tok"))
    assert tokenizer.vocab_size == len(hf_tokenizer)
    assert tokenizer.encode("[0]Hello") == hf_tokenizer.encode("[0]Hello", add_special_tokens=False)
    assert segment_text_tokens(tokenizer, 0, "Hi")[0] == hf_tokenizer.bos_token_id


def test_byte_tokenizer_round_trips_utf8():
    tokens = ByteTokenizer().encode("[1]café")
    assert bytes(tokens).decode() == "[1]café" and max(tokens) < ByteTokenizer.bos_id


def test_missing_tokenizer_names_the_fix(tmp_path):
    with pytest.raises(OSError, match="could not load the tokenizer.*local directory holding tokenizer.json"):
        load_tokenizer(str(tmp_path / "nowhere"))
