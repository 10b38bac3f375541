"""The report, from known suite results: every number lands in report.json with its interval, sample count
and judge; report.md and report.html show the same table, the refusals, the plots and the audio links."""

import csv
import json

import numpy as np
import soundfile as sf

from eval.metrics import Estimate
from eval.report import write_report
from eval.suites import SuiteResult, _spread

MODEL = {"checkpoint": "runs/x/y/checkpoints/last.ckpt", "step": 40, "run_dir": None, "codec": "random-init:seed=0"}


def results(tmp_path):
    sf.write(tmp_path / "a.wav", np.zeros(2400, np.float32), 24000)
    wer = SuiteResult("wer", "whisper:shipped:tiny.en")
    wer.metrics["wer"] = Estimate(0.25, 0.1, 0.4, 3)
    wer.samples = [
        {"id": "wer-000", "text": "one", "transcript": "won", "wer": 1.0, "audio": "a.wav"},
        {"id": "wer-001", "text": "two", "transcript": "two", "wer": 0.0},
    ]
    homograph = SuiteResult("homograph", "phonemes:random", refused="the judge is random")
    homograph.samples = [{"id": "lead-guide-00", "judged": None}]
    consistency = SuiteResult("consistency", "phonemes:real")
    consistency.metrics["accuracy"] = Estimate(0.5, 0.0, 1.0, 2)
    consistency.metrics["accuracy/route"] = Estimate(1.0, 1.0, 1.0, 1)
    return [wer, homograph, consistency]


def test_report_json_holds_every_number_with_interval_count_and_judge(tmp_path):
    write_report(results(tmp_path), MODEL, {"limit": 3}, tmp_path)
    report = json.loads((tmp_path / "report.json").read_text())
    rows = {(r["suite"], r["metric"]): r for r in report["numbers"]}
    assert rows[("wer", "wer")] == {
        "suite": "wer",
        "metric": "wer",
        "value": 0.25,
        "ci95": [0.1, 0.4],
        "n": 3,
        "judge": "whisper:shipped:tiny.en",
        "checkpoint": MODEL["checkpoint"],
    }
    assert ("consistency", "accuracy/route") in rows
    assert not any(r["suite"] == "homograph" for r in report["numbers"])  # refused: no number
    assert report["suites"]["homograph"]["refused"] == "the judge is random"
    assert report["suites"]["wer"]["samples"][0]["transcript"] == "won"
    assert report["model"]["step"] == 40


def test_markdown_and_html_show_the_results_refusals_and_audio(tmp_path):
    path = write_report(results(tmp_path), MODEL, {"limit": 3}, tmp_path)
    markdown, page = path.read_text(), (tmp_path / "report.html").read_text()
    assert "| wer | wer | 0.250 | [0.100, 0.400] | 3 | whisper:shipped:tiny.en |" in markdown
    assert "**homograph: no number reported.** the judge is random" in markdown
    assert "| consistency | route | 1.000 |" in markdown  # per-word table
    assert "[wav](a.wav)" in markdown and "wer-001" not in markdown.split("Samples: wer")[1]  # only linked audio
    assert '<audio controls src="a.wav">' in page and "<td>0.250</td>" in page
    assert (tmp_path / "plots" / "distributions.png").stat().st_size > 1000
    assert "plots/distributions.png" in markdown and "plots/distributions.png" in page


def test_loss_curves_plot_each_codebook_from_the_runs_metrics(tmp_path):
    logs = tmp_path / "run" / "logs"
    logs.mkdir(parents=True)
    columns = ["step", "train/loss"] + [f"codebook_loss/{k:02d}" for k in range(4)]
    with (logs / "metrics.csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, columns)
        writer.writeheader()
        for step in range(0, 50, 10):
            writer.writerow({"step": step, "train/loss": 5.0, **{c: 7.0 - step / 10 for c in columns[2:]}})
            writer.writerow({"step": step, "train/loss": ""})  # Lightning writes sparse rows
    path = write_report(results(tmp_path), {**MODEL, "run_dir": str(tmp_path / "run")}, {}, tmp_path / "out")
    assert (tmp_path / "out" / "plots" / "codebook_loss.png").stat().st_size > 1000
    assert "plots/codebook_loss.png" in path.read_text()


def test_a_limit_spreads_samples_over_the_whole_suite():
    rows = [{"id": f"{word}-{i}"} for word in "abcde" for i in range(4)]
    picked = _spread(rows, 5)
    assert [r["id"][0] for r in picked] == list("abcde")
    assert _spread(rows, 100) == rows
