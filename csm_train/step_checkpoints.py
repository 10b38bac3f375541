"""The run's checkpoints, written by a Lightning callback: `checkpoints/step-N.ckpt` every
`checkpoint.every_n_steps` optimizer steps, on the final step and when preemption asks, the newest
`checkpoint.keep` kept, and `last.ckpt` a link to the newest.

Why a link: a copy would double every save's disk and write time (at 1b a checkpoint with its AdamW state is
~18 GB). Why the final step: Lightning saves only on multiples of N, so a run of 150 steps saved every 100 would
end with `last.ckpt` at step 100, and eval or convert would read weights 50 steps old.

Reading them (the newest: `last_checkpoint`; their weights: `load_checkpoint`) is `checkpoint.py`, which loads a
model without importing Lightning."""

from __future__ import annotations

from pathlib import Path

from lightning.pytorch.callbacks import ModelCheckpoint


class StepCheckpoints(ModelCheckpoint):
    def __init__(self, directory: str | Path, every_n_steps: int, keep: int):
        super().__init__(
            dirpath=directory,
            filename="step-{step:07d}",  # no "=" in names: Hydra overrides (checkpoint=…) would need quotes
            auto_insert_metric_name=False,
            every_n_train_steps=every_n_steps,
            save_top_k=keep,
            monitor="step",
            mode="max",
            save_last="link",
            enable_version_counter=False,  # step names never repeat; a resumed run relinks last.ckpt, not last-v1
        )

    def save_now(self, trainer) -> Path:
        """Save this step (every rank calls it: sharded strategies write their own part) unless it is saved;
        returns `last.ckpt`."""
        if self._last_global_step_saved != trainer.global_step:
            candidates = self._monitor_candidates(trainer)
            self._save_topk_checkpoint(trainer, candidates)
            self._save_last_checkpoint(trainer, candidates)
        return Path(self.last_model_path)

    def on_train_start(self, trainer, module) -> None:
        self._last_global_step_saved = trainer.global_step  # a resumed run's step is the checkpoint it came from

    def on_train_end(self, trainer, module) -> None:
        self.save_now(trainer)
