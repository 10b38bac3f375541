"""launch/local_slurm.sh against itself: a real single-node SLURM cluster (slurmctld + slurmd) runs multi-task and
requeued jobs, starts idempotently, and stops and starts again (the `slurm_cluster` fixture is in conftest.py)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from conftest import job_state, local_slurm, slurm, wait_for


def _cluster_dir(cluster_env: dict) -> Path:
    return Path(cluster_env["SLURM_CONF"]).parent


def _daemon_pids(cluster_dir: Path) -> dict[str, str]:
    return {p.stem: p.read_text().strip() for p in sorted((cluster_dir / "run").glob("*.pid"))}


@pytest.mark.slow
def test_two_task_job_runs_both_ranks(slurm_cluster, tmp_path):
    """The shape Lightning's SLURM detection accepts: --nodes=1 --ntasks-per-node=2, tasks started by srun."""
    job = tmp_path / "ranks.sh"
    job.write_text("#!/bin/bash\nsrun bash -c 'echo rank=$SLURM_PROCID'\n")
    out = tmp_path / "ranks.out"
    slurm(slurm_cluster, "sbatch", "--wait", "--nodes=1", "--ntasks-per-node=2", f"--output={out}", job)
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
    job_id = slurm(slurm_cluster, "sbatch", "--parsable", "--open-mode=append", f"--output={out}", job).strip()
    wait_for("the job's first run", lambda: out.exists() and "start restarts=0" in out.read_text())
    slurm(slurm_cluster, "scontrol", "requeue", job_id)
    wait_for("the requeued job to complete", lambda: job_state(slurm_cluster, job_id) == "COMPLETED")
    runs = [line for line in out.read_text().splitlines() if line.startswith(("start", "done"))]
    assert runs == ["start restarts=0", "start restarts=1", "done restarts=1"], out.read_text()
    assert "Restarts=1" in slurm(slurm_cluster, "scontrol", "show", "job", job_id)


@pytest.mark.slow
def test_start_twice_is_a_no_op(slurm_cluster):
    cluster_dir = _cluster_dir(slurm_cluster)
    pids = _daemon_pids(cluster_dir)
    assert set(pids) == {"slurmctld", "slurmd"}
    conf = cluster_dir / "slurm.conf"
    written = (conf.read_text(), conf.stat().st_mtime_ns)
    again = local_slurm("start", cluster_dir)
    assert again.returncode == 0, again.stderr
    assert "already running" in again.stderr and "nothing to do" in again.stderr, again.stderr
    # nothing restarted or rewritten: the same daemons serve the same configuration, and still run jobs
    assert _daemon_pids(cluster_dir) == pids
    assert all(Path(f"/proc/{pid}").exists() for pid in pids.values())
    assert (conf.read_text(), conf.stat().st_mtime_ns) == written
    assert "ok" in slurm(slurm_cluster, "srun", "echo", "ok")


def _ports(conf: Path) -> set[str]:
    return set(re.findall(r"^Slurm(?:ctld|d)Port=(\d+)$", conf.read_text(), re.MULTILINE))


@pytest.mark.slow
def test_stop_then_start_again(slurm_cluster, tmp_path):
    """On a second cluster beside the session's (its own DIR, so its own ports): stop cancels running jobs and
    kills the daemons, keeping the logs; status then fails; start brings it back."""
    second = tmp_path / "cluster"
    try:
        assert local_slurm("start", second).returncode == 0
        env = {"SLURM_CONF": str(second / "slurm.conf")}
        assert not _ports(second / "slurm.conf") & _ports(Path(slurm_cluster["SLURM_CONF"]))
        assert local_slurm("status", second).returncode == 0

        pid_file = tmp_path / "sleeper.pid"
        slurm(env, "sbatch", "--output=/dev/null", "--wrap", f"sleep 300 & echo $! > {pid_file}; wait")
        sleeper = wait_for("the job to start", lambda: pid_file.exists() and pid_file.read_text().strip())
        daemons = _daemon_pids(second).values()

        assert local_slurm("stop", second).returncode == 0
        assert local_slurm("status", second).returncode != 0
        for pid in [sleeper, *daemons]:
            assert not Path(f"/proc/{pid}").exists() or "Z" in Path(f"/proc/{pid}/stat").read_text().split()[2]
        assert (second / "log" / "slurmctld.log").stat().st_size > 0

        assert local_slurm("start", second).returncode == 0
        assert local_slurm("status", second).returncode == 0
        assert "ok" in slurm(env, "srun", "echo", "ok")
    finally:
        local_slurm("stop", second)
    assert local_slurm("status", _cluster_dir(slurm_cluster)).returncode == 0  # the session's cluster is untouched
