"""`python -m csm_train.consolidate CHECKPOINT OUT_DIR`: a training checkpoint → one `model.safetensors`
(+ `config.json`) that `CSM.from_pretrained` and `csm_train.convert` read.

CHECKPOINT is a Lightning `.ckpt` file (DDP/CPU runs) or a DeepSpeed ZeRO checkpoint directory (Lightning's
`last.ckpt/` under a DeepSpeed strategy, or any `engine.save_checkpoint` directory), whose fp32 partitions are
gathered into full tensors with DeepSpeed's own `zero_to_fp32` merge.

Nothing from a file runs code: every `.pt` shard is opened with torch's restricted unpickler
(`weights_only=True`), which builds tensors and plain containers only; the four record types DeepSpeed pickles
into its shards (two loss scalers, the ZeRO stage, parameter fragment addresses) are read as inert data, never
as DeepSpeed's classes. A shard holding anything else is refused. For a checkpoint you trust (your own run),
`--trust-pickle` reads it the same way but unpickles (`weights_only=False`, as DeepSpeed's own `zero_to_fp32`
does): any code a file names runs.
"""

from __future__ import annotations

import argparse
import pickle
from pathlib import Path

import torch

from csm_train.lora import LoraConfig, merge_lora_weights
from csm_train.model import CSM, CSMConfig

# Lightning's DeepSpeed strategy wraps the LightningModule (`_forward_module.`), which holds the CSM as `model.`.
WRAPPER_PREFIXES = ("_forward_module.", "model.")
TRUST_FLAG = "--trust-pickle"


def _strip_prefixes(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    for prefix in WRAPPER_PREFIXES:
        if state_dict and all(k.startswith(prefix) for k in state_dict):
            state_dict = {k[len(prefix) :]: v for k, v in state_dict.items()}
    return state_dict


def unpickling_reason(error: Exception) -> str:
    """The gist of torch's weights_only refusal, e.g. `Unsupported global: GLOBAL posix.system`."""
    for line in str(error).splitlines():
        if "WeightsUnpickler error:" in line:
            return line.split("WeightsUnpickler error:", 1)[1].strip().split(" was not an allowed global")[0]
    return f"{type(error).__name__}: {error}".splitlines()[0]


class UntrustedCheckpointError(ValueError):
    """A checkpoint file holds objects other than tensors and known records: reading it would run its code."""

    def __init__(self, checkpoint: Path, file: Path, error: Exception):
        where = f"{file.relative_to(checkpoint)} " if checkpoint in file.parents else ""
        super().__init__(
            f"{checkpoint}: {where}holds objects other than tensors and DeepSpeed's checkpoint records "
            f"({unpickling_reason(error)}). csm_train does not unpickle them: "
            f"unpickling runs whatever code the file names. If this checkpoint is yours (a run you trained), "
            f"consolidate it once, trusting it explicitly: `python -m csm_train.consolidate {checkpoint} OUT_DIR "
            f"{TRUST_FLAG}`, then load OUT_DIR"
        )


class _Record:
    """Stands in for a DeepSpeed object pickled into a ZeRO shard (its loss scaler, a fragment's address): built
    empty, its saved attributes kept as one dict of data (no attribute is set from the file); none of DeepSpeed's
    code runs."""

    def __setstate__(self, state) -> None:
        self.saved = state


# Every non-tensor type DeepSpeed 0.19 pickles into a ZeRO checkpoint's *_states.pt files (listed from the
# files ZeRO-1/2/3 write in fp32 and bf16; fp16 adds the dynamic loss scaler), mapped to inert stand-ins.
# tests/test_untrusted.py reads a ZeRO directory holding all four.
DEEPSPEED_RECORDS = [
    (_Record, "deepspeed.runtime.fp16.loss_scaler.LossScaler"),
    (_Record, "deepspeed.runtime.fp16.loss_scaler.DynamicLossScaler"),
    (_Record, "deepspeed.utils.tensor_fragment.fragment_address"),
    (int, "deepspeed.runtime.zero.config.ZeroStageEnum"),  # an int Enum, pickled as ZeroStageEnum(value)
]


def load_safely(file: Path, checkpoint: Path, mmap: bool = False):
    """A torch file through torch's restricted unpickler (tensors, containers, DEEPSPEED_RECORDS as data), or
    UntrustedCheckpointError naming `checkpoint` and how to consolidate it."""
    try:
        with torch.serialization.safe_globals(DEEPSPEED_RECORDS):
            return torch.load(file, map_location="cpu", weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as error:
        raise UntrustedCheckpointError(checkpoint, file, error) from None


def _tag_directory(directory: Path) -> Path:
    tag = (directory / "latest").read_text().strip() if (directory / "latest").exists() else None
    return directory / tag if tag else directory


def _load(file: Path, checkpoint: Path, trust_pickle: bool, mmap: bool = False):
    if trust_pickle:  # the user named `checkpoint` as trusted: any code its files name runs
        return torch.load(file, map_location="cpu", weights_only=False, mmap=mmap)
    return load_safely(file, checkpoint, mmap)


def _deepspeed_client_state(directory: Path, trust_pickle: bool = False) -> dict:
    # ZeRO-1/2 write mp_rank_00_model_states.pt, ZeRO-3 one zero_pp_rank_N_mp_rank_00_model_states.pt per rank.
    candidates = sorted(_tag_directory(directory).glob("*mp_rank_00_model_states.pt"))
    if not candidates:
        raise FileNotFoundError(f"{directory}: no mp_rank_00_model_states.pt; is this a DeepSpeed checkpoint?")
    return _load(candidates[0], directory, trust_pickle)


def _zero_fp32_weights(directory: Path, trust_pickle: bool = False) -> dict[str, torch.Tensor]:
    """DeepSpeed's zero_to_fp32 (`get_fp32_state_dict_from_zero_checkpoint`) with its two readers,
    `parse_model_states` and `parse_optim_states`, redone over `load_safely` (or, trusted, a plain unpickling
    `torch.load` as DeepSpeed's); the merge is DeepSpeed's own."""
    from deepspeed.utils import zero_to_fp32 as z

    tag_dir = _tag_directory(directory)
    model_states = []
    for file in z.get_model_state_files(str(tag_dir)):
        state = _load(Path(file), directory, trust_pickle)
        z._raise_if_autoep_zero3_partitioned_state(state)
        if z.BUFFER_NAMES not in state:
            raise ValueError(f"{file} is not a model state checkpoint")
        buffer_names = state[z.BUFFER_NAMES]
        model_states.append(
            z.zero_model_state(
                buffers={
                    k: v.float() if v.is_floating_point() else v
                    for k, v in state["module"].items()
                    if k in buffer_names
                },
                param_shapes=state[z.PARAM_SHAPES],
                shared_params=[[k, v] for k, v in state["shared_params"].items()],
                ds_version=state.get(z.DS_VERSION),
                frozen_param_shapes=state.get(z.FROZEN_PARAM_SHAPES),
                frozen_param_fragments=state.get(z.FROZEN_PARAM_FRAGMENTS),
            )
        )

    optim_files = z.get_optim_files(str(tag_dir))
    optim_states = []
    for file in optim_files:
        state = _load(Path(file), directory, trust_pickle, mmap=True)[z.OPTIMIZER_STATE_DICT]
        state.pop(z.OPTIMIZER_STATE_DICT, None)  # the optimizer's moments: only the fp32 master weights are read
        optim_states.append(state)
    if z.ZERO_STAGE in optim_states[0]:
        stage = int(optim_states[0][z.ZERO_STAGE])
    elif z.SINGLE_PARTITION_OF_FP32_GROUPS in optim_states[0]:
        # ZeRO-1 with bf16 weights and fp32 gradient accumulation runs DeepSpeed's BF16_Optimizer, whose shards
        # (bf16_zero_pp_rank_*) zero_to_fp32 does not read: the same fp32 partitions of the same flat groups as
        # ZeRO-1/2, without a stage entry, and with padding only at the end of each group.
        stage = 1
    else:
        raise ValueError(f"{optim_files[0]} is not a ZeRO checkpoint")
    world_size = optim_states[0][z.PARTITION_COUNT]
    world_size = max(world_size) if isinstance(world_size, list) else world_size
    if world_size != len(optim_files):
        raise ValueError(
            f"{tag_dir}: expected {world_size} '*_optim_states.pt' files (one per rank) but found {len(optim_files)}; "
            f"a rank did not save, or an older checkpoint was partly overwritten"
        )
    if stage <= 2:
        groups = [s[z.SINGLE_PARTITION_OF_FP32_GROUPS] for s in optim_states]
        paddings = optim_states[0].get(z.PARAM_ALIGNMENT_PADDINGS)
        weights = z._get_fp32_state_dict_from_zero2_checkpoint(world_size, groups, model_states, False, paddings)
    elif stage == 3:
        groups = [s[z.FP32_FLAT_GROUPS] for s in optim_states]
        weights = z._get_fp32_state_dict_from_zero3_checkpoint(world_size, groups, model_states, False)
    else:
        raise ValueError(f"{optim_files[0]}: unknown ZeRO stage {stage}")
    return z.to_torch_tensor(weights)


def training_state(path: str | Path, trust_pickle: bool = False) -> dict:
    """What the trainer saved beside the weights (`global_step`, `csm_config`, …): a Lightning `.ckpt`'s whole
    dict, or a ZeRO directory's client state. Read safely unless `trust_pickle`."""
    path = Path(path)
    if path.is_dir():
        return _deepspeed_client_state(path, trust_pickle)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    return _load(path, path, trust_pickle)


def load_training_checkpoint(path: str | Path, trust_pickle: bool = False) -> tuple[CSMConfig, dict[str, torch.Tensor]]:
    """(config, weights with our names) from a Lightning `.ckpt` or a ZeRO directory, LoRA merged. Read safely
    (see the module's docstring) unless `trust_pickle`, which unpickles: only for a checkpoint you trust."""
    path = Path(path)
    state = training_state(path, trust_pickle)
    weights = _zero_fp32_weights(path, trust_pickle) if path.is_dir() else state["state_dict"]
    if "csm_config" not in state:
        raise ValueError(f"{path}: no 'csm_config' in the checkpoint; was it written by csm_train's trainer?")
    config, weights = CSMConfig(**state["csm_config"]), _strip_prefixes(dict(weights))
    if "lora" in state:
        weights = merge_lora_weights(weights, LoraConfig(**state["lora"]))
    return config, weights


def consolidate(checkpoint: str | Path, out_dir: str | Path, trust_pickle: bool = False) -> CSM:
    config, weights = load_training_checkpoint(checkpoint, trust_pickle)
    model = CSM.from_state_dict(config, {k: v.float().contiguous() for k, v in weights.items()})
    model.save_pretrained(out_dir)
    return model


def main() -> None:
    parser = argparse.ArgumentParser(
        prog="python -m csm_train.consolidate",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("checkpoint", help="Lightning .ckpt file or DeepSpeed checkpoint directory")
    parser.add_argument("out_dir", help="directory for model.safetensors and config.json")
    parser.add_argument(
        TRUST_FLAG,
        action="store_true",
        help="only for a checkpoint you trust (your own run) that the safe reader refuses: read it with "
        "torch.load(weights_only=False), as DeepSpeed's zero_to_fp32 does, which runs any code its files name",
    )
    args = parser.parse_args()
    try:
        model = consolidate(args.checkpoint, args.out_dir, trust_pickle=args.trust_pickle)
    except UntrustedCheckpointError as error:
        parser.exit(2, f"error: {error}\n")
    print(f"wrote {args.out_dir}/model.safetensors: {model.num_parameters():,} parameters")


if __name__ == "__main__":
    main()
