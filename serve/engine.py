"""The scheduler that owns the model: requests go in as jobs (a prompt, its own `Sampling`, a time limit), their
frames come out as they are generated.

This first version runs one job at a time on one worker thread, through `csm_train.generate.generate_steps`
(Sesame's frame loop with KV caches): the event loop stays free for other requests while the model works, and
a job's frames reach its request as each is made. The interface is the batched scheduler's (issue 16, item 5):
`submit` puts a job in a bounded queue (`QueueFull` → 429), `Job.frames()` yields its frames, `Job.cancel()`
(a client that disconnected) stops it at the next frame. Batching frame steps across jobs — a job joins at the
next frame, leaves when done, keeps its own sampling and seed — replaces `_run` without changing them.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from collections import Counter
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import torch

from csm_train.generate import Sampling, generate_steps
from csm_train.model import CSM

log = logging.getLogger(__name__)


class QueueFull(RuntimeError):
    pass


@dataclass
class Job:
    prompt: tuple[torch.Tensor, torch.Tensor]  # (tokens, tokens_mask) [T, K+1] from prompt_frames
    sampling: Sampling
    max_seconds: float  # generation stops here whatever the frame budget
    loop: asyncio.AbstractEventLoop
    outbox: asyncio.Queue = field(default_factory=asyncio.Queue)
    cancelled: threading.Event = field(default_factory=threading.Event)
    ended: str | None = None  # eos | max_frames | time_limit | cancelled | error
    frames: int = 0

    def cancel(self) -> None:
        self.cancelled.set()

    async def chunks(self, size: int) -> AsyncIterator[torch.Tensor]:
        """The job's frames as `[K, n]` code chunks of `size` frames (the last may be shorter)."""
        pending = []
        while True:
            item = await self.outbox.get()
            if isinstance(item, BaseException):
                raise item
            if item is None:
                break
            pending.append(item)
            if len(pending) == size:
                yield torch.stack(pending, dim=1)
                pending = []
        if pending:
            yield torch.stack(pending, dim=1)

    def _send(self, item) -> None:
        self.loop.call_soon_threadsafe(self.outbox.put_nowait, item)


class Engine:
    def __init__(self, model: CSM, queue_size: int):
        self.model = model
        self.device = model.codebook0_head.weight.device
        self._queue: queue.Queue[Job | None] = queue.Queue(maxsize=queue_size)
        self.counts: Counter[str] = Counter()  # jobs by how they ended
        self.running = 0
        self._thread = threading.Thread(target=self._work, name="csm-engine", daemon=True)
        self._thread.start()

    def submit(self, prompt: tuple[torch.Tensor, torch.Tensor], sampling: Sampling, max_seconds: float) -> Job:
        job = Job(prompt, sampling, max_seconds, asyncio.get_running_loop())
        try:
            self._queue.put_nowait(job)
        except queue.Full:
            raise QueueFull(f"{self._queue.maxsize} requests are already waiting: try again shortly") from None
        return job

    def stats(self) -> dict:
        return {"queued": self._queue.qsize(), "running": self.running, "jobs": dict(self.counts)}

    def close(self) -> None:
        """Stop after the jobs already queued."""
        self._queue.put(None)
        self._thread.join()

    def _work(self) -> None:
        while (job := self._queue.get()) is not None:
            if job.cancelled.is_set():
                self._finish(job, "cancelled")
                continue
            self.running = 1
            try:
                self._finish(job, self._run(job))
            except Exception as error:  # one job's failure is its request's error, not the server's
                log.exception("generation failed")
                self._finish(job, "error", error)
            finally:
                self.running = 0

    def _run(self, job: Job) -> str:
        """Generate one job's frames, sending each as it is made; returns why it ended."""
        deadline = time.monotonic() + job.max_seconds
        tokens, mask = (t.to(self.device) for t in job.prompt)
        steps = generate_steps(self.model, [(tokens, mask)], job.sampling)
        try:
            for step in steps:
                frame = step.frame[0]
                if (frame == 0).all():
                    return "eos"
                job.frames += 1
                job._send(frame.cpu())
                if job.cancelled.is_set():
                    return "cancelled"
                if time.monotonic() > deadline:
                    return "time_limit"
            return "max_frames"
        finally:
            steps.close()  # frees the KV caches at once when stopped early

    def _finish(self, job: Job, reason: str, error: Exception | None = None) -> None:
        job.ended = reason
        self.counts[reason] += 1
        job._send(error if error is not None else None)
