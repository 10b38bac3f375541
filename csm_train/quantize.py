"""Weight-only int8 / int4 quantization for CPU inference: `CSM.from_pretrained(path, quantize="int8")`.

Every `nn.Linear` inside the backbone's and the depth decoder's layers (attention q/k/v/output_proj, MLP
w1/w2/w3) becomes a `QuantizedLinear` that multiplies through PyTorch's packed CPU kernels:

* **int8**: symmetric per output channel, `w ≈ q · s` with q in [-127, 127] → `torch._weight_int8pack_mm`;
* **int4**: asymmetric per group of `group_size` input columns, `w ≈ (q - 8) · s + z` with q in [0, 15]
  (PyTorch's/torchao's layout) → `torch._weight_int4pack_mm_for_cpu` on the tile-packed weight of
  `torch._convert_weight_to_int4pack_for_cpu`.

Both kernels read the int weights directly (no dequantized copy) and take **bf16** activations: x is cast to
bf16 for the matmul and the result back to the model's dtype. Given fp32 activations the same kernels run
2-4x *slower* than an fp32 matmul; given bf16 they are memory-bound reads of 1 or 0.5 byte per weight
(bench/RESULTS.md, issue 17). Scales (and int4 zeros) are stored in bf16, as the kernels take them, and the
weights are rounded against those bf16 values, so the stored scale is the one the rounding used.

Left in the model's precision, by measurement: token embeddings (lookups, no matmul), `projection`,
`codebook0_head` and `audio_head` (the heads decide every sampled code, so an error there is not averaged
away; at 1b `projection` and the audio heads are 0.53 GB of a frame's reads, 11 % of an int8 frame's, yet
quantizing them to int8 measured +6 % decoding speed for int4 and nothing for int8: bench/RESULTS.md), norms.

Quantized models are for inference only: the layers hold no parameters and have no backward, a model in
training mode refuses to run them, and `save_pretrained` refuses to write them (save the unquantized model
and quantize when loading). The kernels are CPU kernels.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

MODES = ("int8", "int4")
DEFAULT_GROUP_SIZE = 32  # int4: input columns per scale/zero pair (32, 64, 128, 256)
INNER_K_TILES = 1  # int4 packing parameter of the CPU kernel (it ignores all but the layout)


CLIP_RATIOS = torch.linspace(1.0, 0.5, 11).tolist()  # int4: fractions of a group's range tried as its range


def _best_clip(w: torch.Tensor, quantize_dequantize, rows: int = 512) -> torch.Tensor:
    """Per block (last dim of `w`), the ratio of `CLIP_RATIOS` whose quantize-dequantize round trip has the least
    squared error: clipping a Gaussian block's rare extremes buys finer steps for the rest (as AWQ/GPTQ's clip
    search). `quantize_dequantize(w, ratio [..., 1])` returns the round trip. Searched `rows` rows at a time, so
    its passes over the weight stay in cache (2x faster over a 1b model; the same result)."""
    if len(w) > rows:
        return torch.cat([_best_clip(chunk, quantize_dequantize, rows) for chunk in w.split(rows)])
    best_err = torch.full(w.shape[:-1], float("inf"))
    best = torch.ones(w.shape[:-1])
    for ratio in CLIP_RATIOS:
        r = torch.full((*w.shape[:-1], 1), ratio)
        err = (quantize_dequantize(w, r) - w).pow(2).sum(-1)
        better = err < best_err
        best_err, best = torch.where(better, err, best_err), torch.where(better, ratio, best)
    return best[..., None]


def quantize_int8(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """`weight [N, K]` → (`q [N, K]` int8, `scales [N]` bf16) with `weight ≈ q * scales[:, None]`. Each row's
    scale spans its whole range: int4's clip search never chose less for int8 rows, Gaussian or heavy-tailed, and
    took 7x as long (bench/RESULTS.md)."""
    w = weight.detach().float()
    scales = (w.abs().amax(dim=-1, keepdim=True) / 127).clamp(min=1e-10).to(torch.bfloat16).float()
    q = (w / scales).round().clamp(-127, 127)
    return q.to(torch.int8), scales[:, 0].to(torch.bfloat16)


def _int4_params(w: torch.Tensor, ratio) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    lo, hi = w.amin(dim=-1, keepdim=True), w.amax(dim=-1, keepdim=True)
    mid, half = (hi + lo) / 2, (hi - lo) / 2 * ratio
    scales = (2 * half / 15).clamp(min=1e-10).to(torch.bfloat16).float()
    zeros = (mid - half + 8 * scales).to(torch.bfloat16).float()
    return ((w - zeros) / scales + 8).round().clamp(0, 15), scales, zeros


def int4_round_trip(w: torch.Tensor, ratio) -> torch.Tensor:
    """Groups `w [..., group_size]` quantized to int4 over `ratio` of their range and back (the clip search's)."""
    q, scales, zeros = _int4_params(w, ratio)
    return (q - 8) * scales + zeros


def quantize_int4(weight: torch.Tensor, group_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """`weight [N, K]` → (`q [N, K]` int32 in 0..15, `scales_and_zeros [K/group_size, N, 2]` bf16) with
    `weight[n, k] ≈ (q[n, k] - 8) * s[k//g, n] + z[k//g, n]` (the layout of `_weight_int4pack_mm_for_cpu`)."""
    N, K = weight.shape
    if K % group_size:
        raise ValueError(f"int4 group_size={group_size} does not divide the {K} input features of a linear layer")
    w = weight.detach().float().reshape(N, K // group_size, group_size)
    q, scales, zeros = _int4_params(w, _best_clip(w, int4_round_trip))
    scales_and_zeros = torch.stack([scales[..., 0], zeros[..., 0]], dim=-1).transpose(0, 1).contiguous()
    return q.to(torch.int32).reshape(N, K), scales_and_zeros.to(torch.bfloat16)


def dequantize_int4(q: torch.Tensor, scales_and_zeros: torch.Tensor) -> torch.Tensor:
    """The fp32 weight `[N, K]` that `quantize_int4`'s output stands for (the reference for tests)."""
    N, K = q.shape
    groups = scales_and_zeros.shape[0]
    s, z = scales_and_zeros.float().transpose(0, 1).unbind(-1)  # [N, groups]
    return ((q.float().reshape(N, groups, -1) - 8) * s[..., None] + z[..., None]).reshape(N, K)


class QuantizedLinear(nn.Module):
    """A bias-free `nn.Linear` with int8 (per channel) or int4 (grouped) weights, inference only."""

    def __init__(self, in_features: int, out_features: int, mode: str, group_size: int = DEFAULT_GROUP_SIZE):
        super().__init__()
        if mode not in MODES:
            raise ValueError(f"quantize={mode!r}: choose one of {MODES}")
        self.in_features, self.out_features, self.mode, self.group_size = in_features, out_features, mode, group_size
        N, K = out_features, in_features
        if mode == "int8":
            self.register_buffer("weight_q", torch.zeros(N, K, dtype=torch.int8))
            self.register_buffer("scales", torch.zeros(N, dtype=torch.bfloat16))
        else:
            packed = torch._convert_weight_to_int4pack_for_cpu(torch.zeros(N, K, dtype=torch.int32), INNER_K_TILES)
            self.register_buffer("weight_q", packed)  # uint8 [N, K/2]
            self.register_buffer("scales", torch.zeros(K // group_size, N, 2, dtype=torch.bfloat16))

    @classmethod
    def from_linear(cls, linear: nn.Linear, mode: str, group_size: int = DEFAULT_GROUP_SIZE) -> QuantizedLinear:
        if linear.bias is not None:
            raise ValueError("QuantizedLinear has no bias; CSM's linear layers have none")
        if linear.weight.device.type != "cpu":
            raise ValueError(f"quantized kernels are CPU kernels; this layer is on {linear.weight.device}")
        module = cls(linear.in_features, linear.out_features, mode, group_size)
        if mode == "int8":
            module.weight_q, module.scales = quantize_int8(linear.weight)
        else:
            q, module.scales = quantize_int4(linear.weight, group_size)
            module.weight_q = torch._convert_weight_to_int4pack_for_cpu(q, INNER_K_TILES)
        return module

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training or (torch.is_grad_enabled() and x.requires_grad):
            raise RuntimeError(
                "this model is quantized (csm_train.quantize), for inference only: call .eval() and run under "
                "torch.inference_mode(); to train or fine-tune, load it without quantize"
            )
        shape = x.shape
        x2 = x.reshape(-1, self.in_features).to(torch.bfloat16)
        if self.mode == "int8":
            y = torch._weight_int8pack_mm(x2, self.weight_q, self.scales)
        else:
            y = torch._weight_int4pack_mm_for_cpu(x2, self.weight_q, self.group_size, self.scales)
        return y.reshape(*shape[:-1], self.out_features).to(x.dtype)

    def _apply(self, fn, recurse=True):
        # `.float()` / `.to(dtype)` on the model must not convert the scales: the kernels take bf16 ones.
        super()._apply(fn, recurse)
        self.scales = self.scales.to(torch.bfloat16)
        return self

    def extra_repr(self) -> str:
        group = f", group_size={self.group_size}" if self.mode == "int4" else ""
        return f"in_features={self.in_features}, out_features={self.out_features}, {self.mode}{group}"


def quantize(model: nn.Module, mode: str, group_size: int = DEFAULT_GROUP_SIZE) -> nn.Module:
    """Replace, in place, every `nn.Linear` of `model.backbone` and `model.decoder` (a `CSM`) by a
    `QuantizedLinear`; the model is put in eval mode and its remaining parameters frozen. Returns the model."""
    if mode not in MODES:
        raise ValueError(f"quantize={mode!r}: choose one of {MODES} (or None for none)")
    for transformer in (model.backbone, model.decoder):
        for name, module in list(transformer.named_modules()):
            if isinstance(module, nn.Linear):
                parent_name, _, attr = name.rpartition(".")
                parent = transformer.get_submodule(parent_name) if parent_name else transformer
                setattr(parent, attr, QuantizedLinear.from_linear(module, mode, group_size))
    model.eval().requires_grad_(False)
    return model


def is_quantized(model: nn.Module) -> bool:
    return any(isinstance(m, QuantizedLinear) for m in model.modules())


def reference_linear(module: QuantizedLinear, x: torch.Tensor, q: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """`module(x)` computed the slow way, fp32, from the unpacked quantized values (for tests)."""
    if module.mode == "int8":
        return F.linear(x.float(), q.float() * scales.float()[:, None])
    return F.linear(x.float(), dequantize_int4(q, scales))
