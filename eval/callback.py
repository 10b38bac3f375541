"""Evaluation during training: a few light suites every N steps, on rank 0, logged beside the losses."""

from __future__ import annotations

from pathlib import Path

from lightning.pytorch.callbacks import Callback

from data_pipeline.device import resolve_device
from eval.run import load_suites, run_suites
from eval.speaker import Speaker, codec_from_weights_id, dataset_codec
from eval.suites import Session


class EvaluateEvery(Callback):
    """Runs `suites` (names in conf/eval/suite/) with `limit` samples each every `every_n_steps` optimizer
    steps and logs `eval/<suite>/<metric>` to the trainer's loggers (CSV, W&B). Only rank 0 generates; the
    other ranks wait at their next collective, so keep the suites light (the default: 8 WER sentences,
    scored for WER and speaker similarity, about a minute for the tiny model on CPU). The codec is the one
    the training data was encoded with, from the dataset's `dataset.json`, unless `codec` is given."""

    def __init__(
        self,
        every_n_steps: int,
        out_dir: str | Path,
        suites: list[str] = ("wer", "sim"),
        limit: int = 8,
        codec: str | None = None,
        speaker: dict | None = None,
    ):
        if every_n_steps < 1:
            raise ValueError(f"evaluate.every_n_steps={every_n_steps}: must be ≥ 1 (0 in the config turns it off)")
        self.every_n_steps, self.out_dir, self.limit = every_n_steps, Path(out_dir), limit
        self.suites = load_suites(list(suites))
        self.codec_id, self.speaker_args = codec, speaker or {}
        self._codec = None
        self._last_step = None

    def on_fit_start(self, trainer, module) -> None:
        if getattr(trainer.strategy, "zero_stage_3", False):
            raise ValueError(
                "evaluate.every_n_steps with ZeRO-3: the parameters are sharded across ranks, so rank 0 cannot "
                "generate alone; evaluate saved checkpoints with `python -m eval` instead"
            )

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:
        step = trainer.global_step  # optimizer steps; with gradient accumulation several batches share one
        if step == 0 or step % self.every_n_steps or step == self._last_step or not trainer.is_global_zero:
            return
        self._last_step = step
        device = resolve_device(str(module.device.type))
        if self._codec is None:
            self._codec = codec_from_weights_id(self.codec_id or self._dataset_codec(trainer), device)
        model = module.model
        was_training = model.training
        model.eval()
        try:
            speaker = Speaker(model, trainer.datamodule.tokenizer, self._codec, **self.speaker_args)
            results = run_suites(Session(speaker, self.out_dir / f"step-{step:07d}", self.limit, device), self.suites)
        finally:
            model.train(was_training)
        metrics = {f"eval/{r.suite}/{name}": e.value for r in results for name, e in r.metrics.items()}
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=step)

    @staticmethod
    def _dataset_codec(trainer) -> str:
        codec = dataset_codec(trainer.datamodule.path)
        if not codec:
            raise ValueError(
                f"evaluate: {trainer.datamodule.path}/dataset.json does not say which codec encoded the training "
                f"data (the synthetic corpus has none); set evaluate.codec (e.g. kyutai/mimi) or train on a "
                f"data_pipeline dataset"
            )
        return codec
