"""`python -m csm_train`: compose the Hydra config, build data, model and trainer, resume if the run
directory already holds a checkpoint, and fit."""

from __future__ import annotations

import fcntl
import hashlib
import json
import math
import os
import socket
import time
from pathlib import Path

import hydra
import lightning as L
import torch
from lightning.pytorch.callbacks import Callback, EarlyStopping, LearningRateMonitor, ModelCheckpoint
from omegaconf import DictConfig, OmegaConf

from csm_train.checkpoint import StepCheckpoints, last_checkpoint
from csm_train.console import StepProgress, quiet_libraries
from csm_train.data import positions_per_epoch
from csm_train.model import CSMConfig
from csm_train.module import CSMDataModule, CSMModule
from csm_train.plan import decoder_frames_run, format_plan, gpu_peak_bf16_flops, plan, train_step_flops
from csm_train.preemption import Preemption
from data_pipeline.shards import MIMI_FRAME_RATE, check_codec


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
        frames = int(batch["tokens_mask"].any(-1).sum())  # non-padding frames: the backbone's useful work
        audio_frames = int((batch["labels"][..., 0] != -100).sum())
        # The backbone is charged on every frame, the depth decoder only on the ⌈fraction × audio targets⌉ frames
        # the loss runs it on (plan.train_step_flops).
        decoder_frames = decoder_frames_run(batch["labels"], module.loss_weights.decoder_fraction)
        flops = train_step_flops(module.config, frames, decoder_frames, batch["tokens"].shape[1])
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
    card = Path(cfg.data.path) / "dataset.json"
    if not card.exists():
        return
    problems = check_codec(json.loads(card.read_text()).get("codec") or {}, num_codebooks)
    if problems:
        raise ValueError(
            f"data.path={cfg.data.path} cannot train model.preset={cfg.model.preset} (from its dataset.json):\n"
            + "\n".join(f"  - {problem}" for problem in problems)
        )


RUN_LOCK, RUN_IDENTITY = "run.lock", "run.json"
_held_locks: set[int] = set()  # descriptors of RunLocks this process holds (not inherited by forks: see below)


def _forget_locks_after_fork() -> None:
    """A forked child (a dataloader worker) shares the lock's open file, which would keep it locked until the child
    ends too; the child closes its copy, so the lock lives exactly as long as the process that took it."""
    for fd in _held_locks:
        os.close(fd)
    _held_locks.clear()


os.register_at_fork(after_in_child=_forget_locks_after_fork)


class RunDirectoryError(RuntimeError):
    """The run directory is in use by another process, or holds a different run."""


class RunLock:
    """An exclusive `flock` on `run_dir/run.lock`: a second process started on the same run directory is refused
    while the first runs. The kernel drops the lock when its process ends, however it ends (SIGKILL, a SLURM
    requeue), so nothing is left to clean up; the file stays, naming its last holder."""

    def __init__(self, run_dir: Path):
        self.path = run_dir / RUN_LOCK
        self._fd: int | None = None

    def acquire(self) -> RunLock:
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 4096, 0).decode(errors="replace").strip() or "another process"
            os.close(fd)
            raise RunDirectoryError(
                f"run directory {self.path.parent} is in use by {holder} ({self.path} is locked): two processes "
                f"on one run would overwrite each other's checkpoints. Wait for it to end or stop it, or start "
                f"this one as a new run with run_id=NAME"
            ) from None
        except OSError as error:  # a file system without flock (some NFS or Lustre mounts)
            os.close(fd)
            print(f"warning: cannot lock {self.path} ({error}); a second run started on it would not be refused")
            return self
        os.ftruncate(fd, 0)
        started = time.strftime("%Y-%m-%d %H:%M:%S %Z")
        os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()} (since {started})\n".encode(), 0)
        self._fd = fd
        _held_locks.add(fd)
        return self

    def release(self) -> None:
        if self._fd is not None:
            _held_locks.discard(self._fd)
            os.close(self._fd)  # the last descriptor of the open file: the lock goes with it
            self._fd = None


def _flat(prefix: str, value) -> dict:
    if isinstance(value, dict):
        return {k: v for key, item in value.items() for k, v in _flat(f"{prefix}.{key}", item).items()}
    return {prefix: value}


def config_identity(cfg: DictConfig) -> dict:
    """The settings that make a run what it is (a resume must not change them), flat: the model preset and what
    changes its parameters (LoRA, frozen groups, starting weights), the tokenizer, the data split and the seed
    (it orders the data stream)."""
    model = OmegaConf.to_container(cfg.model, resolve=True)
    lora = model.get("lora") or {}
    return {
        "model.preset": model["preset"],
        **_flat("model.lora", lora if lora.get("rank") else {"rank": 0}),
        "model.freeze": sorted(model.get("freeze") or []),
        "model.init_from": model.get("init_from"),
        **_flat("tokenizer.config", OmegaConf.to_container(cfg.data.tokenizer, resolve=True)),
        "data.path": str(Path(cfg.data.path).resolve()),
        "data.holdout": cfg.data.get("holdout", 0.0),
        "seed": cfg.seed,
    }


def dataset_identity(path: str | Path) -> dict:
    """What tells one dataset from another: its samples (the manifest's hash and row count: keys, shards,
    lengths), its codec (which codes) and the pipeline settings that made it. Empty while it does not exist."""
    path = Path(path)
    if not (path / "manifest.jsonl").exists():
        return {}
    digest, samples = hashlib.sha256(), 0
    with open(path / "manifest.jsonl", "rb") as f:
        for line in f:
            digest.update(line)
            samples += bool(line.strip())
    card = json.loads((path / "dataset.json").read_text()) if (path / "dataset.json").exists() else {}
    identity = {"dataset.samples": samples, "dataset.manifest_sha256": digest.hexdigest()[:16]}
    identity.update(_flat("dataset.codec", card.get("codec") or {}))
    if "config_hash" in card:
        identity["dataset.pipeline_config_hash"] = card["config_hash"]
    return identity


# Text that tells tokenizers apart by what they do with it: speaker tags, cases, digits, punctuation, accents, scripts.
TOKENIZER_PROBE = "[0]Hello, world! It's 3:45 p.m., 2024-06-01 — naïve café, Straße, Ωμέγα, Москва, 東京\n[1]ok?"


def tokenizer_fingerprint(tokenizer) -> str:
    """The tokenizer by content: its vocabulary size, special ids and the ids of `TOKENIZER_PROBE` (the same
    tokenizer from another path or the Hub matches; another vocabulary does not)."""
    ids = [tokenizer.vocab_size, tokenizer.bos_id, tokenizer.eos_id, *tokenizer.encode(TOKENIZER_PROBE)]
    return hashlib.sha256(json.dumps(ids).encode()).hexdigest()[:16]


def run_identity(cfg: DictConfig, tokenizer, model_config: CSMConfig | None = None) -> dict:
    """`config_identity`, the model's shapes (`model_config`, else the preset's with the tokenizer's vocabulary, as
    the module builds it), the tokenizer's vocabulary size and fingerprint, and `dataset_identity`."""
    model_config = model_config or CSMConfig.preset(cfg.model.preset, text_vocab_size=tokenizer.vocab_size)
    architecture = {k: v for k, v in model_config.to_dict().items() if k != "activation_checkpointing"}
    return {
        **config_identity(cfg),
        **_flat("model.architecture", architecture),
        "tokenizer.vocab_size": tokenizer.vocab_size,
        "tokenizer.fingerprint": tokenizer_fingerprint(tokenizer),
        **dataset_identity(cfg.data.path),
    }


# Compared by content where both sides know it: (content key, its group, the keys that only say where it came from)
BY_CONTENT = (
    ("dataset.manifest_sha256", "dataset.", "data.path"),
    ("tokenizer.fingerprint", "tokenizer.", "tokenizer.config."),
)


def identity_differences(then: dict, now: dict) -> list[str]:
    """`key: then → now` for each setting both identities record and that differs. A key only one side has is not
    compared (a run written before the key existed). The dataset and the tokenizer are compared by content
    (`BY_CONTENT`): where they come from (a path, a Hub id) counts only where a side does not know the content, and
    is shown beside a content difference. Architecture details are left out when the preset differs."""
    differ = [k for k in now if k in then and then[k] != now[k]]
    for content, group, where in BY_CONTENT:
        if content in then and content in now:
            same = not any(k.startswith(group) and not k.startswith(where) for k in differ)
            differ = [k for k in differ if not (same and k.startswith(where))]
    if "model.preset" in differ:
        differ = [k for k in differ if not k.startswith("model.architecture.")]
    return [f"{k}: {then[k]} → {now[k]}" for k in differ]


def previous_identity(run_dir: Path) -> dict | None:
    """The identity the run directory's run was started with: its run.json, or for a run from before run.json
    existed, what its config.yaml says; None for a new run directory."""
    if (run_dir / RUN_IDENTITY).exists():
        return json.loads((run_dir / RUN_IDENTITY).read_text())
    if (run_dir / "config.yaml").exists():
        return config_identity(OmegaConf.load(run_dir / "config.yaml"))
    return None


def _write_atomically(path: Path, text: str) -> None:
    partial = path.with_name(f".{path.name}.{os.getpid()}.partial")
    partial.write_text(text)
    os.replace(partial, path)


def check_run_dir(cfg: DictConfig, run_dir: Path, identity: dict) -> list[str]:
    """Refuse a run directory that holds a different run (`identity_differences`) unless `resume=force`; returns
    the differences `resume=force` accepted. Reads only: every rank may call it, before anything is built."""
    force = cfg.resume
    if force not in ("auto", "force"):
        raise ValueError(f"resume={force}: use auto (resume when the run is the same) or force")
    then = previous_identity(run_dir)
    differences = identity_differences(then, identity) if then is not None else []
    if differences and force != "force":
        raise RunDirectoryError(
            f"run directory {run_dir} holds a different run, so this one does not resume it (then → now):\n"
            + "".join(f"  {d}\n" for d in differences)
            + "Start a new run beside it with run_id=NAME (or another run_dir=), or resume it with these settings "
            "anyway with resume=force (its checkpoint must still fit the model)."
        )
    return differences


def claim_run_dir(cfg: DictConfig, run_dir: Path, trainer: L.Trainer, identity: dict) -> RunLock:
    """Before the run writes anything: rank 0 locks the run directory, checks it again under the lock
    (`check_run_dir`, now with the dataset the data module may just have written) and writes `config.yaml` and
    `run.json` (the identity). The other ranks of a multi-process run are the same run, relaunched: they neither
    lock nor write. Returns the lock, held until the caller releases it or the process ends."""
    lock = RunLock(run_dir)
    if not trainer.is_global_zero:
        return lock
    run_dir.mkdir(parents=True, exist_ok=True)
    lock.acquire()
    try:
        differences = check_run_dir(cfg, run_dir, identity)
        if differences:
            lines = "".join(f"  {d}\n" for d in differences)
            print(f"resume=force: resuming a run whose settings differ (then → now):\n{lines}", end="")
        _write_atomically(run_dir / "config.yaml", OmegaConf.to_yaml(cfg, resolve=True))
        _write_atomically(run_dir / RUN_IDENTITY, json.dumps(identity, indent=2) + "\n")
    except BaseException:
        lock.release()
        raise
    return lock


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
    if cfg.evaluate.every_n_steps:
        from eval.callback import EvaluateEvery

        settings = OmegaConf.to_container(cfg.evaluate, resolve=True)
        callbacks.append(EvaluateEvery(out_dir=run_dir / "eval", **settings))
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
