"""Every shipped experiment trains as shipped.

Each `conf/experiment/*.yaml` runs through `python -m csm_train` with its own trainer, strategy, precision,
optimizer, gradient clipping, accumulation, activation checkpointing and data settings (workers, batch size,
look-ahead, validation split, epochs). Only the model (`model.preset=tiny`), the data (a synthetic corpus on disk,
the byte tokenizer: no Hub) and the device (CPU; two processes where the experiment trains on several ranks) are
shrunk. DeepSpeed experiments go through `tests/cpu_launch.py`, which lifts Lightning's CUDA-only checks and nothing
else. A new experiment file is covered without editing this test."""

import csv
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir

from csm_train import CSM, CSMConfig
from csm_train.tokenizer import ByteTokenizer
from data_pipeline.synthetic import write_synthetic_corpus

REPO = Path(__file__).resolve().parents[1]
EXPERIMENTS = sorted(p.stem for p in (REPO / "conf" / "experiment").glob("*.yaml"))
BYTE_TOKENIZER = ["data.tokenizer._target_=csm_train.tokenizer.ByteTokenizer", "~data.tokenizer.name_or_path"]


def composed(experiment: str, *overrides: str):
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        return compose(config_name="config", overrides=[f"+experiment={experiment}", *overrides])


def is_deepspeed(cfg) -> bool:
    return "DeepSpeed" in str(cfg.trainer.strategy)


def ranks(cfg) -> int:
    """Two processes where the experiment trains on every visible GPU (devices: auto) or on several."""
    return 1 if cfg.trainer.devices == 1 else 2


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """Pre-training data: 8 shards, enough for 2 ranks × 4 dataloader workers reading disjoint shards."""
    path = tmp_path_factory.mktemp("experiments") / "corpus"
    write_synthetic_corpus(path, num_conversations=32, samples_per_shard=4)
    return path


@pytest.fixture(scope="module")
def voice(tmp_path_factory):
    """Fine-tuning data as a 5-minute voice comes out of the pipeline: one shard."""
    path = tmp_path_factory.mktemp("experiments") / "voice"
    card = write_synthetic_corpus(path, num_conversations=13, samples_per_shard=64)
    assert card["shards"] == 1 and 280 < card["seconds"] < 320
    return path


@pytest.fixture(scope="module")
def start(tmp_path_factory):
    """The weights a fine-tuning recipe starts from (model.init_from), in our format."""
    path = tmp_path_factory.mktemp("experiments") / "start"
    torch.manual_seed(0)
    CSM(CSMConfig.preset("tiny", text_vocab_size=ByteTokenizer.vocab_size)).save_pretrained(path)
    return path


def losses(run_dir: Path) -> list[float]:
    with open(run_dir / "logs" / "metrics.csv") as f:
        return [float(row["train/loss"]) for row in csv.DictReader(f) if row.get("train/loss")]


@pytest.mark.slow
@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_experiment_trains_as_shipped(experiment, corpus, voice, start, tmp_path):
    shipped = composed(experiment)
    n = ranks(shipped)
    shrink = ["model.preset=tiny", "trainer.accelerator=cpu", f"trainer.devices={n}", "trainer.log_every_n_steps=1"]
    if "name_or_path" in shipped.data.tokenizer:  # Llama-3.2's tokenizer is on the Hub
        shrink += BYTE_TOKENIZER
    if shipped.fine_tuning:
        # Its own data settings (batch, workers, validation split, epochs → steps) on one shard of one voice.
        shrink += [f"data.path={voice}", f"model.init_from={start}"]
    else:
        # Its own batch size, workers and look-ahead; rows of at most 256 frames, a few steps.
        shrink += [
            f"data.path={corpus}",
            f"data.max_seq_len={min(256, shipped.data.max_seq_len)}",
            "trainer.max_steps=2",
        ]
    run_dir = tmp_path / "run"
    cfg = composed(experiment, *shrink, f"run_dir={run_dir}")
    assert cfg.model.preset == "tiny" and cfg.trainer.devices == n
    assert (cfg.trainer.precision, cfg.trainer.gradient_clip_val) == (
        shipped.trainer.precision,
        shipped.trainer.gradient_clip_val,
    )

    entry = [str(REPO / "tests" / "cpu_launch.py")] if is_deepspeed(cfg) else ["-m", "csm_train"]
    args = [f"+experiment={experiment}", *shrink, f"run_dir={run_dir}"]
    done = subprocess.run([sys.executable, *entry, *args], capture_output=True, text=True, timeout=600, cwd=REPO)
    assert done.returncode == 0, f"{' '.join(args)}\n{done.stdout[-3000:]}\n{done.stderr[-5000:]}"

    trained = losses(run_dir)
    assert len(trained) >= 2, f"{len(trained)} logged steps"
    assert all(math.isfinite(x) for x in trained) and len(set(trained)) > 1, trained
    last = run_dir / "checkpoints" / "last.ckpt"
    if is_deepspeed(cfg):  # a ZeRO checkpoint directory: its client state holds the step
        assert (last / "checkpoint").is_dir()
    else:
        assert torch.load(last, weights_only=True)["global_step"] >= 2
