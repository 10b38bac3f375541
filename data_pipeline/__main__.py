"""`python -m data_pipeline input_dir=… output_dir=…` (see conf/pipeline/ and data_pipeline/run.py)."""

import logging
import signal
import sys
from pathlib import Path

import hydra
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from data_pipeline.audio import Inputs
from data_pipeline.run import Pipeline, PipelineConfig, merge
from data_pipeline.transcribe import SidecarTranscripts, Transcriber

CONFIG_DIR = str(Path(__file__).resolve().parents[1] / "conf" / "pipeline")
STAGES = {
    "asr": ("vad", "asr", "diarizer", "quality", "codec"),
    "sidecar": ("quality", "codec"),
    "lhotse": ("quality", "codec"),  # + vad, asr and diarizer with lhotse.fallback
}


def build(cfg: DictConfig) -> Pipeline:
    if cfg.transcripts not in STAGES:
        raise ValueError(f"transcripts={cfg.transcripts!r}: use one of {sorted(STAGES)}")
    fallback = cfg.transcripts == "lhotse" and cfg.lhotse.fallback
    stages = STAGES["asr"] if fallback else STAGES[cfg.transcripts]
    components = {stage: OmegaConf.to_container(cfg[stage], resolve=True) for stage in stages}
    inputs = None
    if cfg.transcripts == "sidecar":
        transcriber = SidecarTranscripts()
    elif cfg.transcripts == "lhotse":
        from data_pipeline.corpora import LhotseTranscripts  # lhotse takes ~1.5 s to import: only when used

        asr = Transcriber(instantiate(cfg.vad), instantiate(cfg.asr), instantiate(cfg.diarizer)) if fallback else None
        transcriber = LhotseTranscripts(cfg.lhotse.recordings, cfg.lhotse.supervisions, fallback=asr)
        inputs = Inputs(transcriber.root, transcriber.inputs())
    else:
        transcriber = Transcriber(instantiate(cfg.vad), instantiate(cfg.asr), instantiate(cfg.diarizer))
    config = PipelineConfig(
        input_dir=str(inputs.root) if inputs else cfg.input_dir,
        output_dir=cfg.output_dir,
        num_parts=cfg.num_parts,
        max_positions=cfg.max_positions,
        max_gap=cfg.max_gap,
        min_seconds=cfg.min_seconds,
        max_seconds=cfg.max_seconds,
        samples_per_shard=cfg.samples_per_shard,
        max_errors=cfg.max_errors,
        max_attempts=cfg.max_attempts,
        components=components,
    )
    return Pipeline(config, instantiate(cfg.codec), transcriber, instantiate(cfg.quality), inputs=inputs)


def summary(card: dict, throughput: dict) -> str:
    lines = [
        f"recordings: {card['recordings']} kept, {card['failed']} failed (failures.jsonl)",
        f"audio: {card['input_hours']:.3f} h in, {card['hours']:.3f} h kept in {card['windows']} windows,"
        f" {card['segments']} turns, {card['speakers']} speakers, {card['shards']} shards",
    ]
    lines += [f"rejected {reason}: {count}" for reason, count in card["rejected"].items()]
    if card.get("skipped"):
        skipped = ", ".join(f"{n} {extension}" for extension, n in card["skipped"].items())
        lines.append(f"not audio by their extension, skipped: {skipped}")
    lines += [
        f"{stage:>10}: {t['seconds']:8.1f} s  {t['x_real_time'] or 0:8.1f}x real time"
        for stage, t in throughput.items()
    ]
    return "\n".join(lines)


@hydra.main(config_path=CONFIG_DIR, config_name="config", version_base="1.3")
def main(cfg: DictConfig) -> None:
    # SIGTERM (scancel, a SLURM time limit) as SystemExit: the recording in progress is left unmarked, not "killed"
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    logging.getLogger("faster_whisper").setLevel(logging.WARNING)  # one INFO line per recording otherwise
    if cfg.merge_only:
        card = merge(cfg.output_dir, cfg.num_parts)
        print(summary(card, {}))
        return
    pipeline = build(cfg)
    parts = range(cfg.num_parts) if cfg.part is None else [cfg.part]
    for part in parts:
        pipeline.run_part(part, progress=cfg.progress)
    if cfg.part is not None:
        print(f"part {cfg.part} of {cfg.num_parts} done; when all are, run again with merge_only=true")
        return
    card = merge(cfg.output_dir, cfg.num_parts)
    print(summary(card, pipeline.throughput()))
    print(f"dataset: {Path(cfg.output_dir).resolve()} (train with data=shards data.path=…)")


if __name__ == "__main__":
    main()
