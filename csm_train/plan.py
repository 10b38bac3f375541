"""What a run costs before you book GPUs (`python -m csm_train +experiment=1b dry_run=true`): memory per GPU
per strategy, and the FLOP accounting behind the MFU the trainer logs.

**Model states** follow the ZeRO paper's accounting for mixed precision with Adam. Under `bf16-mixed` the
optimizer state and the master weights stay fp32 whatever the strategy: AdamW's momentum and variance (4 + 4
bytes per parameter) and fp32 weights (4), which the optimizer updates; bf16 is only the compute copy.
- DDP (`bf16-mixed`, Lightning's `MixedPrecision`): fp32 weights + fp32 gradients + fp32 momentum/variance =
  16 bytes per parameter, unsharded. On top (the "buffers" column): DDP's gradient buckets, a second
  gradient-sized fp32 copy (Lightning leaves `gradient_as_bucket_view=False`, so its 25 MiB buckets together
  cover every trainable parameter once more), and autocast's bf16 copies of every matmul weight (2 bytes per
  non-embedding parameter): autocast casts each weight once per forward, and autograd keeps the cast for
  backward.
- DeepSpeed ZeRO (`bf16-mixed` turns DeepSpeed's bf16 mode on: the module itself is bf16, no autocast):
  2 bytes of bf16 weights + 2 of bf16 gradients + 12 of fp32 master weights, momentum and variance = 16.
  ZeRO-1 shards the 12, ZeRO-2 also the gradients, ZeRO-3 also the weights across the data-parallel GPUs;
  CPU offload moves the fp32 states (and, at stage 3, weights) to host memory. Buffers: the reduce buckets
  (`reduce_bucket_size` 2e8 elements, double-buffered under `overlap_comm`), at stage 3 DeepSpeed's prefetch
  bucket (5e7 elements), and what fp32 gradient accumulation (`data_types.grad_accum_dtype: fp32` in
  conf/trainer/deepspeed_z1.yaml) adds to the paper's bf16 gradients: at stage 1 DeepSpeed's BF16_Optimizer
  keeps a full fp32 gradient buffer (+4 bytes per parameter), at stages 2 and 3 the gradient partitions are fp32
  (+2 bytes per parameter / GPUs).

**Activations** are what autograd keeps per micro-batch, modelled tensor by tensor from what this model's
modules save (`saved_activation_bytes`; tests/test_plan.py measures it with `saved_tensors_hooks`):
- under autocast the backbone's residual stream is fp32 (embeddings are not autocast, and bf16 + fp32
  adds promote), so each RMSNorm keeps its fp32 input and fp32 normalised output; the depth decoder's stream
  is bf16 (its input is the bf16 output of `projection`), so its norms keep an fp32 copy and a bf16 output;
- autocast casts a linear layer's input once per call: q, k, v, w1 and w3 each keep their own bf16 copy of
  the same normalised input, output_proj and w2 keep their bf16 inputs;
- attention keeps q, k, v, its output and the fp32 log-sum-exp (flash/efficient kernels: no T×T scores);
  RoPE keeps only the complex rotation (its fp32 intermediates are not saved);
- SwiGLU keeps w1's and w3's outputs and silu's (and w2 the product): 4 × ffn bf16 values per position;
- the loss keeps the fp32 log-softmax of the c0 logits (every position) and of the decoder logits (the
  sampled frames × (K-1) codebooks).
With bf16 weights (DeepSpeed) there are no cast copies (q/k/v share one input, w1/w3 another) and every
stream is bf16. With activation checkpointing each layer keeps only its input, and backward rebuilds one
layer at a time. Backward adds the logits' gradients; allocator fragmentation and CUDA workspaces come on
top (bench/gpu_check.sh compares the total with `torch.cuda.max_memory_allocated`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from csm_train.model import CSM, CSMConfig, TransformerConfig
from data_pipeline.shards import MIMI_FRAME_RATE

GiB = 2**30
STRATEGIES = ("ddp (bf16-mixed)", "deepspeed_z1", "deepspeed_z2", "deepspeed_z3", "deepspeed_z3_offload")
# Lightning's DeepSpeedStrategy defaults (elements) and DeepSpeed's ZeRO-3 prefetch bucket.
REDUCE_BUCKET = 200_000_000
PREFETCH_BUCKET = 50_000_000


# --------------------------------------------------------------------------------------------------------
# Activations


def layer_saved_bytes(cfg: TransformerConfig, tokens: int, residual_bytes: int, autocast: bool) -> int:
    """Bytes one transformer layer keeps for backward over `tokens` positions (see the module doc).

    `residual_bytes`: 4 where the residual stream is fp32 (the backbone under autocast), else 2. Per position:
    two RMSNorms keep their fp32 input and their output in the stream's dtype, 2·(4 + r)·dim; the linear
    layers' bf16 inputs, 2·dim each: under autocast five separate casts (q, k, v, w1, w3) + output_proj's,
    else one per norm + output_proj's; attention keeps q and its output (2·2·dim), k and v (2·2·kv_dim) and
    the fp32 log-sum-exp per head; SwiGLU keeps four ffn-wide bf16 tensors."""
    kv_dim = cfg.num_kv_heads * cfg.head_dim
    norms = 2 * (4 + residual_bytes) * cfg.dim
    linear_inputs = (6 if autocast else 3) * 2 * cfg.dim
    attention = 2 * 2 * cfg.dim + 2 * 2 * kv_dim + 4 * cfg.num_heads
    mlp = 4 * 2 * cfg.ffn_dim
    return tokens * (norms + linear_inputs + attention + mlp)


def _decoder_frames(frames: int, decoder_fraction: float) -> int:
    # csm_loss trains the decoder on ceil(fraction × audio target frames); the plan takes every frame as audio.
    return math.ceil(frames * decoder_fraction)


def saved_activation_bytes(
    config: CSMConfig,
    rows: int,
    seq_len: int,
    decoder_fraction: float,
    checkpointing: bool,
    autocast: bool = True,
    decoder_frames: int | None = None,
) -> int:
    """What autograd keeps after the forward of one micro-batch of `rows × seq_len` frames (tensors whose
    storage is a parameter are not counted; autocast's weight copies are, see `autocast_weight_bytes`).
    `autocast`: fp32 weights under bf16 autocast (DDP's bf16-mixed); False: the weights themselves are bf16
    (DeepSpeed). `decoder_frames`: how many frames the depth decoder runs on (default
    ⌈decoder_fraction × frames⌉)."""
    K, V = config.num_codebooks, config.audio_vocab_size
    b, d = config.backbone, config.decoder
    frames = rows * seq_len
    n = _decoder_frames(frames, decoder_fraction) if decoder_frames is None else decoder_frames
    positions = n * K  # the depth decoder's sequence: [h, c0 … c(K-2)] per chosen frame
    backbone_residual = 4 if autocast else 2

    def stack(cfg: TransformerConfig, tokens: int, residual: int) -> int:
        if checkpointing:  # only each layer's input; the rebuilt layer is counted in activation_bytes
            return cfg.num_layers * residual * tokens * cfg.dim
        return cfg.num_layers * layer_saved_bytes(cfg, tokens, residual, autocast)

    embeddings = frames * K * (8 + 4)  # embedding_bag's codebook ids (int64) and per-code weights (fp32)
    backbone = stack(b, frames, backbone_residual) + frames * (4 + backbone_residual) * b.dim  # + final norm
    c0_head = frames * 2 * b.dim + frames * 4 * V  # the head's bf16 input; the loss's fp32 log-softmax
    decoder_in = positions * 2 * b.dim + n * (K - 1) * 8  # projection's bf16 input; code ids
    decoder = stack(d, positions, 2) + positions * (4 + 2) * d.dim  # + final norm
    heads = positions * 2 * d.dim + n * (K - 1) * 4 * V  # audio_head's bf16 input; fp32 log-softmax
    return embeddings + backbone + c0_head + decoder_in + decoder + heads


def activation_bytes(
    config: CSMConfig,
    rows: int,
    seq_len: int,
    decoder_fraction: float,
    checkpointing: bool,
    autocast: bool = True,
) -> int:
    """Activation memory at the start of backward, its peak: what the forward kept, the gradients of the
    logits (fp32 for the log-softmax, then bf16 for the heads), and with checkpointing the layer being
    rebuilt (the larger of a backbone and a decoder layer)."""
    K, V = config.num_codebooks, config.audio_vocab_size
    frames = rows * seq_len
    n = _decoder_frames(frames, decoder_fraction)
    saved = saved_activation_bytes(config, rows, seq_len, decoder_fraction, checkpointing, autocast)
    logit_grads = (4 + 2) * (frames + n * (K - 1)) * V
    rebuilt = 0
    if checkpointing:
        residual = 4 if autocast else 2
        rebuilt = max(
            layer_saved_bytes(config.backbone, frames, residual, autocast),
            layer_saved_bytes(config.decoder, n * K, 2, autocast),
        )
    return saved + logit_grads + rebuilt


def matmul_parameters(config: CSMConfig, outside_layers: bool = False) -> int:
    """Parameters that go through a matmul: every weight but the embedding tables and the norms' scales
    (`outside_layers`: only those outside the transformer layers, i.e. the heads and `projection`)."""
    with torch.device("meta"):
        model = CSM(config)
    return sum(
        p.numel()
        for name, p in model.named_parameters()
        if "embeddings" not in name
        and not name.endswith(".scale")
        and not (outside_layers and name.startswith(("backbone.", "decoder.")))
    )


def autocast_weight_bytes(config: CSMConfig, checkpointing: bool = False) -> int:
    """autocast's bf16 copies of the matmul weights (bf16-mixed only). Autocast caches one cast per weight
    until the forward ends, and autograd keeps it for backward; inside checkpointed layers backward
    recasts instead, so with `checkpointing` only the copies of the weights outside the layers are kept."""
    return 2 * matmul_parameters(config, outside_layers=checkpointing)


# --------------------------------------------------------------------------------------------------------
# Model states and strategy buffers


def model_state_bytes(params: int, strategy: str, gpus: int) -> float:
    """Weights + gradients + optimizer states per GPU (see module doc); fp32 master weights and AdamW states
    under every bf16-mixed strategy."""
    return {
        "ddp (bf16-mixed)": 16 * params,
        "deepspeed_z1": 2 * params + 2 * params + 12 * params / gpus,
        "deepspeed_z2": 2 * params + (2 + 12) * params / gpus,
        "deepspeed_z3": 16 * params / gpus,
        "deepspeed_z3_offload": 0.0,  # states and weights live in host memory; GPU holds working copies
    }[strategy]


def buffer_bytes(config: CSMConfig, params: int, strategy: str, gpus: int) -> float:
    """Per-GPU memory a strategy adds beyond states and activations (see module doc)."""
    if strategy == "ddp (bf16-mixed)":
        return 4 * params + autocast_weight_bytes(config)  # gradient buckets + autocast's weight copies
    buckets = 2 * 2 * min(REDUCE_BUCKET, params)  # bf16, double-buffered (overlap_comm)
    if strategy.startswith("deepspeed_z3"):
        buckets += 2 * min(PREFETCH_BUCKET, params)
    # fp32 gradient accumulation on top of the paper's bf16 gradients (offload keeps them in host memory)
    fp32_grads = {"deepspeed_z1": 4 * params, "deepspeed_z2": 2 * params / gpus, "deepspeed_z3": 2 * params / gpus}
    return buckets + fp32_grads.get(strategy, 0.0)


@dataclass
class StrategyMemory:
    name: str
    states_gib: float
    buffers_gib: float
    activations_gib: float

    @property
    def total_gib(self) -> float:
        return self.states_gib + self.buffers_gib + self.activations_gib


def plan(config: CSMConfig, gpus: int, rows: int, seq_len: int, accumulate: int, decoder_fraction: float) -> dict:
    with torch.device("meta"):
        params = CSM(config).num_parameters()
    frames_per_step = gpus * rows * seq_len * accumulate
    strategies = []
    for name in STRATEGIES:
        autocast = name.startswith("ddp")  # DeepSpeed's bf16 mode makes the module bf16 instead
        activations = activation_bytes(
            config, rows, seq_len, decoder_fraction, config.activation_checkpointing, autocast=autocast
        )
        strategies.append(
            StrategyMemory(
                name,
                model_state_bytes(params, name, gpus) / GiB,
                buffer_bytes(config, params, name, gpus) / GiB,
                activations / GiB,
            )
        )
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
        f"memory per GPU on {gpus} GPU(s), bf16-mixed (fp32 master weights and AdamW states):",
        f"  {'strategy':<22} {'states':>8} {'buffers':>8} {'activations':>12} {'total':>8}",
    ]
    for s in p["strategies"]:
        lines.append(
            f"  {s.name:<22} {s.states_gib:7.1f}G {s.buffers_gib:7.1f}G {s.activations_gib:11.1f}G {s.total_gib:7.1f}G"
        )
    lines.append("  (+ allocator fragmentation and CUDA workspaces, typically a few GiB)")
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------------------
# FLOPs (MFU)


def _layers_forward_flops(cfg: TransformerConfig, context: float) -> float:
    """Forward FLOPs per position of a stack: 2 per multiply-add of the q/k/v/o and SwiGLU matmuls, plus
    attention's scores and weighted values, 2·2·dim·context with `context` the mean number of keys a query
    sees (PaLM's appendix B accounting)."""
    attn = cfg.dim * cfg.head_dim * (2 * cfg.num_heads + 2 * cfg.num_kv_heads)
    mlp = 3 * cfg.dim * cfg.ffn_dim
    return cfg.num_layers * (2 * (attn + mlp) + 2 * 2 * cfg.dim * context)


def backbone_flops_per_frame(config: CSMConfig, seq_len: int) -> float:
    """Forward FLOPs of one frame through the backbone and the c0 head. Causal attention over rows of
    `seq_len` frames: on average seq_len/2 keys (charged at the row length even where packed conversations
    are masked from each other, as PaLM and torchtitan do). Embedding lookups are not FLOPs."""
    b = config.backbone
    return _layers_forward_flops(b, seq_len / 2) + 2 * b.dim * config.audio_vocab_size


def decoder_flops_per_frame(config: CSMConfig) -> float:
    """Forward FLOPs of the depth decoder on one frame: K positions (projection + layers, causal over K),
    then K-1 codebook heads."""
    b, d, K, V = config.backbone, config.decoder, config.num_codebooks, config.audio_vocab_size
    return K * (2 * b.dim * d.dim + _layers_forward_flops(d, K / 2)) + (K - 1) * 2 * d.dim * V


def train_step_flops(config: CSMConfig, frames: int, decoder_frames: int, seq_len: int) -> float:
    """Model FLOPs of one training step (forward + backward = 3 × forward): the backbone on every
    non-padding frame, the depth decoder only on the `decoder_frames` it really runs (⌈decoder_fraction ×
    audio target frames⌉, `decoder_frames_run`). Recomputation from activation checkpointing is not
    counted: this is MFU, not hardware FLOPs utilisation."""
    return 3 * (frames * backbone_flops_per_frame(config, seq_len) + decoder_frames * decoder_flops_per_frame(config))


def train_flops_per_frame(config: CSMConfig, seq_len: int, decoder_fraction: float, audio_share: float = 1.0) -> float:
    """`train_step_flops` per frame when `audio_share` of the frames are audio targets: for planning; the
    trainer and bench/bench_train.py count a batch's frames with `train_step_flops`."""
    return 3 * (
        backbone_flops_per_frame(config, seq_len) + decoder_fraction * audio_share * decoder_flops_per_frame(config)
    )


def decoder_frames_run(labels: torch.Tensor, decoder_fraction: float) -> int:
    """How many frames of a batch the depth decoder trains on: ⌈fraction × N⌉ of its N audio target frames
    (frame 0 of a row has no previous state to predict it from), as `loss.select_decoder_frames` draws."""
    targets = labels[:, 1:, 0] != -100
    return math.ceil(decoder_fraction * int(targets.sum()))


# Dense (not 2:4-sparse) bf16 tensor-core peaks from NVIDIA's datasheets, which print the sparse figure: half of
# it. A PCIe or NVL card is not an SXM one: lower clocks and power, a lower peak.
GPU_PEAK_BF16_FLOPS = {
    "H100 SXM": 989e12,  # torch reports "NVIDIA H100 80GB HBM3"
    "H100 NVL": 835e12,
    "H100 PCIe": 756e12,
    "H200 SXM": 989e12,  # "NVIDIA H200"
    "H200 NVL": 835e12,
    "GH200": 989e12,  # the Grace Hopper superchip's H100/H200 die at SXM clocks
    "A100": 312e12,  # SXM4 and PCIe alike
}


def gpu_model(device_name: str) -> str | None:
    """Which row of `GPU_PEAK_BF16_FLOPS` a `torch.cuda.get_device_name()` is, or None where the name does not
    say (a MIG slice, an "H100" without its form factor, any other GPU): better no MFU than a wrong one."""
    name = device_name.upper()
    if "MIG" in name:
        return None
    if "GH200" in name:
        return "GH200"
    if "H200" in name:
        return "H200 NVL" if "NVL" in name else "H200 SXM"
    if "H100" in name:
        if "NVL" in name:
            return "H100 NVL"
        if "PCIE" in name:
            return "H100 PCIe"
        if "SXM" in name or "HBM3" in name:
            return "H100 SXM"
        return None
    if "A100" in name:
        return "A100"
    return None


def gpu_peak_bf16_flops(device_name: str) -> float | None:
    model = gpu_model(device_name)
    return GPU_PEAK_BF16_FLOPS[model] if model else None
