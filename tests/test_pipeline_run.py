"""The pipeline driver on a small transcribed corpus: shards the trainer reads, failures recorded and kept
out, parts that merge into the single-process result, byte-identical output after a crash, nothing rewritten by a
rerun, and runs on one output that cannot step on each other."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
from conftest import wait_for, write_with_ffmpeg

from csm_train.data import FrameStream
from csm_train.tokenizer import ByteTokenizer
from data_pipeline.codec import MimiCodec
from data_pipeline.run import Pipeline, PipelineConfig, merge
from data_pipeline.shards import read_samples
from data_pipeline.transcribe import SidecarTranscripts

LINES = ["we should go to the library", "sounds good to me", "let us meet at ten", "i will bring coffee"]


def write_recording(path, seed, seconds=12.0):
    """Gated tones for audio, and a sidecar transcript with two speakers taking turns every 3 s."""
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * 24000)) / 24000
    audio = 0.1 * np.sin(2 * np.pi * rng.uniform(150, 300) * t) * (np.sin(2 * np.pi * 2 * t) > -0.5)
    sf.write(path, audio.astype(np.float32), 24000)
    words = []
    for turn in range(int(seconds // 3)):
        text = LINES[(seed + turn) % len(LINES)].split()
        for i, word in enumerate(text):
            start = turn * 3 + 0.2 + i * 0.35
            words.append(
                {"text": word, "start": start, "end": start + 0.3, "speaker": "AB"[turn % 2], "probability": 0.9}
            )
    path.with_suffix(".json").write_text(json.dumps({"words": words}))


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("corpus")
    for i in range(4):
        write_recording(root / f"talk_{i}.wav", seed=i)
    (root / "broken.wav").write_bytes(b"not audio at all" * 100)  # not audio
    write_recording(root / "untranscribed.wav", seed=9)
    (root / "untranscribed.json").unlink()  # no transcript
    sf.write(root / "short.wav", np.zeros(2400, dtype=np.float32), 24000)  # 0.1 s
    return root


@pytest.fixture(scope="module")
def encoder(mimi_dir):
    return MimiCodec(str(mimi_dir))


def run(corpus, out, encoder, num_parts):
    config = PipelineConfig(str(corpus), str(out), num_parts=num_parts, max_positions=256, samples_per_shard=2)
    pipeline = Pipeline(config, encoder, SidecarTranscripts())
    for part in range(num_parts):
        pipeline.run_part(part)
    return merge(out, num_parts)


def contents(out):
    return dict(read_samples(out))


def test_pipeline_writes_the_shard_contract_and_records_failures(corpus, encoder, tmp_path):
    card = run(corpus, tmp_path, encoder, num_parts=1)
    failures = [json.loads(line) for line in (tmp_path / "failures.jsonl").read_text().splitlines()]
    assert {(f["input"].split("/")[-1], f["stage"], f["reason"]) for f in failures} == {
        ("broken.wav", "ingest", "not_audio"),
        ("short.wav", "ingest", "too_short"),
        ("untranscribed.wav", "transcribe", "no_transcript"),
    }
    keys = [json.loads(line)["key"] for line in (tmp_path / "manifest.jsonl").read_text().splitlines()]
    assert keys and all(k.startswith("talk_") for k in keys)  # no broken input reached the shards
    assert card["rejected"] == {"ingest:too_short": 1, "ingest:not_audio": 1, "transcribe:no_transcript": 1}
    assert card["skipped"] == {".json": 4}  # the sidecar transcripts: listed, not silently passed over
    assert card["windows"] == len(keys) and card["codec"]["weights_id"] and card["config_hash"]
    # The trainer reads it back: segments' frames index the codes, text is tokenized at load time.
    batch = next(iter(FrameStream(tmp_path, ByteTokenizer(), 32, max_seq_len=256, batch_size=2, lookahead=2)))
    assert batch.tokens.shape == (2, 256, 33) and batch.stream.skipped == 0 and batch.stream.truncated == 0


def test_parts_merge_into_the_single_process_result(corpus, encoder, tmp_path):
    run(corpus, tmp_path / "one", encoder, num_parts=1)
    run(corpus, tmp_path / "three", encoder, num_parts=3)
    one, three = contents(tmp_path / "one"), contents(tmp_path / "three")
    assert one == three and len(one) > 0


def test_a_crash_mid_run_resumes_to_identical_bytes(corpus, encoder, tmp_path):
    run(corpus, tmp_path / "clean", encoder, num_parts=1)
    config = PipelineConfig(str(corpus), str(tmp_path / "crashed"), max_positions=256, samples_per_shard=2)
    pipeline = Pipeline(config, encoder, SidecarTranscripts())
    talks = [p for p in pipeline.inputs if p.stem.startswith("talk_")]
    pipeline.process(talks[0])  # one input finished; the process died writing the next one's codes:
    (tmp_path / "crashed" / "work" / "talk_1.npz.4242.tmp").write_bytes(b"torn write")
    time.sleep(1.1)  # a later second on the wall clock: a shard stamped with it would differ in bytes
    assert contents_after_rerun(corpus, tmp_path / "crashed", encoder) == contents(tmp_path / "clean")
    shards = {run: sorted((tmp_path / run / "shards").glob("*.tar")) for run in ("clean", "crashed")}
    assert [p.name for p in shards["clean"]] == [p.name for p in shards["crashed"]]
    for clean, crashed in zip(shards["clean"], shards["crashed"], strict=True):  # byte-stable, tar headers too
        assert clean.read_bytes() == crashed.read_bytes(), clean.name


def contents_after_rerun(corpus, out, encoder):
    run(corpus, out, encoder, num_parts=1)
    return contents(out)


def test_cli_parts_then_merge_equal_one_process(corpus, mimi_dir, tmp_path):
    """`python -m data_pipeline` as array tasks would run it: each part alone, then merge_only."""
    import subprocess
    import sys

    def cli(out, *args):
        command = [sys.executable, "-m", "data_pipeline", f"input_dir={corpus}", f"output_dir={out}"]
        common = ["transcripts=sidecar", f"codec.name_or_path={mimi_dir}", "max_positions=256", "progress=false"]
        subprocess.run([*command, *common, "samples_per_shard=2", *args], check=True, capture_output=True)

    cli(tmp_path / "one")
    for part in range(2):
        cli(tmp_path / "two", "num_parts=2", f"part={part}")
    assert not (tmp_path / "two" / "manifest.jsonl").exists()  # parts alone do not merge
    cli(tmp_path / "two", "num_parts=2", "merge_only=true")
    assert contents(tmp_path / "one") == contents(tmp_path / "two")
    card = json.loads((tmp_path / "two" / "dataset.json").read_text())
    assert card["recordings"] == 4 and card["failed"] == 3


def test_an_unexpected_error_is_recorded_and_retried_by_the_next_run(corpus, encoder, tmp_path):
    class FlakyTranscripts(SidecarTranscripts):
        def __call__(self, path, audio):
            if path.stem == "talk_1" and self.fail:
                raise RuntimeError("model server went away")
            return super().__call__(path, audio)

    transcripts = FlakyTranscripts()
    transcripts.fail = True
    config = PipelineConfig(str(corpus), str(tmp_path), max_positions=256, samples_per_shard=2)
    pipeline = Pipeline(config, encoder, transcripts)
    pipeline.run_part(0, progress=False)
    failures = [json.loads(line) for line in (tmp_path / "parts" / "part-0000" / "failures.jsonl").open()]
    assert {f["reason"] for f in failures if "talk_1" in f["input"]} == {"error:RuntimeError"}
    assert set(pipeline.throughput()) >= {"ingest", "encode"}  # the error record is not a finished input
    transcripts.fail = False
    pipeline.run_part(0, progress=False)  # retried, unlike bad audio
    failures = (tmp_path / "parts" / "part-0000" / "failures.jsonl").read_text()
    assert "talk_1" not in failures


def test_merge_refuses_a_wrong_part_count_and_unfinished_parts(corpus, encoder, tmp_path):
    """A merge with another num_parts than the parts were cut with would leave recordings out or mix two splits."""
    run(corpus, tmp_path, encoder, num_parts=3)
    with pytest.raises(ValueError, match=r"num_parts=2: parts \[2\] exist beyond num_parts=2.*part 0 was cut for"):
        merge(tmp_path, 2)
    with pytest.raises(ValueError, match=r"part 3 has not finished.*run it"):
        merge(tmp_path, 4)
    assert merge(tmp_path, 3)["recordings"] == 4


def test_an_input_dir_without_audio_is_an_error(encoder, tmp_path):
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "notes.txt").write_text("no audio here")
    with pytest.raises(ValueError, match=r"input_dir=.*in holds no audio file \(.*\.wav.*\): point it at"):
        Pipeline(PipelineConfig(str(tmp_path / "in"), str(tmp_path / "out")), encoder, SidecarTranscripts())
    assert not (tmp_path / "out").exists()


def test_twins_that_reduce_to_one_name_stay_two_recordings(tmp_path):
    """`talk.wav` and `talk.flac`, `day 1` and `day_1`, two Japanese names: each its own id, windows and keys."""
    root = tmp_path / "in"
    root.mkdir()
    for i, name in enumerate(["talk.wav", "talk.flac", "day 1.wav", "day_1.wav", "テスト.wav", "データ.wav"]):
        write_recording(root / name, seed=i, seconds=6.0)
    config = PipelineConfig(str(root), str(tmp_path / "out"), max_positions=256, samples_per_shard=4)
    pipeline = Pipeline(config, FakeCodes(), SidecarTranscripts())
    pipeline.run_part(0, progress=False)
    card = merge(tmp_path / "out", 1)
    assert card["recordings"] == 6 and card["failed"] == 0
    samples = contents(tmp_path / "out")
    sources = {json.loads(sample["meta.json"])["source"] for sample in samples.values()}
    assert sources == {p.name for p in root.glob("*.wav")} | {"talk.flac"}
    keys = [json.loads(line)["key"] for line in (tmp_path / "out" / "manifest.jsonl").open()]
    assert len(samples) == len(keys) == len(set(keys))  # read_samples' dict would hide a repeated key


class FakeCodes:
    """Codes without a codec: zeros of each turn's frame count (these tests check bookkeeping, not audio)."""

    weights_id = "zeros"

    def encode(self, clips):
        return [np.zeros((32, max(1, round(len(c) / 1920))), dtype=np.uint16) for c in clips]


def test_other_formats_empty_windows_and_skipped_files_are_all_accounted_for(tmp_path):
    root = tmp_path / "in"
    root.mkdir()
    write_recording(root / "talk.wav", seed=0, seconds=6.0)
    audio, rate = sf.read(root / "talk.wav", dtype="float32")
    write_with_ffmpeg(root / "phone.m4a", "aac", "ipod", rate, audio[None])  # AAC in MP4: FFmpeg's, not libsndfile's
    shutil.copy(root / "talk.json", root / "phone.json")
    write_recording(root / "mumbled.wav", seed=1, seconds=6.0)  # every word below the ASR confidence floor
    words = json.loads((root / "mumbled.json").read_text())["words"]
    (root / "mumbled.json").write_text(json.dumps({"words": [{**w, "probability": 0.1} for w in words]}))
    (root / "cover.png").write_bytes(b"\x89PNG")
    config = PipelineConfig(str(root), str(tmp_path / "out"), max_positions=256)
    Pipeline(config, FakeCodes(), SidecarTranscripts()).run_part(0, progress=False)
    card = merge(tmp_path / "out", 1)
    assert card["recordings"] == 2 and card["skipped"] == {".json": 3, ".png": 1}
    failures = [json.loads(line) for line in (tmp_path / "out" / "failures.jsonl").open()]
    assert [(Path(f["input"]).name, f["stage"], f["reason"]) for f in failures] == [
        ("mumbled.wav", "quality", "all_turns_rejected")
    ]
    assert "low_asr_confidence" in failures[0]["error"]


def test_a_rerun_over_a_finished_dataset_rewrites_nothing(corpus, encoder, tmp_path):
    run(corpus, tmp_path, encoder, num_parts=2)

    def files():
        return {
            p.relative_to(tmp_path): (p.stat().st_ino, p.stat().st_mtime_ns)
            for p in tmp_path.rglob("*")
            if p.is_file() and not p.name.endswith(".lock")
        }

    before = files()
    time.sleep(0.01)
    run(corpus, tmp_path, encoder, num_parts=2)
    assert files() == before


def test_a_run_with_another_part_count_is_refused_until_the_parts_are_gone(corpus, encoder, tmp_path):
    run(corpus, tmp_path, encoder, num_parts=3)
    config = PipelineConfig(str(corpus), str(tmp_path), num_parts=2, max_positions=256, samples_per_shard=2)
    with pytest.raises(ValueError, match=r"parts was cut with num_parts=3, not 2: run with num_parts=3, or delete"):
        Pipeline(config, encoder, SidecarTranscripts())
    shutil.rmtree(tmp_path / "parts")
    assert run(corpus, tmp_path, encoder, num_parts=2)["recordings"] == 4  # the cache in work/ is reused


def cli_overrides(root, out, mimi_dir) -> list[str]:
    return [f"input_dir={root}", f"output_dir={out}", "progress=false", "transcripts=sidecar",
            f"codec.name_or_path={mimi_dir}", "max_positions=256"]  # fmt: skip


def cli_pipeline(root, out, mimi_dir) -> Pipeline:
    """The Pipeline `python -m data_pipeline` builds for these overrides, in this process."""
    from hydra import compose, initialize_config_dir

    from data_pipeline.__main__ import CONFIG_DIR, build

    with initialize_config_dir(CONFIG_DIR, version_base="1.3"):
        return build(compose("config", cli_overrides(root, out, mimi_dir)))


@pytest.fixture
def blocked_runs():
    """The runs `start_blocked_run` starts, killed at the end whatever the test did (else they wait forever)."""
    processes = []
    yield processes
    for process in processes:
        process.kill()
        process.wait()


def start_blocked_run(root, out, mimi_dir, runs: list, attempt: int = 1):
    """`python -m data_pipeline` stuck inside one recording: its sidecar transcript is a FIFO nobody writes."""
    if not (root / "blocked.json").is_fifo():
        (root / "blocked.json").unlink()
        os.mkfifo(root / "blocked.json")
    command = [sys.executable, "-m", "data_pipeline", *cli_overrides(root, out, mimi_dir)]
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    runs.append(process)

    def blocked_mark():
        at = {"stage": "transcribe", "attempts": attempt}
        marks = [m for m in (out / "work").glob("blocked-*.started") if json.loads(m.read_text()) == at]
        return marks and marks[0]

    return process, wait_for("the run to block in the recording's transcribe stage", blocked_mark, 120)


def test_a_killed_run_leaves_no_lock_and_its_recording_fails_after_the_second_death(tmp_path, mimi_dir, blocked_runs):
    """SIGKILL (what the out-of-memory killer sends) inside a recording: while it ran, a second run on the output
    was refused; after it, the lock is gone and the next run tries the recording again (the kill may have come
    from outside). When that one dies inside it too, the run after records it as `killed` instead of dying on
    it a third time."""
    root = tmp_path / "in"
    root.mkdir()
    write_recording(root / "blocked.wav", seed=0, seconds=6.0)
    write_recording(root / "talk.wav", seed=1, seconds=6.0)
    process, mark = start_blocked_run(root, tmp_path / "out", mimi_dir, blocked_runs)
    second = cli_pipeline(root, tmp_path / "out", mimi_dir)
    with pytest.raises(RuntimeError, match=rf"part 0 of .*out is in use by pid {process.pid} on .*: two runs on"):
        second.run_part(0, progress=False)
    with pytest.raises(RuntimeError, match=rf"in use by pid {process.pid}"):
        merge(tmp_path / "out", 1)
    for attempt in (1, 2):
        process.kill()
        process.wait()
        assert json.loads(mark.read_text()) == {"stage": "transcribe", "attempts": attempt}
        if attempt == 1:
            process, mark = start_blocked_run(root, tmp_path / "out", mimi_dir, blocked_runs, attempt=2)  # tried again
    second.run_part(0, progress=False)
    card = merge(tmp_path / "out", 1)
    failures = [json.loads(line) for line in (tmp_path / "out" / "failures.jsonl").open()]
    assert card["recordings"] == 1 and [(f["stage"], f["reason"]) for f in failures] == [("transcribe", "killed")]
    assert "2 processes died in it at stage transcribe" in failures[0]["error"] and not mark.exists()


def test_a_terminated_run_leaves_its_recording_to_be_done_again(tmp_path, mimi_dir, blocked_runs):
    """SIGTERM (scancel, a time limit) is a clean stop: the mark goes, and the next run processes the recording."""
    root = tmp_path / "in"
    root.mkdir()
    write_recording(root / "blocked.wav", seed=0, seconds=6.0)
    process, mark = start_blocked_run(root, tmp_path / "out", mimi_dir, blocked_runs)
    process.send_signal(signal.SIGTERM)
    assert process.wait(timeout=30) == 128 + signal.SIGTERM
    assert not mark.exists()
    (root / "blocked.json").unlink()
    write_recording(root / "blocked.wav", seed=0, seconds=6.0)  # its transcript arrives
    cli_pipeline(root, tmp_path / "out", mimi_dir).run_part(0, progress=False)
    assert merge(tmp_path / "out", 1)["recordings"] == 1
