"""Text tokenizers for CSM segments. Real runs use Llama-3.2's tokenizer (through transformers); the
byte-level one needs no files and serves smoke runs and tests."""

from __future__ import annotations

from pathlib import Path
from typing import Protocol


class TextTokenizer(Protocol):
    bos_id: int
    eos_id: int
    vocab_size: int

    def encode(self, text: str) -> list[int]:
        """Token ids of `text`, without special tokens."""
        ...


class TransformersTokenizer:
    """A transformers tokenizer (e.g. Llama-3.2's, as csm-1b uses) as a `TextTokenizer`."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.bos_id = tokenizer.bos_token_id
        self.eos_id = tokenizer.eos_token_id
        self.vocab_size = len(tokenizer)
        if self.bos_id is None or self.eos_id is None:
            raise ValueError(f"{type(tokenizer).__name__} has no BOS/EOS token; CSM text segments need both")

    def encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=False)


class ByteTokenizer:
    """UTF-8 bytes 0..255, BOS 256, EOS 257."""

    bos_id, eos_id, vocab_size = 256, 257, 258

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))


def load_tokenizer(name_or_path: str) -> TransformersTokenizer:
    """A transformers tokenizer from a local directory or the Hub (Llama-3.2's for csm-1b)."""
    from transformers import AutoTokenizer

    hint = "give data.tokenizer.name_or_path a local directory holding tokenizer.json, or log in to the Hub"
    if name_or_path.startswith(("/", ".", "~")) and not Path(name_or_path).expanduser().is_dir():
        raise OSError(f"could not load the tokenizer {name_or_path!r}: no such directory; {hint}")
    try:
        return TransformersTokenizer(AutoTokenizer.from_pretrained(name_or_path))
    except OSError as error:
        raise OSError(f"could not load the tokenizer {name_or_path!r} ({error}); {hint} for gated models") from error
