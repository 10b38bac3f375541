"""Checkpoints, read and written: every format csm_train knows, training checkpoints included, and loading one
into a model. Anything that reads weights goes through `load_checkpoint` (`CSM.from_pretrained`, `model.init_from`,
`python -m csm_train.convert`, `python -m eval`).

`load_checkpoint` gives `(CSMConfig, state dict with our names)` from
* **ours**: a directory with `model.safetensors` (Sesame's parameter names) and `config.json` holding
  `{"csm_train": <CSMConfig>}`, as `save_checkpoint` (`CSM.save_pretrained`) writes it;
* **Sesame's**: `model.safetensors` or `ckpt.pt`, beside Sesame's `config.json` or recognised by shape (`save_sesame`);
* **transformers'**: a `CsmForConditionalGeneration.save_pretrained` directory (`save_transformers`);
* a **Hub id** such as `sesame/csm-1b`, downloaded;
* a **GGUF** file (`*.gguf`): ours or csm.rs's, dequantized to fp32 (`gguf.py`; `save_gguf` writes one);
* a **training checkpoint**: a Lightning `.ckpt` file (DDP/CPU runs) or a DeepSpeed ZeRO checkpoint directory
  (Lightning's `last.ckpt/` under a DeepSpeed strategy, or any `engine.save_checkpoint` directory), whose fp32
  partitions are gathered into full tensors with DeepSpeed's own `zero_to_fp32` merge, LoRA adapters merged.
How names, RoPE layout and configs map between the formats is `formats.py`.

Nothing from a file runs code: safetensors hold tensors only, and every torch file, ZeRO shards included, is opened
with torch's restricted unpickler (`weights_only=True`), which builds tensors and plain containers only; the four
record types DeepSpeed pickles into its shards (two loss scalers, the ZeRO stage, parameter fragment addresses) are
read as inert data, never as DeepSpeed's classes. A file holding anything else is refused. For a training checkpoint
you trust (your own run), `trust_pickle` (`convert --trust-pickle`) reads it the same way but unpickles
(`weights_only=False`, as DeepSpeed's own `zero_to_fp32` does): any code a file names runs.

The Lightning callback that writes a run's checkpoints is `step_checkpoints.py`, apart because it needs Lightning,
which loading a model does not.
"""

from __future__ import annotations

import json
import pickle
import re
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from csm_train.formats import (
    config_from_sesame,
    config_from_transformers,
    config_to_sesame,
    config_to_transformers,
    sesame_config_from_shapes,
    state_dict_from_transformers,
    state_dict_to_transformers,
)
from csm_train.lora import LoraConfig, merge_lora_weights
from csm_train.model import CSM, CSMConfig

# -- reading -----------------------------------------------------------------------------------------------


def _load_weights(path: Path) -> dict[str, torch.Tensor]:
    """Weights from a safetensors file, a sharded safetensors index, or a torch file (never unpickled:
    `weights_only=True`)."""
    if path.name.endswith(".safetensors.index.json"):
        shards = sorted(set(json.loads(path.read_text())["weight_map"].values()))
        return {k: v for shard in shards for k, v in _load_weights(path.parent / shard).items()}
    try:
        if path.suffix == ".safetensors":
            return load_file(path)
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        raise ValueError(
            f"{path} holds objects other than tensors ({unpickling_reason(error)}); it is not read, since "
            f"unpickling runs whatever code the file names: get its weights as safetensors"
        ) from None
    except Exception as error:
        raise ValueError(
            f"could not read weights from {path} ({error}); the file is truncated or not a "
            f"safetensors/torch file: copy or download it again"
        ) from error
    return state.get("model", state) if isinstance(state, dict) else state


def _find_weights(directory: Path) -> Path:
    for name in ("model.safetensors", "model.safetensors.index.json", "ckpt.pt"):
        if (directory / name).exists():
            return directory / name
    raise FileNotFoundError(
        f"{directory}: no model.safetensors, model.safetensors.index.json or ckpt.pt; "
        f"point at a checkpoint directory written by save_pretrained (ours or transformers') or Sesame's"
    )


HUB_ID = re.compile(r"[\w-]+/[\w.-]+")  # e.g. sesame/csm-1b: a checkpoint path that is not a local file


def _download(repo_id: str) -> Path:
    """A Hub repository's config and weights (safetensors when it has them, else `ckpt.pt`), cached by the Hub."""
    from huggingface_hub import snapshot_download

    try:
        path = Path(snapshot_download(repo_id, allow_patterns=["*.json", "*.safetensors"]))
        if not any(path.glob("*.safetensors")):
            path = Path(snapshot_download(repo_id, allow_patterns=["*.json", "ckpt.pt"]))
    except Exception as error:
        raise FileNotFoundError(
            f"checkpoint {repo_id} is no local path, and downloading it from the Hugging Face Hub failed "
            f"({type(error).__name__}: {error}); for a gated repository like sesame/csm-1b accept its terms and "
            f"`huggingface-cli login`, or download it and pass the directory"
        ) from error
    return path


def is_training_checkpoint(path: Path) -> bool:
    """A Lightning `.ckpt` file, or a DeepSpeed ZeRO checkpoint directory (`latest` + per-rank states)."""
    return (path.is_file() and path.suffix == ".ckpt") or (path.is_dir() and (path / "latest").exists())


def load_checkpoint(path: str | Path, trust_pickle: bool = False) -> tuple[CSMConfig, dict[str, torch.Tensor]]:
    """(config, state dict with our names) from any supported checkpoint, training checkpoints (ZeRO ones
    consolidated) included. Nothing is unpickled beyond tensors and DeepSpeed's checkpoint records (see the
    module's docstring); `trust_pickle` lets a training checkpoint you trust be read with an unpickling
    `torch.load(weights_only=False)`, as DeepSpeed's own zero_to_fp32 reads."""
    path = Path(path)
    if not path.exists() and HUB_ID.fullmatch(str(path)):
        path = _download(str(path))
    if not path.exists():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    if is_training_checkpoint(path):
        return load_training_checkpoint(path, trust_pickle)
    if path.is_file() and path.suffix == ".gguf":
        from csm_train.gguf import read_gguf  # needs the gguf package, which nothing else here does

        return read_gguf(path)
    directory = path.parent if path.is_file() else path
    state_dict = _load_weights(path if path.is_file() else _find_weights(path))
    config_file = directory / "config.json"
    if not config_file.exists():
        return sesame_config_from_shapes(state_dict, path), state_dict

    meta = json.loads(config_file.read_text())
    if "csm_train" in meta:
        return CSMConfig(**meta["csm_train"]), state_dict
    if "backbone_flavor" in meta:
        return config_from_sesame(meta), state_dict
    if meta.get("model_type") == "csm":
        from transformers import CsmConfig

        config = config_from_transformers(CsmConfig.from_pretrained(directory))
        return config, state_dict_from_transformers(state_dict, config)
    raise ValueError(
        f"{config_file}: not a CSM config (expected our 'csm_train' key, Sesame's 'backbone_flavor', "
        f"or transformers' model_type 'csm')"
    )


def load_initial_weights(model: CSM, path: str) -> None:
    """`model.init_from`: every tensor of the model from the checkpoint, with its shape, or an error that lists
    what does not match and says why."""
    config, weights = load_checkpoint(path)
    own = model.state_dict()
    problems = [f"{k}: missing" for k in sorted(set(own) - set(weights))]
    problems += [f"{k}: not in this model" for k in sorted(set(weights) - set(own))]
    problems += [
        f"{k}: {tuple(v.shape)} in the checkpoint, {tuple(own[k].shape)} here"
        for k, v in weights.items()
        if k in own and v.shape != own[k].shape
    ]
    if problems:
        why = []
        if config.text_vocab_size != model.config.text_vocab_size:
            why.append(
                f"the text vocabularies differ ({config.text_vocab_size} in the checkpoint, "
                f"{model.config.text_vocab_size} from this run's tokenizer): use the checkpoint's tokenizer "
                f"(data.tokenizer=…; Llama-3.2's for sesame/csm-1b)"
            )
        if (config.backbone, config.decoder) != (model.config.backbone, model.config.decoder):
            why.append("the architectures differ: pick the checkpoint's preset (model=…)")
        listed = "; ".join(problems[:6]) + (f"; … {len(problems) - 6} more" if len(problems) > 6 else "")
        raise ValueError(f"model.init_from={path} does not fit this model ({listed}). " + ". ".join(why))
    model.load_state_dict({k: v.to(own[k].dtype) for k, v in weights.items()}, strict=True)


def last_checkpoint(run_dir: Path) -> Path | None:
    """The newest checkpoint of the run. Lightning writes each file atomically (temp file, then move), so a
    run killed mid-save leaves the previous ones intact; a kill between a save and the relinking can leave
    `last.ckpt` dangling or a step behind, so the newest existing file wins. `last.ckpt` is preferred when it
    links the newest: Lightning never deletes the file a run resumed from, so resuming from `step-N.ckpt` would
    keep it past `checkpoint.keep`."""
    checkpoints = [p for p in (run_dir / "checkpoints").glob("*.ckpt") if p.exists()]
    return max(checkpoints, key=lambda p: (p.stat().st_mtime, p.name == "last.ckpt"), default=None)


# -- writing -----------------------------------------------------------------------------------------------


def _weights(model: CSM) -> dict[str, torch.Tensor]:
    return {k: v.detach().contiguous() for k, v in model.state_dict().items()}


def save_checkpoint(model: CSM, directory: str | Path) -> None:
    """Ours: `model.safetensors` (Sesame's names) + `config.json` with the whole `CSMConfig`."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    save_file(_weights(model), directory / "model.safetensors")
    (directory / "config.json").write_text(json.dumps({"csm_train": model.config.to_dict()}, indent=2))


def save_sesame(model: CSM, directory: str | Path, torch_file: bool = False) -> None:
    """Sesame's: `model.safetensors` (or `ckpt.pt`, a plain state dict) + Sesame's `config.json`, as in the
    sesame/csm-1b repository; its generator's `Model.from_pretrained` reads the directory."""
    sesame_config = config_to_sesame(model.config)
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    if torch_file:
        torch.save(_weights(model), directory / "ckpt.pt")
    else:
        save_file(_weights(model), directory / "model.safetensors")
    (directory / "config.json").write_text(json.dumps(sesame_config, indent=2))


def save_transformers(model: CSM, directory: str | Path, codec, token_ids: dict | None = None) -> None:
    """transformers': a `CsmForConditionalGeneration.save_pretrained` directory. That model carries its Mimi
    codec, so one must be given (`codec`: a `MimiModel`); `token_ids` (bos, audio, … : TRANSFORMERS_TOKEN_IDS)
    default to transformers' own, which are Llama-3.2's and need its text vocabulary."""
    from transformers import CsmForConditionalGeneration
    from transformers.initialization import no_init_weights

    hf_config = config_to_transformers(model.config, codec_config=codec.config.to_dict(), **(token_ids or {}))
    too_large = {
        k: getattr(hf_config, k)
        for k in ("bos_token_id", "pad_token_id", "audio_token_id", "audio_eos_token_id")
        if isinstance(getattr(hf_config, k), int) and getattr(hf_config, k) >= model.config.text_vocab_size
    }
    if too_large:
        raise ValueError(
            f"token ids {too_large} are outside this model's text vocabulary ({model.config.text_vocab_size}): "
            f"take them from the transformers CSM the model should work like (convert --like DIR)"
        )
    with no_init_weights():
        hf = CsmForConditionalGeneration(hf_config)
    weights = state_dict_to_transformers(_weights(model), model.config)
    weights |= {f"codec_model.{k}": v for k, v in codec.state_dict().items()}
    hf.load_state_dict(weights, strict=True)
    hf.save_pretrained(directory)


def save_gguf(model: CSM, path: str | Path, qtype: str = "q8_0"):
    """A GGUF file csm.rs serves (`qtype`: f16, q8_0, q4_1; see `gguf.py`), which `load_checkpoint` reads back
    dequantized. Returns the `GGUFReport` (each tensor's type and relative error)."""
    from csm_train.gguf import write_gguf

    return write_gguf(_weights(model), model.config, path, qtype)


# -- training checkpoints ----------------------------------------------------------------------------------

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
            f"convert it once, trusting it explicitly: `python -m csm_train.convert {checkpoint} OUT_DIR --to ours "
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
    UntrustedCheckpointError naming `checkpoint` and how to convert a trusted one."""
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
