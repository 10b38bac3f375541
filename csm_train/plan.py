"""`python -m csm_train +experiment=1b dry_run=true`: what a run costs before you book GPUs.

Memory per GPU = model states + activations. Model states follow the ZeRO paper's accounting for mixed
precision with Adam: 2 bytes of bf16 weights + 2 of bf16 gradients + 12 of fp32 master weights, momentum
and variance = 16 bytes per parameter. ZeRO-1 shards the 12, ZeRO-2 also the gradients, ZeRO-3 also the
weights across the data-parallel GPUs; CPU offload moves the fp32 states (and, at stage 3, weights) to
host memory. Plain DDP in `bf16-mixed` keeps fp32 weights and gradients: 4 + 4 + 8 = 16 bytes, unsharded.

Activations are what autograd keeps per micro-batch: per layer, the bf16 inputs of the norms, attention
projections and SwiGLU (flash attention keeps no T×T scores); with activation checkpointing only each
layer's input is kept and one layer is rebuilt at a time. The estimate is within tens of percent of
measured peaks, which is what choosing a strategy needs; fragmentation and buffers come on top.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from csm_train.model import CSM, CSMConfig, TransformerConfig
from data_pipeline.shards import MIMI_FRAME_RATE

GiB = 2**30


def layer_activation_bytes(cfg: TransformerConfig, tokens: int) -> int:
    """bf16 bytes one layer saves for backward over `tokens` positions: x and norm outputs (4 × dim),
    q, k, v and the attention output (2 × dim + 2 × kv dim), SwiGLU's w1, w3, silu and product (4 × ffn)."""
    kv_dim = cfg.num_kv_heads * cfg.head_dim
    return 2 * tokens * (6 * cfg.dim + 2 * kv_dim + 4 * cfg.ffn_dim)


def activation_bytes(config: CSMConfig, rows: int, seq_len: int, decoder_fraction: float, checkpointing: bool) -> int:
    def stack(cfg: TransformerConfig, tokens: int) -> int:
        if checkpointing:  # each layer's input, plus one layer rebuilt during backward
            return cfg.num_layers * 2 * tokens * cfg.dim + layer_activation_bytes(cfg, tokens)
        return cfg.num_layers * layer_activation_bytes(cfg, tokens)

    frames = rows * seq_len
    decoder_positions = int(frames * decoder_fraction) * config.num_codebooks
    logits = 4 * 2 * (frames + decoder_positions) * config.audio_vocab_size  # fp32 logits + their gradient
    return stack(config.backbone, frames) + stack(config.decoder, decoder_positions) + logits


@dataclass
class StrategyMemory:
    name: str
    states_gib: float
    activations_gib: float

    @property
    def total_gib(self) -> float:
        return self.states_gib + self.activations_gib


def model_state_bytes(params: int, strategy: str, gpus: int) -> float:
    """Weights + gradients + optimizer states per GPU (see module doc)."""
    return {
        "ddp (bf16-mixed)": 16 * params,
        "deepspeed_z1": 2 * params + 2 * params + 12 * params / gpus,
        "deepspeed_z2": 2 * params + (2 + 12) * params / gpus,
        "deepspeed_z3": 16 * params / gpus,
        "deepspeed_z3_offload": 0.0,  # states and weights live in host memory; GPU holds working copies
    }[strategy]


def plan(config: CSMConfig, gpus: int, rows: int, seq_len: int, accumulate: int, decoder_fraction: float) -> dict:
    with torch.device("meta"):
        params = CSM(config).num_parameters()
    frames_per_step = gpus * rows * seq_len * accumulate
    activations = activation_bytes(config, rows, seq_len, decoder_fraction, config.activation_checkpointing)
    strategies = [
        StrategyMemory(name, model_state_bytes(params, name, gpus) / GiB, activations / GiB)
        for name in ("ddp (bf16-mixed)", "deepspeed_z1", "deepspeed_z2", "deepspeed_z3", "deepspeed_z3_offload")
    ]
    return {
        "parameters": params,
        "frames_per_step": frames_per_step,
        "max_audio_seconds_per_step": frames_per_step / MIMI_FRAME_RATE,
        "strategies": strategies,
    }


def format_plan(p: dict, gpus: int) -> str:
    lines = [
        f"parameters            {p['parameters']:,}",
        f"frames per step       {p['frames_per_step']:,} (≤ {p['max_audio_seconds_per_step'] / 3600:.2f} h of audio)",
        f"memory per GPU on {gpus} GPU(s), bf16:",
        f"  {'strategy':<22} {'states':>8} {'activations':>12} {'total':>8}",
    ]
    for s in p["strategies"]:
        lines.append(f"  {s.name:<22} {s.states_gib:7.1f}G {s.activations_gib:11.1f}G {s.total_gib:7.1f}G")
    return "\n".join(lines)
