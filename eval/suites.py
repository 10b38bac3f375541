"""The evaluation suites, one class each (configs in conf/eval/suite/), all run against one `Session`.

* `wer`, `mos`, `sim` measure one generated set, as Seed-TTS-eval does: each sentence of
  eval/data/wer.jsonl spoken by the model after a prompt turn in one of the prompt voices; intelligibility
  (Whisper + WER), quality (DNSMOS) and speaker similarity (prompt vs answer) of the same audio.
* `homograph` and `consistency` are Sesame's pronunciation suites, judged by a phoneme recognizer
  (eval/pronunciation.py scores, eval/phonemes.py recognizes). A randomly initialised judge still runs the
  whole path but the suite refuses to report a number from it.

Every number is an `Estimate` (mean, 95 % bootstrap interval, sample count) with the judge that made it.
"""

from __future__ import annotations

import re
import tempfile
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

import numpy as np
import soundfile as sf

from csm_train.layout import Segment
from data_pipeline.codec import RANDOM_INIT
from data_pipeline.shards import MIMI_SAMPLE_RATE
from eval.metrics import Estimate, bootstrap, word_error_rates
from eval.pronunciation import CONSISTENCY_WORDS, HOMOGRAPHS, judge
from eval.speaker import Speaker
from eval.suite_data import espeak_variants, load_suite_data

PROMPT_SPEAKER = 0  # the prompt turn and the answer share a speaker id: the answer continues the voice


@dataclass
class SuiteResult:
    suite: str
    judge: str
    metrics: dict[str, Estimate] = field(default_factory=dict)
    samples: list[dict] = field(default_factory=list)  # per sample: id, text, what the judge made of it, audio
    refused: str | None = None  # why no number is reported

    def as_dict(self) -> dict:
        return {
            "suite": self.suite,
            "judge": self.judge,
            "metrics": {k: v.as_dict() for k, v in self.metrics.items()},
            "refused": self.refused,
            "samples": self.samples,
        }


class JudgeUnavailable(OSError):
    """A suite's judge model cannot be loaded (not downloaded, no network): the suite reports why, the
    others still run."""


class Session:
    """One evaluation run: the speaker under test, the prompt voices, the output directory, and what the
    suites share (the generated WER set, the judges), each built once on first use."""

    def __init__(self, speaker: Speaker, out_dir: str | Path, limit: int | None = None, device: str = "auto"):
        self.speaker, self.out_dir, self.limit, self.device = speaker, Path(out_dir), limit, device
        self._judges: dict[tuple, object] = {}

    def rows(self, name: str) -> list[dict]:
        rows = load_suite_data(name)
        return rows if self.limit is None else _spread(rows, self.limit)

    @cached_property
    def prompts(self) -> list[dict]:
        """The prompt voices: each prompt's text spoken by espeak-ng in its voice, with the audio's codes."""
        from data_pipeline.demo_corpus import speak

        rows = load_suite_data("prompts")
        audios = [speak(row["text"], row["voice"], speed=165) for row in rows]
        codes = self.speaker.encode(audios)
        return [{**row, "audio": a, "codes": c} for row, a, c in zip(rows, audios, codes, strict=True)]

    @cached_property
    def sentences(self) -> list[dict]:
        """The generated set shared by wer/mos/sim: every WER sentence after a prompt turn."""
        rows = self.rows("wer")
        conversations = []
        for i, row in enumerate(rows):
            prompt = self.prompts[i % len(self.prompts)]
            conversations.append(
                [Segment(PROMPT_SPEAKER, prompt["text"], prompt["codes"]), Segment(PROMPT_SPEAKER, row["text"])]
            )
        audios = self.speaker.say(conversations)
        return [
            {**row, "prompt": self.prompts[i % len(self.prompts)]["id"], "audio": audio}
            for i, (row, audio) in enumerate(zip(rows, audios, strict=True))
        ]

    def judge(self, kind: str, model: str):
        """A judge model, loaded once per session (`kind`: whisper, phonemes). For phonemes, `random-init`
        builds the random recognizer (offline smoke runs: the suites then refuse to report a number)."""
        key = (kind, model)
        if key not in self._judges:
            try:
                self._judges[key] = self._load_judge(kind, model)
            except OSError as error:
                raise JudgeUnavailable(str(error)) from error
        return self._judges[key]

    def _load_judge(self, kind: str, model: str):
        if kind == "whisper":
            from eval.metrics import WhisperJudge

            return WhisperJudge(model, device=self.device)
        if kind == "phonemes":
            from eval.phonemes import PhonemeRecognizer, write_random_recognizer

            if model == RANDOM_INIT:  # written, loaded, and gone: nothing is left in the temp directory
                with tempfile.TemporaryDirectory(prefix="random-phoneme-judge-") as directory:
                    recognizer = PhonemeRecognizer(str(write_random_recognizer(directory)), device=self.device)
                recognizer.model_id = RANDOM_INIT  # the report names the judge, not a deleted path
                return recognizer
            return PhonemeRecognizer(model, device=self.device)
        raise ValueError(f"unknown judge kind {kind!r}")

    def save_audio(self, suite: str, sample_id: str, audio: np.ndarray) -> str:
        """Writes one sample's audio under the output directory; returns its path relative to it."""
        path = Path("samples") / suite / f"{sample_id}.wav"
        (self.out_dir / path).parent.mkdir(parents=True, exist_ok=True)
        sf.write(self.out_dir / path, audio, MIMI_SAMPLE_RATE)
        return str(path)


def _spread(rows: list[dict], limit: int) -> list[dict]:
    """`limit` rows spread evenly over the suite (suites are sorted by word and variant, so the first rows
    alone would test one word)."""
    if limit >= len(rows):
        return rows
    return [rows[int(i * len(rows) / limit)] for i in range(limit)]


class Suite:
    name = "suite"
    audio_dir = ""  # samples/<audio_dir>/ (default: the suite's name); wer, mos and sim share one generated set

    def __init__(self, keep_audio: int = 4):
        self.keep_audio = keep_audio  # samples whose audio the report links

    def run(self, session: Session) -> SuiteResult:
        raise NotImplementedError

    def _audio(self, session: Session, index: int, sample_id: str, audio: np.ndarray) -> dict:
        if index >= self.keep_audio:
            return {}
        return {"audio": session.save_audio(self.audio_dir or self.name, sample_id, audio)}


class WERSuite(Suite):
    """Intelligibility: Whisper's transcript of each generated sentence against the sentence."""

    name, audio_dir = "wer", "sentences"

    def __init__(self, judge: str = "shipped:tiny.en", keep_audio: int = 4):
        super().__init__(keep_audio)
        self.judge_model = judge

    def run(self, session: Session) -> SuiteResult:
        whisper = session.judge("whisper", self.judge_model)
        sentences = session.sentences
        transcripts = [whisper.transcribe(s["audio"]) if len(s["audio"]) else "" for s in sentences]
        wer = word_error_rates([s["text"] for s in sentences], transcripts)
        result = SuiteResult(self.name, f"whisper:{self.judge_model}")
        result.metrics["wer"] = wer["per_utterance"]
        result.metrics["wer_corpus"] = Estimate(wer["corpus"], wer["corpus"], wer["corpus"], len(sentences))
        for i, (s, transcript, value) in enumerate(zip(sentences, transcripts, wer["values"], strict=True)):
            row = {"id": s["id"], "text": s["text"], "transcript": transcript, "wer": value}
            result.samples.append(
                {**row, "seconds": len(s["audio"]) / MIMI_SAMPLE_RATE, **self._audio(session, i, s["id"], s["audio"])}
            )
        return result


class MOSSuite(Suite):
    """Quality: DNSMOS P.835 overall (1–5) of each generated sentence (speechmos ships its ONNX models)."""

    name, audio_dir = "mos", "sentences"

    def run(self, session: Session) -> SuiteResult:
        from data_pipeline.quality import DNSMOS

        dnsmos = DNSMOS()
        result = SuiteResult(self.name, "dnsmos:ovrl_mos")
        scores = []
        for i, s in enumerate(session.sentences):
            score = dnsmos(s["audio"]) if len(s["audio"]) else 1.0  # silence: the scale's floor
            scores.append(score)
            result.samples.append({"id": s["id"], "dnsmos": score, **self._audio(session, i, s["id"], s["audio"])})
        result.metrics["dnsmos"] = bootstrap(scores)
        return result


class SimilaritySuite(Suite):
    """Speaker similarity: cosine of speaker embeddings of the prompt turn and the generated answer."""

    name, audio_dir = "sim", "sentences"

    def run(self, session: Session) -> SuiteResult:
        from eval.metrics import SpeakerSimilarity

        prompts = {p["id"]: p["audio"] for p in session.prompts}
        kept = [s for s in session.sentences if len(s["audio"])]
        cosines = SpeakerSimilarity()([prompts[s["prompt"]] for s in kept], [s["audio"] for s in kept])
        result = SuiteResult(self.name, "resemblyzer:d-vector")
        by_id = dict(zip((s["id"] for s in kept), cosines.tolist(), strict=True))
        values = [by_id.get(s["id"], 0.0) for s in session.sentences]  # no audio: no similarity
        for i, (s, value) in enumerate(zip(session.sentences, values, strict=True)):
            result.samples.append(
                {
                    "id": s["id"],
                    "prompt": s["prompt"],
                    "similarity": value,
                    **self._audio(session, i, s["id"], s["audio"]),
                }
            )
        result.metrics["similarity"] = bootstrap(values)
        return result


class PronunciationSuite(Suite):
    """Shared by Sesame's two pronunciation suites: generate, recognize phonemes, judge each sample's
    variant, report accuracy — unless the judge is a random model."""

    variants: dict = {}  # word → {variant: phonemes}
    data = ""  # eval/data/<data>.jsonl

    def __init__(self, judge: str = "facebook/wav2vec2-lv-60-espeak-cv-ft", keep_audio: int = 4):
        super().__init__(keep_audio)
        self.judge_model = judge

    def conversations(self, session: Session, rows: list[dict]) -> list[list[Segment]]:
        raise NotImplementedError

    def run(self, session: Session) -> SuiteResult:
        recognizer = session.judge("phonemes", self.judge_model)
        rows = session.rows(self.data)
        audios = session.speaker.say(self.conversations(session, rows))
        heard = recognizer.recognize(audios)
        result = SuiteResult(self.name, f"phonemes:{recognizer.model_id}")
        judged = []
        for i, (row, audio, phonemes) in enumerate(zip(rows, audios, heard, strict=True)):
            judged.append(judge(phonemes, self.variants[row["word"]]))
            result.samples.append(
                {
                    "id": row["id"],
                    "text": row["text"],
                    "word": row["word"],
                    "expected": row["variant"],
                    "judged": judged[-1],
                    "phonemes": " ".join(phonemes),
                    **self._audio(session, i, row["id"], audio),
                }
            )
        if recognizer.is_random:
            result.refused = (
                f"the phoneme judge {recognizer.model_id} is a randomly initialised model: its verdicts mean "
                f"nothing. Download facebook/wav2vec2-lv-60-espeak-cv-ft (huggingface-cli download "
                f"facebook/wav2vec2-lv-60-espeak-cv-ft --local-dir DIR) and pass judges.phonemes=DIR"
            )
            return result
        result.metrics["accuracy"] = bootstrap([float(j == r["variant"]) for j, r in zip(judged, rows, strict=True)])
        for word in sorted({r["word"] for r in rows}):
            hits = [float(j == r["variant"]) for j, r in zip(judged, rows, strict=True) if r["word"] == word]
            result.metrics[f"accuracy/{word}"] = bootstrap(hits)
        return result


class HomographSuite(PronunciationSuite):
    """Sesame's homograph disambiguation: the sentence's context decides how lead, bass, tear, wound and
    row are said; the model speaks it after a prompt turn."""

    name, data = "homograph", "homographs"
    variants = HOMOGRAPHS

    def conversations(self, session: Session, rows: list[dict]) -> list[list[Segment]]:
        conversations = []
        for i, row in enumerate(rows):
            prompt = session.prompts[i % len(session.prompts)]
            conversations.append(
                [Segment(PROMPT_SPEAKER, prompt["text"], prompt["codes"]), Segment(PROMPT_SPEAKER, row["text"])]
            )
        return conversations


class ConsistencySuite(PronunciationSuite):
    """Sesame's pronunciation continuation consistency: the context turn says the word one way (espeak-ng
    forced to that variant), the model's continuation must say it the same way. Contexts are spoken with the
    en-us variant of the prompt's voice: British espeak voices cannot produce the judge's en-us phonemes."""

    name, data = "consistency", "consistency"
    variants = CONSISTENCY_WORDS

    def conversations(self, session: Session, rows: list[dict]) -> list[list[Segment]]:
        from data_pipeline.demo_corpus import speak

        spellings = espeak_variants()
        contexts = []
        for i, row in enumerate(rows):
            forced = spellings["words"][row["word"]][row["variant"]]
            text = re.sub(rf"\b{re.escape(row['word'])}\b", forced, row["context"], count=1, flags=re.IGNORECASE)
            voice = session.prompts[i % len(session.prompts)]["voice"].partition("+")[2]
            contexts.append(speak(text, f"en-us+{voice}" if voice else "en-us", speed=165))
        codes = session.speaker.encode(contexts)
        return [
            [Segment(PROMPT_SPEAKER, row["context"], c), Segment(PROMPT_SPEAKER, row["text"])]
            for row, c in zip(rows, codes, strict=True)
        ]
