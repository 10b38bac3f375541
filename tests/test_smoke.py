"""The README's main command: a CPU smoke run whose loss falls."""

import subprocess
import sys

from csm_train.smoke import run


def test_smoke_run_loss_falls(capsys):
    losses = run(steps=20, batch_size=2)
    assert losses[-1] < losses[0] - 4  # from ~15.3 (2 × log 2051) down
    assert "c0" in capsys.readouterr().out


def test_python_m_csm_train_runs():
    result = subprocess.run(
        [sys.executable, "-m", "csm_train", "--steps", "2", "--batch-size", "1"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    assert "CSM tiny: 13,266,304 parameters" in result.stdout and "→" in result.stdout
