"""Data-pipeline throughput on the espeak-ng demo corpus, in × real time (audio seconds per wall second).

Three side-by-side comparisons, each on the same audio in one run:
* ingest: FFmpeg (PyAV) decoding streamed through soxr block by block (what `load_audio` does) vs. libsndfile
  reading the whole file and soxr resampling it in one call (the pipeline's ingest before it read m4a/aac/webm);
* ASR: faster-whisper's batched pipeline (what `FasterWhisperASR` uses) vs. its sequential `transcribe` over
  the same VAD chunks — and whether they return the same words;
* diarizer embeddings: our batched d-vectors vs. resemblyzer's `embed_utterance` one window at a time (equal
  vectors);
then every stage of a whole `Pipeline` run (ingest, VAD, ASR, diarization, quality, Mimi encoding).

    python bench/bench_pipeline.py --conversations 4
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import pyloudnorm
import soundfile as sf
import soxr

from data_pipeline.asr import FasterWhisperASR
from data_pipeline.audio import MODEL_SAMPLE_RATE, discover, load_audio, to_model_rate
from data_pipeline.codec import RANDOM_INIT, MimiCodec
from data_pipeline.demo_corpus import write_demo_corpus
from data_pipeline.diarize import EmbeddingDiarizer, windows
from data_pipeline.run import Pipeline, PipelineConfig
from data_pipeline.shards import MIMI_SAMPLE_RATE
from data_pipeline.transcribe import Transcriber
from data_pipeline.vad import SileroVAD, merge_regions


def timed(fn, *args):
    start = time.perf_counter()
    result = fn(*args)
    return result, time.perf_counter() - start


def whole_file_ingest(path: Path) -> np.ndarray:
    """The old ingest: libsndfile decodes the whole file, soxr resamples it at once, pyloudnorm measures it."""
    audio, rate = sf.read(path, dtype="float32", always_2d=True)
    audio = soxr.resample(audio.mean(axis=1), rate, MIMI_SAMPLE_RATE, quality="HQ").astype(np.float32)
    pyloudnorm.Meter(MIMI_SAMPLE_RATE).integrated_loudness(audio.astype(np.float64))
    return audio


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--conversations", type=int, default=4)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        corpus = Path(tmp) / "corpus"
        write_demo_corpus(corpus, num_conversations=args.conversations, broken=False)
        paths = discover(corpus / "audio").paths
        load_audio(paths[0]), whole_file_ingest(paths[0])  # warm-up: FFmpeg's and libsndfile's first open
        recordings, t_streamed = timed(lambda: [load_audio(p) for p in paths])
        _, t_whole = timed(lambda: [whole_file_ingest(p) for p in paths])
        audio16 = [to_model_rate(a) for a in recordings]
        seconds = sum(len(a) for a in recordings) / MIMI_SAMPLE_RATE
        vad = SileroVAD()
        regions = [vad(a) for a in audio16]
        print(f"{len(recordings)} conversations, {seconds:.1f} s of audio")
        print(f"ingest  FFmpeg streamed {seconds / t_streamed:6.0f}x rt   libsndfile whole {seconds / t_whole:6.0f}x rt"
              f"   ratio {t_streamed / t_whole:.2f}")  # fmt: skip

        asr = FasterWhisperASR()
        whisper = asr.pipeline.model
        asr.transcribe(audio16[0], regions[0])  # warm-up
        batched, t_batched = timed(lambda: [asr.transcribe(a, r) for a, r in zip(audio16, regions, strict=True)])

        def sequential():
            words = []
            for a, r in zip(audio16, regions, strict=True):
                clips = [t for chunk in merge_regions(r) for t in chunk]
                segments, _ = whisper.transcribe(
                    a, language="en", beam_size=5, word_timestamps=True, clip_timestamps=clips
                )
                words.append([w.word.strip() for s in segments for w in s.words])
            return words

        plain, t_plain = timed(sequential)
        same = sum(b == [w.text for w in x] for b, x in zip(plain, batched, strict=True))
        print(f"ASR  batched {seconds / t_batched:6.1f}x rt   sequential {seconds / t_plain:6.1f}x rt"
              f"   ratio {t_plain / t_batched:.2f}   identical words in {same}/{len(batched)} recordings")  # fmt: skip

        diarizer = EmbeddingDiarizer()
        clips = [
            a[int(s * MODEL_SAMPLE_RATE) : int(e * MODEL_SAMPLE_RATE)]
            for a, r in zip(audio16, regions, strict=True)
            for s, e, _, _ in windows(r, diarizer.window, diarizer.step)
        ]
        diarizer.encoder.embed(clips[:2])  # warm-up
        ours, t_ours = timed(diarizer.encoder.embed, clips)
        theirs, t_theirs = timed(lambda: np.stack([diarizer.encoder.encoder.embed_utterance(c) for c in clips]))
        print(f"d-vectors  batched {seconds / t_ours:6.1f}x rt   one by one {seconds / t_theirs:6.1f}x rt"
              f"   ratio {t_theirs / t_ours:.2f}   max |difference| {np.abs(ours - theirs).max():.1e}")  # fmt: skip

        config = PipelineConfig(str(corpus / "audio"), str(Path(tmp) / "dataset"), max_positions=512)
        pipeline = Pipeline(config, MimiCodec(RANDOM_INIT), Transcriber(vad, asr, diarizer))
        pipeline.run_part(0, progress=False)
        for stage, t in pipeline.throughput().items():
            print(f"stage {stage:>10}: {t['seconds']:7.2f} s  {t['x_real_time']:9.1f}x real time")


if __name__ == "__main__":
    main()
