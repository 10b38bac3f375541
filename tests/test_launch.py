"""Training and the data pipeline as SLURM jobs on a real cluster (the `slurm_cluster` fixture): Hydra's
submitit launcher (conf/hydra/launcher/), sweeps as job arrays, the sbatch template (launch/train.sbatch), and
preemption: a job signalled or requeued mid-run resumes and ends identical to an uninterrupted one."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from conftest import DEMO_PIPELINE_ARGS, REPO, job_state, slurm, slurm_client_env, wait_for

from data_pipeline.shards import read_samples

DDP = ["trainer=ddp", "trainer.accelerator=cpu", "trainer.devices=2", "trainer.precision=32-true"]
STEPS = ["trainer.max_steps=12", "checkpoint.every_n_steps=4", "trainer.log_every_n_steps=4"]


def multirun(cluster: dict, module: str, *overrides: str) -> str:
    """`python -m module --multirun hydra/launcher=local_slurm …`: submits, waits for every job; its output."""
    command = [sys.executable, "-m", module, "--multirun", "hydra/launcher=local_slurm", *overrides]
    done = subprocess.run(command, capture_output=True, text=True, env=slurm_client_env(cluster), timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done.stdout + done.stderr


def run_dirs(root: Path) -> list[Path]:
    return sorted(p.parent.parent for p in root.glob("*/checkpoints/last.ckpt"))


def checkpoint(run_dir: Path) -> dict:
    return torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return tmp_path_factory.mktemp("launch") / "synthetic"  # written by the first run, read by the rest


@pytest.fixture(scope="module")
def ddp_reference(slurm_cluster, data, tmp_path_factory):
    """An uninterrupted two-task DDP job submitted through Hydra's launcher: 12 steps, a checkpoint every 4."""
    root = tmp_path_factory.mktemp("reference")
    multirun(slurm_cluster, "csm_train", "+experiment=tiny", f"run_dir={root}", f"data.path={data}", *DDP, *STEPS)
    (run_dir,) = run_dirs(root)
    return run_dir


@pytest.mark.slow
def test_launcher_runs_two_ranks_over_gloo(ddp_reference):
    state = checkpoint(ddp_reference)
    assert state["global_step"] == 12
    stream = state["CSMDataModule"]["stream"]
    assert sorted(stream["slots"]) == ["0", "1"] and stream["num_slots"] == 2  # both ranks read and were saved
    (job,) = (p for p in (ddp_reference.parent / ".submitit").iterdir() if p.is_dir())
    assert {p.name for p in job.glob("*_log.out")} == {f"{job.name}_0_log.out", f"{job.name}_1_log.out"}
    assert (ddp_reference / "logs" / "metrics.csv").read_text().count("\n") > 1
    config = yaml.safe_load((ddp_reference / "config.yaml").read_text())
    assert config["run_dir"] == str(ddp_reference) and config["trainer"]["devices"] == 2


@pytest.mark.slow
def test_a_sweep_is_one_job_array_with_a_run_directory_per_point(slurm_cluster, data, tmp_path):
    multirun(
        slurm_cluster,
        "csm_train",
        "+experiment=tiny",
        f"run_dir={tmp_path}",
        f"data.path={data}",
        "trainer.max_steps=2",
        "checkpoint.every_n_steps=2",
        "seed=1,2",
    )
    # a point is named by its overrides (less the run-naming ones: conf/config.yaml's exclude_keys)
    points = [f"checkpoint.every_n_steps-2__seed-{seed}__trainer.max_steps-2" for seed in (1, 2)]
    assert [p.name for p in run_dirs(tmp_path)] == points
    configs = [yaml.safe_load((p / "config.yaml").read_text()) for p in run_dirs(tmp_path)]
    assert [(c["seed"], c["run_id"]) for c in configs] == [(1, f"main.{points[0]}"), (2, f"main.{points[1]}")]
    tasks = [p.name.split("_") for p in (tmp_path / ".submitit").glob("*_*") if p.is_dir()]  # ARRAY_TASK
    assert len({array for array, _ in tasks}) == 1 and sorted(task for _, task in tasks) == ["0", "1"]
    a, b = (checkpoint(p)["state_dict"] for p in run_dirs(tmp_path))
    assert any(not torch.equal(a[k], b[k]) for k in a)  # two seeds, two runs


@pytest.mark.slow
@pytest.mark.parametrize("interrupt", ["usr1", "requeue"])
def test_an_interrupted_job_resumes_exactly(slurm_cluster, data, ddp_reference, tmp_path, interrupt):
    """launch/train.sbatch with two tasks. usr1: SLURM's time-limit warning, after which the run saves and
    requeues itself; requeue: `scontrol requeue`, i.e. SIGTERM, a save before KillWait, and SLURM's requeue."""
    run_dir, log = tmp_path / "run", tmp_path / "job.out"
    job = slurm(
        {**slurm_cluster, "PYTHON": sys.executable},  # the template's default is the checkout's .venv/bin/python
        "sbatch",
        "--parsable",
        "--gpus-per-node=0",
        "--ntasks-per-node=2",
        "--cpus-per-task=1",
        "--time=20",
        f"--output={log}",
        REPO / "launch" / "train.sbatch",
        "+experiment=tiny",
        f"run_dir={run_dir}",
        f"data.path={data}",
        *DDP[:2],
        DDP[3],  # devices: the template passes the allocation's tasks per node
        *STEPS,
    ).strip()
    wait_for("the first checkpoint", (run_dir / "checkpoints" / "step-0000004.ckpt").exists, timeout=300)
    if interrupt == "usr1":
        slurm(slurm_cluster, "scancel", "--signal=USR1", job)
    else:
        slurm(slurm_cluster, "scontrol", "requeue", job)
    wait_for("the requeued job to finish", lambda: job_state(slurm_cluster, job) == "COMPLETED", timeout=300)

    output = log.read_text()
    assert "restart 1" in output and f"resuming from {run_dir / 'checkpoints'}" in output, output[-3000:]
    signal = "SIGUSR1" if interrupt == "usr1" else "SIGTERM"
    assert f"stopped by {signal} at step" in output, output[-3000:]
    a, b = checkpoint(ddp_reference), checkpoint(run_dir)
    assert a["global_step"] == b["global_step"] == 12
    assert a["CSMDataModule"] == b["CSMDataModule"]  # neither repeated nor skipped a sample
    for name, tensor in a["state_dict"].items():
        assert torch.equal(tensor, b["state_dict"][name]), name


@pytest.mark.slow
def test_pipeline_parts_as_a_job_array_merge_into_the_single_process_dataset(
    slurm_cluster, demo_corpus, demo_dataset, tmp_path
):
    out = tmp_path / "dataset"
    common = [f"input_dir={demo_corpus / 'audio'}", f"output_dir={out}", *DEMO_PIPELINE_ARGS, "num_parts=2"]
    multirun(slurm_cluster, "data_pipeline", *common, "part=0,1")
    assert sorted(p.name for p in (out / "parts").iterdir()) == ["part-0000", "part-0001"]
    merged = subprocess.run(
        [sys.executable, "-m", "data_pipeline", *common, "merge_only=true"], capture_output=True, text=True
    )
    assert merged.returncode == 0, merged.stderr
    assert dict(read_samples(out)) == dict(read_samples(demo_dataset))
