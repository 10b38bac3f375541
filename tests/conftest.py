"""Shared fixtures, built once per session: a small real BPE tokenizer with CSM's special tokens, and a
random transformers CSM (with the real Mimi architecture as its codec) beside our model with the same
weights."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from data_pipeline.codec import fill_codebooks, random_mimi

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never reach the Hub; fail fast instead of retrying

# The suite's temporary files peak near 2.5 GB (session fixtures plus one test's checkpoints; a passing test's
# directory is removed at once). On a fuller disk every test that writes would error for the same hidden reason.
NEEDS_FREE_GB = 4


def pytest_sessionstart(session):
    basetemp = session.config._tmp_path_factory.getbasetemp()
    free_gb = shutil.disk_usage(basetemp).free / 1e9
    if free_gb < NEEDS_FREE_GB:
        pytest.exit(
            f"only {free_gb:.1f} GB free under {basetemp}: the tests need {NEEDS_FREE_GB} GB for checkpoints and "
            "audio; free some space or pass --basetemp=DIR on a larger disk",
            returncode=1,
        )


SPECIAL_TOKENS = ["<|begin_of_text|>", "<|end_of_text|>", "<|AUDIO|>", "<|audio_eos|>", "<|pad|>"]
SENTENCES = [
    "The past is just a story we tell ourselves.",
    "We have a chance for a new life here.",
    "Do you remember the lead singer of that band?",
    "I wound the bandage around the wound.",
    "She sat in the front row and began to row.",
    "A tear rolled down as she saw the tear in the paper.",
]


@pytest.fixture(scope="session")
def hf_tokenizer():
    """A byte-level BPE trained here: real tokenization, CSM's special tokens, no download."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400, special_tokens=SPECIAL_TOKENS, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(SENTENCES * 4, trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<|begin_of_text|>", eos_token="<|end_of_text|>", pad_token="<|pad|>"
    )


@pytest.fixture(scope="session")
def text_tokenizer(hf_tokenizer):
    from csm_train.tokenizer import TransformersTokenizer

    return TransformersTokenizer(hf_tokenizer)


@pytest.fixture(scope="session")
def tiny_config(hf_tokenizer):
    from csm_train import CSMConfig

    return CSMConfig.preset("tiny", text_vocab_size=len(hf_tokenizer))


@pytest.fixture(scope="session")
def hf_pair(tiny_config, hf_tokenizer):
    """(transformers CsmForConditionalGeneration, our CSM) holding the same random weights, in fp32, eval.

    The transformers model carries a real (randomly initialised) Mimi codec. Mimi's codebooks start as
    zeros, which would make every code 0; they are filled with random centroids so codes vary."""
    from transformers import CsmForConditionalGeneration

    from csm_train import CSM
    from csm_train.formats import config_to_transformers, state_dict_from_transformers

    torch.manual_seed(0)
    hf_config = config_to_transformers(
        tiny_config,
        bos_token_id=hf_tokenizer.bos_token_id,
        pad_token_id=hf_tokenizer.pad_token_id,
        audio_token_id=hf_tokenizer.convert_tokens_to_ids("<|AUDIO|>"),
        audio_eos_token_id=hf_tokenizer.convert_tokens_to_ids("<|audio_eos|>"),
    )
    hf_config._attn_implementation = "eager"
    hf = CsmForConditionalGeneration(hf_config).eval()
    fill_codebooks(hf.codec_model)
    ours = CSM(tiny_config).eval()
    hf_weights = {k: v for k, v in hf.state_dict().items() if not k.startswith("codec_model.")}
    ours.load_state_dict(state_dict_from_transformers(hf_weights, tiny_config), strict=True)
    return hf, ours


@pytest.fixture(scope="session")
def mimi_dir(tmp_path_factory):
    """A random-init Mimi (codebooks filled) saved as a transformers directory, loaded back by path."""
    path = tmp_path_factory.mktemp("mimi")
    random_mimi(seed=0).save_pretrained(path)
    return path


def random_frames(config, batch: int, text_len: int, audio_len: int, seed: int = 0):
    """`[B, T, K+1]` frames: `text_len` text frames, `audio_len` audio frames, one all-zero end frame."""
    g = torch.Generator().manual_seed(seed)
    K = config.num_codebooks
    T = text_len + audio_len + 1
    tokens = torch.zeros(batch, T, K + 1, dtype=torch.long)
    tokens_mask = torch.zeros(batch, T, K + 1, dtype=torch.bool)
    tokens[:, :text_len, K] = torch.randint(0, config.text_vocab_size, (batch, text_len), generator=g)
    tokens_mask[:, :text_len, K] = True
    tokens[:, text_len : T - 1, :K] = torch.randint(0, 2048, (batch, audio_len, K), generator=g)
    tokens_mask[:, text_len:, :K] = True
    labels = torch.full((batch, T, K), -100, dtype=torch.long)
    labels[:, text_len:] = tokens[:, text_len:, :K]
    return tokens, tokens_mask, labels


@pytest.fixture(scope="session")
def speech():
    """Two sentences of espeak-ng speech: float32, 24 kHz, mono."""
    from data_pipeline.demo_corpus import speak

    return speak("We should go to the new library downtown this weekend. I heard it is beautiful.", "en-us+m3", 155)


DEMO_PIPELINE_ARGS = ["codec=mimi_random", "max_positions=512", "progress=false"]


def pipeline_command(corpus, out) -> list[str]:
    """`python -m data_pipeline` over a demo corpus, as the quickstart runs it."""
    return [
        sys.executable,
        "-m",
        "data_pipeline",
        f"input_dir={corpus / 'audio'}",
        f"output_dir={out}",
        *DEMO_PIPELINE_ARGS,
    ]


def write_with_ffmpeg(path, codec: str, container: str, rate: int, audio, options=None) -> None:
    """Encode `audio` [channels, n] (1 or 2 channels, float32) with FFmpeg through PyAV: the formats libsndfile
    cannot read (m4a, aac, webm, mp4)."""
    import av
    import numpy as np

    layout = "mono" if len(audio) == 1 else "stereo"
    with av.open(str(path), "w", format=container, options=options or {}) as out:
        stream = out.add_stream(codec, rate=rate, layout=layout)
        frame = av.AudioFrame.from_ndarray(np.ascontiguousarray(audio), format="fltp", layout=layout)
        frame.sample_rate = rate
        for packet in [*stream.encode(frame), *stream.encode(None)]:
            out.mux(packet)


@pytest.fixture(scope="session")
def demo_corpus(tmp_path_factory):
    """Four espeak-ng conversations with their truth (and the planted broken files)."""
    from data_pipeline.demo_corpus import write_demo_corpus

    path = tmp_path_factory.mktemp("demo_corpus")
    write_demo_corpus(path, num_conversations=4, seed=0)
    return path


@pytest.fixture(scope="session")
def demo_dataset(demo_corpus, tmp_path_factory):
    """The demo corpus through `python -m data_pipeline` (random-init Mimi, recorded in dataset.json)."""
    out = tmp_path_factory.mktemp("demo_dataset")
    subprocess.run(pipeline_command(demo_corpus, out), check=True, capture_output=True, text=True)
    return out


# A real SLURM cluster (launch/local_slurm.sh) for the launch tests.
REPO = Path(__file__).resolve().parents[1]
LOCAL_SLURM = REPO / "launch" / "local_slurm.sh"
CANNOT_INSTALL = 3  # local_slurm.sh's exit code when SLURM is missing and this machine cannot install or run it
SKIP_SLURM = "CSM_SKIP_SLURM"  # =1: skip the tests that need the cluster (they fail where it cannot run otherwise)


def local_slurm(*args: str | Path, env: dict | None = None, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run(
        [str(LOCAL_SLURM), *map(str, args)], capture_output=True, text=True, env=env, timeout=timeout, check=False
    )


def slurm_client_env(cluster_env: dict) -> dict:
    """This process's environment pointed at the cluster, without the SLURM_* of any job pytest itself runs in."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    return {**env, **cluster_env}


@pytest.fixture(scope="session")
def slurm_cluster(tmp_path_factory):
    """A real single-node SLURM cluster for the session (launch/local_slurm.sh start; installs SLURM with apt when
    it is missing). Returns the environment variables its clients need ({"SLURM_CONF": ...}); add them to a
    subprocess's environment to run sbatch/srun/squeue/scontrol against it. Stopped at the end of the session.
    Where SLURM cannot be installed or run (no apt, no root or sudo) the tests that need it fail, saying so, as
    they do in CI: `make test` runs them everywhere. Skipped only when asked: CSM_SKIP_SLURM=1."""
    if os.environ.get(SKIP_SLURM) == "1":
        pytest.skip(f"{SKIP_SLURM}=1: the tests that need a local SLURM cluster are skipped")
    cluster_dir = tmp_path_factory.mktemp("slurm")
    env = dict(os.environ)
    if len(os.sched_getaffinity(0)) < 2:  # the tests run two tasks; SLURM may promise more CPUs than there are
        env["CSM_SLURM_CPUS"] = "2"
    started = local_slurm("start", cluster_dir, env=env, timeout=600)
    output = f"{started.stdout}{started.stderr}".strip()
    if started.returncode == CANNOT_INSTALL:
        pytest.fail(
            f"no local SLURM cluster on this machine: {output}\nThe launch tests need one (launch/local_slurm.sh "
            f"installs SLURM with apt as root or with sudo); to run the suite without them set {SKIP_SLURM}=1",
            pytrace=False,
        )
    assert started.returncode == 0, f"launch/local_slurm.sh start failed ({started.returncode}):\n{output}"
    try:
        yield {"SLURM_CONF": str(cluster_dir / "slurm.conf")}
    finally:
        local_slurm("stop", cluster_dir)


def slurm(cluster_env: dict, *args: str | Path, timeout: float = 60) -> str:
    """Run a SLURM client command against the cluster; its stdout."""
    done = subprocess.run(
        list(map(str, args)), capture_output=True, text=True, env=slurm_client_env(cluster_env), timeout=timeout
    )
    assert done.returncode == 0, f"{' '.join(map(str, args))} failed ({done.returncode}): {done.stdout}{done.stderr}"
    return done.stdout


def wait_for(what: str, condition, timeout: float = 30):
    deadline = time.monotonic() + timeout
    while not (result := condition()):
        assert time.monotonic() < deadline, f"timed out after {timeout:.0f}s waiting for {what}"
        time.sleep(0.1)
    return result


def job_state(cluster_env: dict, job_id: str) -> str:
    return slurm(cluster_env, "squeue", "-h", "-t", "all", "-j", job_id, "-o", "%T").strip()


# -- python -m serve: one real server process for the session (tests/test_serve*.py) ---------------------------

SERVE_KEY = "sk-test-key"
SERVE_CONTEXT_FRAMES = 360  # the server's context: small, so a short conversation is pruned
SERVE_ARGS = ["tokenizer={_target_: csm_train.tokenizer.ByteTokenizer}", "codec='random-init:seed=0'"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def serve_checkpoint(tmp_path_factory):
    """A tiny random-weights CSM for a byte tokenizer, saved as `save_pretrained` writes it."""
    from csm_train import CSM, CSMConfig
    from csm_train.tokenizer import ByteTokenizer

    path = tmp_path_factory.mktemp("serve") / "tiny"
    torch.manual_seed(0)
    CSM(CSMConfig.preset("tiny", text_vocab_size=ByteTokenizer.vocab_size)).save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def serve_voice_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("voices")


def serve_command(checkpoint: Path, voice_dir: Path, *settings: str) -> list[str]:
    """`python -m serve` on `checkpoint` with the tests' tokenizer, codec, context and one torch thread, and
    only the `alloy` built-in voice (a faster start)."""
    return [sys.executable, "-m", "serve", f"checkpoint={checkpoint}", *SERVE_ARGS, f"voice_dir={voice_dir}",
            f"context_frames={SERVE_CONTEXT_FRAMES}", "torch_threads=1",
            "~builtin_voices.echo", "~builtin_voices.nova", "~builtin_voices.shimmer", *settings]  # fmt: skip


def start_server(command: list[str], log: Path, timeout: float = 180):
    """Start `python -m serve …` and wait for /health: (process, base URL). `command` lacks the port."""
    import httpx

    port = free_port()
    with open(log, "w") as out:
        process = subprocess.Popen([*command, f"port={port}"], stdout=out, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + timeout
    while True:
        try:
            if httpx.get(f"{url}/health").status_code == 200:
                return process, url
        except httpx.TransportError:
            pass
        if process.poll() is not None or time.monotonic() > deadline:
            process.kill()
            pytest.fail(f"server did not start:\n{log.read_text()[-3000:]}")
        time.sleep(0.5)


@pytest.fixture(scope="session")
def serve_log(tmp_path_factory):
    """The session server's output: JSON log lines."""
    return tmp_path_factory.mktemp("log") / "server.log"


@pytest.fixture(scope="session")
def server(serve_checkpoint, serve_voice_dir, serve_log):
    """The base URL of a running server (keys on, batches of 2, one torch thread, JSON logs); its voice store is
    built (built-in voices) at its start."""
    command = serve_command(serve_checkpoint, serve_voice_dir, f"api_keys=[{SERVE_KEY}]", "max_batch=2", "queue_size=2",
                            "limits.max_body_mb=1", "limits.max_upload_mb=0.5", "log_format=json")  # fmt: skip
    process, url = start_server(command, serve_log)
    yield url
    process.terminate()
    process.wait(timeout=30)
