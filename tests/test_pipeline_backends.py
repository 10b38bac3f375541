"""The production backends, asr=whisperx and diarizer=pyannote, offline, on espeak-ng speech.

No Hub access here, so the models are built locally: pyannote's diarization pipeline gets the real
pyannote/segmentation model that whisperx ships in its package, a random-init WeSpeakerResNet34 (saved in
pyannote's own checkpoint format) and a neutral PLDA; whisperx aligns with a random-init wav2vec2 CTC model.
With random speaker embeddings and a random aligner, diarization accuracy and alignment precision cannot be
asserted: the tests check the contracts (labels, spans and word times inside the audio, monotonic, the words
Whisper heard kept) and that `python -m data_pipeline` runs with both backends end to end. Whisper tiny.en and
the segmentation model are real, so the transcripts' WER and the speech the spans cover are checked.

pyannote.audio and whisperx are not in the base install: scripts/install_extras.sh adds them (CI runs it).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from data_pipeline.asr import _with_alignment
from data_pipeline.turns import Word

VOICES = ("en-us+m3", "en+steph")  # espeak-ng voices that sound apart
LINES = (
    "I think we should leave the house soon.",
    "Can you help me move these boxes to the car?",
    "The coffee shop on the corner is closed this week.",
    "I sent you a long message this morning.",
)
PAUSE = 0.8  # seconds of silence between turns
ENV = {"PYANNOTE_METRICS_ENABLED": "0", "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}


# --- whisperx's words → ours, without any model ------------------------------------------------------------


def test_aligned_words_take_whisperx_times_and_fall_back_to_whisper_where_it_has_none():
    whisper = [Word("Hello", 1.0, 1.4, 0.9), Word("New York.", 1.5, 2.2, 0.6)]
    text = "Hello New York."
    aligned = [
        {"word": "Hello", "start": 1.1, "end": 1.3, "score": 0.2},
        {"word": "New", "start": 1.6, "end": 1.8, "score": 0.3},
        {"word": "York."},  # whisperx could not time it
    ]
    assert _with_alignment(whisper, text, aligned) == [
        Word("Hello", 1.1, 1.3, 0.9),  # probability stays Whisper's: the quality filter's ASR confidence
        Word("New", 1.6, 1.8, 0.6),  # whisperx split a Whisper word at its space: both halves find their source
        Word("York.", 1.5, 2.2, 0.6),
    ]
    assert _with_alignment(whisper, text, []) == whisper  # the stretch failed to align: Whisper's words as they are


# --- fixtures: the extras and local models ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def extras():
    try:
        import nltk  # noqa: F401
        import pyannote.audio  # noqa: F401
        import whisperx  # noqa: F401
    except ImportError as error:
        pytest.fail(f"{error}: the production backends are not installed; run scripts/install_extras.sh")
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # on a small CPU box, threads fighting over cores make pyannote's LSTM crawl
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def models(extras, tmp_path_factory):
    """{"pyannote": pipeline dir, "align": wav2vec2 dir, "nltk": NLTK_DATA dir}, built here, no download."""
    root = tmp_path_factory.mktemp("backend_models")
    paths = {"pyannote": root / "diarization", "align": root / "wav2vec2", "nltk": root / "nltk_data"}
    make_pyannote_pipeline(paths["pyannote"])
    make_align_model(paths["align"])
    make_punkt(paths["nltk"])
    import nltk

    nltk.data.path.insert(0, str(paths["nltk"]))
    yield paths
    nltk.data.path.remove(str(paths["nltk"]))


def make_pyannote_pipeline(path: Path) -> None:
    import lightning
    import torch
    import whisperx
    import yaml
    from pyannote.audio.core.task import Problem, Resolution, Specifications
    from pyannote.audio.models.embedding import WeSpeakerResNet34

    torch.manual_seed(0)
    embedding = WeSpeakerResNet34()
    embedding.specifications = Specifications(problem=Problem.REPRESENTATION, resolution=Resolution.CHUNK, duration=5.0)
    checkpoint = {"state_dict": embedding.state_dict(), "pytorch-lightning_version": lightning.__version__}
    embedding.on_save_checkpoint(checkpoint)  # adds pyannote's versions, architecture and specifications
    (path / "embedding").mkdir(parents=True)
    torch.save(checkpoint, path / "embedding" / "pytorch_model.bin")

    # A neutral PLDA for VBx clustering: an orthonormal LDA and an identity within-class covariance.
    dim, lda_dim = 256, 128
    basis, _ = np.linalg.qr(np.random.default_rng(0).standard_normal((dim, dim)))
    (path / "plda").mkdir()
    np.savez(path / "plda" / "xvec_transform.npz", mean1=np.zeros(dim), mean2=np.zeros(lda_dim), lda=basis[:, :lda_dim])
    np.savez(path / "plda" / "plda.npz", mu=np.zeros(lda_dim), tr=np.eye(lda_dim), psi=np.linspace(10.0, 0.1, lda_dim))

    segmentation = Path(whisperx.__file__).parent / "assets" / "pytorch_model.bin"  # pyannote/segmentation
    config = {
        "dependencies": {"pyannote.audio": "4.0.7"},
        "pipeline": {
            "name": "pyannote.audio.pipelines.SpeakerDiarization",
            "params": {
                "segmentation": str(segmentation),
                "embedding": "$model/embedding",  # pyannote resolves $model/ against this directory
                "plda": "$model/plda",
                "clustering": "VBxClustering",
                "segmentation_step": 0.5,  # half-overlapping 10 s windows instead of 90 %: ~5x faster
                "embedding_batch_size": 8,
            },
        },
        # this segmentation model is multi-label, not powerset: it needs a threshold
        "params": {
            "segmentation": {"threshold": 0.5, "min_duration_off": 0.0},
            "clustering": {"threshold": 0.6, "Fa": 0.07, "Fb": 0.8},
        },
    }
    (path / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))


def make_align_model(path: Path) -> None:
    import torch
    from transformers import (
        Wav2Vec2Config,
        Wav2Vec2CTCTokenizer,
        Wav2Vec2FeatureExtractor,
        Wav2Vec2ForCTC,
        Wav2Vec2Processor,
    )

    path.mkdir()
    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, "<unk>": 3, "|": 4}  # <pad>: the CTC blank, |: the word boundary
    vocab.update({c: i + len(vocab) for i, c in enumerate("ETAONIHSRDLUMWCFGYPBVK'XJQZ")})
    (path / "vocab.json").write_text(json.dumps(vocab))
    tokenizer = Wav2Vec2CTCTokenizer(path / "vocab.json", word_delimiter_token="|")
    features = Wav2Vec2FeatureExtractor(feature_size=1, sampling_rate=16_000, padding_value=0.0, do_normalize=True)
    Wav2Vec2Processor(feature_extractor=features, tokenizer=tokenizer).save_pretrained(path)
    torch.manual_seed(0)
    config = Wav2Vec2Config(
        vocab_size=len(vocab), pad_token_id=0, hidden_size=64, num_hidden_layers=2, num_attention_heads=2,
        intermediate_size=128,
    )  # fmt: skip
    Wav2Vec2ForCTC(config).save_pretrained(path)


def make_punkt(nltk_data: Path) -> None:
    """NLTK's punkt_tab for English, untrained (it still splits at . ! ?): whisperx.align loads it, and
    nltk.download cannot reach the network here."""
    english = nltk_data / "tokenizers" / "punkt_tab" / "english"
    english.mkdir(parents=True)
    for name in ("collocations.tab", "sent_starters.txt", "ortho_context.tab"):
        (english / name).write_text("")
    (english / "abbrev_types.txt").write_text("mr\nmrs\ndr\n")


@pytest.fixture(scope="module")
def dialogue():
    """(16 kHz float32 audio, [(start, end) of each turn]): LINES spoken by two espeak-ng voices in turn."""
    from data_pipeline.audio import to_model_rate
    from data_pipeline.demo_corpus import speak

    pause = np.zeros(int(PAUSE * 24_000), dtype=np.float32)
    clips, turns, t = [pause], [], PAUSE
    for i, line in enumerate(LINES):
        clip = speak(line, VOICES[i % 2], 160)
        clips += [clip, pause]
        turns.append((t, t + len(clip) / 24_000))
        t += (len(clip) + len(pause)) / 24_000
    return to_model_rate(np.concatenate(clips)), turns


# --- the backends ------------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_pyannote_diarizer_returns_two_speakers_over_the_speech(models, dialogue):
    from data_pipeline.diarize import PyannoteDiarizer

    audio, turns = dialogue
    duration = len(audio) / 16_000
    diarizer = PyannoteDiarizer(pipeline=str(models["pyannote"]), num_speakers=2, device="cpu")
    spans = diarizer(audio, regions=[])

    assert {s.speaker for s in spans} == {"SPEAKER_00", "SPEAKER_01"}
    assert all(0.0 <= s.start < s.end <= duration + 0.01 for s in spans)
    ordered = sorted(spans, key=lambda s: s.start)
    assert all(a.end <= b.start + 1e-6 for a, b in zip(ordered, ordered[1:], strict=False))  # exclusive: no overlap
    # The segmentation model is real: the spans cover the speech and not the pauses between turns.
    covered = np.zeros(len(audio), dtype=bool)
    for s in spans:
        covered[int(s.start * 16_000) : int(s.end * 16_000)] = True
    speech = np.zeros(len(audio), dtype=bool)
    for start, end in turns:
        speech[int(start * 16_000) : int(end * 16_000)] = True
    assert covered[speech].mean() > 0.9, covered[speech].mean()
    assert covered[~speech].mean() < 0.25, covered[~speech].mean()


@pytest.mark.slow
def test_whisperx_asr_keeps_whispers_words_with_aligned_times_inside_the_audio(models, dialogue):
    from data_pipeline.asr import FasterWhisperASR, WhisperXASR
    from data_pipeline.vad import SileroVAD

    audio, _ = dialogue
    duration = len(audio) / 16_000
    regions = SileroVAD()(audio)
    whisper = FasterWhisperASR(model="shipped:tiny.en", device="cpu", beam_size=1).transcribe(audio, regions)
    asr = WhisperXASR(model="shipped:tiny.en", align_model=str(models["align"]), device="cpu", beam_size=1)
    words = asr.transcribe(audio, regions)

    assert [w.text for w in words] == [w.text for w in whisper]
    assert len(words) >= 30  # the four lines, heard
    assert all(0.0 <= w.start <= w.end <= duration for w in words)
    assert all(a.start <= b.start and a.end <= b.end for a, b in zip(words, words[1:], strict=False))
    assert [w.probability for w in words] == [w.probability for w in whisper]
    assert [(w.start, w.end) for w in words] != [(w.start, w.end) for w in whisper]  # the aligner set the times
    assert asr.transcribe(audio, []) == []


@pytest.mark.slow
def test_python_m_data_pipeline_runs_with_whisperx_and_pyannote(models, tmp_path):
    from data_pipeline.demo_corpus import write_demo_corpus
    from data_pipeline.score import word_error_rate

    write_demo_corpus(tmp_path / "corpus", num_conversations=1, broken=False)
    out = tmp_path / "dataset"
    command = [
        *(sys.executable, "-m", "data_pipeline", f"input_dir={tmp_path / 'corpus' / 'audio'}", f"output_dir={out}"),
        *("asr=whisperx", f"asr.align_model={models['align']}", "diarizer=pyannote"),
        *(f"diarizer.pipeline={models['pyannote']}", "diarizer.num_speakers=2"),
        *("codec=mimi_random", "max_positions=512", "progress=false"),
    ]
    env = {**os.environ, **ENV, "NLTK_DATA": str(models["nltk"])}
    result = subprocess.run(command, env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-4000:]

    rows = [json.loads(line) for line in (out / "manifest.jsonl").read_text().splitlines()]
    assert rows and list((out / "shards").glob("*.tar"))
    card = json.loads((out / "dataset.json").read_text())
    components = card["pipeline"]["components"]
    assert components["asr"]["_target_"] == "data_pipeline.asr.WhisperXASR"
    assert components["diarizer"]["_target_"] == "data_pipeline.diarize.PyannoteDiarizer"
    assert components["diarizer"]["pipeline"] == str(models["pyannote"])
    assert card["recordings"] == 1 and card["failed"] == 0 and 1 <= card["speakers"] <= 2
    # Whisper tiny.en is real: the words survive alignment and diarization into the shards.
    assert word_error_rate(out, tmp_path / "corpus" / "truth")["wer"] < 0.2
