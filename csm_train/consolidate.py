"""`python -m csm_train.consolidate CHECKPOINT OUT_DIR`: a training checkpoint → one `model.safetensors`
(+ `config.json`) that `CSM.from_pretrained` and `csm_train.convert` read.

CHECKPOINT is a Lightning `.ckpt` file (DDP/CPU runs) or a DeepSpeed ZeRO checkpoint directory (Lightning's
`last.ckpt/` under a DeepSpeed strategy, or any `engine.save_checkpoint` directory), whose weight shards are
gathered into full fp32 tensors with DeepSpeed's own `zero_to_fp32`. Nothing is unpickled beyond tensors.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from csm_train.lora import LoraConfig, merge_lora_weights
from csm_train.model import CSM, CSMConfig

# Lightning's DeepSpeed strategy wraps the LightningModule (`_forward_module.`), which holds the CSM as `model.`.
WRAPPER_PREFIXES = ("_forward_module.", "model.")


def _strip_prefixes(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    for prefix in WRAPPER_PREFIXES:
        if state_dict and all(k.startswith(prefix) for k in state_dict):
            state_dict = {k[len(prefix) :]: v for k, v in state_dict.items()}
    return state_dict


def _deepspeed_client_state(directory: Path) -> dict:
    tag = (directory / "latest").read_text().strip() if (directory / "latest").exists() else None
    # ZeRO-1/2 write mp_rank_00_model_states.pt, ZeRO-3 one zero_pp_rank_N_mp_rank_00_model_states.pt per rank.
    candidates = sorted((directory / tag if tag else directory).glob("*mp_rank_00_model_states.pt"))
    if not candidates:
        raise FileNotFoundError(f"{directory}: no mp_rank_00_model_states.pt; is this a DeepSpeed checkpoint?")
    return torch.load(candidates[0], map_location="cpu", weights_only=True)


def load_training_checkpoint(path: str | Path) -> tuple[CSMConfig, dict[str, torch.Tensor]]:
    path = Path(path)
    if path.is_dir():
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        state = _deepspeed_client_state(path)
        weights = get_fp32_state_dict_from_zero_checkpoint(str(path))
    elif path.is_file():
        state = torch.load(path, map_location="cpu", weights_only=True)
        weights = state["state_dict"]
    else:
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    if "csm_config" not in state:
        raise ValueError(f"{path}: no 'csm_config' in the checkpoint; was it written by csm_train's trainer?")
    config, weights = CSMConfig(**state["csm_config"]), _strip_prefixes(dict(weights))
    if "lora" in state:
        weights = merge_lora_weights(weights, LoraConfig(**state["lora"]))
    return config, weights


def consolidate(checkpoint: str | Path, out_dir: str | Path) -> CSM:
    config, weights = load_training_checkpoint(checkpoint)
    model = CSM.from_state_dict(config, {k: v.float().contiguous() for k, v in weights.items()})
    model.save_pretrained(out_dir)
    return model


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m csm_train.consolidate", description=__doc__)
    parser.add_argument("checkpoint", help="Lightning .ckpt file or DeepSpeed checkpoint directory")
    parser.add_argument("out_dir", help="directory for model.safetensors and config.json")
    args = parser.parse_args()
    model = consolidate(args.checkpoint, args.out_dir)
    print(f"wrote {args.out_dir}/model.safetensors: {model.num_parameters():,} parameters")


if __name__ == "__main__":
    main()
