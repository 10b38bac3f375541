"""What the suites evaluate: a checkpoint with its text tokenizer and its codec, turning text (with the
earlier turns of a conversation as context) into 24 kHz speech.

A training checkpoint (`runs/<experiment>/<run_id>/checkpoints/*.ckpt`, or the run directory itself) knows
the rest: the run's `config.yaml` names the tokenizer and the dataset, whose `dataset.json` names the
codec the codes came from — evaluating with any other codec would decode someone else's tokens. Exported
checkpoints (ours, Sesame's, transformers') need `tokenizer` and `codec` given.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
from omegaconf import OmegaConf

from csm_train.checkpoint import is_training_checkpoint, last_checkpoint, training_state
from csm_train.generate import Sampling, generate, prompt_frames
from csm_train.layout import Segment
from csm_train.model import CSM
from data_pipeline.codec import RANDOM_INIT, MimiCodec
from data_pipeline.shards import MIMI_FRAME_RATE, read_card


@dataclass
class Checkpoint:
    """A checkpoint resolved for evaluation: what it is, where it came from, what it was trained on."""

    path: Path
    step: int | None
    run_dir: Path | None
    tokenizer: dict  # Hydra config of the text tokenizer
    codec: str  # the codec's weights id, as data_pipeline records it

    def describe(self) -> dict:
        return {
            "checkpoint": str(self.path),
            "step": self.step,
            "run_dir": str(self.run_dir) if self.run_dir else None,
            "tokenizer": self.tokenizer,
            "codec": self.codec,
        }


def dataset_codec(dataset_dir: str | Path) -> str | None:
    """The codec a dataset's audio was encoded with (`dataset.json` → `codec.weights_id`), None if it does not say
    (the synthetic corpus)."""
    return read_card(dataset_dir).get("codec", {}).get("weights_id")


def codec_from_weights_id(weights_id: str, device: str = "auto") -> MimiCodec:
    """The codec a dataset records (`dataset.json` → `codec.weights_id`): a Hub id or directory, or the
    seeded random Mimi (`random-init:seed=N`)."""
    if weights_id.startswith(RANDOM_INIT):
        seed = int(weights_id.partition("seed=")[2] or 0)
        return MimiCodec(RANDOM_INIT, device=device, seed=seed)
    return MimiCodec(weights_id, device=device)


def resolve_checkpoint(path: str | Path, tokenizer: dict | None = None, codec: str | None = None) -> Checkpoint:
    """Find the checkpoint file (a run directory means its newest checkpoint) and what it was trained with;
    explicit `tokenizer` / `codec` win over what the run recorded."""
    path = Path(path)
    if (path / "checkpoints").is_dir():
        newest = last_checkpoint(path)
        if newest is None:
            raise FileNotFoundError(f"run directory {path} has no checkpoints yet: train it first")
        path = newest
    if not path.exists():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    run_dir = path.parent.parent if path.parent.name in ("checkpoints", "best") else None
    step = None
    if run_dir is not None and (run_dir / "config.yaml").exists():
        run_cfg = OmegaConf.load(run_dir / "config.yaml")
        tokenizer = tokenizer or OmegaConf.to_container(run_cfg.data.tokenizer)
        codec = codec or dataset_codec(run_cfg.data.path)
    if is_training_checkpoint(path):  # a Lightning .ckpt, or a ZeRO directory (DeepSpeed's last.ckpt/)
        saved_step = training_state(path).get("global_step")  # read safely: csm_train.checkpoint
        step = None if saved_step is None else int(saved_step)
    missing = [name for name, value in (("tokenizer", tokenizer), ("codec", codec)) if not value]
    if missing:
        raise ValueError(
            f"{path}: cannot tell which {' and '.join(missing)} it was trained with (no run config.yaml with a "
            f"pipeline dataset beside it); pass {' and '.join(f'{m}=…' for m in missing)}, e.g. codec=kyutai/mimi "
            f"'tokenizer={{_target_: csm_train.tokenizer.load_tokenizer, name_or_path: meta-llama/Llama-3.2-1B}}'"
        )
    return Checkpoint(path, step, run_dir, dict(tokenizer), codec)


def load_model(path: Path, quantize: str | None = None) -> CSM:
    """Our model in fp32 from a training checkpoint (Lightning / DeepSpeed) or an exported one (any format);
    `quantize` ("int8" | "int4"): its backbone and decoder weight-only quantized (CPU, csm_train/quantize.py)."""
    return CSM.from_pretrained(path, quantize=quantize).float().eval()


SEEDED = Sampling(seed=0)  # evaluations are reproducible


class Speaker:
    """Generates the last turn of each conversation as speech. Each answer gets a frame budget from its
    text's length (`seconds_per_char`, at most `max_seconds`): an undertrained model that never emits the
    end-of-audio frame then costs a bounded time, and long sentences are not cut short."""

    def __init__(
        self,
        model: CSM,
        tokenizer,
        codec: MimiCodec,
        max_seconds: float = 20.0,
        seconds_per_char: float = 0.15,
        sampling: Sampling | dict = SEEDED,
        batch_size: int = 8,
    ):
        """`sampling`'s `max_frames` is replaced by each batch's budget, and its seed by `seed + index of the
        batch's first conversation`, so a conversation's audio does not depend on the batch size's split."""
        self.model, self.tokenizer, self.codec = model, tokenizer, codec
        self.max_seconds, self.seconds_per_char = max_seconds, seconds_per_char
        self.sampling = Sampling(**sampling) if isinstance(sampling, dict) else sampling  # a dict: from a config
        self.batch_size = batch_size

    @classmethod
    def from_checkpoint(cls, checkpoint: Checkpoint, device: str, quantize: str | None = None, **settings) -> Speaker:
        """The checkpoint's model (`quantize`: int8 | int4 weights, CPU only), text tokenizer and codec, on `device`."""
        import hydra

        if quantize and torch.device(device).type != "cpu":
            raise ValueError(f"quantize={quantize} runs on CPU kernels; device is {device}")
        model = load_model(checkpoint.path, quantize).to(device)
        return cls(
            model,
            hydra.utils.instantiate(checkpoint.tokenizer),
            codec_from_weights_id(checkpoint.codec, device),
            **settings,
        )

    def budget(self, text: str) -> int:
        seconds = min(self.max_seconds, 1.0 + self.seconds_per_char * len(text))
        return math.ceil(seconds * MIMI_FRAME_RATE)

    def encode(self, audios: list[np.ndarray]) -> list[torch.Tensor]:
        """24 kHz clips → their Mimi codes `[K, n]`, as a context `Segment` takes them."""
        return [torch.from_numpy(codes.astype(np.int64)) for codes in self.codec.encode(audios)]

    def say(self, conversations: list[list[Segment]]) -> list[np.ndarray]:
        """For each conversation (context turns with codes, then the turn to speak, text only): its 24 kHz
        audio."""
        K = self.model.config.num_codebooks
        out: list[np.ndarray] = []
        for start in range(0, len(conversations), self.batch_size):
            batch = conversations[start : start + self.batch_size]
            prompts = []
            for turns in batch:
                *context, last = turns
                prompts.append(prompt_frames(self.tokenizer, K, last.text, last.speaker, context))
            budgets = [self.budget(turns[-1].text) for turns in batch]
            device = self.model.codebook0_head.weight.device
            prompts = [(t.to(device), m.to(device)) for t, m in prompts]
            seed = None if self.sampling.seed is None else self.sampling.seed + start
            generated = generate(self.model, prompts, replace(self.sampling, max_frames=max(budgets), seed=seed))
            for codes, budget in zip(generated.codes, budgets, strict=True):
                codes = codes[:, :budget]
                out.append(self.codec.decode(codes) if codes.shape[1] else np.zeros(0, np.float32))
        return out
