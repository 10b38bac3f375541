"""What cannot train is refused up front, and a run directory is checked before it is trusted: a dataset that does
not fit the model (at start-up from its dataset.json, at run time within a bounded number of reads and log lines),
a run that is not stepping still stops on SIGTERM/SIGINT, a resume with another model, tokenizer or dataset is
refused (or forced), and a second process on a run directory is refused while the first runs — but not after it
was SIGKILLed."""

import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir

from csm_train.run_dir import RunDirectoryError
from csm_train.train import train
from data_pipeline.synthetic import write_synthetic_corpus

CONF = str(Path(__file__).resolve().parents[1] / "conf")


def config(*overrides):
    with initialize_config_dir(config_dir=CONF, version_base="1.3"):
        return compose(config_name="config", overrides=list(overrides))


def tiny(run_dir, data, *overrides):
    return config(
        "+experiment=tiny",
        f"run_dir={run_dir}",
        f"data.path={data}",
        "trainer.max_steps=2",
        "checkpoint.every_n_steps=2",
        *overrides,
    )


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "synthetic"
    write_synthetic_corpus(path)
    return path


def test_a_dataset_with_another_codebook_count_is_refused_at_start_up(tmp_path):
    write_synthetic_corpus(tmp_path / "k8", num_codebooks=8)
    cfg = tiny(tmp_path / "run", tmp_path / "k8")
    with pytest.raises(
        ValueError, match=r"(?s)cannot train model.preset=tiny.*8 codebooks per frame and the model has 32"
    ):
        train(cfg)
    assert not (tmp_path / "run").exists()  # nothing of the run written
    # Without its card the dataset is found out as it streams: a bounded number of reads, then the cause.
    (tmp_path / "k8" / "dataset.json").unlink()
    with pytest.raises(RuntimeError, match=r"1000 samples read in a row.*32 codebooks.*codes have shape \(8, "):
        train(cfg)


def test_windows_that_never_fit_stop_the_stream_with_the_cause(tmp_path, data, caplog):
    """No conversation's first turn fits 16 positions: the stream gives up after a bounded number of reads (the
    corpus is read over and over, 32 samples an epoch) with a bounded number of log lines, naming the fix."""
    caplog.set_level(logging.WARNING, logger="csm_train.data")
    cfg = tiny(tmp_path, data, "data.max_seq_len=16")
    with pytest.raises(
        RuntimeError, match=r"(?s)1000 samples read in a row.*cannot fit data.max_seq_len=16.*max_positions=16"
    ):
        train(cfg)
    skips = [r for r in caplog.records if "skipping sample that cannot fit" in r.getMessage()]
    assert 1 <= len(skips) <= 6, [r.getMessage() for r in skips]


def test_repeated_warnings_are_counted_not_repeated(caplog, monkeypatch):
    from csm_train import data as data_module

    clock = [0.0]
    monkeypatch.setattr(data_module.time, "monotonic", lambda: clock[0])
    caplog.set_level(logging.WARNING, logger="csm_train.data")
    warnings = data_module.RateLimitedWarnings(first=2, every_s=60)
    for i in range(10):
        warnings.warn("skipping bad sample", f"sample {i}")
    clock[0] = 61.0
    warnings.warn("skipping bad sample", "sample 10")
    lines = [r.getMessage() for r in caplog.records]
    assert lines == [
        "skipping bad sample: sample 0",
        "skipping bad sample: sample 1 (further ones: a count every 60 s)",
        "skipping bad sample: 9 more (11 in all); the latest: sample 10",
    ]


@pytest.mark.slow
def test_a_resume_with_another_model_tokenizer_or_dataset_is_refused_unless_forced(tmp_path, data, hf_tokenizer):
    run = tmp_path / "run"
    train(tiny(run, data))
    config_yaml = (run / "config.yaml").read_text()

    def refused(*overrides) -> str:
        with pytest.raises(RunDirectoryError) as error:
            train(tiny(run, data, *overrides))
        assert (run / "config.yaml").read_text() == config_yaml  # unchanged
        message = str(error.value)
        assert "run_id=NAME" in message and "resume=force" in message
        return message

    assert "model.preset: tiny → 100m" in refused("model.preset=100m")
    hf_tokenizer.save_pretrained(tmp_path / "tokenizer")
    tokenizer = ["data.tokenizer._target_=csm_train.tokenizer.load_tokenizer"]
    message = refused(*tokenizer, f"+data.tokenizer.name_or_path={tmp_path / 'tokenizer'}")
    vocab = len(hf_tokenizer)
    assert "tokenizer.config._target_: csm_train.tokenizer.ByteTokenizer → csm_train.tokenizer.load_tok" in message
    assert "tokenizer.fingerprint: " in message
    assert f"tokenizer.vocab_size: 258 → {vocab}" in message
    assert f"model.architecture.text_vocab_size: 258 → {vocab}" in message

    other = tmp_path / "other"
    write_synthetic_corpus(other, seed=1)
    message = refused(f"data.path={other}")
    assert "dataset.manifest_sha256: " in message and f"data.path: {data} → {other}" in message
    assert "seed: 0 → 1" in refused("seed=1")

    # Deliberately: the same run continues on the other dataset from its checkpoint at step 2.
    trainer = train(tiny(run, other, "resume=force", "trainer.max_steps=4", "checkpoint.every_n_steps=4"))
    assert trainer.global_step == 4
    assert str(other) in (run / "config.yaml").read_text()
    train(tiny(run, other, "trainer.max_steps=5"))  # and from then on, it is that run


def test_a_dataset_or_tokenizer_is_the_same_wherever_it_lives(tmp_path, data, hf_tokenizer):
    """Run identities compare the dataset and the tokenizer by content: a copy elsewhere (a Hub id then a local
    directory) is the same run; another vocabulary of the same size is not."""
    from csm_train.run_dir import identity_differences, run_identity
    from csm_train.tokenizer import ByteTokenizer, load_tokenizer

    copy = tmp_path / "copy"
    (copy / "shards").mkdir(parents=True)
    for path in data.rglob("*"):
        if path.is_file():
            (copy / path.relative_to(data)).write_bytes(path.read_bytes())
    for name in ("a", "b"):
        hf_tokenizer.save_pretrained(tmp_path / name)

    def identity(data_path, tokenizer_dir):
        overrides = ["data.tokenizer._target_=csm_train.tokenizer.load_tokenizer"]
        cfg = tiny(tmp_path / "run", data_path, *overrides, f"+data.tokenizer.name_or_path={tokenizer_dir}")
        return run_identity(cfg, load_tokenizer(str(tokenizer_dir)))

    assert identity_differences(identity(data, tmp_path / "a"), identity(copy, tmp_path / "b")) == []

    class Shifted(ByteTokenizer):  # as many tokens, other ids
        def encode(self, text):
            return [(i + 1) % 256 for i in super().encode(text)]

    then = run_identity(tiny(tmp_path / "run", data), ByteTokenizer())
    differences = identity_differences(then, run_identity(tiny(tmp_path / "run", data), Shifted()))
    assert [d.split(":")[0] for d in differences] == ["tokenizer.fingerprint"]


def cli(run_dir, *overrides) -> subprocess.Popen:
    args = [sys.executable, "-m", "csm_train", "+experiment=tiny", f"run_dir={run_dir}", *overrides]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)


def wait_for(what, condition, process, timeout=300):
    deadline = time.time() + timeout
    while not condition():
        if process.poll() is not None:
            pytest.fail(f"the run ended ({process.returncode}) before {what}:\n{process.stdout.read()[-3000:]}")
        if time.time() > deadline:
            process.kill()
            pytest.fail(f"no {what} within {timeout} s")
        time.sleep(0.2)


@pytest.mark.slow
def test_a_second_process_is_refused_while_the_first_runs_and_not_after_it_was_killed(tmp_path, data):
    run = tmp_path / "run"
    first = cli(run, f"data.path={data}", "trainer.max_steps=500", "checkpoint.every_n_steps=2")
    try:
        wait_for("a checkpoint", (run / "checkpoints" / "step-0000002.ckpt").exists, first)
        with pytest.raises(RunDirectoryError, match=rf"{run} is in use by pid {first.pid} on "):
            train(tiny(run, data, "trainer.max_steps=500"))
    finally:
        first.kill()
        first.communicate()
    assert first.returncode == -signal.SIGKILL
    step = torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)["global_step"]
    trainer = train(tiny(run, data, f"trainer.max_steps={step + 1}"))  # the kernel released the dead run's lock
    assert trainer.global_step == step + 1


def hung_dataset(tmp_path: Path, data: Path) -> Path:
    """The corpus's first shard as a FIFO: reading it blocks while the test holds its write end open and writes
    nothing, as a read from a hung file system would."""
    hung = tmp_path / "hung"
    (hung / "shards").mkdir(parents=True)
    (hung / "dataset.json").write_bytes((data / "dataset.json").read_bytes())
    rows = [row for row in (data / "manifest.jsonl").read_text().splitlines() if "shard-000000.tar" in row]
    (hung / "manifest.jsonl").write_text("\n".join(rows) + "\n")
    os.mkfifo(hung / "shards" / "shard-000000.tar")
    return hung


def start_hung_run(tmp_path: Path, hung: Path, name: str, *overrides) -> tuple[subprocess.Popen, int]:
    """A run whose data stream blocks on its first read (the fit has started: its signal handlers are in place);
    returns it and the FIFO's write end, which keeps the read blocked."""
    run = cli(tmp_path / name, f"data.path={hung}", *overrides)
    fifo = hung / "shards" / "shard-000000.tar"
    writer = []

    def reader_arrived() -> bool:
        try:  # a non-blocking open for writing succeeds only once a reader has the FIFO open
            writer.append(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
            return True
        except OSError:
            return False

    wait_for("the first read of the data", reader_arrived, run)
    return run, writer[0]


@pytest.mark.slow
def test_a_run_that_is_not_stepping_stops_on_sigterm_after_a_grace_period_or_at_a_second_signal(tmp_path, data):
    hung = hung_dataset(tmp_path, data)
    announced = "saving a checkpoint at the next optimizer step, then stopping"

    # One SIGTERM: the run waits its grace period (3 s) for a step to save at, then exits unsaved, saying why.
    run, writer = start_hung_run(tmp_path, hung, "a", "stop_grace_s=3")
    run.send_signal(signal.SIGTERM)
    signalled = time.time()
    out, _ = run.communicate(timeout=60)
    os.close(writer)
    assert run.returncode == 128 + signal.SIGTERM, out[-3000:]
    assert announced in out and "no optimizer step within 3 s of SIGTERM: the run is not stepping" in out
    assert "exiting without saving" in out and time.time() - signalled < 30

    # SIGINT, then SIGINT again: the second exits at once, however long the grace period.
    run, writer = start_hung_run(tmp_path, hung, "b", "stop_grace_s=600")
    run.send_signal(signal.SIGINT)
    time.sleep(1)
    run.send_signal(signal.SIGINT)
    out, _ = run.communicate(timeout=60)
    os.close(writer)
    assert run.returncode == 128 + signal.SIGINT, out[-3000:]
    assert announced in out and "a second stop signal (SIGINT); exiting without saving" in out
