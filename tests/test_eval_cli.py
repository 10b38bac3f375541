"""`python -m eval` on a tiny checkpoint trained here on the demo dataset, as users run it: the run's
tokenizer and codec are found from its directory, every suite runs, the report is written, a random
phoneme judge is refused, an unavailable judge fails only its suites, and W&B (offline) gets the numbers.
Training also evaluates itself every N steps through the callback."""

import csv
import json
import os
import subprocess
import sys

import pytest

from eval.metrics import bootstrap, word_error_rates

pytestmark = pytest.mark.slow

STEPS = 20
STEP_DIRS = ("step-0000010", "step-0000020")  # evaluate.every_n_steps=10


@pytest.fixture(scope="module")
def run_dir(demo_dataset, tmp_path_factory):
    """The quickstart's training on the demo dataset, shortened, evaluating every 10 steps."""
    run = tmp_path_factory.mktemp("run")
    command = [
        sys.executable, "-m", "csm_train", "+experiment=tiny", "data=speech_demo", f"data.path={demo_dataset}",
        f"run_dir={run}", f"trainer.max_steps={STEPS}", f"checkpoint.every_n_steps={STEPS}",
        "evaluate.every_n_steps=10", "evaluate.limit=2", "evaluate.speaker.max_seconds=2",
    ]  # fmt: skip
    subprocess.run(command, check=True, capture_output=True, text=True)
    return run


def evaluate(*overrides, env=None):
    command = [sys.executable, "-m", "eval", "speaker.max_seconds=2", *overrides]
    return subprocess.run(command, capture_output=True, text=True, env={**os.environ, **(env or {})}, check=False)


def test_training_logs_eval_suites_every_n_steps(run_dir):
    with (run_dir / "logs" / "metrics.csv").open() as f:
        rows = [r for r in csv.DictReader(f) if r.get("eval/wer/wer")]
    assert [int(r["step"]) for r in rows] == [10, 20]
    logged = {k for r in rows for k, v in r.items() if k.startswith("eval/") and v}
    assert logged == {"eval/wer/wer", "eval/wer/wer_corpus", "eval/sim/similarity"}  # evaluate.suites: [wer, sim]
    for r in rows:
        assert -1.0 <= float(r["eval/sim/similarity"]) <= 1.0
    # each evaluation generated evaluate.limit sentences with the weights of its step
    first, second = (sorted((run_dir / "eval" / step / "samples" / "sentences").glob("*.wav")) for step in STEP_DIRS)
    assert [p.name for p in first] == [p.name for p in second] and len(first) == 2
    assert any(a.read_bytes() != b.read_bytes() for a, b in zip(first, second, strict=True))


def test_a_full_eval_run_writes_the_report(run_dir, tmp_path):
    out = tmp_path / "report"
    done = evaluate(
        f"checkpoint={run_dir}", "limit=2", f"out_dir={out}", "judges.phonemes=random-init",
        "wandb.enabled=true", env={"WANDB_MODE": "offline", "WANDB_SILENT": "true"},
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    assert f"report: {out / 'report.md'}" in done.stdout
    report = json.loads((out / "report.json").read_text())
    assert report["model"]["step"] == STEPS and report["model"]["codec"] == "random-init:seed=0"
    numbers = {(r["suite"], r["metric"]): r for r in report["numbers"]}
    assert set(numbers) == {("wer", "wer"), ("wer", "wer_corpus"), ("mos", "dnsmos"), ("sim", "similarity")}
    assert all(r["n"] == 2 for r in numbers.values())  # limit=2
    samples = {suite: report["suites"][suite]["samples"] for suite in ("wer", "mos", "sim")}
    ids = [s["id"] for s in samples["wer"]]
    assert len(ids) == 2 and all([s["id"] for s in samples[suite]] == ids for suite in samples)  # one generated set
    # every number is what its judge said of the stored samples: WER recomputed from the transcripts, each mean and
    # its interval the bootstrap of the per-sample verdicts
    wer = word_error_rates([s["text"] for s in samples["wer"]], [s["transcript"] for s in samples["wer"]])
    assert [s["wer"] for s in samples["wer"]] == pytest.approx(wer["values"])
    assert numbers[("wer", "wer_corpus")]["value"] == pytest.approx(wer["corpus"])
    for suite, metric in (("wer", "wer"), ("mos", "dnsmos"), ("sim", "similarity")):
        expected = bootstrap([s[metric] for s in samples[suite]])
        assert numbers[(suite, metric)]["value"] == pytest.approx(expected.value), (suite, metric)
        assert numbers[(suite, metric)]["ci95"] == pytest.approx([expected.low, expected.high]), (suite, metric)
    assert all(1.0 <= s["dnsmos"] <= 5.0 for s in samples["mos"])
    assert all(-1.0 <= s["similarity"] <= 1.0 for s in samples["sim"])
    for suite in ("homograph", "consistency"):  # the whole path ran, but a random judge gives no number
        result = report["suites"][suite]
        assert "randomly initialised" in result["refused"] and len(result["samples"]) == 2
        assert all(s["expected"] and isinstance(s["phonemes"], str) for s in result["samples"])
    markdown = (out / "report.md").read_text()
    for sample in report["suites"]["wer"]["samples"]:
        assert (out / sample["audio"]).stat().st_size > 44 and sample["audio"] in markdown
    assert (out / "report.html").read_text().count("<audio controls") >= 2
    # W&B's offline run: its transaction log (protobuf records) holds every number's key, its media the audio
    (run_file,) = out.glob("wandb/offline-run-*/run-*.wandb")
    records = run_file.read_bytes()
    assert all(f"eval/{suite}/{metric}".encode() in records for suite, metric in numbers)
    assert len(list(run_file.parent.glob("files/media/audio/eval/wer/audio/*.wav"))) == 2


def test_an_unavailable_judge_fails_only_its_suite(run_dir, tmp_path):
    missing = tmp_path / "no-such-judge"
    done = evaluate(
        f"checkpoint={run_dir}", "limit=1", f"out_dir={tmp_path}", "suite=[homograph,sim]", f"judges.phonemes={missing}"
    )
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads((tmp_path / "report.json").read_text())
    assert "huggingface-cli download" in report["suites"]["homograph"]["refused"]
    assert [r["metric"] for r in report["numbers"]] == ["similarity"]


def test_a_checkpoint_without_a_run_needs_tokenizer_and_codec(run_dir, tmp_path):
    from csm_train.convert import convert

    convert(run_dir / "checkpoints" / "last.ckpt", tmp_path / "exported", "ours")
    done = evaluate(f"checkpoint={tmp_path / 'exported'}", "limit=1")
    assert done.returncode != 0
    assert "cannot tell which tokenizer and codec" in done.stderr and "codec=kyutai/mimi" in done.stderr
