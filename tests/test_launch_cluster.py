"""launch/local_slurm.sh against itself: a real single-node SLURM cluster (slurmctld + slurmd) runs multi-task and
requeued jobs, starts idempotently, and stops and starts again.

The `slurm_cluster` fixture is written to move to conftest.py unchanged once other tests need the cluster."""

from __future__ import annotations

import os
import re
import subprocess
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
LOCAL_SLURM = REPO / "launch" / "local_slurm.sh"
CANNOT_INSTALL = 3  # local_slurm.sh's exit code when SLURM is missing and this machine cannot install or run it


def _local_slurm(*args: str | Path, env: dict | None = None, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run(
        [str(LOCAL_SLURM), *map(str, args)], capture_output=True, text=True, env=env, timeout=timeout, check=False
    )


def _client_env(cluster_env: dict) -> dict:
    """This process's environment pointed at the cluster, without the SLURM_* of any job pytest itself runs in."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    return {**env, **cluster_env}


@pytest.fixture(scope="session")
def slurm_cluster(tmp_path_factory):
    """A real single-node SLURM cluster for the session (launch/local_slurm.sh start; installs SLURM with apt when
    it is missing). Returns the environment variables its clients need ({"SLURM_CONF": ...}); add them to a
    subprocess's environment to run sbatch/srun/squeue/scontrol against it. Stopped at the end of the session.
    Skipped where SLURM cannot be installed or run (no apt, no root or sudo), except in CI (env CI set)."""
    cluster_dir = tmp_path_factory.mktemp("slurm")
    env = dict(os.environ)
    if len(os.sched_getaffinity(0)) < 2:  # the tests run two tasks; SLURM may promise more CPUs than there are
        env["CSM_SLURM_CPUS"] = "2"
    started = _local_slurm("start", cluster_dir, env=env, timeout=600)
    output = f"{started.stdout}{started.stderr}".strip()
    if started.returncode == CANNOT_INSTALL and not os.environ.get("CI"):
        pytest.skip(f"no local SLURM cluster on this machine: {output}")
    assert started.returncode == 0, f"launch/local_slurm.sh start failed ({started.returncode}):\n{output}"
    try:
        yield {"SLURM_CONF": str(cluster_dir / "slurm.conf")}
    finally:
        _local_slurm("stop", cluster_dir)


def _cluster_dir(cluster_env: dict) -> Path:
    return Path(cluster_env["SLURM_CONF"]).parent


def _daemon_pids(cluster_dir: Path) -> dict[str, str]:
    return {p.stem: p.read_text().strip() for p in sorted((cluster_dir / "run").glob("*.pid"))}


def _slurm(cluster_env: dict, *args: str | Path, timeout: float = 60) -> str:
    """Run a SLURM client command against the cluster; its stdout."""
    done = subprocess.run(
        list(map(str, args)), capture_output=True, text=True, env=_client_env(cluster_env), timeout=timeout
    )
    assert done.returncode == 0, f"{' '.join(map(str, args))} failed ({done.returncode}): {done.stdout}{done.stderr}"
    return done.stdout


def _wait_for(what: str, condition, timeout: float = 30):
    deadline = time.monotonic() + timeout
    while not (result := condition()):
        assert time.monotonic() < deadline, f"timed out after {timeout:.0f}s waiting for {what}"
        time.sleep(0.1)
    return result


def _job_state(cluster_env: dict, job_id: str) -> str:
    return _slurm(cluster_env, "squeue", "-h", "-t", "all", "-j", job_id, "-o", "%T").strip()


@pytest.mark.slow
def test_two_task_job_runs_both_ranks(slurm_cluster, tmp_path):
    """The shape Lightning's SLURM detection accepts: --nodes=1 --ntasks-per-node=2, tasks started by srun."""
    job = tmp_path / "ranks.sh"
    job.write_text("#!/bin/bash\nsrun bash -c 'echo rank=$SLURM_PROCID'\n")
    out = tmp_path / "ranks.out"
    _slurm(slurm_cluster, "sbatch", "--wait", "--nodes=1", "--ntasks-per-node=2", f"--output={out}", job)
    ranks = {int(line.split("=")[1]) for line in out.read_text().splitlines() if line.startswith("rank=")}
    assert ranks == {0, 1}, out.read_text()


@pytest.mark.slow
def test_requeued_job_runs_again_and_completes(slurm_cluster, tmp_path):
    job = tmp_path / "requeue.sh"
    job.write_text(
        "#!/bin/bash\n"
        'echo "start restarts=${SLURM_RESTART_COUNT:-0}"\n'
        '[ "${SLURM_RESTART_COUNT:-0}" -ge 1 ] || sleep 300\n'
        'echo "done restarts=${SLURM_RESTART_COUNT:-0}"\n'
    )
    out = tmp_path / "requeue.out"  # appended to by both runs
    job_id = _slurm(slurm_cluster, "sbatch", "--parsable", "--open-mode=append", f"--output={out}", job).strip()
    _wait_for("the job's first run", lambda: out.exists() and "start restarts=0" in out.read_text())
    _slurm(slurm_cluster, "scontrol", "requeue", job_id)
    _wait_for("the requeued job to complete", lambda: _job_state(slurm_cluster, job_id) == "COMPLETED")
    runs = [line for line in out.read_text().splitlines() if line.startswith(("start", "done"))]
    assert runs == ["start restarts=0", "start restarts=1", "done restarts=1"], out.read_text()
    assert "Restarts=1" in _slurm(slurm_cluster, "scontrol", "show", "job", job_id)


@pytest.mark.slow
def test_start_twice_is_a_no_op(slurm_cluster):
    cluster_dir = _cluster_dir(slurm_cluster)
    pids = _daemon_pids(cluster_dir)
    assert set(pids) == {"slurmctld", "slurmd"}
    began = time.monotonic()
    again = _local_slurm("start", cluster_dir)
    assert again.returncode == 0, again.stderr
    assert time.monotonic() - began < 5
    assert "already running" in again.stderr
    assert _daemon_pids(cluster_dir) == pids


def _ports(conf: Path) -> set[str]:
    return set(re.findall(r"^Slurm(?:ctld|d)Port=(\d+)$", conf.read_text(), re.MULTILINE))


@pytest.mark.slow
def test_stop_then_start_again(slurm_cluster, tmp_path):
    """On a second cluster beside the session's (its own DIR, so its own ports): stop cancels running jobs and
    kills the daemons, keeping the logs; status then fails; start brings it back."""
    second = tmp_path / "cluster"
    try:
        assert _local_slurm("start", second).returncode == 0
        env = {"SLURM_CONF": str(second / "slurm.conf")}
        assert not _ports(second / "slurm.conf") & _ports(Path(slurm_cluster["SLURM_CONF"]))
        assert _local_slurm("status", second).returncode == 0

        pid_file = tmp_path / "sleeper.pid"
        _slurm(env, "sbatch", "--output=/dev/null", "--wrap", f"sleep 300 & echo $! > {pid_file}; wait")
        sleeper = _wait_for("the job to start", lambda: pid_file.exists() and pid_file.read_text().strip())
        daemons = _daemon_pids(second).values()

        assert _local_slurm("stop", second).returncode == 0
        assert _local_slurm("status", second).returncode != 0
        for pid in [sleeper, *daemons]:
            assert not Path(f"/proc/{pid}").exists() or "Z" in Path(f"/proc/{pid}/stat").read_text().split()[2]
        assert (second / "log" / "slurmctld.log").stat().st_size > 0

        assert _local_slurm("start", second).returncode == 0
        assert _local_slurm("status", second).returncode == 0
        assert "ok" in _slurm(env, "srun", "echo", "ok")
    finally:
        _local_slurm("stop", second)
    assert _local_slurm("status", _cluster_dir(slurm_cluster)).returncode == 0  # the session's cluster is untouched
