"""The ASR stage's word errors, decomposed (issue 14): what the batched decode lost and what the loop check and
the second pass won back. On demo corpora with exact truth (hard style: overlaps, back-channels, noise,
telephone band; default style: clean turns), Silero's regions from the pipeline's VAD, then `FasterWhisperASR`
built from conf/pipeline exactly as `python -m data_pipeline` builds it, with these `asr.*` overrides:

* before: `asr.without_timestamps=true asr.max_compression_ratio=inf asr.passes=1` — one batched pass, no
  timestamp tokens, no compression-ratio (loop) check, no second pass: the stage before issue 14;
* timestamp tokens only: `asr.max_compression_ratio=inf asr.passes=1`;
* after: the defaults (timestamp tokens, segments over compression ratio 2.4 dropped, a second pass over the
  speech no word covers).

The reference is Whisper direct: the same tiny.en `WhisperModel.transcribe` on the whole file (beam 5, its own
temperature fallback and seeking), what tests/test_pipeline_asr.py bounds the stage against. Its fallback samples
(temperature 0.2 on a few segments of the hard corpora), and CTranslate2's seed does not fix that, so its WER
moves between runs (hard s1: 0.284-0.299 in five); the stage decodes at temperature 0 and repeats exactly. WER as
`data_pipeline.score` computes it (the truth's turns in start order, Whisper's English normaliser, jiwer), with
substitutions / deletions / insertions; `× direct` and `× before` are WER ratios; ASR cost as CPU seconds of this
process (all threads) per minute of audio, after one untimed call, VAD not included.

    python bench/bench_asr.py                      # hard seeds 1 and 7, default seed 1, 10 conversations each
    python bench/bench_asr.py --corpus hard:3:20   # the tuning set (20 conversations)
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import jiwer
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate

from data_pipeline.asr import normalize_text
from data_pipeline.audio import load_audio, to_model_rate
from data_pipeline.demo_corpus import CONFIG_DIR, write_demo_corpus
from data_pipeline.score import transcript

CONTENDERS = {
    "before": ["asr.without_timestamps=true", "asr.max_compression_ratio=inf", "asr.passes=1"],
    "timestamp tokens only": ["asr.max_compression_ratio=inf", "asr.passes=1"],
    "after (default)": [],
}


def pipeline_config(overrides: list[str]):
    with initialize_config_dir(CONFIG_DIR, version_base="1.3"):
        return compose("config", overrides=["input_dir=-", "output_dir=-", *overrides])


def demo_corpus(work: Path, spec: str) -> tuple[str, list[str], list]:
    """`STYLE:SEED[:CONVERSATIONS]` → (label, truth transcripts, 16 kHz audio), written under `work` once."""
    style, seed, *rest = spec.split(":")
    conversations = int(rest[0]) if rest else 10
    folder = work / f"{style}_s{seed}_{conversations}"
    if not (folder / "truth").is_dir():
        write_demo_corpus(folder, num_conversations=conversations, seed=int(seed), broken=False, style=style)
    truths = [json.loads(p.read_text()) for p in sorted((folder / "truth").glob("conv_*.json"))]
    audio = [to_model_rate(load_audio(folder / "audio" / t["audio"])) for t in truths]
    return f"{style} s{seed}", [transcript(t["turns"]) for t in truths], audio


def score(references: list[str], hypotheses: list[str], cpu: float, minutes: float) -> dict:
    counts = jiwer.process_words(references, hypotheses)
    return {
        "wer": counts.wer,
        "sdi": (counts.substitutions, counts.deletions, counts.insertions),
        "cpu": cpu / minutes,
    }


def timed_cpu(fn, items) -> tuple[list, float]:
    clock = time.process_time()
    results = [fn(*item) for item in items]
    return results, time.process_time() - clock


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--corpus",
        action="append",
        help="STYLE:SEED[:CONVERSATIONS] (style default or hard; 10 conversations unless given), repeatable;"
        " default hard:1 hard:7 default:1",
    )
    parser.add_argument("--work-dir", help="where the corpora are written (and reused); default a temporary one")
    args = parser.parse_args()
    specs = args.corpus or ["hard:1", "hard:7", "default:1"]

    vad = instantiate(pipeline_config([]).vad)
    asrs = {name: instantiate(pipeline_config(overrides).asr) for name, overrides in CONTENDERS.items()}
    whisper = asrs["after (default)"].pipeline.model

    def direct(audio16):
        return normalize_text(" ".join(s.text for s in whisper.transcribe(audio16, language="en", beam_size=5)[0]))

    def stage(asr):
        return lambda audio16, regions: normalize_text(" ".join(w.text for w in asr.transcribe(audio16, regions)))

    with tempfile.TemporaryDirectory() as tmp:
        work = Path(args.work_dir or tmp)
        corpora = [demo_corpus(work, spec) for spec in specs]
        warm = corpora[0][2][0][: 16_000 * 5]
        direct(warm)
        for asr in asrs.values():
            asr.transcribe(warm, [(0.0, 5.0)])
        print("| corpus | words from | WER | S / D / I | × direct | × before | ASR CPU s per audio min |")
        print("| --- | --- | --- | --- | --- | --- | --- |")
        for label, references, audio in corpora:
            minutes = sum(len(a) for a in audio) / 16_000 / 60
            regions = [vad(a) for a in audio]
            hypotheses, cpu = timed_cpu(direct, [(a,) for a in audio])
            rows = {"Whisper direct (whole file)": score(references, hypotheses, cpu, minutes)}
            for name, asr in asrs.items():
                hypotheses, cpu = timed_cpu(stage(asr), list(zip(audio, regions, strict=True)))
                rows[f"stage, {name}"] = score(references, hypotheses, cpu, minutes)
            reference, before = rows["Whisper direct (whole file)"]["wer"], rows["stage, before"]["wer"]
            for name, r in rows.items():
                s, d, i = r["sdi"]
                print(
                    f"| {label}, {len(audio)} rec., {minutes:.1f} min | {name} | **{r['wer']:.3f}** "
                    f"| {s} / {d} / {i} | {r['wer'] / reference:.2f}x | {r['wer'] / before:.2f}x | {r['cpu']:.1f} |",
                    flush=True,
                )


if __name__ == "__main__":
    main()
