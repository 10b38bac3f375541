"""Real DeepSpeed ZeRO-2 and ZeRO-3 on CPU (two processes over gloo) and the consolidation CLI."""

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from csm_train import CSM
from csm_train.consolidate import load_training_checkpoint
from csm_train.convert import convert
from data_pipeline.synthetic import write_synthetic_corpus

PROBE = Path(__file__).with_name("deepspeed_probe.py")


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    path = tmp_path_factory.mktemp("ds_data")
    write_synthetic_corpus(path, num_conversations=16, samples_per_shard=4)
    return path


@pytest.mark.slow
@pytest.mark.parametrize("stage", [2, 3])
def test_zero_training_matches_single_process_and_consolidates(stage, dataset, tmp_path):
    torchrun = Path(sys.executable).with_name("torchrun")
    result = subprocess.run(
        [str(torchrun), "--nproc_per_node=2", str(PROBE), str(stage), str(dataset), str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    engine = torch.load(tmp_path / "engine.pt", weights_only=True)
    reference = torch.load(tmp_path / "reference.pt", weights_only=True)
    # Sharded weights, reduce-scattered gradients and partitioned optimizer states give the same training.
    for name, tensor in reference.items():
        torch.testing.assert_close(engine[name], tensor, atol=2e-6, rtol=1e-5, msg=name)

    # python -m csm_train.consolidate: the ZeRO shards → one safetensors file, exactly the engine's weights.
    out = subprocess.run(
        [sys.executable, "-m", "csm_train.consolidate", str(tmp_path / "zero"), str(tmp_path / "full")],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    assert "13,266,304 parameters" in out.stdout
    model = CSM.from_pretrained(tmp_path / "full")
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, engine[f"model.{name}"]), name
    # Any reader takes the ZeRO directory as it is (consolidated on the way, nothing unpickled): init_from, convert,
    # eval; it reads what DeepSpeed's own zero_to_fp32 (which unpickles: --trust-pickle) reads.
    direct = CSM.from_pretrained(tmp_path / "zero")
    assert all(torch.equal(direct.state_dict()[k], v) for k, v in model.state_dict().items())
    _, trusted = load_training_checkpoint(tmp_path / "zero", trust_pickle=True)
    assert all(torch.equal(trusted[k], v) for k, v in model.state_dict().items())
    with pytest.raises(ValueError, match="--codec.*--like"):  # a ZeRO directory has no config.json to look in
        convert(tmp_path / "zero", tmp_path / "hf", "transformers")
