"""Mimi encoding speed, batched vs one turn at a time, side by side in one run (× real time).

The codec's speed does not depend on its weights, so a randomly initialised Mimi (the real architecture,
saved and loaded like real weights) stands in where kyutai/mimi cannot be downloaded.

    python bench/bench_codec.py --turns 32 --batch 16
"""

from __future__ import annotations

import argparse
import tempfile
import time

import numpy as np
import torch

from data_pipeline.codec import MimiCodec


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--turns", type=int, default=32)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--weights", default=None, help="a Mimi directory or hub id; default: random init")
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    # Turns of 2–10 s, as conversations have them.
    audios = [
        (0.1 * rng.standard_normal(int(rng.uniform(2, 10) * 24000))).astype(np.float32) for _ in range(args.turns)
    ]
    seconds = sum(len(a) for a in audios) / 24000
    with tempfile.TemporaryDirectory() as tmp:
        weights = args.weights
        if weights is None:
            from transformers import MimiConfig, MimiModel

            MimiModel(MimiConfig()).save_pretrained(tmp)
            weights = tmp
        encoders = {
            "batched": MimiCodec(weights, batch_size=args.batch),
            "one at a time": MimiCodec(weights, batch_size=1),
        }
        encoders["batched"].encode(audios[:2])  # warm-up
        speed = {}
        for name, encoder in encoders.items():
            start = time.perf_counter()
            encoder.encode(audios)
            speed[name] = seconds / (time.perf_counter() - start)
    device = encoders["batched"].device
    print(f"{args.turns} turns, {seconds:.0f} s of audio, {device}, torch threads {torch.get_num_threads()}")
    print(
        f"  batched ({args.batch}) {speed['batched']:6.1f}x real time   one at a time {speed['one at a time']:6.1f}x   "
        f"ratio {speed['batched'] / speed['one at a time']:.2f}x"
    )


if __name__ == "__main__":
    main()
