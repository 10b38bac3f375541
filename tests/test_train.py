"""`python -m csm_train`: Hydra configs, the tiny quickstart, exact resume after SIGKILL, DDP on CPU."""

import csv
import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir

from csm_train.train import train

CONF = str(Path(__file__).resolve().parents[1] / "conf")


def config(*overrides):
    with initialize_config_dir(config_dir=CONF, version_base="1.3"):
        return compose(config_name="config", overrides=list(overrides))


def metrics(run_dir: Path) -> list[dict]:
    with open(run_dir / "logs" / "metrics.csv") as f:
        return [row for row in csv.DictReader(f) if row.get("train/loss")]


@pytest.mark.parametrize("experiment", ["tiny", "100m", "1b"])
def test_experiments_compose(experiment):
    cfg = config(f"+experiment={experiment}")
    assert cfg.model.preset == experiment and cfg.experiment == experiment
    assert cfg.run_dir == f"runs/{experiment}/main"
    assert cfg.model.optim.max_steps == cfg.trainer.max_steps


@pytest.fixture(scope="module")
def demo_data(tmp_path_factory):
    return tmp_path_factory.mktemp("data") / "demo"


@pytest.mark.slow
def test_tiny_quickstart_loss_falls(tmp_path, demo_data):
    cfg = config(
        "+experiment=tiny",
        f"run_dir={tmp_path}",
        f"data.path={demo_data}",
        "trainer.max_steps=60",
        "trainer.log_every_n_steps=5",
        "checkpoint.every_n_steps=25",
    )
    train(cfg)
    rows = metrics(tmp_path)
    first, last = rows[0], rows[-1]
    assert float(last["train/c0_loss"]) < 0.4 * float(first["train/c0_loss"])
    assert float(last["train/decoder_loss"]) < 0.75 * float(first["train/decoder_loss"])
    assert float(last["perf/frames_per_s"]) > 0 and "train/grad_norm" in last and "lr-AdamW/backbone" in last
    # Every 25 steps and the final one (60, no multiple of 25), the newest `keep` (2); last.ckpt links the newest.
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == [
        "last.ckpt",
        "step-0000050.ckpt",
        "step-0000060.ckpt",
    ]
    assert (tmp_path / "checkpoints" / "last.ckpt").readlink() == Path("step-0000060.ckpt")
    ckpt = torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=True)  # nothing needs unpickling
    assert ckpt["global_step"] == 60 and ckpt["CSMDataModule"]["stream"]["slots"]


def run_cli(run_dir, *overrides, **popen):
    args = [sys.executable, "-m", "csm_train", "+experiment=tiny", f"run_dir={run_dir}", *overrides]
    return subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, **popen)


@pytest.mark.slow
def test_sigkill_and_restart_resumes_exactly(tmp_path, demo_data):
    """A run killed with SIGKILL after its first checkpoint and started again ends bit-identical to an
    uninterrupted run, with the data stream at the same place."""
    common = [f"data.path={demo_data}", "trainer.max_steps=16", "checkpoint.every_n_steps=4"]
    reference = run_cli(tmp_path / "ref", *common)
    killed = run_cli(tmp_path / "killed", *common)
    first_checkpoint = tmp_path / "killed" / "checkpoints" / "step-0000004.ckpt"
    last = tmp_path / "killed" / "checkpoints" / "last.ckpt"  # linked just after the save: kill after both
    deadline = time.time() + 300
    while not (first_checkpoint.exists() and last.exists()) and killed.poll() is None and time.time() < deadline:
        time.sleep(0.2)
    killed.send_signal(signal.SIGKILL)
    killed.wait()
    assert killed.returncode == -signal.SIGKILL and first_checkpoint.exists()
    assert not (tmp_path / "killed" / "checkpoints" / "step-0000016.ckpt").exists()
    restarted = run_cli(tmp_path / "killed", *common)
    out, _ = restarted.communicate(timeout=600)
    assert restarted.returncode == 0, out
    assert "resuming from" in out
    out, _ = reference.communicate(timeout=600)
    assert reference.returncode == 0, out

    names = {run: sorted(p.name for p in (tmp_path / run / "checkpoints").iterdir()) for run in ("ref", "killed")}
    assert names["ref"] == names["killed"] == ["last.ckpt", "step-0000012.ckpt", "step-0000016.ckpt"]
    a = torch.load(tmp_path / "ref" / "checkpoints" / "last.ckpt", weights_only=True)
    b = torch.load(tmp_path / "killed" / "checkpoints" / "last.ckpt", weights_only=True)
    assert a["global_step"] == b["global_step"] == 16
    assert a["CSMDataModule"] == b["CSMDataModule"]  # neither repeated nor skipped a sample
    for name, tensor in a["state_dict"].items():
        assert torch.equal(tensor, b["state_dict"][name]), name
    for sa, sb in zip(
        a["optimizer_states"][0]["state"].values(), b["optimizer_states"][0]["state"].values(), strict=True
    ):
        assert torch.equal(sa["exp_avg"], sb["exp_avg"])


@pytest.mark.slow
def test_sigterm_saves_at_the_next_step_and_exits_nonzero(tmp_path, demo_data):
    """Without SLURM too (csm_train/preemption.py): the signal is taken at an optimizer step, last.ckpt holds
    that step, and the exit status says the run did not finish."""
    run = run_cli(tmp_path, f"data.path={demo_data}", "trainer.max_steps=1000", "checkpoint.every_n_steps=4")
    first_checkpoint = tmp_path / "checkpoints" / "step-0000004.ckpt"
    deadline = time.time() + 300
    while not first_checkpoint.exists() and run.poll() is None and time.time() < deadline:
        time.sleep(0.2)
    run.send_signal(signal.SIGTERM)
    out, _ = run.communicate(timeout=120)
    assert run.returncode == 1, out
    step = int(out.split("stopped by SIGTERM at step ")[1].split(";")[0])
    assert step >= 4 and torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == step
    assert (tmp_path / "checkpoints" / "last.ckpt").resolve().name == f"step-{step:07d}.ckpt"


@pytest.mark.slow
def test_two_process_ddp_on_cpu(tmp_path, demo_data):
    """Real DDP: two processes over gloo; each rank reads its own shards; the replicas end identical."""
    probe = Path(__file__).with_name("ddp_probe.py")
    args = [
        sys.executable,
        str(probe),
        "+experiment=tiny",
        f"run_dir={tmp_path}",
        f"data.path={demo_data}",
        "trainer=ddp",
        "trainer.accelerator=cpu",
        "trainer.devices=2",
        "trainer.precision=32-true",
        "trainer.max_steps=3",
        "checkpoint.every_n_steps=3",
    ]  # 12 of the 16 samples each rank has per epoch
    result = subprocess.run(
        args, capture_output=True, text=True, timeout=600, env={**os.environ, "PYTHONUNBUFFERED": "1"}
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    keys = [set((tmp_path / f"keys-rank{r}.txt").read_text().split()) for r in (0, 1)]
    assert keys[0] and keys[1] and not keys[0] & keys[1]
    sums = [(tmp_path / f"weights-rank{r}.txt").read_text() for r in (0, 1)]
    assert sums[0] == sums[1]
    state = torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=True)["CSMDataModule"]["stream"]
    assert sorted(state["slots"]) == ["0", "1"] and state["num_slots"] == 2  # both ranks' positions saved


def test_unknown_preset_is_a_clear_error(tmp_path):
    cfg = config("+experiment=tiny", f"run_dir={tmp_path}", "model.preset=2b")
    with pytest.raises(Exception, match=r"unknown CSM preset '2b'; choose one of \['100m', '1b', '3b', '8b', 'tiny'\]"):
        train(cfg)


def test_nonfinite_loss_skips_steps_then_stops_clearly(tmp_path, demo_data):
    import lightning as L

    from csm_train.data import CSMDataModule
    from csm_train.module import CSMModule
    from csm_train.tokenizer import ByteTokenizer

    module = CSMModule(text_vocab_size=ByteTokenizer.vocab_size, max_bad_steps=3)
    with torch.no_grad():
        module.model.codebook0_head.weight[0, 0] = float("nan")
    before = {k: v.clone() for k, v in module.state_dict().items()}
    data = CSMDataModule(str(demo_data), ByteTokenizer(), max_seq_len=512, batch_size=2, synthetic_corpus=True)
    trainer = L.Trainer(
        accelerator="cpu",
        max_steps=10,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        default_root_dir=tmp_path,
    )
    with pytest.raises(FloatingPointError, match="loss was nan for 3 steps in a row.*lower optim.lr"):
        trainer.fit(module, datamodule=data)
    assert module.bad_steps_total == 3
    for name, tensor in module.state_dict().items():  # skipped steps never touched the weights
        torch.testing.assert_close(tensor, before[name], rtol=0, atol=0, equal_nan=True, msg=name)


def test_dry_run_prints_a_plan_without_building_anything(tmp_path, capsys):
    from csm_train.plan import GiB, activation_bytes, model_state_bytes

    cfg = config("+experiment=8b", f"run_dir={tmp_path}", "dry_run=true", "trainer.devices=8")
    assert train(cfg) is None
    assert not any(tmp_path.iterdir())  # no run directory, no checkpoint, no download
    out = capsys.readouterr().out
    assert "8,157,138,944" in out and "deepspeed_z3_offload" in out
    params = 8_157_138_944
    assert model_state_bytes(params, "ddp (bf16-mixed)", 8) == 16 * params  # nothing sharded
    assert model_state_bytes(params, "deepspeed_z3", 8) == 2 * params  # 16 bytes / 8 GPUs
    assert f"{16 * params / GiB:7.1f}G" in out
    from csm_train import CSMConfig

    full = activation_bytes(CSMConfig.preset("1b"), rows=4, seq_len=2048, decoder_fraction=1 / 16, checkpointing=False)
    recomputed = activation_bytes(
        CSMConfig.preset("1b"), rows=4, seq_len=2048, decoder_fraction=1 / 16, checkpointing=True
    )
    assert recomputed < full / 4


@pytest.mark.slow
def test_wandb_logger_runs_offline_under_a_stable_id(tmp_path, demo_data, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    cfg = config(
        "+experiment=tiny",
        f"run_dir={tmp_path}",
        f"data.path={demo_data}",
        "logger=wandb",
        "trainer.max_steps=3",
        "checkpoint.every_n_steps=3",
        "run_id=abc",
    )
    train(cfg)
    runs = list((tmp_path / "wandb").glob("offline-run-*-tiny-abc"))
    assert len(runs) == 1  # id = experiment-run_id: a resumed run continues the same W&B run
    assert list(runs[0].glob("run-tiny-abc.wandb"))


def nan_probe(run_dir, demo_data, *overrides):
    """tests/nan_probe.py: two DDP ranks in bf16-mixed with clipping (trainer=ddp as shipped, on CPU)."""
    args = [
        sys.executable,
        str(Path(__file__).with_name("nan_probe.py")),
        "+experiment=tiny",
        f"run_dir={run_dir}",
        f"data.path={demo_data}",
        "trainer=ddp",
        "trainer.accelerator=cpu",
        "trainer.devices=2",
        "checkpoint.every_n_steps=100",
        "model.optim.warmup_steps=1",
        *overrides,
    ]
    return subprocess.run(
        args, capture_output=True, text=True, timeout=600, env={**os.environ, "PYTHONUNBUFFERED": "1"}
    )


@pytest.mark.slow
def test_nonfinite_loss_on_one_ddp_rank_skips_the_update_on_every_rank(tmp_path, demo_data):
    """Rank 1 alone sees a NaN loss at step 2: no rank's weights or AdamW state change at that step, the step still
    counts on both (global step and schedule move on together), and training goes on after it."""
    result = nan_probe(tmp_path, demo_data, "trainer.max_steps=4", "+poison.rank=1", "+poison.steps=[2]")
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    records = [json.loads((tmp_path / f"steps-rank{r}.json").read_text()) for r in (0, 1)]
    assert records[0] == records[1]  # replicas identical at every step, counters included
    steps = {r["step"]: r for r in records[0]}
    assert sorted(steps) == [1, 2, 3, 4]
    assert (steps[3]["weights"], steps[3]["optimizer"]) == (steps[2]["weights"], steps[2]["optimizer"])
    assert len({steps[s]["weights"] for s in (1, 2, 4)}) == 3  # the other steps do update
    assert [steps[s]["skipped"] for s in (1, 2, 3, 4)] == [0, 0, 1, 1]
    assert steps[3]["lr"] != steps[2]["lr"]  # the schedule moved on with the step


@pytest.mark.slow
def test_nonfinite_losses_in_a_row_stop_every_ddp_rank_with_the_reason(tmp_path, demo_data):
    result = nan_probe(
        tmp_path, demo_data, "trainer.max_steps=10", "model.max_bad_steps=2", "+poison.rank=0", "+poison.steps=[1,2,3]"
    )
    assert result.returncode != 0
    out = result.stdout + result.stderr
    assert "loss was nan for 2 steps in a row (step 2)" in out and "lower optim.lr" in out


# Lightning turns `precision=16-mixed` into bf16-mixed on a CPU; its fp16 plugin with a CPU loss scaler, given
# directly, is the same code path a GPU's 16-mixed takes (bench/gpu_check.sh runs bf16-mixed on a GPU).
FP16_ON_CPU = [
    "trainer.precision=null",
    "+trainer.plugins=[{_target_: lightning.pytorch.plugins.precision.MixedPrecision, precision: 16-mixed, "
    "device: cpu, scaler: {_target_: torch.amp.GradScaler, device: cpu}}]",
]


@pytest.mark.parametrize("precision", ["bf16-mixed", "16-mixed"])
def test_mixed_precision_clips_gradients_and_steps(precision, tmp_path, demo_data):
    """Both mixed precisions train with clipping at 1.0 and fp32 master weights and AdamW states: bf16-mixed with the
    fused AdamW (Lightning refused that pair), 16-mixed with its loss scaler and the foreach AdamW."""
    cfg = config(
        "+experiment=tiny",
        f"run_dir={tmp_path}",
        f"data.path={demo_data}",
        *(FP16_ON_CPU if precision == "16-mixed" else [f"trainer.precision={precision}"]),
        "trainer.max_steps=2",
        "trainer.log_every_n_steps=1",
        "data.max_seq_len=128",
        "model.optim.warmup_steps=1",
    )
    trainer = train(cfg)
    assert trainer.precision == precision
    scaler = trainer.precision_plugin.scaler  # fp16 scales the loss (2**16 to start); bf16 needs no scale
    assert (scaler.get_scale() >= 2**15) if precision == "16-mixed" else scaler is None
    optimizer = trainer.optimizers[0]
    assert optimizer.defaults["fused"] is (precision == "bf16-mixed") and cfg.trainer.gradient_clip_val == 1.0
    assert trainer.global_step == 2 and all(math.isfinite(float(row["train/loss"])) for row in metrics(tmp_path))
    assert all(p.dtype == torch.float32 for p in trainer.lightning_module.parameters())
    assert all(v.dtype == torch.float32 for s in optimizer.state.values() for k, v in s.items() if k != "step")


@pytest.mark.parametrize("precision", ["bf16-true", "16-true", "64-true"])
def test_precisions_that_train_badly_are_refused_before_a_step(precision, tmp_path, demo_data):
    cfg = config("+experiment=tiny", f"run_dir={tmp_path}", f"data.path={demo_data}", f"trainer.precision={precision}")
    with pytest.raises(ValueError, match=rf"trainer.precision={precision} .*use bf16-mixed"):
        train(cfg)
    assert not list((tmp_path / "checkpoints").glob("*.ckpt"))
