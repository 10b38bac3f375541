"""Nothing from a file executes code. A DeepSpeed ZeRO checkpoint directory is read without unpickling anything
but tensors, containers and DeepSpeed's own checkpoint records (csm_train.checkpoint); a directory whose `.pt`
files carry a pickled payload is refused by every reader (CSM.from_pretrained, model.init_from, convert, eval)
with a message naming it and saying how to convert a trusted one; and a run's
`config.yaml` cannot name an arbitrary `_target_` (Hydra's instantiate allow-list).

The ZeRO directories are built by hand in DeepSpeed's layout (`latest`, `<tag>/mp_rank_00_model_states.pt`,
`<tag>/*_optim_states.pt`); tests/test_deepspeed.py reads ones that DeepSpeed's engine wrote."""

from __future__ import annotations

import itertools
import math
import subprocess
import sys
from collections import OrderedDict
from pathlib import Path

import pytest
import torch

from csm_train import CSM, CSMConfig
from csm_train.checkpoint import load_initial_weights, load_training_checkpoint
from csm_train.convert import convert

TAG = "global_step7"
MODEL_STATES, OPTIM_STATES = "mp_rank_00_model_states.pt", "zero_pp_rank_{}_mp_rank_00_optim_states.pt"


class Payload:
    """Unpickled, it creates `marker` (pickle calls `open(marker, "w")`)."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return open, (str(self.marker), "w")


@pytest.fixture(scope="module")
def config():
    return CSMConfig.preset("tiny", text_vocab_size=64)


@pytest.fixture(scope="module")
def weights(config):
    torch.manual_seed(0)
    return {k: v.detach().clone() for k, v in CSM(config).state_dict().items()}


def write_zero(directory: Path, model_states: dict, optim_states: list[dict]) -> Path:
    (directory / TAG).mkdir(parents=True)
    (directory / "latest").write_text(TAG)
    torch.save(model_states, directory / TAG / MODEL_STATES)
    for rank, state in enumerate(optim_states):
        torch.save(state, directory / TAG / OPTIM_STATES.format(rank))
    return directory


def zero2_checkpoint(directory: Path, config: CSMConfig, weights: dict, world_size: int = 2, extra=None) -> Path:
    """What a ZeRO-2 engine saves for the CSM held as `model` (Lightning's layout): the client state and the
    parameter shapes in the model states, each rank's slice of the flat fp32 master weights in its optimizer
    states, with the DeepSpeed records the real files hold (loss scaler, ZeRO stage, fragment addresses)."""
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    scalers = [LossScaler(1.0), DynamicLossScaler(2.0**16, 1000, 1.0, 2, False)]  # fp32/bf16 runs, fp16 runs
    names = [f"model.{k}" for k in weights]
    flat = torch.cat([v.float().flatten() for v in weights.values()])
    per_rank = math.ceil(flat.numel() / world_size)
    numels = [v.numel() for v in weights.values()]
    addresses = OrderedDict(
        (n, fragment_address(numel, start))
        for n, numel, start in zip(names, numels, [0, *itertools.accumulate(numels)][:-1], strict=True)
    )
    model_states = {
        "module": OrderedDict(),
        "buffer_names": [],
        "param_shapes": [OrderedDict((n, v.shape) for n, v in zip(names, weights.values(), strict=True))],
        "frozen_param_shapes": None,
        "frozen_param_fragments": None,
        "shared_params": {},
        "ds_config": {"zero_optimization": {"stage": 2}},
        "ds_version": "0.19.8",
        "global_step": 7,
        "csm_config": config.to_dict(),
        **(extra or {}),
    }
    optim_states = [
        {
            "optimizer_state_dict": {
                "loss_scaler": scalers[rank % 2],
                "dynamic_loss_scale": rank != 0,
                "overflow": False,
                "clip_grad": 1.0,
                "base_optimizer_state": {"state": {}, "param_groups": [{"lr": 1e-3, "betas": (0.9, 0.95)}]},
                "single_partition_of_fp32_groups": [flat[rank * per_rank : (rank + 1) * per_rank].clone()],
                "zero_stage": ZeroStageEnum.gradients,
                "group_paddings": [0],
                "param_alignment_paddings": [[0] * len(names)],
                "partition_count": [world_size],
                "ds_version": "0.19.8",
                "param_slice_mappings": [addresses],
            },
            "ds_config": {"zero_optimization": {"stage": 2}},
            "ds_version": "0.19.8",
        }
        for rank in range(world_size)
    ]
    return write_zero(directory, model_states, optim_states)


def test_a_zero_checkpoint_is_read_without_unpickling_and_equals_deepspeeds_reader(config, weights, tmp_path):
    directory = zero2_checkpoint(tmp_path / "zero", config, weights)
    read_config, read = load_training_checkpoint(directory)
    assert read_config == config
    assert read.keys() == weights.keys() and all(torch.equal(read[k], v) for k, v in weights.items())
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    deepspeeds = get_fp32_state_dict_from_zero_checkpoint(str(directory))  # which unpickles
    assert all(torch.equal(deepspeeds[f"model.{k}"], v) for k, v in read.items())
    _, trusted = load_training_checkpoint(directory, trust_pickle=True)
    assert all(torch.equal(trusted[k], v) for k, v in read.items())
    model = CSM.from_pretrained(directory)
    assert all(torch.equal(model.state_dict()[k], v) for k, v in weights.items())

    from eval.speaker import resolve_checkpoint

    assert resolve_checkpoint(directory, tokenizer={"_target_": "x"}, codec="c").step == 7


def planted(tmp_path: Path, config: CSMConfig, weights: dict, where: str) -> tuple[Path, Path]:
    """A ZeRO directory whose model states or rank 1's optimizer states carry a Payload; (directory, marker)."""
    marker = tmp_path / "payload-ran"
    directory = zero2_checkpoint(tmp_path / "zero", config, weights)
    file = directory / TAG / (MODEL_STATES if where == "model" else OPTIM_STATES.format(1))
    state = torch.load(file, weights_only=False)
    target = state if where == "model" else state["optimizer_state_dict"]
    target["ds_config"] = {"zero_optimization": {"stage": 2}, "hook": Payload(marker)}
    torch.save(state, file)
    return directory, marker


def assert_refused(error: Exception, directory: Path, marker: Path):
    message = str(error)
    assert str(directory) in message and "unpickl" in message, message
    assert f"python -m csm_train.convert {directory} OUT_DIR --to ours --trust-pickle" in message, message
    assert not marker.exists()


def test_the_planted_payload_runs_when_unpickled(config, weights, tmp_path):
    """The payload is a real threat: DeepSpeed's zero_to_fp32 runs it, and so does --trust-pickle, as it says."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    directory, marker = planted(tmp_path, config, weights, "optim")
    get_fp32_state_dict_from_zero_checkpoint(str(directory))
    assert marker.exists()
    marker.unlink()
    load_training_checkpoint(directory, trust_pickle=True)
    assert marker.exists()


@pytest.mark.parametrize("where", ["model", "optim"])
def test_every_reader_refuses_a_zero_directory_carrying_a_payload(config, weights, tmp_path, where):
    from eval.speaker import load_model, resolve_checkpoint

    directory, marker = planted(tmp_path, config, weights, where)
    readers = {
        "CSM.from_pretrained": lambda: CSM.from_pretrained(directory),
        "convert": lambda: convert(directory, tmp_path / "out", "ours"),
        "model.init_from": lambda: load_initial_weights(CSM(config), str(directory)),
        "eval": lambda: load_model(directory),
    }
    if where == "model":
        readers["eval's step"] = lambda: resolve_checkpoint(directory, tokenizer={"_target_": "x"}, codec="c")
    for name, read in readers.items():
        try:
            read()
        except ValueError as refused:
            assert_refused(refused, directory, marker)
        else:
            pytest.fail(f"{name} read a checkpoint carrying a payload")
    assert not (tmp_path / "out").exists()


def test_the_convert_command_refuses_it_and_says_how(config, weights, tmp_path):
    directory, marker = planted(tmp_path, config, weights, "optim")
    command = ["csm_train.convert", str(directory), str(tmp_path / "full"), "--to", "ours"]
    done = subprocess.run([sys.executable, "-m", *command], capture_output=True, text=True, timeout=300)
    assert done.returncode == 2, done.stdout + done.stderr[-3000:]
    assert "Traceback" not in done.stderr
    assert_refused(done.stderr, directory, marker)
    assert not (tmp_path / "full").exists()


def test_torch_files_carrying_a_payload_are_refused(config, weights, tmp_path):
    marker, path = tmp_path / "payload-ran", tmp_path / "last.ckpt"
    torch.save({"state_dict": weights, "csm_config": config.to_dict(), "hook": Payload(marker)}, path)
    with pytest.raises(ValueError) as refused:  # a Lightning checkpoint
        CSM.from_pretrained(path)
    assert_refused(refused.value, path, marker)
    sesame = tmp_path / "sesame"
    sesame.mkdir()
    torch.save({**weights, "hook": Payload(marker)}, sesame / "ckpt.pt")
    with pytest.raises(ValueError, match="holds objects other than tensors .*GLOBAL io.open"):  # Sesame's format
        CSM.from_pretrained(sesame)
    assert not marker.exists()


@pytest.mark.parametrize("target", ["os.system", "shutil.rmtree", "posix.system", "builtins.exec"])
def test_a_run_config_cannot_name_an_arbitrary_target(target, config, weights, tmp_path, monkeypatch):
    """eval reads the tokenizer to build from the run's config.yaml and instantiates it (Speaker.from_checkpoint):
    Hydra 1.3.8's allow-list refuses anything but importable classes of allowed modules."""
    import hydra
    import yaml

    from eval.speaker import Speaker, resolve_checkpoint

    monkeypatch.delenv("HYDRA_INSTANTIATE_ALLOWLIST_OVERRIDE", raising=False)
    victim = tmp_path / "victim"
    victim.mkdir()
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    torch.save(
        {"global_step": 3, "state_dict": {f"model.{k}": v for k, v in weights.items()}, "csm_config": config.to_dict()},
        run / "checkpoints" / "last.ckpt",
    )
    argument = str(victim) if target == "shutil.rmtree" else f"import os; os.rmdir({str(victim)!r})"
    if target.endswith("system"):
        argument = f"rmdir {victim}"
    tokenizer = {"_target_": target, "_args_": [argument]}
    (run / "config.yaml").write_text(yaml.safe_dump({"data": {"tokenizer": tokenizer, "path": str(tmp_path)}}))

    checkpoint = resolve_checkpoint(run, codec="random-init:seed=0")
    assert checkpoint.tokenizer == tokenizer and checkpoint.step == 3
    with pytest.raises(hydra.errors.InstantiationException, match="blocklisted|not allowlisted"):
        Speaker.from_checkpoint(checkpoint, "cpu")
    assert victim.is_dir()
