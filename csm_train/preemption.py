"""Preemption safety: a signal from the cluster ends the run at the next optimizer step with a checkpoint.

* SIGUSR1 / SIGUSR2 are SLURM's warning before the time limit or a preemption (`--signal=USR1@120` in
  launch/train.sbatch; submitit asks for USR2). The run saves its step (`last.ckpt` links it), requeues its job
  (`scontrol requeue`), and exits; the requeued job starts the same command, whose run directory is the same,
  so it resumes from that checkpoint exactly.
* SIGTERM is what `scancel`, `scontrol requeue` and a preemption send before SIGKILL (after the cluster's
  KillWait, often 30 s). The run saves its step if it can in that time and exits; SLURM has already decided
  whether the job comes back. SIGINT (Ctrl-C) does the same.
* A run that is not stepping (stuck reading data, or in a step that never ends) must still stop: after a stop
  signal (SIGTERM, SIGINT) it waits a grace period for the next optimizer step — `grace_s`, by default 60 s or
  twice the longest time between two steps so far, whichever is longer — then exits without saving, non-zero
  (128 + the signal), saying why; a second stop signal exits at once. Either way the last checkpoint stays.

The handlers are installed when the fit starts (Lightning's own SIGTERM handler, registered a moment later, calls
them after its own until training starts; from then on they replace it) and removed when it ends. The grace period
and the second signal are watched by a thread reading the signal module's wakeup pipe, not by the Python-level
handler: that one runs only when the main thread next runs Python code, and a main thread stuck in a read (a hung
file system) never does when the kernel delivers the signal to another of the process's threads.

Why not Lightning's own SLURM handler: it saves from inside the signal handler, i.e. in the middle of whatever
the step was doing (under DDP possibly inside a collective), and writes `hpc_ckpt_N.ckpt` beside the run's
checkpoints. Here the handler only records the signal; the ranks agree at the next optimizer step (one boolean
all-reduce per step) and save there, so every rank saves the same step and gradient accumulation is never cut.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time

import lightning as L

from csm_train.step_checkpoints import StepCheckpoints

WARNINGS = (signal.SIGUSR1, signal.SIGUSR2)  # the job should come back: save and requeue
STOPS = (signal.SIGTERM, signal.SIGINT)  # the scheduler or the user is ending the run: save
GRACE_S = 60.0  # the least time a stop signal waits for an optimizer step to save at


def _no_wakeup_in_forked_child() -> None:
    """A forked dataloader worker must not write its own signals into the trainer's wakeup pipe (scancel signals
    every process of the job: the watcher would count the worker's SIGTERM as a second one)."""
    try:
        signal.set_wakeup_fd(-1)
    except ValueError:  # forked from another thread than the main one: Python keeps no wakeup fd there
        pass


os.register_at_fork(after_in_child=_no_wakeup_in_forked_child)


def _say(message: str) -> None:
    """One line on stderr, safe inside a signal handler (print could re-enter a write the handler interrupted)."""
    os.write(sys.stderr.fileno(), f"{message}\n".encode())


def slurm_job_id() -> str | None:
    """The id `scontrol requeue` takes: an array task's own id, else the job's."""
    if os.environ.get("SLURM_ARRAY_JOB_ID"):
        return f"{os.environ['SLURM_ARRAY_JOB_ID']}_{os.environ['SLURM_ARRAY_TASK_ID']}"
    return os.environ.get("SLURM_JOB_ID")


class Preemption(L.Callback):
    """Save a checkpoint (and `last.ckpt`) and stop on a preemption signal; requeue the SLURM job on a warning.
    `signal` is the signal that stopped the run (None while it runs or when it ended normally). `grace_s`: how
    long a stop signal waits for an optimizer step before the run exits unsaved (None: see the module doc)."""

    def __init__(self, checkpoints: StepCheckpoints, grace_s: float | None = None):
        self.checkpoints = checkpoints
        self.grace_s = grace_s
        self.signal: signal.Signals | None = None
        self._received: signal.Signals | None = None
        self._originals: dict = {}  # the handlers before the fit, restored after it
        self._active = False
        self._last_step = -1
        self._pid: int | None = None  # the process whose handlers these are (not a forked data worker)
        self._trainer = None
        self._step_time = 0.0  # when the last optimizer step ended
        self._longest_step = 0.0  # the longest time between two optimizer steps so far
        self._deadline: threading.Timer | None = None  # armed by the first stop signal
        self._wakeup: tuple[int, int, int] | None = None  # the watcher's pipe (read, write) and the previous fd

    def grace(self) -> float:
        if self.grace_s is not None:
            return float(self.grace_s)
        return max(GRACE_S, 2 * self._longest_step)

    def _record(self, signum, frame) -> None:
        """The Python-level handler (main thread): which signal to save for at the next step."""
        if os.getpid() != self._pid:
            return  # a dataloader worker forked with these handlers: its process follows the trainer's
        if not self._active:  # after the fit, if Lightning put this handler back: what was there before
            original = self._originals.get(signum, signal.SIG_DFL)
            if callable(original):
                original(signum, frame)
            elif original == signal.SIG_DFL:
                signal.signal(signum, signal.SIG_DFL)
                signal.raise_signal(signum)
            return
        self._received = self._received or signal.Signals(signum)

    def _watch(self, wakeup: int) -> None:
        """The watcher thread: every signal the process receives arrives here as a byte, whichever thread the
        kernel delivered it to; a stop signal arms the grace period, a second one exits."""
        while data := os.read(wakeup, 64):
            for signum in data:
                if self._active and signum in STOPS:
                    self._stop_signal(signal.Signals(signum))

    def _stop_signal(self, received: signal.Signals) -> None:
        if self._deadline is not None:
            self._give_up(f"a second stop signal ({received.name})", 128 + received)
        self._received = self._received or received
        grace = self.grace()
        _say(
            f"{received.name}: saving a checkpoint at the next optimizer step, then stopping (without a step "
            f"within {grace:.0f} s the run exits unsaved; a second SIGTERM or SIGINT exits at once)"
        )
        why = f"no optimizer step within {grace:.0f} s of {received.name}: the run is not stepping"
        self._deadline = threading.Timer(grace, self._give_up, args=(why, 128 + received))
        self._deadline.daemon = True
        self._deadline.start()

    def _give_up(self, reason: str, status: int) -> None:
        """Exit now, without a checkpoint (from the timer's or the watcher's thread)."""
        last = self.checkpoints.last_model_path
        resume = f"the last checkpoint is {last}: run again to resume from it" if last else "no checkpoint yet"
        _say(f"{reason}; exiting without saving ({resume})")
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except Exception:  # a write the signal interrupted holds the stream: what it buffered is lost
                pass
        launcher = getattr(getattr(self._trainer, "strategy", None), "launcher", None)
        for proc in getattr(launcher, "procs", None) or ():  # the ranks this process launched (DDP on one node)
            proc.kill()
        os._exit(status)

    def _install(self, trainer) -> None:
        self._pid, self._trainer, self._active, self._step_time = os.getpid(), trainer, True, time.monotonic()
        for signum in WARNINGS + STOPS:
            previous = signal.signal(signum, self._record)
            self._originals.setdefault(signum, previous)
        if self._wakeup is None:
            read, write = os.pipe()
            os.set_blocking(write, False)
            self._wakeup = (read, write, signal.set_wakeup_fd(write, warn_on_full_buffer=False))
            threading.Thread(target=self._watch, args=(read,), name="stop-signal-watcher", daemon=True).start()

    def _uninstall(self) -> None:
        if self._active:
            for signum, handler in self._originals.items():
                signal.signal(signum, handler)
            self._active = False
        if self._wakeup is not None:
            read, write, previous = self._wakeup
            signal.set_wakeup_fd(previous)
            os.close(write)  # the watcher's read ends, and with it the thread (it closes its end)
            self._wakeup = None
        self._disarm()

    def setup(self, trainer, module, stage) -> None:
        # From the fit's start: a run whose first batch never comes (a data stream that hangs) is covered too.
        # Lightning then registers its own SIGTERM handler, which calls this one after its own.
        if stage == "fit":
            self._install(trainer)

    def on_train_start(self, trainer, module) -> None:
        # This handler alone from here on: Lightning's would end a multi-process run at its next step, unsaved.
        self._install(trainer)
        if self._received is not None and hasattr(trainer, "_signal_connector"):
            trainer._signal_connector.received_sigterm = False  # taken: saved at the next step

    def teardown(self, trainer, module, stage) -> None:
        self._uninstall()

    def on_exception(self, trainer, module, exception) -> None:
        self._uninstall()

    def _disarm(self) -> None:
        if self._deadline is not None:
            self._deadline.cancel()

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:
        if trainer.global_step == self._last_step:
            return  # mid gradient accumulation: only whole optimizer steps are saved
        self._last_step = trainer.global_step
        now = time.monotonic()
        self._longest_step, self._step_time = max(self._longest_step, now - self._step_time), now
        if not trainer.strategy.reduce_boolean_decision(self._received is not None, all=False):
            return
        self._disarm()  # stepping: the save may take its time
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
