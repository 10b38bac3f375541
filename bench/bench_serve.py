"""The speech server under concurrent clients (issue 16): `python -m serve` batching frame steps across requests
(`max_batch=16`) against the same server serving one request at a time (`max_batch=1`, as a mutex around the
model does, csm.rs's design), side by side in one run.

Each preset gets a random-weights checkpoint (`CSM.save_pretrained`, byte tokenizer, random-init Mimi) and a
voice directory holding one built-in voice (`alloy`) of random codes, written here so that no espeak-ng runs
at start-up (on a machine without it too). Both servers are real `python -m serve` processes (uvicorn, loopback),
started once per preset. For each concurrency N, N client threads (httpx) each send `--requests` streaming
requests one after another (`response_format: "pcm"`, the same text, `max_audio_length_ms` and seed, so every
request asks for `--frames` frames; random weights rarely emit end-of-audio, and the bytes actually received are
what count), first to one contender, then to the other. Reported per preset × N × contender:

    audio s/s   aggregate audio seconds received per wall second (24 kHz s16le: 48000 bytes a second)
    per CPU s   audio seconds per CPU second of the server process (all its threads): on a machine shared
                with other jobs, steadier than wall time
    TTFA p50/p95  time to first audio: request sent → first non-empty piece of the body
    batched / one-at-a-time   the ratio of aggregate throughputs, and of p95 TTFA
    TTFA p95 / lone   p95 TTFA at N against the same contender's at N = 1

Goal (issue 16, on the 2-core CPU): batched ≥ 3× the aggregate throughput of one-at-a-time at 8 clients, and
its p95 time to first audio within 2× of a lone client's.

    python bench/bench_serve.py                                  # tiny and 100m, N = 1, 4, 8, 16 (~10 min)
    python bench/bench_serve.py --presets tiny --concurrency 1 8 --frames 50
    python bench/bench_serve.py --presets 100m --device cuda --torch-threads 0

`--torch-threads 1` (the default here) is what to run on a small shared CPU: the engine's thread and Mimi's
decode thread then each use one core instead of both oversubscribing them (`torch_threads=` of the server);
0 leaves torch's default (one thread per core). Exits non-zero when a server fails to start, dies, or answers
a request with anything but 200.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # serve/ (not an installed package in an older editable install)
BYTES_PER_SECOND = 24_000 * 2  # pcm: 24 kHz, 16-bit mono
FRAME_MS = 80
CODEC = "random-init:seed=0"
TEXT = "The train was late again, so I walked the last part of the way home."
CONTENDERS = {"one-at-a-time": 1, "batched": 16}  # max_batch


class ServerFailed(RuntimeError):
    pass


@dataclass
class Request:
    sent: float
    first: float | None = None  # first non-empty piece
    done: float | None = None
    bytes: int = 0
    status: int = 0
    error: str | None = None


@dataclass
class Round:
    contender: str
    concurrency: int
    wall: float
    requests: list[Request] = field(default_factory=list)
    engine: dict = field(default_factory=dict)
    cpu: float = 0.0  # the server's CPU seconds during the round

    @property
    def per_cpu(self) -> float:
        """Audio seconds per server CPU second: less at the mercy of other processes than wall time."""
        return self.audio_seconds / self.cpu if self.cpu else float("nan")

    @property
    def audio_seconds(self) -> float:
        return sum(r.bytes for r in self.requests) / BYTES_PER_SECOND

    @property
    def throughput(self) -> float:
        return self.audio_seconds / self.wall

    def ttfa(self, q: float) -> float:
        return float(np.percentile([r.first - r.sent for r in self.requests], q))


def build(preset: str, root: Path, voice_frames: int) -> tuple[Path, Path]:
    """A random-weights checkpoint of `preset` and a voice directory whose `alloy` is `voice_frames` of random
    codes, stored as the server's own built-in voice would be (so it is not spoken again at start)."""
    from csm_train import CSM, CSMConfig
    from csm_train.tokenizer import ByteTokenizer
    from serve.voices import VoiceStore

    checkpoint, voices = root / preset, root / f"voices-{preset}"
    torch.manual_seed(0)
    model = CSM(CSMConfig.preset(preset, text_vocab_size=ByteTokenizer.vocab_size))
    model.save_pretrained(checkpoint)
    codes = np.random.default_rng(0).integers(1, 2048, (model.config.num_codebooks, voice_frames))
    VoiceStore(voices, CODEC).add("alloy", TEXT, codes, builtin_id="alloy")
    return checkpoint, voices


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    def __init__(self, name: str, checkpoint: Path, voices: Path, max_batch: int, args, log: Path):
        self.name, self.log, self.port = name, log, free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        command = [
            sys.executable, "-m", "serve", f"checkpoint={checkpoint}", f"voice_dir={voices}", f"port={self.port}",
            "tokenizer={_target_: csm_train.tokenizer.ByteTokenizer}", f"codec='{CODEC}'", f"device={args.device}",
            f"max_batch={max_batch}", f"queue_size={max(64, 2 * max(args.concurrency))}", "asr=null",
            f"torch_threads={args.torch_threads or 'null'}", "log_level=warning",
            f"limits.max_request_seconds={args.request_timeout}",
            "~builtin_voices.echo", "~builtin_voices.nova", "~builtin_voices.shimmer",
        ]  # fmt: skip
        env = {**os.environ, "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
        with open(log, "w") as out:
            self.process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, cwd=REPO, env=env)

    def wait(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while True:
            self.check()
            try:
                if httpx.get(f"{self.url}/health").status_code == 200:
                    return
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                raise ServerFailed(f"{self.name} did not answer /health in {timeout:.0f} s: {self.tail()}")
            time.sleep(0.5)

    def check(self) -> None:
        if self.process.poll() is not None:
            raise ServerFailed(f"{self.name} exited with {self.process.returncode}: {self.tail()}")

    def tail(self) -> str:
        return self.log.read_text()[-3000:]

    def cpu_seconds(self) -> float:
        """The server process's user + system CPU time so far (all its threads), from /proc; 0 elsewhere."""
        try:
            fields = Path(f"/proc/{self.process.pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            return 0.0
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def engine(self) -> dict:
        return httpx.get(f"{self.url}/health").json()["engine"]

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.process.kill()


def speak(client: httpx.Client, url: str, body: dict) -> Request:
    request = Request(sent=time.perf_counter())
    try:
        with client.stream("POST", f"{url}/v1/audio/speech", json=body) as response:
            request.status = response.status_code
            if response.status_code != 200:
                request.error = response.read().decode(errors="replace")[:300]
                return request
            for piece in response.iter_raw():
                if piece and request.first is None:
                    request.first = time.perf_counter()
                request.bytes += len(piece)
    except httpx.HTTPError as error:
        request.error = repr(error)
    request.done = time.perf_counter()
    return request


def drive(server: Server, concurrency: int, args, body: dict) -> Round:
    """`concurrency` clients, each sending `args.requests` requests one after another (more when that makes fewer
    than `args.min_requests` in all); all start together."""
    results: list[list[Request]] = [[] for _ in range(concurrency)]
    barrier = threading.Barrier(concurrency + 1)
    per_client = max(args.requests, -(-args.min_requests // concurrency))

    def client(i: int) -> None:
        with httpx.Client(timeout=args.request_timeout + 60) as http:
            barrier.wait()
            for _ in range(per_client):
                results[i].append(speak(http, server.url, body))

    threads = [threading.Thread(target=client, args=(i,), daemon=True) for i in range(concurrency)]
    for thread in threads:
        thread.start()
    before, cpu = server.engine(), server.cpu_seconds()
    barrier.wait()
    start = time.perf_counter()
    for thread in threads:
        thread.join()
    wall = time.perf_counter() - start
    server.check()
    after, cpu = server.engine(), server.cpu_seconds() - cpu
    requests = [r for rs in results for r in rs]
    failed = [r for r in requests if r.status != 200 or r.error or r.first is None]
    if failed:
        raise ServerFailed(f"{server.name}: {len(failed)} of {len(requests)} requests failed, e.g. "
                           f"status {failed[0].status}: {failed[0].error}")  # fmt: skip
    engine = {"peak_batch": after["peak_batch"], "steps": after["steps"] - before["steps"],
              "batched_steps": after["batched_steps"] - before["batched_steps"]}  # fmt: skip
    return Round(server.name, concurrency, wall, requests, engine, cpu)


def run_preset(preset: str, args, root: Path) -> list[Round]:
    checkpoint, voices = build(preset, root, args.voice_frames)
    servers = {}
    try:
        for name, max_batch in CONTENDERS.items():  # started together: their start-ups overlap
            servers[name] = Server(name, checkpoint, voices, max_batch, args, root / f"{preset}-{name}.log")
        for server in servers.values():
            server.wait(args.start_timeout)
        body = {"model": "csm", "voice": "alloy", "input": TEXT, "response_format": "pcm", "seed": 0,
                "max_audio_length_ms": args.frames * FRAME_MS}  # fmt: skip
        for server in servers.values():  # warm-up: one request each, untimed
            with httpx.Client(timeout=args.request_timeout + 60) as http:
                warm = speak(http, server.url, {**body, "max_audio_length_ms": 10 * FRAME_MS})
            if warm.status != 200 or warm.error:
                raise ServerFailed(f"{server.name}: warm-up failed: {warm.status} {warm.error}")
        rounds = []
        for n in args.concurrency:
            for repeat in range(args.repeats):  # contenders alternate: A B, then B A, ...
                for server in list(servers.values())[:: -1 if repeat % 2 else 1]:
                    r = drive(server, n, args, body)
                    print(f"  {preset} N={n:<2} {server.name:<13} {r.throughput:6.2f} audio s/s, {r.per_cpu:5.2f} per "
                          f"CPU s, TTFA p50 {r.ttfa(50):6.2f} s p95 {r.ttfa(95):6.2f} s ({len(r.requests)} requests, "
                          f"{r.wall:.1f} s, peak batch {r.engine['peak_batch']})", flush=True)  # fmt: skip
                    rounds.append(r)
        return rounds
    finally:
        for server in servers.values():
            server.stop()


def report(preset: str, rounds: list[Round], args) -> dict:
    from rich.console import Console
    from rich.table import Table

    by = {}
    for r in rounds:  # repeats pooled: their requests, wall and CPU time together
        key = (r.contender, r.concurrency)
        if key in by:
            old = by[key]
            r = Round(r.contender, r.concurrency, old.wall + r.wall, old.requests + r.requests,
                      {k: max(old.engine[k], v) if k == "peak_batch" else old.engine[k] + v
                       for k, v in r.engine.items()}, old.cpu + r.cpu)  # fmt: skip
        by[key] = r
    threads = args.torch_threads or "default"
    title = (f"{preset}: {args.frames} frames ({args.frames * FRAME_MS / 1000:.1f} s) per request, {args.requests}+ "
             f"per client, {args.repeats} repeat(s), {args.device}, torch threads {threads}")  # fmt: skip
    table = Table(title=title)
    columns = ["N", "contender", "audio s/s", "per CPU s", "TTFA p50", "TTFA p95", "p95 / lone", "steps shared"]
    for column in columns:
        table.add_column(column, justify="right")
    table.add_column("batched / one-at-a-time", justify="right")
    summary = {}
    for n in args.concurrency:
        for name in CONTENDERS:
            r, lone = by[(name, n)], by[(name, args.concurrency[0])]
            ratio = ""
            if name == "batched":
                a = by[("one-at-a-time", n)]
                figures = {"throughput_ratio": r.throughput / a.throughput,
                           "per_cpu_ratio": r.per_cpu / a.per_cpu, "ttfa_p95_ratio": r.ttfa(95) / a.ttfa(95),
                           "ttfa_p95_vs_lone": r.ttfa(95) / lone.ttfa(95)}  # fmt: skip
                summary[n] = figures
                ratio = (f"{figures['throughput_ratio']:.2f}x audio s/s, {figures['per_cpu_ratio']:.2f}x per CPU s, "
                         f"{figures['ttfa_p95_ratio']:.2f}x TTFA p95")  # fmt: skip
            table.add_row(str(n), name, f"{r.throughput:.2f}", f"{r.per_cpu:.2f}", f"{r.ttfa(50):.2f} s",
                          f"{r.ttfa(95):.2f} s", f"{r.ttfa(95) / lone.ttfa(95):.2f}x",
                          f"{r.engine['batched_steps']}/{r.engine['steps']}", ratio)  # fmt: skip
    Console(width=160).print(table)
    return summary


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--presets", nargs="+", default=["tiny", "100m"])
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 8, 16], help="clients; first = lone")
    parser.add_argument("--frames", type=int, default=25, help="frames per request (80 ms each)")
    parser.add_argument("--requests", type=int, default=1, help="requests per client, one after another")
    parser.add_argument("--min-requests", type=int, default=4, help="at least this many per round (the lone client)")
    parser.add_argument("--voice-frames", type=int, default=60, help="the voice prompt's frames (~5 s, as alloy)")
    parser.add_argument("--repeats", type=int, default=1, help="rounds per N and contender, alternating order")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--torch-threads", type=int, default=1, help="the server's torch_threads; 0: torch's default")
    parser.add_argument("--start-timeout", type=float, default=300)
    parser.add_argument("--request-timeout", type=float, default=600)
    parser.add_argument("--work", default=None, help="where checkpoints and server logs go; default: a temp dir")
    args = parser.parse_args()
    root = Path(args.work or tempfile.mkdtemp(prefix="bench_serve-"))
    root.mkdir(parents=True, exist_ok=True)
    print(f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.2f}; work dir {root}", flush=True)
    summary = {}
    try:
        for preset in args.presets:
            rounds = run_preset(preset, args, root)
            summary[preset] = report(preset, rounds, args)
    except ServerFailed as error:
        print(f"FAILED: {error}\n(logs in {root})", file=sys.stderr)
        sys.exit(1)
    for preset, by_n in summary.items():  # one line each, for bench/gpu_check.sh
        figures = " ".join(f"N{n} {s['throughput_ratio']:.2f}x p95/lone {s['ttfa_p95_vs_lone']:.2f}x"
                           for n, s in by_n.items())  # fmt: skip
        print(f"serve: {preset} {args.device} batched/one-at-a-time audio s/s {figures}")
    print("summary:", json.dumps(summary))
    if args.work is None:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
