"""The matrix-vector kernels a decoded frame spends its time in, side by side on one frame's linear layers.

One frame at batch 1 runs every linear layer of the backbone once and the depth decoder's layers once per
codebook (32 times), each on one row of activations. This bench runs exactly that sequence of shapes (the
backbone's layers all distinct, so their weights stream from memory as in decoding; the decoder's re-read 32
times, as in decoding) through each contender and prints the time per frame, the ratio to fp32 and the weight
bytes read per second:

* `fp32`, `bf16`: `F.linear` with weights and activations in that precision (oneDNN);
* `int8`: `torch._weight_int8pack_mm`, int8 per-channel weights, bf16 activations (csm_train/quantize.py's int8);
* `int8-fp32x`: the same kernel given fp32 activations (why QuantizedLinear casts to bf16);
* `int4`: `torch._weight_int4pack_mm_for_cpu`, groups of 32, bf16 activations (csm_train/quantize.py's int4);
* `int8-inductor`: `torch.compile` of the plain dequantize-and-reduce expression on int8 weights (the kernel
  inductor writes itself);
* `w8a8`: `torch.ao`'s dynamically quantized linear (fbgemm): int8 weights *and* activations quantized per call.
  Not weight-only (activation outliers cost quality) and a deprecated API: shown as the ceiling of int8 math here.

Weights are random (speed does not depend on their values). Rounds alternate the contenders; the best is kept.

    python bench/bench_kernels.py --preset 1b --threads 2
    python bench/bench_kernels.py --preset 100m --threads 1 --contenders fp32,int8,int4
"""

from __future__ import annotations

import argparse
import time
import warnings
from collections.abc import Callable

import torch
import torch.nn.functional as F

from csm_train import CSMConfig
from csm_train.model import TransformerConfig
from csm_train.quantize import DEFAULT_GROUP_SIZE, INNER_K_TILES

CONTENDERS = ("fp32", "bf16", "int8", "int8-fp32x", "int4", "int8-inductor", "w8a8")


def layer_shapes(config: TransformerConfig) -> list[tuple[int, int]]:
    """`(out, in)` of one transformer layer's linear layers: q, k, v, output_proj, w1, w3, w2."""
    D, kv = config.dim, config.num_kv_heads * config.head_dim
    return [(D, D), (kv, D), (kv, D), (D, D), (config.ffn_dim, D), (config.ffn_dim, D), (D, config.ffn_dim)]


def frame_layers(config: CSMConfig, codebooks: int) -> tuple[list[tuple[int, int]], list[int]]:
    """The distinct weights of a frame (backbone's then decoder's) and the order a frame reads them in."""
    backbone = [s for _ in range(config.backbone.num_layers) for s in layer_shapes(config.backbone)]
    decoder = [s for _ in range(config.decoder.num_layers) for s in layer_shapes(config.decoder)]
    order = list(range(len(backbone))) + [len(backbone) + i for _ in range(codebooks) for i in range(len(decoder))]
    return backbone + decoder, order


def kernels(name: str, shapes: list[tuple[int, int]], generator: torch.Generator) -> tuple[list[Callable], list[int]]:
    """One callable per weight, `f(x [1, in] fp32) → [1, out]`, and the bytes each weight holds."""
    calls, nbytes = [], []

    def rand_int(low, high, shape):
        return torch.randint(low, high, shape, generator=generator)

    for N, K in shapes:
        if name in ("fp32", "bf16"):
            w = (torch.randn(N, K, generator=generator) * 0.02).to(torch.float32 if name == "fp32" else torch.bfloat16)
            calls.append(lambda x, w=w: F.linear(x.to(w.dtype), w))
            nbytes.append(w.nbytes)
        elif name in ("int8", "int8-fp32x", "int8-inductor"):
            q, s = rand_int(-127, 128, (N, K)).to(torch.int8), torch.rand(N, generator=generator).to(torch.bfloat16)
            if name == "int8":
                calls.append(lambda x, q=q, s=s: torch._weight_int8pack_mm(x.to(torch.bfloat16), q, s))
            elif name == "int8-fp32x":
                s32 = s.float()
                calls.append(lambda x, q=q, s=s32: torch._weight_int8pack_mm(x, q, s))
            else:
                calls.append(lambda x, q=q, s=s: _dequantized_reduce(x, q, s))
            nbytes.append(q.nbytes + s.nbytes)
        elif name == "int4":
            q = torch._convert_weight_to_int4pack_for_cpu(rand_int(0, 16, (N, K)).to(torch.int32), INNER_K_TILES)
            sz = torch.rand(K // DEFAULT_GROUP_SIZE, N, 2, generator=generator).to(torch.bfloat16)
            calls.append(
                lambda x, q=q, sz=sz: torch._weight_int4pack_mm_for_cpu(x.to(torch.bfloat16), q, DEFAULT_GROUP_SIZE, sz)
            )
            nbytes.append(q.nbytes + sz.nbytes)
        elif name == "w8a8":
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # torch.ao.quantization's deprecation notice
                linear = torch.nn.Linear(K, N, bias=False)
                layer = torch.ao.quantization.quantize_dynamic(torch.nn.Sequential(linear), dtype=torch.qint8)[0]
            calls.append(layer)
            nbytes.append(N * K + 4 * N)
        else:
            raise ValueError(f"unknown contender {name!r}: choose from {CONTENDERS}")
    return calls, nbytes


@torch.compile(dynamic=False)
def _dequantized_reduce(x: torch.Tensor, q: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    return (x[:, None, :] * q.to(x.dtype)).sum(-1) * scales.to(x.dtype)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="1b")
    parser.add_argument("--contenders", default=",".join(CONTENDERS), help=f"comma-separated: {CONTENDERS}")
    parser.add_argument("--threads", type=int, help="torch threads (default torch's)")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    config = CSMConfig.preset(args.preset)
    shapes, order = frame_layers(config, config.num_codebooks)
    inputs = {K: torch.randn(1, K) for _, K in shapes}
    generator = torch.Generator().manual_seed(0)
    contenders = {}
    for name in args.contenders.split(","):
        calls, nbytes = kernels(name, shapes, generator)
        for i in range(len(shapes)):  # compile / warm each shape once
            calls[i](inputs[shapes[i][1]])
        contenders[name] = (calls, nbytes)
    best = dict.fromkeys(contenders, float("inf"))
    for _ in range(args.rounds):
        for name, (calls, _) in contenders.items():
            start = time.perf_counter()
            for i in order:
                calls[i](inputs[shapes[i][1]])
            best[name] = min(best[name], time.perf_counter() - start)
    read = {name: sum(nbytes[i] for i in order) for name, (_, nbytes) in contenders.items()}
    base = next(iter(best))
    weights = sum(N * K for N, K in (shapes[i] for i in order))
    print(
        f"{args.preset}: one frame's linear layers, {len(order)} matrix-vector products over {weights / 1e9:.2f} G "
        f"weights, {torch.get_num_threads()} threads, best of {args.rounds} alternating rounds"
    )
    print(f"| contender | ms per frame | vs {base} | GB/s of weights read |")
    print("| --- | --- | --- | --- |")
    for name, t in best.items():
        print(f"| {name} | {t * 1e3:.1f} | {best[base] / t:.2f}x | {read[name] / t / 1e9:.1f} |")


if __name__ == "__main__":
    main()
