"""What a SLURM launch costs: job turnaround on the local cluster (launch/local_slurm.sh), and the same tiny
training run started directly vs as a job through launch/train.sbatch vs through Hydra's submitit launcher,
alternated so machine noise hits all alike. Prints seconds and each launch's ratio to the direct run.

    python bench/bench_launch.py --repeats 3 --steps 20
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
LOCAL_SLURM = REPO / "launch" / "local_slurm.sh"


def timed(command: list[str], env: dict) -> float:
    """Seconds until `command` ends; for sbatch, until its job ends (polled every 0.1 s: `sbatch --wait` backs
    off to 30 s+ between polls and would time its own polling)."""
    began = time.perf_counter()
    done = subprocess.run(command, check=True, env=env, cwd=REPO, capture_output=True, text=True)
    if command[0] == "sbatch":
        job = done.stdout.strip()
        while (state := squeue_state(job, env)) not in FINISHED:
            time.sleep(0.1)
        assert state == "COMPLETED", f"job {job} ended {state}"
    return time.perf_counter() - began


FINISHED = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY"}


def squeue_state(job: str, env: dict) -> str:
    command = ["squeue", "-h", "-t", "all", "-j", job, "-o", "%T"]
    return subprocess.run(command, env=env, capture_output=True, text=True).stdout.strip()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--steps", type=int, default=20, help="tiny training steps per run")
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="bench-launch-"))
    cluster = work / "cluster"
    subprocess.run([LOCAL_SLURM, "start", cluster], check=True)
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")} | {
        "SLURM_CONF": str(cluster / "slurm.conf")
    }
    try:
        data = work / "data"
        training = [
            "+experiment=tiny",
            f"data.path={data}",
            f"trainer.max_steps={args.steps}",
            f"checkpoint.every_n_steps={args.steps}",
        ]
        timed([sys.executable, "-m", "csm_train", *training, f"run_dir={work / 'warm'}"], env)  # data, caches

        def direct(i):
            return [sys.executable, "-m", "csm_train", *training, f"run_dir={work / f'direct{i}'}"]

        def sbatch(i):
            template = REPO / "launch" / "train.sbatch"
            options = ["--parsable", "--gpus-per-node=0", "--ntasks-per-node=1", "--cpus-per-task=1"]
            log = f"--output={work / f'sbatch{i}.out'}"
            return ["sbatch", *options, log, template, *training, f"run_dir={work / f'sbatch{i}'}"]

        def submitit(i):
            launcher = ["--multirun", "hydra/launcher=local_slurm"]
            return [sys.executable, "-m", "csm_train", *launcher, *training, f"run_dir={work / f'submitit{i}'}"]

        contenders = {"direct": direct, "sbatch": sbatch, "submitit": submitit}
        times = {name: [] for name in contenders}
        turnaround = []
        for i in range(args.repeats):
            turnaround.append(timed(["sbatch", "--parsable", "--output=/dev/null", "--wrap", "true"], env))
            for name, command in contenders.items():
                times[name].append(timed(command(i), env))
    finally:
        subprocess.run([LOCAL_SLURM, "stop", cluster], check=False)

    print(f"local cluster, {os.cpu_count()} CPUs; tiny preset, {args.steps} steps, {args.repeats} repeats (median)")
    print(f"trivial job (sbatch --wrap true, submit to COMPLETED): {statistics.median(turnaround):6.2f} s")
    base = statistics.median(times["direct"])
    for name, values in times.items():
        median = statistics.median(values)
        print(f"{name:>9}: {median:6.2f} s  {median / base:5.2f}x direct  (+{median - base:5.2f} s)")


if __name__ == "__main__":
    main()
