"""The offline diarizer's settings, side by side on one demo corpus: DER (pyannote.metrics, 0.5 s collar) of
the resemblyzer + clustering diarizer for each window size and clustering threshold, on the corpus's speech
regions from Silero VAD. This is the measurement behind the defaults in conf/pipeline/diarizer/resemblyzer.yaml.

    python bench/bench_diarizer.py --conversations 12 --seed 1 [--style hard]
"""

from __future__ import annotations

import argparse
import itertools
import json
import tempfile
from pathlib import Path

from pyannote.metrics.diarization import DiarizationErrorRate

from data_pipeline.audio import load_audio, to_model_rate
from data_pipeline.demo_corpus import STYLES, write_demo_corpus
from data_pipeline.diarize import EmbeddingDiarizer
from data_pipeline.score import score_recording
from data_pipeline.vad import SileroVAD


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--conversations", type=int, default=12)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--style", choices=STYLES, default="default", help="demo corpus style (demo_corpus.STYLES)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        write_demo_corpus(tmp, num_conversations=args.conversations, seed=args.seed, broken=False, style=args.style)
        vad, recordings = SileroVAD(), []
        for path in sorted((Path(tmp) / "truth").glob("conv_*.json")):
            truth = json.loads(path.read_text())
            audio = load_audio(Path(tmp) / "audio" / truth["audio"])
            audio16 = to_model_rate(audio)
            recordings.append((truth, audio16, vad(audio16)))
    diarizer = EmbeddingDiarizer()
    print(f"{len(recordings)} {args.style} conversations (seed {args.seed}); DER with a 0.5 s collar")
    for (window, step), threshold in itertools.product(((1.5, 0.75), (3.0, 1.5)), (0.2, 0.3, 0.4)):
        diarizer.window, diarizer.step, diarizer.threshold = window, step, threshold
        metric = DiarizationErrorRate(collar=0.5)
        for truth, audio16, regions in recordings:
            score_recording(metric, truth, [(s.start, s.end, s.speaker) for s in diarizer(audio16, regions)])
        print(f"window {window:.1f} s / hop {step:.2f} s  threshold {threshold:.1f}:  DER {abs(metric):.3f}")


if __name__ == "__main__":
    main()
