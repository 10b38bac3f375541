"""The scheduler that owns the model: requests go in as jobs (a prompt, its own `Sampling`, a time limit), their
frames come out as they are generated, and concurrent jobs share every frame step.

One worker thread runs Sesame's frame loop (as `csm_train.generate.generate_steps`: the backbone reads one frame
per step through its KV cache, then the depth decoder makes the frame's codebooks) over a batch whose rows are
jobs. A job waiting in the queue joins at the next step and a job that ended (end-of-audio frame, its frame
budget, its time limit, or a cancel from a client that went away) leaves after the step that ended it: its
row is dropped from the caches. Each row samples with its own temperature, top-k and seeded generator, so a seed
gives the same codes whether its job ran alone or beside others.

How rows of different lengths share a step: all rows write the same cache position `t` each step (the model's
KV cache writes one position for the whole batch). A joining job's prompt of `L` frames is read into a
one-row cache at positions `t-L+1 .. t` (RoPE depends only on distances, so a prompt shifted right attends as it
would at 0, as left padding does in `generate_steps`), then that row is appended to the batch's caches; each
row masks the positions before its prompt. A job therefore joins once `L <= t + 1` and its frames still fit
below `max_seq_len`; otherwise it waits (first come, first served) and the next batch starts at its length when
the current one drains. A bounded queue answers `QueueFull` (429) beyond `queue_size` waiting jobs.

Prefix caching: most prompts begin with a voice's reference turn (10 s to 3 min of audio: 125-2250 positions),
the same for every request in that voice. A job names how many of its first frames are such a prefix;
`PrefixCache` keeps their keys and values, computed once at positions `0..P-1`, and writes them where the job's
prompt starts, its keys rotated there (RoPE rotates a key at position `p` by `p` angles; rotating that by `d`
more gives the key at `p + d`, to float rounding), so only the rest of the prompt is read. Entries are found by
the prefix's content and evicted least recently used beyond `prefix_cache_mb`.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import threading
import time
from collections import Counter, OrderedDict, deque
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import torch

from csm_train.generate import EAGER, Sampling, decode_frame, frame_sampler, frame_steps, frame_uniforms
from csm_train.model import CSM, apply_rope

log = logging.getLogger(__name__)


class QueueFull(RuntimeError):
    pass


@dataclass(eq=False)
class Job:
    prompt: tuple[torch.Tensor, torch.Tensor]  # (tokens, tokens_mask) [T, K+1] from prompt_frames
    sampling: Sampling
    max_seconds: float  # generation stops here whatever the frame budget
    loop: asyncio.AbstractEventLoop
    outbox: asyncio.Queue = field(default_factory=asyncio.Queue)
    cancelled: threading.Event = field(default_factory=threading.Event)
    prefix: int = 0  # the prompt's first frames that PrefixCache may reuse (a voice's turn)
    ended: str | None = None  # eos | max_frames | time_limit | cancelled | error
    frames: int = 0
    generator: torch.Generator | None = None
    deadline: float = 0.0

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
    def __init__(self, model: CSM, queue_size: int, max_batch: int, prefix_cache_mb: float = 0):
        self.model, self.queue_size, self.max_batch = model, queue_size, max_batch
        self.prefixes = PrefixCache(model, int(prefix_cache_mb * 2**20))
        self.device = model.codebook0_head.weight.device
        self.limit = model.config.backbone.max_seq_len
        self._waiting: deque[Job] = deque()
        self._wake = threading.Condition()
        self._closing = False
        self.rows: list[Job] = []
        self.counts: Counter[str] = Counter()  # jobs by how they ended; steps: all, shared by >1 job, rows over all
        self.peak_rows = 0
        self._thread = threading.Thread(target=self._work, name="csm-engine", daemon=True)
        self._thread.start()

    def submit(
        self, prompt: tuple[torch.Tensor, torch.Tensor], sampling: Sampling, max_seconds: float, prefix: int = 0
    ) -> Job:
        if len(prompt[0]) + sampling.max_frames > self.limit:  # it could never join: refuse it, not the queue
            raise ValueError(f"a prompt of {len(prompt[0])} frames plus {sampling.max_frames} exceeds {self.limit}")
        if not 0 <= prefix < len(prompt[0]):
            raise ValueError(f"prefix={prefix}: a prompt of {len(prompt[0])} frames needs a frame after its prefix")
        job = Job(prompt, sampling, max_seconds, asyncio.get_running_loop(), prefix=prefix)
        with self._wake:
            if len(self._waiting) >= self.queue_size:
                raise QueueFull(f"{len(self._waiting)} requests are already waiting: try again shortly")
            self._waiting.append(job)
            self._wake.notify()
        return job

    def stats(self) -> dict:
        counts = dict(self.counts)  # one copy: the worker may add a key meanwhile
        jobs = {k: v for k, v in counts.items() if not k.startswith("steps")}
        return {"queued": len(self._waiting), "running": len(self.rows), "peak_batch": self.peak_rows,
                "steps": counts.get("steps", 0), "batched_steps": counts.get("steps_batched", 0),
                "rows": counts.get("steps_rows", 0), "jobs": jobs, "prefix_cache": self.prefixes.stats()}  # fmt: skip

    def close(self) -> None:
        """Stop once the running and waiting jobs are done."""
        with self._wake:
            self._closing = True
            self._wake.notify()
        self._thread.join()

    # -- the worker --------------------------------------------------------------------------------------

    def _work(self) -> None:
        while True:
            with self._wake:
                while not self.rows and not self._waiting:
                    if self._closing:
                        return
                    self._wake.wait()
                joining = self._admit()
            try:
                with torch.inference_mode():
                    self._step(joining)
            except Exception as error:  # the step's jobs fail with it; the engine goes on
                log.exception("generation step failed")
                for job in dict.fromkeys([*self.rows, *joining]):
                    self._finish(job, "error", error)
                self.rows = []
                self.model.remove_caches()

    def _admit(self) -> list[Job]:
        """Jobs from the head of the queue that can join this step (see the module's docstring)."""
        joining = []
        while self._waiting and len(self.rows) + len(joining) < self.max_batch:
            job = self._waiting[0]
            if job.cancelled.is_set():
                self._waiting.popleft()
                self._finish(job, "cancelled")
                continue
            length = len(job.prompt[0])
            if not self.rows and not joining:
                self.t = length - 1  # a new batch: the first prompt starts at position 0
            if length > self.t + 1 or self.t + 1 + job.sampling.max_frames > self.limit:
                break
            self._waiting.popleft()
            job.generator = None if job.sampling.seed is None else torch.Generator(self.device)
            if job.generator is not None:
                job.generator.manual_seed(job.sampling.seed)
            job.deadline = time.monotonic() + job.max_seconds
            joining.append(job)
        return joining

    def _step(self, joining: list[Job]) -> None:
        """One frame for every row: the running rows read their last frame at position `t`, the joining ones
        their whole prompt ending at `t`; then each row's frame is decoded and sampled."""
        model, t = self.model, self.t
        states = []
        if self.rows:
            K = model.config.num_codebooks
            tokens = torch.cat([self.last, torch.zeros_like(self.last[:, :1])], dim=-1)[:, None]
            mask = torch.ones_like(tokens, dtype=torch.bool)
            mask[..., K] = False
            positions = torch.full((len(self.rows), 1), t, device=self.device)
            h = model.backbone(model.embed_frames(tokens, mask), input_pos=positions, mask=self._keys())
            states.append(h[:, -1])
        for job in joining:
            states.append(self._prefill(job, t))
            self.rows.append(job)
            self.starts = torch.cat([self.starts, self.starts.new_tensor([t - len(job.prompt[0]) + 1])])
        self.peak_rows = max(self.peak_rows, len(self.rows))
        self.counts["steps"] += 1
        self.counts["steps_batched"] += len(self.rows) > 1
        self.counts["steps_rows"] += len(self.rows)
        pad_to = None if frame_steps(model) is EAGER else self.max_batch
        frames = decode_frame_per_job(model, torch.cat(states), self.rows, pad_to)
        self.t += 1
        keep = []
        now = time.monotonic()
        for row, (job, frame) in enumerate(zip(self.rows, frames, strict=True)):
            if (frame == 0).all():
                self._finish(job, "eos")
                continue
            job.frames += 1
            job._send(frame.cpu())
            reason = ("cancelled" if job.cancelled.is_set() else "max_frames" if job.frames >= job.sampling.max_frames
                      else "time_limit" if now > job.deadline else None)  # fmt: skip
            if reason:
                self._finish(job, reason)
            else:
                keep.append(row)
        self._keep(keep, frames)

    def _prefill(self, job: Job, t: int) -> torch.Tensor:
        """Read `job`'s prompt into a one-row cache at positions ending at `t`, append that row to the batch's
        caches and return the prompt's last backbone state."""
        backbone = self.model.backbone
        tokens, mask = (x.to(self.device)[None] for x in job.prompt)
        start = t - tokens.shape[1] + 1
        batch = [layer.attn.kv_cache for layer in backbone.layers]
        dtype = self.model.codebook0_head.weight.dtype
        backbone.setup_caches(1, self.limit, dtype, self.device)
        read = job.prefix if self.prefixes.place(tokens[:, : job.prefix], mask[:, : job.prefix], start) else 0
        positions = torch.arange(start + read, t + 1, device=self.device)[None]
        keys = (torch.arange(self.limit, device=self.device) >= start)[None, None, None]
        h = backbone(self.model.embed_frames(tokens[:, read:], mask[:, read:]), input_pos=positions, mask=keys)[:, -1]
        for layer, cache in zip(backbone.layers, batch, strict=True):
            if cache is not None:  # the batch's rows, then this one
                new = layer.attn.kv_cache
                cache.k, cache.v = torch.cat([cache.k, new.k]), torch.cat([cache.v, new.v])
                layer.attn.kv_cache = cache
        if batch[0] is None:
            self.starts = torch.zeros(0, dtype=torch.long, device=self.device)
        return h

    def _keys(self) -> torch.Tensor:
        """`[B, 1, 1, limit]`: each row sees its own prompt and frames, not the positions before its prompt."""
        return (torch.arange(self.limit, device=self.device) >= self.starts[:, None])[:, None, None]

    def _keep(self, keep: list[int], frames: torch.Tensor) -> None:
        """Drop the rows of ended jobs from the batch and its caches."""
        if len(keep) == len(self.rows):
            self.last = frames
            return
        self.rows = [self.rows[i] for i in keep]
        if not self.rows:
            self.model.remove_caches()
            return
        index = torch.tensor(keep, device=self.device)
        for layer in self.model.backbone.layers:
            cache = layer.attn.kv_cache
            cache.k, cache.v = cache.k[index], cache.v[index]
        self.last, self.starts = frames[index], self.starts[index]

    def _finish(self, job: Job, reason: str, error: Exception | None = None) -> None:
        job.ended = reason
        self.counts[reason] += 1
        job._send(error if error is not None else None)


class PrefixCache:
    """Keys and values of prompt prefixes, by content (see the module's docstring), within `max_bytes`."""

    def __init__(self, model: CSM, max_bytes: int):
        self.model, self.max_bytes = model, max_bytes
        self.entries: OrderedDict[bytes, list[tuple[torch.Tensor, torch.Tensor]]] = OrderedDict()
        self.bytes = self.hits = self.misses = 0

    def stats(self) -> dict:
        return {"entries": len(self.entries), "bytes": self.bytes, "hits": self.hits, "misses": self.misses}

    def place(self, tokens: torch.Tensor, mask: torch.Tensor, start: int) -> bool:
        """Write the keys and values of the prefix `tokens, mask [1, P, K+1]` at positions `start..start+P-1` of
        the backbone's one-row caches (set up by the caller). False: nothing written (no prefix, or caching off)."""
        if not self.max_bytes or not tokens.shape[1]:
            return False
        backbone, length = self.model.backbone, tokens.shape[1]
        key = hashlib.sha256(tokens.cpu().numpy().tobytes() + mask.cpu().numpy().tobytes()).digest()
        entry = self.entries.get(key)
        if entry is None:
            self.misses += 1
            backbone(self.model.embed_frames(tokens, mask), input_pos=torch.arange(length, device=tokens.device)[None])
            entry = [(layer.attn.kv_cache.k[:, :, :length].clone(), layer.attn.kv_cache.v[:, :, :length].clone())
                     for layer in backbone.layers]  # fmt: skip
            self._store(key, entry)
            if start == 0:
                return True  # computed where it belongs
        else:
            self.hits += 1
            self.entries.move_to_end(key)
        rotation = backbone.rotation(torch.tensor(start, device=tokens.device))  # by `start` positions
        for layer, (k, v) in zip(backbone.layers, entry, strict=True):
            cache = layer.attn.kv_cache
            cache.k[:, :, start : start + length] = apply_rope(k, rotation)
            cache.v[:, :, start : start + length] = v
        return True

    def _store(self, key: bytes, entry: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
        size = sum(k.nbytes + v.nbytes for k, v in entry)
        if size > self.max_bytes:
            return
        while self.bytes + size > self.max_bytes:
            _, evicted = self.entries.popitem(last=False)
            self.bytes -= sum(k.nbytes + v.nbytes for k, v in evicted)
        self.entries[key] = entry
        self.bytes += size


def decode_frame_per_job(model: CSM, h: torch.Tensor, jobs: list[Job], pad_to: int | None = None) -> torch.Tensor:
    """`csm_train.generate.decode_frame` with each row sampled by its own job's settings and generator (one
    vectorised draw for the batch: `sample_topk`): the frame `[B, K]`. The depth decoder's cache is set up for
    this step's batch, which changes as jobs come and go; compiled (`pad_to`), the batch is padded to one size,
    so one set of graphs serves every step (a compiled graph's shapes are fixed: each new batch size would
    compile again), the padding rows decoded greedily and dropped."""
    rows, K = len(h), model.config.num_codebooks
    pad = max(0, (pad_to or rows) - rows)
    h = torch.cat([h, h.new_zeros(pad, h.shape[1])])
    model.decoder.setup_caches(len(h), K, h.dtype, h.device)
    uniforms = torch.cat([frame_uniforms(K, [job.generator for job in jobs], h.device), h.new_zeros(pad, K)])
    temperature = torch.tensor([job.sampling.temperature for job in jobs] + [0.0] * pad, device=h.device)
    topk = torch.tensor([job.sampling.topk for job in jobs] + [1] * pad, device=h.device)
    return decode_frame(model, h, frame_sampler(temperature, topk, uniforms))[0][:rows]
