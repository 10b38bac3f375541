"""Preemption safety: a signal from the cluster ends the run at the next optimizer step with a checkpoint.

* SIGUSR1 / SIGUSR2 are SLURM's warning before the time limit or a preemption (`--signal=USR1@120` in
  launch/train.sbatch; submitit asks for USR2). The run saves its step (`last.ckpt` links it), requeues its job
  (`scontrol requeue`), and exits; the requeued job starts the same command, whose run directory is the same,
  so it resumes from that checkpoint exactly.
* SIGTERM is what `scancel`, `scontrol requeue` and a preemption send before SIGKILL (after the cluster's
  KillWait, often 30 s). The run saves its step if it can in that time and exits; SLURM has already decided
  whether the job comes back.

Why not Lightning's own SLURM handler: it saves from inside the signal handler, i.e. in the middle of whatever
the step was doing (under DDP possibly inside a collective), and writes `hpc_ckpt_N.ckpt` beside the run's
checkpoints. Here the handler only records the signal; the ranks agree at the next optimizer step (one boolean
all-reduce per step) and save there, so every rank saves the same step and gradient accumulation is never cut.
"""

from __future__ import annotations

import os
import signal
import subprocess

import lightning as L

from csm_train.checkpoint import StepCheckpoints

WARNINGS = (signal.SIGUSR1, signal.SIGUSR2)  # the job should come back: save and requeue
STOPS = (signal.SIGTERM,)  # the scheduler is ending the job: save


def slurm_job_id() -> str | None:
    """The id `scontrol requeue` takes: an array task's own id, else the job's."""
    if os.environ.get("SLURM_ARRAY_JOB_ID"):
        return f"{os.environ['SLURM_ARRAY_JOB_ID']}_{os.environ['SLURM_ARRAY_TASK_ID']}"
    return os.environ.get("SLURM_JOB_ID")


class Preemption(L.Callback):
    """Save a checkpoint (and `last.ckpt`) and stop on a preemption signal; requeue the SLURM job on a warning.
    `signal` is the signal that stopped the run (None while it runs or when it ended normally)."""

    def __init__(self, checkpoints: StepCheckpoints):
        self.checkpoints = checkpoints
        self.signal: signal.Signals | None = None
        self._received: signal.Signals | None = None
        self._previous_handlers: dict = {}
        self._last_step = -1

    def _record(self, signum, frame) -> None:
        self._received = signal.Signals(signum)

    def on_train_start(self, trainer, module) -> None:
        # After Lightning's own handlers (registered at fit start): these replace them for the training loop.
        for signum in WARNINGS + STOPS:
            self._previous_handlers[signum] = signal.signal(signum, self._record)

    def teardown(self, trainer, module, stage) -> None:
        for signum, handler in self._previous_handlers.items():
            signal.signal(signum, handler)
        self._previous_handlers = {}

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:
        if trainer.global_step == self._last_step:
            return  # mid gradient accumulation: only whole optimizer steps are saved
        self._last_step = trainer.global_step
        if not trainer.strategy.reduce_boolean_decision(self._received is not None, all=False):
            return
        # Every rank takes part in the save (sharded strategies write their own part); signals may differ by
        # rank (or be absent on some), so the first one rank 0 saw decides whether to requeue.
        received = self._received or signal.SIGTERM
        requeue = trainer.strategy.broadcast(received in WARNINGS, src=0)
        saved = self.checkpoints.save_now(trainer)
        self.signal = received
        trainer.should_stop = True
        if trainer.is_global_zero:
            job = slurm_job_id()
            print(f"{received.name} at step {trainer.global_step}: saved {saved}")
            if requeue and job:
                subprocess.run(["scontrol", "requeue", job], check=True, timeout=60)
                print(f"requeued SLURM job {job}: it resumes from that checkpoint")
