"""Trainer benchmarks, each contender pair measured in this one process:

1. MFU of a training step (forward + loss + backward + AdamW) — model FLOPs/s from
   `csm_train.plan.train_step_flops` (backbone on every non-padding frame, depth decoder only on the frames it
   runs) ÷ the device's dense bf16 datasheet peak (`plan.GPU_PEAK_BF16_FLOPS`: H100/H200 SXM 989 TFLOP/s;
   `--peak-flops` elsewhere; a CPU has none, so there MFU is "n/a" and the step is compared with the best
   matmul timed in the same run instead); on CUDA also the peak memory against the planner's estimate;
2. the data loader's batches/s vs the trainer's consumption (steps/s) at the same batch shape;
3. padding waste of the packer on a realistic mix of conversation-window lengths.

    python bench/bench_train.py --preset 100m --rows 1 --seq 512        # CPU
    python bench/bench_train.py --preset 1b --rows 4 --seq 2048 --steps 10  # one GPU, bf16-mixed

The last line is one `summary:` line for bench/gpu_check.sh.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time

import numpy as np
import torch

from csm_train import CSM, CSMConfig, csm_loss, decoder_frame_generator
from csm_train.data import FrameStream, RowPacker, attention_mask
from csm_train.layout import Frames
from csm_train.module import OptimConfig, param_groups
from csm_train.plan import (
    GiB,
    activation_bytes,
    autocast_weight_bytes,
    decoder_frames_run,
    gpu_peak_bf16_flops,
    model_state_bytes,
    train_step_flops,
)
from csm_train.tokenizer import ByteTokenizer
from data_pipeline.synthetic import write_synthetic_corpus


def matmul_peak(device: torch.device, dtype: torch.dtype, n: int = 2048, reps: int = 10) -> float:
    """Best FLOP/s of an n×n matmul: what this device really reaches on a large product (a reference beside
    MFU, never its denominator)."""
    a, b = (torch.randn(n, n, device=device, dtype=dtype) for _ in range(2))
    best = float("inf")
    for _ in range(reps):
        sync(device)
        start = time.perf_counter()
        a @ b
        sync(device)
        best = min(best, time.perf_counter() - start)
    return 2 * n**3 / best


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def batch_mask(batch: dict, kind: str):
    """`none`: each row one causal sequence (SDPA's flash kernel); `dense`: the trainer's block-causal bool mask
    for packed rows; `flex`: a FlexAttention block mask, where csm_train.data offers one."""
    if kind == "none" or not bool((batch.doc_ids > 0).any()):
        return None
    if kind == "flex":
        return attention_mask(batch.doc_ids, flex=True)
    return attention_mask(batch.doc_ids)


def training_step_seconds(config, batch, device, dtype, steps: int, mask, decoder_fraction: float) -> float:
    torch.manual_seed(0)
    model = CSM(config).to(device).train()
    optimizer = torch.optim.AdamW(param_groups(model, OptimConfig()), lr=1e-4, fused=True)
    times = []
    for step in range(steps + 1):
        sync(device)
        start = time.perf_counter()
        with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
            out = csm_loss(
                model,
                batch.tokens,
                batch.tokens_mask,
                batch.labels,
                decoder_fraction=decoder_fraction,
                generator=decoder_frame_generator(0, step),
                input_pos=batch.input_pos,
                mask=mask,
            )
        out.loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        sync(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times[1:])  # the first step pays for allocation


def realistic_window_lengths(n_conversations: int, max_frames: int, seed: int = 0) -> list[int]:
    """Frame counts of pipeline windows: conversations of ~5 min (log-normal) cut at turn boundaries into
    windows of at most `max_frames`; turns of ~6 s (log-normal), each with ~20 % text frames on top of
    12.5 audio frames/s, one end-of-audio frame and BOS/EOS."""
    rng = np.random.default_rng(seed)
    windows = []
    for _ in range(n_conversations):
        remaining = rng.lognormal(np.log(300), 0.8)
        current = 0
        while remaining > 0:
            seconds = min(remaining, rng.lognormal(np.log(6), 0.7))
            remaining -= seconds
            turn = int(seconds * 12.5 * 1.2) + 3
            turn = min(turn, max_frames)
            if current + turn > max_frames:
                windows.append(current)
                current = 0
            current += turn
        windows.append(current)
    return windows


def padding_fraction(lengths: list[int], seq_len: int, lookahead: int) -> float:
    """Padding share of the rows the trainer's packer makes from windows of these lengths."""
    packer, used = RowPacker(seq_len, lookahead), []
    for i, n in enumerate(lengths):
        frames = Frames(torch.zeros(n, 1, dtype=torch.long), torch.zeros(n, 1, dtype=torch.bool), torch.zeros(n, 0))
        row = packer.add(frames, str(i), (0, i))
        if row is not None:
            used.append(sum(len(f) for f, _, _ in row))
    return 1 - sum(used) / (len(used) * seq_len)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="100m")
    parser.add_argument("--rows", type=int, default=1)
    parser.add_argument("--seq", type=int, default=512)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", choices=["bf16", "fp32"], default=None, help="default: bf16 on CUDA, fp32 on CPU")
    parser.add_argument("--checkpointing", action="store_true", help="activation checkpointing on")
    parser.add_argument("--decoder-fraction", type=float, default=1 / 16)
    parser.add_argument("--mask", choices=["none", "dense", "flex"], default="none", help=batch_mask.__doc__)
    parser.add_argument("--peak-flops", type=float, default=None, help="per-device peak FLOP/s for MFU")
    args = parser.parse_args()
    device = torch.device(args.device)
    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32, None: None}[args.dtype]
    dtype = dtype or (torch.bfloat16 if device.type == "cuda" else torch.float32)
    tokenizer = ByteTokenizer()
    config = CSMConfig.preset(
        args.preset, text_vocab_size=tokenizer.vocab_size, activation_checkpointing=args.checkpointing
    )

    with tempfile.TemporaryDirectory() as tmp:
        write_synthetic_corpus(tmp, num_conversations=64, samples_per_shard=8)
        stream = FrameStream(tmp, tokenizer, config.num_codebooks, max_seq_len=args.seq, batch_size=args.rows)
        it = iter(stream)
        batch = next(it)
        start, n = time.perf_counter(), 20
        for _ in range(n):
            next(it)
        loader_batches_per_s = n / (time.perf_counter() - start)
    batch = batch.to(device)
    mask = batch_mask(batch, args.mask)

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    step_s = training_step_seconds(config, batch, device, dtype, args.steps, mask, args.decoder_fraction)
    peak_bytes = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None
    matmul = matmul_peak(device, dtype)
    frames = int(batch.tokens_mask.any(-1).sum())  # non-padding frames
    # Backbone FLOPs on every frame, depth-decoder FLOPs on the ⌈fraction × audio targets⌉ frames it runs.
    flops = train_step_flops(config, frames, decoder_frames_run(batch.labels, args.decoder_fraction), args.seq)
    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    peak = args.peak_flops or (gpu_peak_bf16_flops(device_name) if dtype == torch.bfloat16 else None)
    mfu = flops / step_s / peak if peak else None
    print(
        f"preset {args.preset}, {args.rows} × {args.seq} frames, {device_name} {dtype}, mask {args.mask}, "
        f"checkpointing {'on' if args.checkpointing else 'off'}, threads {torch.get_num_threads()}"
    )
    print(
        f"  MFU        step {step_s * 1e3:8.1f} ms   model {flops / step_s / 1e12:8.3f} TFLOP/s   "
        + (f"peak {peak / 1e12:.0f} TFLOP/s   MFU {mfu:.1%}" if mfu else "MFU n/a (no known peak: --peak-flops)")
        + f"   ({flops / step_s / matmul:.0%} of the best timed matmul, {matmul / 1e12:.3f} TFLOP/s)"
    )
    print(f"  throughput {frames / step_s:8.0f} frames/s   {frames} frames per step")
    planned = None
    if peak_bytes is not None and dtype == torch.bfloat16:  # the planner models bf16-mixed
        # One process, no DDP: fp32 weights + grads + AdamW states, autocast's weight copies, activations.
        with torch.device("meta"):
            params = CSM(config).num_parameters()
        planned = (
            model_state_bytes(params, "ddp (bf16-mixed)", 1)
            + autocast_weight_bytes(config)
            + activation_bytes(config, args.rows, args.seq, args.decoder_fraction, args.checkpointing)
        )
        print(
            f"  memory     peak allocated {peak_bytes / GiB:6.2f} GiB   planner {planned / GiB:6.2f} GiB   "
            f"ratio {peak_bytes / planned:.2f}"
        )
    print(
        f"  loader     {loader_batches_per_s:8.1f} batches/s (1 process) vs trainer {1 / step_s:6.2f} steps/s   "
        f"ratio {loader_batches_per_s * step_s:.0f}x"
    )
    lengths = realistic_window_lengths(2000, max_frames=2048)
    waste = {k: padding_fraction(lengths, 2048, k) for k in (1, 16, 64)}
    print(
        f"  padding    first-come {waste[1]:.1%}   look-ahead 16 {waste[16]:.1%}   look-ahead 64 {waste[64]:.1%}   "
        f"of 2048-frame rows ({len(lengths)} windows, mean {np.mean(lengths):.0f} frames, "
        f"{np.mean(np.array(lengths) > 1800):.0%} above 1800)"
    )
    memory = (
        f"peak_gib {peak_bytes / GiB:.2f} planned_gib {planned / GiB:.2f} ratio {peak_bytes / planned:.2f}"
        if planned
        else "peak_gib n/a"
    )
    print(
        f"summary: preset {args.preset} rows {args.rows} seq {args.seq} device {device_name.replace(' ', '_')} "
        f"step_ms {step_s * 1e3:.1f} frames_per_s {frames / step_s:.0f} "
        f"mfu {f'{mfu:.3f}' if mfu else 'n/a'} {memory}"
    )


if __name__ == "__main__":
    main()
