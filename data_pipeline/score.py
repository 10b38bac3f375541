"""Score a pipeline's output against ground truth: word error rate of the transcripts (jiwer) and diarization
error rate of the speaker turns (pyannote.metrics), per recording and over the corpus.

Truth is one `{recording}.json` per recording in `truth_dir`, `{"turns": [{"speaker", "text", "start",
"end"}, ...]}` (what data_pipeline/demo_corpus.py writes). The output is read back from the dataset's
shards, so what is scored is exactly what the trainer gets: turns the quality filters rejected count as
deletions and missed speech.

Overlapped speech: DER scores each speaker's turns on their own (pyannote's annotations hold overlapping
turns; overlapped time counts once per speaker). WER compares one word sequence per recording, the turns'
words in order of turn start, on both sides: a back-channel said over a sentence comes after that
sentence's words, wherever in it it was said. A system that puts it elsewhere pays a deletion and an
insertion for it; a system that drops it, a deletion.

    python -m data_pipeline.score DATASET TRUTH_DIR [--collar 0]
"""

from __future__ import annotations

import argparse
import json
from collections import defaultdict
from pathlib import Path

from data_pipeline.asr import normalize_text
from data_pipeline.shards import read_samples


def dataset_turns(dataset_dir: str | Path) -> dict[str, list[dict]]:
    """Source recording (path below the input dir, no suffix) → its kept turns in time order."""
    turns: dict[str, list[dict]] = defaultdict(list)
    for _, sample in read_samples(dataset_dir):
        source = str(Path(json.loads(sample["meta.json"])["source"]).with_suffix(""))
        turns[source] += json.loads(sample["segments.json"])
    return {source: sorted(ts, key=lambda t: t["start"]) for source, ts in turns.items()}


def _truth(truth_dir: Path) -> dict[str, dict]:
    records = {p.stem: json.loads(p.read_text()) for p in sorted(truth_dir.glob("*.json"))}
    return {name: record for name, record in records.items() if "turns" in record}


def transcript(turns: list[dict]) -> str:
    """A recording's words as WER compares them: its turns in order of start (ties in the order given), after
    Whisper's English normaliser (eval.metrics)."""
    ordered = sorted(turns, key=lambda t: t["start"])
    return normalize_text(" ".join(t["text"] for t in ordered))


def word_error_rate(dataset_dir: str | Path, truth_dir: str | Path) -> dict:
    """Corpus WER (errors over all reference words) and each recording's, on `transcript`s. A recording missing
    from the dataset counts with every word deleted."""
    import jiwer

    truth, hypothesis = _truth(Path(truth_dir)), dataset_turns(dataset_dir)
    references = [transcript(record["turns"]) for record in truth.values()]
    hypotheses = [transcript(hypothesis.get(name, [])) for name in truth]
    per_recording = {name: jiwer.wer(r, h) for name, r, h in zip(truth, references, hypotheses, strict=True)}
    return {"wer": jiwer.wer(references, hypotheses), "per_recording": per_recording}


def diarization_error_rate(dataset_dir: str | Path, truth_dir: str | Path, collar: float = 0.5) -> dict:
    """Corpus DER (missed speech + false alarm + speaker confusion over reference speech time) and each
    recording's, with the standard forgiveness `collar` (total width, centred on reference boundaries:
    0.5 = ±0.25 s) because turn boundaries come from word timestamps, not from the waveform."""
    from pyannote.metrics.diarization import DiarizationErrorRate

    truth, hypothesis = _truth(Path(truth_dir)), dataset_turns(dataset_dir)
    metric = DiarizationErrorRate(collar=collar, skip_overlap=False)
    per_recording = {
        name: score_recording(metric, record, [(t["start"], t["end"], t["speaker"]) for t in hypothesis.get(name, [])])
        for name, record in truth.items()
    }
    return {"der": abs(metric), "per_recording": per_recording, "components": dict(metric[:])}


def score_recording(metric, record: dict, turns: list[tuple[float, float, int | str]]) -> float:
    """Add one recording to a pyannote `metric`: its truth `record` against `(start, end, speaker)` turns,
    over the whole recording. Returns the recording's own value. Turns may overlap; each is its own track, so
    two speakers' turns with equal times both count."""
    from pyannote.core import Annotation, Segment, Timeline

    reference, output = Annotation(), Annotation()
    for i, turn in enumerate(record["turns"]):
        reference[Segment(turn["start"], turn["end"]), i] = turn["speaker"]
    for i, (start, end, speaker) in enumerate(turns):
        output[Segment(start, end), i] = str(speaker)
    extent = Timeline([Segment(0.0, record.get("duration", max(t["end"] for t in record["turns"])))])
    return metric(reference, output, uem=extent)


def main() -> None:
    parser = argparse.ArgumentParser(description="WER and DER of a pipeline dataset against ground truth.")
    parser.add_argument("dataset", help="the dataset directory (shards/, manifest.jsonl)")
    parser.add_argument("truth", help="a directory of {recording}.json truth files (as demo_corpus writes)")
    parser.add_argument("--collar", type=float, default=0.5, help="DER forgiveness around boundaries, seconds (total)")
    args = parser.parse_args()
    wer = word_error_rate(args.dataset, args.truth)
    der = diarization_error_rate(args.dataset, args.truth, collar=args.collar)
    print(f"WER {wer['wer']:.3f}  DER {der['der']:.3f} (collar {args.collar:g} s)")
    for name in wer["per_recording"]:
        print(f"  {name}: WER {wer['per_recording'][name]:.3f}  DER {der['per_recording'][name]:.3f}")


if __name__ == "__main__":
    main()
