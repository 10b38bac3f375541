"""Mimi encoding speed, batched vs one turn at a time, side by side in one run (× real time).

The codec's speed does not depend on its weights, so a randomly initialised Mimi (the real architecture,
saved and loaded like real weights) stands in where kyutai/mimi cannot be downloaded.

    python bench/bench_codec.py --turns 32 --batch 16

`--decode` instead times decoding: `MimiCodec.decode` of all frames at once beside the streaming decoder fed
1 or 5 frames per call (as generation would), `--frames` frames of random codes:

    python bench/bench_codec.py --decode --frames 125
"""

from __future__ import annotations

import argparse
import tempfile
import time

import numpy as np
import torch

from data_pipeline.codec import SAMPLES_PER_FRAME, MimiCodec, random_mimi


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--turns", type=int, default=32)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--weights", default=None, help="a Mimi directory or hub id; default: random init")
    parser.add_argument("--decode", action="store_true", help="time full vs streaming decoding instead")
    parser.add_argument("--frames", type=int, default=125, help="--decode: frames to decode (12.5 per second)")
    args = parser.parse_args()
    if args.decode:
        return bench_decode(args)
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


def bench_decode(args):
    """Full decode vs streaming in chunks of 1 and 5 frames: × real time, and each chunk's latency."""
    codes = np.random.default_rng(0).integers(0, 2048, (32, args.frames))
    seconds = args.frames * SAMPLES_PER_FRAME / 24000
    with tempfile.TemporaryDirectory() as tmp:
        weights = args.weights
        if weights is None:
            random_mimi().save_pretrained(tmp)
            weights = tmp
        codec = MimiCodec(weights)
    sync = torch.cuda.synchronize if codec.device.type == "cuda" else (lambda: None)

    def full():
        codec.decode(codes)

    def streaming(chunk):
        def run():
            decoder = codec.streaming_decoder()
            for start in range(0, args.frames, chunk):
                decoder.decode(codes[:, start : start + chunk])

        return run

    contenders = {
        "full decode": full,
        "streaming, 1 frame/call": streaming(1),
        "streaming, 5 frames/call": streaming(5),
    }
    for run in contenders.values():  # warm-up
        run()
    elapsed = {}
    for name, run in contenders.items():
        sync()
        start = time.perf_counter()
        run()
        sync()
        elapsed[name] = time.perf_counter() - start
    print(f"{args.frames} frames, {seconds:.1f} s of audio, {codec.device}, torch threads {torch.get_num_threads()}")
    for name, t in elapsed.items():
        calls = 1 if name == "full decode" else -(-args.frames // (1 if "1 frame" in name else 5))
        print(
            f"  {name:26s} {seconds / t:6.2f}x real time   {1000 * t / calls:8.1f} ms per call   "
            f"full/this {elapsed['full decode'] / t:.2f}x"
        )


if __name__ == "__main__":
    main()
