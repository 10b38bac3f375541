"""Trainer benchmarks, each contender pair measured in this one process:

1. MFU of a training step (forward + loss + backward + AdamW) — model FLOPs/s from
   `train_flops_per_frame` ÷ the FLOP/s this machine's matmul reaches on a large fp32 (CPU) or bf16 (GPU)
   product, measured in the same run;
2. the data loader's batches/s vs the trainer's consumption (steps/s) at the same batch shape;
3. padding waste of the packer on a realistic mix of conversation-window lengths.

    python bench/bench_train.py --preset 100m --rows 1 --seq 512        # CPU
    python bench/bench_train.py --preset 1b --rows 4 --seq 2048 --steps 10  # one GPU, bf16
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
from csm_train.module import OptimConfig, param_groups, train_flops_per_frame
from csm_train.tokenizer import ByteTokenizer
from data_pipeline.synthetic import write_synthetic_corpus


def matmul_peak(device: torch.device, dtype: torch.dtype, n: int = 2048, reps: int = 10) -> float:
    """Best FLOP/s of an n×n matmul: the attainable peak that MFU is measured against."""
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


def training_step_seconds(config, batch, device, dtype, steps: int) -> float:
    torch.manual_seed(0)
    model = CSM(config).to(device).train()
    optimizer = torch.optim.AdamW(param_groups(model, OptimConfig()), lr=1e-4, fused=True)
    mask = attention_mask(batch["doc_ids"]) if bool((batch["doc_ids"] > 0).any()) else None
    times = []
    for step in range(steps + 1):
        sync(device)
        start = time.perf_counter()
        with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
            out = csm_loss(
                model,
                batch["tokens"],
                batch["tokens_mask"],
                batch["labels"],
                generator=decoder_frame_generator(0, step),
                input_pos=batch["input_pos"],
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
    args = parser.parse_args()
    device = torch.device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    tokenizer = ByteTokenizer()
    config = CSMConfig.preset(args.preset, text_vocab_size=tokenizer.vocab_size)

    with tempfile.TemporaryDirectory() as tmp:
        write_synthetic_corpus(tmp, num_conversations=64, samples_per_shard=8)
        stream = FrameStream(tmp, tokenizer, config.num_codebooks, max_seq_len=args.seq, batch_size=args.rows)
        it = iter(stream)
        batch = next(it)
        start, n = time.perf_counter(), 20
        for _ in range(n):
            next(it)
        loader_batches_per_s = n / (time.perf_counter() - start)
    batch = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}

    step_s = training_step_seconds(config, batch, device, dtype, args.steps)
    peak = matmul_peak(device, dtype)
    frames = int(batch["tokens_mask"].any(-1).sum())
    flops = frames * train_flops_per_frame(config, args.seq, 1 / 16)
    print(f"preset {args.preset}, {args.rows} × {args.seq} frames, {device} {dtype}, threads {torch.get_num_threads()}")
    print(
        f"  MFU        step {step_s * 1e3:8.1f} ms   model {flops / step_s / 1e9:8.1f} GFLOP/s   "
        f"matmul peak {peak / 1e9:8.1f} GFLOP/s   MFU {flops / step_s / peak:.1%}"
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


if __name__ == "__main__":
    main()
