"""What a run prints (training; eval's CLI shares the quieting): one progress line of optimizer steps, our summary
lines, and real warnings.

Lightning's own bar counts batches of epochs (`Epoch 0/-2` on a stream that never ends one), and the libraries print
start-up chatter (device lines, a logging-service advertisement, deprecation notices about their own internals)
that says nothing about the run. Each silenced message is named below; anything else still reaches the user."""

from __future__ import annotations

import logging
import os
import warnings

import torch
from lightning.pytorch.callbacks import ProgressBar
from tqdm.auto import tqdm

# Lightning's informational lines (device availability, seeding, "Trainer.fit stopped", tips to install its cloud
# loggers): the run prints its own directory, resume point and final step instead; faster-whisper's line per
# transcribed clip (eval's judge). Their warnings stay.
CHATTY_LOGGERS = ("lightning.pytorch.utilities.rank_zero", "lightning.fabric.utilities.seed", "faster_whisper")

# Warnings about the libraries' internals, or about choices this project made on purpose.
EXPECTED_WARNINGS = (
    r"`isinstance\(treespec, LeafSpec\)` is deprecated",  # Lightning's pytree helper on torch ≥ 2.10
    r"`torch.distributed.all_gather_into_tensor` is deprecated",  # DeepSpeed's ZeRO collectives
    # Our configure_gradient_clipping lets bf16-mixed clip with a fused AdamW; DeepSpeed clips by its own config
    # (gradient_clipping, which Lightning fills from trainer.gradient_clip_val).
    r"Since DeepSpeed handles gradient clipping internally",
    # A resumed run reuses its directory by design (csm_train/train.py checks it holds the same run) with the
    # callbacks that wrote the checkpoint.
    r"Checkpoint directory .* exists and is not empty",
    r"Experiment logs directory .* exists and is not empty",
    r"Be aware that when using `ckpt_path`, callbacks used to create the checkpoint need to be provided",
)


def quiet_libraries() -> None:
    if not torch.cuda.is_available():  # else DeepSpeed, imported by Lightning or transformers, warns it found no GPU
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    for name in CHATTY_LOGGERS:
        logging.getLogger(name).setLevel(logging.WARNING)
    for message in EXPECTED_WARNINGS:
        warnings.filterwarnings("ignore", message=message)


class StepProgress(ProgressBar):
    """On rank 0: `training  37%|███▋      | 55/150 [00:21<00:37, 2.6step/s, loss=9.12]`, optimizer steps of
    `trainer.max_steps` (with gradient accumulation a step is several batches), and each validation's loss."""

    def __init__(self):
        super().__init__()
        self.enabled = True
        self.bar: tqdm | None = None

    def disable(self) -> None:
        self.enabled = False

    def enable(self) -> None:
        self.enabled = True

    def on_train_start(self, trainer, module) -> None:
        if self.enabled and trainer.is_global_zero:
            self.bar = tqdm(total=trainer.max_steps, initial=trainer.global_step, desc="training", unit="step")

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:
        if self.bar is not None and trainer.global_step > self.bar.n:
            loss = trainer.progress_bar_metrics.get("loss")
            if loss is not None:
                self.bar.set_postfix(loss=f"{loss:.3f}", refresh=False)
            self.bar.update(trainer.global_step - self.bar.n)

    def on_validation_end(self, trainer, module) -> None:
        if self.bar is not None and "val/loss" in trainer.callback_metrics:
            self.bar.write(f"step {trainer.global_step}: val/loss {float(trainer.callback_metrics['val/loss']):.3f}")

    def on_train_end(self, trainer, module) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None

    def print(self, *args, **kwargs) -> None:
        (self.bar.write if self.bar is not None else print)(" ".join(map(str, args)))
