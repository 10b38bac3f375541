"""The phoneme recognizer that judges the pronunciation suites (eval/pronunciation.py).

Sesame judged homograph disambiguation and pronunciation consistency with
facebook/wav2vec2-lv-60-espeak-cv-ft: a wav2vec2 CTC model whose output is espeak-ng IPA, one phoneme per
token, space-separated, with no word boundaries. `PhonemeRecognizer` loads it (a Hub id, or a local copy:
`huggingface-cli download facebook/wav2vec2-lv-60-espeak-cv-ft --local-dir DIR`) and turns 24 kHz audio
into phoneme lists by greedy CTC decoding, stress marks removed, as `eval.pronunciation.judge` takes them.
Its tokenizer (Wav2Vec2PhonemeCTCTokenizer) is loaded with `do_phonemize=False`: decoding needs only
vocab.json, not the `phonemizer` package and its espeak-ng bindings, which only encoding text would use.

`write_random_recognizer` writes a seeded, randomly initialised model of the same family, with a phoneme
vocabulary in the real tokenizer's format, so the whole path (files → transformers loaders → batching →
decoding) runs offline and in tests. Its phonemes are noise: it marks its config.json
(`csm_train_random_init`), `PhonemeRecognizer.is_random` reads the mark back, and the suites must refuse to
report numbers judged by a random recognizer.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from data_pipeline.audio import MODEL_SAMPLE_RATE, to_model_rate
from eval.pronunciation import CONSISTENCY_WORDS, HOMOGRAPHS, parse_phonemes

PHONEME_JUDGE = "facebook/wav2vec2-lv-60-espeak-cv-ft"
RANDOM_MARKER = "csm_train_random_init"  # config.json key written by write_random_recognizer

# The real vocab.json's special tokens, at the real ids (<pad> is the CTC blank).
SPECIAL_TOKENS = ("<s>", "<pad>", "</s>", "<unk>")
# espeak-ng's American English output (`espeak-ng -v en-us -q --ipa --sep=' '`, stress removed); every symbol
# is in the real model's vocabulary. The suites' own phonemes are added below, whatever they become.
ENGLISH_PHONEMES = (
    # consonants
    "p b t d k ɡ f v θ ð s z ʃ ʒ h tʃ dʒ m n ŋ l ɫ ɹ j w ɾ ʔ x n̩ "
    # vowels and diphthongs
    "i iː ɪ e eɪ ɛ æ a aɪ aʊ ɑ ɑː ɒ ɔ ɔː ɔɪ o oʊ oː ʊ u uː ʌ ə ɚ ɜ ɜː ɐ ᵻ iə əl "
    # r-coloured vowels, which espeak writes as single phonemes
    "ɑːɹ ɔːɹ oːɹ ɛɹ ɪɹ ʊɹ aɪɚ aɪə"
).split()


def recognizer_vocabulary() -> list[str]:
    """The random recognizer's tokens, in id order: the special tokens, a broad English inventory, and every
    phoneme of the suites' variants."""
    suites = [p for words in (HOMOGRAPHS, CONSISTENCY_WORDS) for v in words.values() for ps in v.values() for p in ps]
    return list(dict.fromkeys([*SPECIAL_TOKENS, *ENGLISH_PHONEMES, *suites]))


def ctc_collapse(ids: list[int], blank_id: int) -> list[int]:
    """Greedy CTC: merge runs of the same id, then drop blanks (a blank between two equal ids keeps both)."""
    collapsed, previous = [], None
    for i in ids:
        if i != previous and i != blank_id:
            collapsed.append(i)
        previous = i
    return collapsed


def decode_ids(ids: list[int], tokenizer) -> list[str]:
    """Frame-wise argmax ids → phonemes without stress marks. The same as the tokenizer's own CTC decoding
    (`tokenizer.decode(ids)`: group repeats, drop the <pad> blank and any word delimiter, join with spaces)
    followed by `parse_phonemes`, except that <s>, </s> and <unk>, which are no phonemes, are dropped too."""
    dropped = set(tokenizer.all_special_ids)
    if tokenizer.word_delimiter_token_id is not None:  # None for the real judge: it has no word boundaries
        dropped.add(tokenizer.word_delimiter_token_id)
    kept = [i for i in ctc_collapse(ids, tokenizer.pad_token_id) if i not in dropped]
    return parse_phonemes(" ".join(tokenizer.convert_ids_to_tokens(kept)))


def _load_error(model: str, error: Exception | None = None) -> OSError:
    reason = f": {str(error).rstrip('.')}" if error else ": no such directory"
    return OSError(
        f"cannot load the phoneme recognizer {model!r}{reason}. Sesame's judge is {PHONEME_JUDGE}; where the Hub"
        f" is out of reach, download it once with `huggingface-cli download {PHONEME_JUDGE} --local-dir DIR`"
        " (or `hf download ...`) and pass DIR."
    )


class PhonemeRecognizer:
    """24 kHz audio → espeak IPA phonemes, with a wav2vec2 CTC phoneme model (by default Sesame's judge)."""

    def __init__(self, model: str = PHONEME_JUDGE, device: str = "auto", batch_size: int = 8):
        from transformers import Wav2Vec2FeatureExtractor, Wav2Vec2ForCTC, Wav2Vec2PhonemeCTCTokenizer

        from data_pipeline.device import resolve_device

        self.model_id, self.batch_size = str(model), batch_size
        source = Path(self.model_id).expanduser()
        if not source.exists() and (source.is_absolute() or self.model_id.startswith((".", "~"))):
            raise _load_error(self.model_id)  # a path, not a Hub id: don't ask the Hub
        source = str(source) if source.exists() else self.model_id
        try:  # the model first: its loader says clearly when files or the Hub are missing
            self.model = Wav2Vec2ForCTC.from_pretrained(source)
            self.feature_extractor = Wav2Vec2FeatureExtractor.from_pretrained(source)
            # do_phonemize=False: decoding needs vocab.json only, never the phonemizer package (nor espeak-ng)
            self.tokenizer = Wav2Vec2PhonemeCTCTokenizer.from_pretrained(source, do_phonemize=False)
        except (OSError, ValueError, TypeError) as error:  # TypeError: the tokenizer's, when vocab.json is missing
            raise _load_error(self.model_id, error) from error
        self.device = torch.device(resolve_device(device))
        self.model.to(self.device).eval()
        self.is_random = bool(getattr(self.model.config, RANDOM_MARKER, False))
        # Fewer samples than one output frame's receptive field (400 at 16 kHz) give the model nothing to read.
        self.min_samples = 1
        for kernel, stride in zip(
            reversed(self.model.config.conv_kernel), reversed(self.model.config.conv_stride), strict=True
        ):
            self.min_samples = (self.min_samples - 1) * stride + kernel

    def recognize(self, audios: list[np.ndarray]) -> list[list[str]]:
        """Per 24 kHz mono float32 array, its recognized phonemes (stress marks removed). Batched with padding
        and an attention mask where the feature extractor asks for one (the layer-norm wav2vec2 models, the
        judge among them: padding then changes nothing); one at a time where it doesn't (group-norm models
        normalise over time, padding included)."""
        waves = [
            to_model_rate(np.asarray(a, dtype=np.float32)) if np.size(a) else np.zeros(0, np.float32) for a in audios
        ]
        results: list[list[str]] = [[] for _ in waves]
        todo = sorted((i for i, w in enumerate(waves) if len(w) >= self.min_samples), key=lambda i: -len(waves[i]))
        step = self.batch_size if self.feature_extractor.return_attention_mask else 1
        for start in range(0, len(todo), step):
            chunk = todo[start : start + step]
            for i, phonemes in zip(chunk, self._recognize_batch([waves[i] for i in chunk]), strict=True):
                results[i] = phonemes
        return results

    @torch.inference_mode()
    def _recognize_batch(self, waves: list[np.ndarray]) -> list[list[str]]:
        inputs = self.feature_extractor(
            waves,
            sampling_rate=MODEL_SAMPLE_RATE,
            padding=True,
            return_attention_mask=self.feature_extractor.return_attention_mask,
            return_tensors="pt",
        )
        mask = inputs.get("attention_mask")
        logits = self.model(
            inputs["input_values"].to(self.device), attention_mask=None if mask is None else mask.to(self.device)
        ).logits
        ids = logits.argmax(dim=-1).cpu()
        if mask is None:
            lengths = [ids.shape[1]] * len(waves)
        else:  # frames computed from real samples only; the padding's frames are dropped
            lengths = self.model._get_feat_extract_output_lengths(mask.sum(dim=-1)).tolist()
        return [decode_ids(ids[b, :n].tolist(), self.tokenizer) for b, n in enumerate(lengths)]


def write_random_recognizer(directory: str | Path, seed: int = 0) -> Path:
    """Write a randomly initialised phoneme recognizer to `directory`, loadable by `PhonemeRecognizer`: a tiny
    Wav2Vec2ForCTC shaped like the judge where it matters (layer-norm feature encoder with the same 320×
    downsampling, so 50 frames a second; stable layer norm; <pad> as CTC blank), a Wav2Vec2PhonemeCTCTokenizer
    over `recognizer_vocabulary()`, and a layer-norm wav2vec2's feature extractor (16 kHz, normalised, attention
    mask). Same seed, same files."""
    from transformers import Wav2Vec2Config, Wav2Vec2FeatureExtractor, Wav2Vec2ForCTC, Wav2Vec2PhonemeCTCTokenizer

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    vocab_file = directory / "vocab.json"
    vocab = {token: i for i, token in enumerate(recognizer_vocabulary())}
    vocab_file.write_text(json.dumps(vocab, ensure_ascii=False, indent=2) + "\n", encoding="utf-8")
    tokenizer = Wav2Vec2PhonemeCTCTokenizer(str(vocab_file), do_phonemize=False)  # word_delimiter_token=None
    tokenizer.save_pretrained(directory)
    Wav2Vec2FeatureExtractor(
        feature_size=1,
        sampling_rate=MODEL_SAMPLE_RATE,
        padding_value=0.0,
        do_normalize=True,
        return_attention_mask=True,
    ).save_pretrained(directory)
    config = Wav2Vec2Config(
        vocab_size=len(vocab),
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        conv_dim=(16,) * 7,
        conv_kernel=(10, 3, 3, 3, 3, 2, 2),  # the judge's stack: 5·2⁶ = 320× downsampling
        conv_stride=(5, 2, 2, 2, 2, 2, 2),
        conv_bias=True,
        feat_extract_norm="layer",
        do_stable_layer_norm=True,
        num_conv_pos_embeddings=16,
        num_conv_pos_embedding_groups=2,
        initializer_range=0.5,  # large, so the argmax moves with the input instead of sitting on one token
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        **{RANDOM_MARKER: True, "csm_train_random_seed": seed},
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = Wav2Vec2ForCTC(config)
    model.save_pretrained(directory)
    return directory
