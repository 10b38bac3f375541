"""`python -m csm_train`: compose the Hydra config, build data, model and trainer, resume if the run
directory already holds a checkpoint, and fit."""

from __future__ import annotations

import math
import time
from pathlib import Path

import hydra
import lightning as L
import torch
from lightning.pytorch.callbacks import Callback, EarlyStopping, LearningRateMonitor, ModelCheckpoint
from omegaconf import DictConfig

from csm_train.checkpoint import last_checkpoint
from csm_train.console import StepProgress, quiet_libraries
from csm_train.data import CSMDataModule, positions_per_epoch
from csm_train.model import CSMConfig
from csm_train.module import CSMModule
from csm_train.plan import decoder_frames_run, format_plan, gpu_peak_bf16_flops, plan, train_step_flops
from csm_train.preemption import Preemption
from csm_train.run_dir import check_run_dir, claim_run_dir, run_identity
from csm_train.step_checkpoints import StepCheckpoints
from data_pipeline.shards import MIMI_FRAME_RATE, check_codec, read_card


def device_peak_flops(configured: float | None) -> float | None:
    """The per-device peak MFU divides by: `peak_flops=` if set, else the dense bf16 datasheet peak of this
    exact GPU (plan.GPU_PEAK_BF16_FLOPS), else None (MFU not logged: an unknown peak is not guessed)."""
    if configured is not None:
        return float(configured)
    if torch.cuda.is_available():
        return gpu_peak_bf16_flops(torch.cuda.get_device_name())
    return None


class Throughput(Callback):
    """Per step: frames/s, audio-seconds/s, and MFU (model FLOPs/s of this rank ÷ its peak)."""

    def __init__(self, peak_flops: float | None):
        self.peak_flops = peak_flops
        self._start = 0.0

    def on_train_batch_start(self, trainer, module, batch, batch_idx):
        self._start = time.perf_counter()

    def on_train_batch_end(self, trainer, module: CSMModule, outputs, batch, batch_idx):
        seconds = time.perf_counter() - self._start
        frames = int(batch.tokens_mask.any(-1).sum())  # non-padding frames: the backbone's useful work
        audio_frames = int((batch.labels[..., 0] != -100).sum())
        # The backbone is charged on every frame, the depth decoder only on the ⌈fraction × audio targets⌉ frames
        # the loss runs it on (plan.train_step_flops).
        decoder_frames = decoder_frames_run(batch.labels, module.loss_weights.decoder_fraction)
        flops = train_step_flops(module.config, frames, decoder_frames, batch.tokens.shape[1])
        metrics = {
            "perf/frames_per_s": frames / seconds,
            "perf/audio_s_per_s": audio_frames / MIMI_FRAME_RATE / seconds,
        }
        if self.peak_flops:
            metrics["perf/mfu"] = flops / seconds / self.peak_flops
        module.log_dict(metrics)


def world_size(cfg: DictConfig) -> int:
    """Ranks the trainer config asks for; devices "auto"/-1 means every visible GPU (one on a CPU machine)."""
    devices = cfg.trainer.devices
    if devices in ("auto", -1):
        devices = max(1, torch.cuda.device_count())
    return int(devices) * int(cfg.trainer.num_nodes)


def print_plan(cfg: DictConfig) -> None:
    """The dry run: nothing is downloaded or allocated (the preset's own text vocabulary is assumed)."""
    config = CSMConfig.preset(cfg.model.preset, activation_checkpointing=cfg.model.activation_checkpointing)
    gpus = world_size(cfg)
    p = plan(
        config,
        gpus=gpus,
        rows=cfg.data.batch_size,
        seq_len=cfg.data.max_seq_len,
        accumulate=cfg.trainer.accumulate_grad_batches,
        decoder_fraction=cfg.model.loss.decoder_fraction,
    )
    checkpointing = "on" if config.activation_checkpointing else "off"
    print(f"plan for experiment {cfg.experiment}: preset {cfg.model.preset}, activation checkpointing {checkpointing}")
    print(format_plan(p, gpus))


def steps_for_epochs(cfg: DictConfig, tokenizer) -> int:
    """`epochs=N` (the fine-tuning recipes): N passes over the dataset as optimizer steps, which the schedule
    needs up front. Rows are packed, so a pass takes about positions / (rows × length) batches."""
    path = Path(cfg.data.path)
    if not (path / "manifest.jsonl").exists():
        raise FileNotFoundError(
            f"epochs={cfg.epochs} counts the dataset at data.path={path}, which has no manifest.jsonl"
        )
    num_codebooks = CSMConfig.preset(cfg.model.preset).num_codebooks
    positions = positions_per_epoch(path, tokenizer, num_codebooks, cfg.data.max_seq_len, cfg.data.holdout)
    per_step = cfg.data.batch_size * cfg.data.max_seq_len * world_size(cfg)
    steps = max(1, math.ceil(cfg.epochs * positions / (per_step * cfg.trainer.accumulate_grad_batches)))
    print(f"epochs={cfg.epochs}: {positions:,} positions per pass, {per_step:,} per batch → {steps} steps")
    return steps


def fit_schedule_to_data(cfg: DictConfig, tokenizer) -> None:
    """`epochs=N` sets trainer.max_steps; with a validation split (data.holdout) and no val_check_interval, the
    run validates after every pass over the data, else at every checkpoint (the stream never ends an epoch)."""
    steps_per_epoch = None
    if cfg.epochs:
        cfg.trainer.max_steps = steps_for_epochs(cfg, tokenizer)
        steps_per_epoch = max(1, cfg.trainer.max_steps // cfg.epochs)
    if cfg.data.holdout and cfg.trainer.val_check_interval is None:
        every = steps_per_epoch or cfg.checkpoint.every_n_steps
        cfg.trainer.val_check_interval = every * cfg.trainer.accumulate_grad_batches


def pin_sweep_point(cfg: DictConfig, point: str) -> None:
    """Under `--multirun`, each sweep point gets its own run directory and W&B run, named by its overrides
    (`run_dir/seed-1__model.optim.lr-0.001`): the same every time the point runs, so a requeued job resumes its
    own run. `point` is Hydra's `job.override_dirname` (its keys and separators are set in conf/config.yaml)."""
    if point:
        run_dir = Path(cfg.run_dir) / point  # resolved before run_id changes: run_dir may interpolate it
        cfg.run_id = f"{cfg.run_id}.{point}"
        cfg.run_dir = str(run_dir)


def check_dataset(cfg: DictConfig) -> None:
    """Refuse, before anything is built, a dataset whose card (`dataset.json`) says the model cannot train on it
    (its codebook count, frame rate, sample rate, codec). A dataset without a card is checked sample by sample as
    it streams (csm_train/data.py); the synthetic corpus, written on first use, is made for the model."""
    num_codebooks = CSMConfig.preset(cfg.model.preset).num_codebooks
    problems = check_codec(read_card(cfg.data.path).get("codec") or {}, num_codebooks)
    if problems:
        raise ValueError(
            f"data.path={cfg.data.path} cannot train model.preset={cfg.model.preset} (from its dataset.json):\n"
            + "\n".join(f"  - {problem}" for problem in problems)
        )


def train(cfg: DictConfig, extra_callbacks: list[Callback] = ()) -> L.Trainer | None:
    quiet_libraries()
    L.seed_everything(cfg.seed, workers=True)
    run_dir = Path(cfg.run_dir)
    if cfg.dry_run:
        print_plan(cfg)
        return None
    if cfg.fine_tuning and not cfg.model.init_from:
        raise ValueError(
            f"+experiment={cfg.experiment} fine-tunes existing weights: name them with model.init_from=… "
            f"(sesame/csm-1b, a local checkpoint, or one of your run directories)"
        )
    # The tokenizer's vocabulary sizes the model's text embeddings; the model's codebook count the data.
    tokenizer = hydra.utils.instantiate(cfg.data.tokenizer)
    check_dataset(cfg)
    check_run_dir(cfg, run_dir, run_identity(cfg, tokenizer))  # before building anything: a different run is refused
    fit_schedule_to_data(cfg, tokenizer)
    module: CSMModule = hydra.utils.instantiate(cfg.model, text_vocab_size=tokenizer.vocab_size, _convert_="all")
    datamodule: CSMDataModule = hydra.utils.instantiate(
        cfg.data, tokenizer=tokenizer, num_codebooks=module.config.num_codebooks
    )
    checkpoints = StepCheckpoints(run_dir / "checkpoints", cfg.checkpoint.every_n_steps, cfg.checkpoint.keep)
    preemption = Preemption(checkpoints, grace_s=cfg.stop_grace_s)
    callbacks = [
        preemption,
        checkpoints,
        StepProgress(),
        LearningRateMonitor(logging_interval="step"),
        Throughput(device_peak_flops(cfg.peak_flops)),
        *extra_callbacks,
    ]
    if cfg.data.holdout:  # the best validation so far, beside (not among) the checkpoints a resume reads
        best = ModelCheckpoint(run_dir / "best", filename="best", monitor="val/loss", auto_insert_metric_name=False)
        callbacks.append(best)
        if cfg.early_stopping.patience:
            callbacks.append(EarlyStopping(check_on_train_epoch_end=False, **cfg.early_stopping))
    if cfg.evaluate.every_n_steps:  # the suites live in eval/, which builds on the trainer: named by the config
        callbacks.append(hydra.utils.instantiate(cfg.evaluate, out_dir=run_dir / "eval", _convert_="all"))
    # Without a validation split there is nothing to validate: no loop, not an empty one (Lightning warns on it).
    no_validation = {} if cfg.data.holdout else {"limit_val_batches": 0}
    trainer: L.Trainer = hydra.utils.instantiate(
        cfg.trainer,
        callbacks=callbacks,
        logger=hydra.utils.instantiate(cfg.logger),
        default_root_dir=run_dir,
        **no_validation,
    )
    if trainer.is_global_zero:
        datamodule.prepare_data()  # the synthetic corpus, if it is to be written: the run's identity names it
    lock = claim_run_dir(cfg, run_dir, trainer, run_identity(cfg, tokenizer, module.config))
    resume = last_checkpoint(run_dir)
    if trainer.is_global_zero:
        print(f"run directory {run_dir}; " + (f"resuming from {resume}" if resume else "starting fresh"))
    try:
        trainer.fit(module, datamodule=datamodule, ckpt_path=resume)
    finally:
        lock.release()
    if preemption.signal is not None:
        # Not a finished run: a non-zero exit, and (under submitit) no result file, so the job counts as not done.
        raise SystemExit(f"stopped by {preemption.signal.name} at step {trainer.global_step}; run again to resume")
    if trainer.is_global_zero:
        metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("train/")}
        losses = "  ".join(f"{k[6:]} {metrics[k]:.3f}" for k in ("train/c0_loss", "train/decoder_loss") if k in metrics)
        print(f"step {trainer.global_step}: {losses}; checkpoints and logs in {run_dir}")
    return trainer
