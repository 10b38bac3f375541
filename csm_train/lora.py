"""LoRA adapters on the backbone's and depth decoder's linear layers, through `peft`.

`model.lora.rank > 0` injects a low-rank update `W + (alpha / rank) · B A` beside each targeted weight and
trains only A and B (the rest of the model is frozen). Checkpoints then hold peft's names
(`…q_proj.base_layer.weight`, `…q_proj.lora_A.default.weight`, …) plus `checkpoint["lora"]`; every export path
(`csm_train.convert`, `CSM.from_pretrained`, evaluation) merges them into plain weights with `merge_lora_weights`, so
what leaves training is an ordinary CSM in any format.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field

import torch

LINEARS = ("q_proj", "k_proj", "v_proj", "output_proj", "w1", "w2", "w3")


@dataclass
class LoraConfig:
    rank: int = 0  # 0: no adapters
    alpha: float = 16.0
    dropout: float = 0.0
    targets: list[str] = field(default_factory=lambda: list(LINEARS))  # of LINEARS
    parts: list[str] = field(default_factory=lambda: ["backbone", "decoder"])

    @property
    def scaling(self) -> float:
        return self.alpha / self.rank

    def pattern(self) -> str:
        """peft's target_modules as a regex on module names, e.g. backbone.layers.3.attn.q_proj."""
        unknown = (set(self.targets) - set(LINEARS)) | (set(self.parts) - {"backbone", "decoder"})
        if unknown:
            raise ValueError(
                f"model.lora: unknown {sorted(unknown)}; targets are {list(LINEARS)}, parts backbone and decoder"
            )
        return rf"({'|'.join(self.parts)})\.layers\.\d+\.(attn|mlp)\.({'|'.join(self.targets)})"

    def to_dict(self) -> dict:
        return asdict(self)


def apply_lora(model: torch.nn.Module, config: LoraConfig) -> None:
    """Freeze `model` and add trainable adapters (in place)."""
    import peft

    for param in model.parameters():
        param.requires_grad_(False)
    peft_config = peft.LoraConfig(
        r=config.rank, lora_alpha=config.alpha, lora_dropout=config.dropout, target_modules=config.pattern()
    )
    peft.inject_adapter_in_model(peft_config, model)


def merge_lora_weights(state_dict: dict[str, torch.Tensor], config: LoraConfig) -> dict[str, torch.Tensor]:
    """peft's names → plain weights: `W + scaling · B A` for each adapted layer (what peft's merge computes)."""
    merged = {}
    for name, tensor in state_dict.items():
        match = re.fullmatch(r"(.*)\.base_layer\.(weight|bias)", name)
        if match is None:
            if ".lora_" not in name:
                merged[name] = tensor
            continue
        prefix, kind = match.groups()
        if kind == "weight":
            a, b = state_dict[f"{prefix}.lora_A.default.weight"], state_dict[f"{prefix}.lora_B.default.weight"]
            tensor = (tensor.float() + config.scaling * (b.float() @ a.float())).to(tensor.dtype)
        merged[f"{prefix}.{kind}"] = tensor
    return merged
