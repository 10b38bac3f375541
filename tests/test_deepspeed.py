"""DeepSpeed through Lightning, as `trainer=deepspeed_z1/z2/z3/z3_offload` ship: `CSMModule` with its AdamW (DeepSpeed's
CPU Adam under offload) and cosine schedule, gradient clipping, bf16-mixed, two processes (on CPU through
`tests/cpu_launch.py`, which lifts only Lightning's CUDA-only checks). Each stage trains like DDP, resumes from its
ZeRO checkpoint bit-exact, and consolidates to exactly the weights it trained."""

import shutil
import subprocess
import sys
from pathlib import Path

import lightning as L
import pytest
import torch

from csm_train import CSM
from csm_train.module import CSMModule
from csm_train.tokenizer import ByteTokenizer
from data_pipeline.synthetic import write_synthetic_corpus

PROBE = Path(__file__).with_name("deepspeed_probe.py")
STEPS = 3


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    path = tmp_path_factory.mktemp("ds_data")
    write_synthetic_corpus(path, num_conversations=16, samples_per_shard=4)
    return path


def probe(trainer: str, run_dir: Path, dataset: Path, *overrides: str) -> dict:
    """`tests/deepspeed_probe.py`: the tiny experiment on `trainer`, 2 ranks; rank 0's live weights at the end."""
    args = [
        "+experiment=tiny",
        f"trainer={trainer}",
        "trainer.accelerator=cpu",
        "trainer.devices=2",
        f"trainer.max_steps={STEPS}",
        "trainer.log_every_n_steps=1",
        f"model.optim.max_steps={STEPS}",
        "model.optim.warmup_steps=1",
        f"data.path={dataset}",
        "data.max_seq_len=256",
        "checkpoint.every_n_steps=2",
        f"run_dir={run_dir}",
        *overrides,
    ]
    done = subprocess.run([sys.executable, str(PROBE), *args], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-5000:]
    return torch.load(run_dir / "live-rank0.pt", weights_only=True)


@pytest.fixture(scope="module")
def ddp(dataset, tmp_path_factory):
    return probe("ddp", tmp_path_factory.mktemp("ddp"), dataset)


def initial_weights() -> dict[str, torch.Tensor]:
    """What `python -m csm_train` starts from: the module built right after seeding with the run's seed (0)."""
    L.seed_everything(0, workers=True)
    return CSMModule(preset="tiny", text_vocab_size=ByteTokenizer.vocab_size).model.state_dict()


@pytest.mark.slow
@pytest.mark.parametrize("stage", ["deepspeed_z1", "deepspeed_z2", "deepspeed_z3", "deepspeed_z3_offload"])
def test_zero_stage_trains_like_ddp_resumes_exactly_and_consolidates(stage, dataset, ddp, tmp_path):
    run = probe(stage, tmp_path / "run", dataset)
    assert run["step"] == ddp["step"] == STEPS
    assert run["grad_norms"] and all(n > 0 for n in run["grad_norms"])  # logged from DeepSpeed's partitions

    # Like DDP: the same updates up to bf16 rounding (DeepSpeed computes in bf16 weights, DDP under autocast).
    start = initial_weights()
    update = torch.cat([(ddp["weights"][k].float() - v).flatten() for k, v in start.items()]).norm()
    apart = torch.cat([(run["weights"][k].float() - ddp["weights"][k].float()).flatten() for k in start]).norm()
    assert update > 0 and apart < 0.1 * update, f"{stage} vs DDP: {apart:.3g} apart, updates {update:.3g}"

    # Resume: the run again from its step-2 ZeRO checkpoint ends bit-identical to the uninterrupted one.
    resumed = tmp_path / "resumed"
    shutil.copytree(tmp_path / "run", resumed, symlinks=True, ignore=shutil.ignore_patterns("live-*.pt"))
    checkpoints = resumed / "checkpoints"
    shutil.rmtree(checkpoints / f"step-{STEPS:07d}.ckpt")
    (checkpoints / "last.ckpt").unlink()
    (checkpoints / "last.ckpt").symlink_to("step-0000002.ckpt")
    again = probe(stage, resumed, dataset)
    for name, tensor in run["weights"].items():
        assert torch.equal(again["weights"][name], tensor), name

    # Consolidation: the ZeRO shards → one safetensors file of the fp32 master weights the live bf16 ones came from.
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "csm_train.convert",
            str(tmp_path / "run" / "checkpoints" / "last.ckpt"),
            str(tmp_path / "full"),
            "--to",
            "ours",
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    consolidated = CSM.from_pretrained(tmp_path / "full").state_dict()
    for name, tensor in run["weights"].items():
        assert consolidated[name].dtype == torch.float32
        assert torch.equal(consolidated[name].to(tensor.dtype), tensor), name


@pytest.mark.slow
def test_nonfinite_loss_on_one_rank_skips_the_zero_step_on_every_rank(dataset, tmp_path):
    """Rank 1 alone sees a NaN loss at step 1: DeepSpeed finds the non-finite gradients in its partitions and skips
    the step on both ranks (weights unchanged), the step still counts, and training goes on after it."""
    run = probe("deepspeed_z2", tmp_path, dataset, "+poison.rank=1", "+poison.steps=[1]")
    steps = {r["step"]: r for r in run["steps"]}
    assert sorted(steps) == [1, 2, 3] and [steps[s]["skipped"] for s in (1, 2, 3)] == [0, 1, 1]
    assert steps[2]["weights"] == steps[1]["weights"] != steps[3]["weights"]
    other = torch.load(tmp_path / "live-rank1.pt", weights_only=True)["steps"]  # each rank holds its own moments
    assert [(r["step"], r["weights"], r["skipped"]) for r in other] == [
        (r["step"], r["weights"], r["skipped"]) for r in run["steps"]
    ]
