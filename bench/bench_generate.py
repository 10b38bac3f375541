"""Generation speed: frame-by-frame with KV caches (csm_train.generate) vs. recomputing the whole sequence
every step, side by side in one run on the same prompt, greedy so both must produce the same codes.

Reports frames/s and the real-time factor (RTF = wall seconds per second of audio; 1 frame = 80 ms; below
1 is faster than real time), as csm.rs reports it. The Mimi decode is not included (the same for both).
With --stream, also the latency to the first playable audio: streaming (`stream`, 5-frame chunks through
Mimi's streaming decoder, random weights) against generating everything and then decoding it once.

    python bench/bench_generate.py --preset tiny --frames 64
    python bench/bench_generate.py --preset 100m --frames 32
"""

from __future__ import annotations

import argparse
import time

import torch

from csm_train import CSM, CSMConfig
from csm_train.generate import MIMI_CODES, Sampling, generate, prompt_frames, stream
from csm_train.layout import Segment
from csm_train.tokenizer import ByteTokenizer

FRAME_SECONDS = 0.08


@torch.inference_mode()
def generate_without_cache(model: CSM, tokens: torch.Tensor, tokens_mask: torch.Tensor, frames: int) -> torch.Tensor:
    """Greedy generation the naive way: every step runs the backbone over all frames so far, and the depth
    decoder over all codebooks so far."""
    K = model.config.num_codebooks
    tokens, tokens_mask, out = tokens[None], tokens_mask[None], []
    for _ in range(frames):
        h = model(tokens, tokens_mask).hidden[:, -1]
        codes = [model.codebook0_head(h)[:, :MIMI_CODES].argmax(-1)]
        for i in range(1, K):
            embeds = model.audio_embeddings(torch.stack(codes, 1) + model.codebook_offsets[:i])
            y = model.decoder(model.projection(torch.cat([h[:, None], embeds], 1)))[:, -1]
            codes.append((y @ model.audio_head[i - 1])[:, :MIMI_CODES].argmax(-1))
        frame = torch.stack(codes, -1)  # [1, K]
        out.append(frame[0])
        row = torch.cat([frame, torch.zeros(1, 1, dtype=torch.long)], -1)[:, None]
        row_mask = torch.ones_like(row, dtype=torch.bool)
        row_mask[..., K] = False
        tokens, tokens_mask = torch.cat([tokens, row], 1), torch.cat([tokens_mask, row_mask], 1)
    return torch.stack(out, 1)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--frames", type=int, default=64, help="frames to generate (80 ms each)")
    parser.add_argument("--context", type=int, default=150, help="audio frames of context (one earlier turn)")
    parser.add_argument("--stream", action="store_true", help="also time to first audio, streaming vs not")
    args = parser.parse_args()
    torch.manual_seed(0)
    model = CSM(CSMConfig.preset(args.preset, text_vocab_size=ByteTokenizer.vocab_size)).eval()
    K = model.config.num_codebooks
    context = [Segment(1, "so what did you think of it", torch.randint(1, 2048, (K, args.context)))]
    tokens, mask = prompt_frames(ByteTokenizer(), K, "i liked it more than i expected", 0, context)

    def cached():  # greedy; the end-of-audio frame cannot stop it early: random weights never emit one
        return generate(model, [(tokens, mask)], Sampling(max_frames=args.frames, temperature=0)).codes[0]

    cached()  # warm-up
    start = time.perf_counter()
    with_cache = cached()
    t_cache = time.perf_counter() - start
    start = time.perf_counter()
    without = generate_without_cache(model, tokens, mask, with_cache.shape[1])
    t_plain = time.perf_counter() - start
    n = with_cache.shape[1]
    audio = n * FRAME_SECONDS
    print(f"{args.preset}: {len(tokens)} prompt frames, {n} generated ({audio:.2f} s of audio)")
    print(f"KV cache     {n / t_cache:8.1f} frames/s   RTF {t_cache / audio:7.3f}")
    print(f"no cache     {n / t_plain:8.1f} frames/s   RTF {t_plain / audio:7.3f}")
    print(f"speed-up {t_plain / t_cache:.2f}x   identical codes: {torch.equal(with_cache, without)}")
    if args.stream:
        time_to_first_audio(model, (tokens, mask), n)


def time_to_first_audio(model: CSM, prompt, frames: int, chunk_frames: int = 5) -> None:
    from data_pipeline.codec import RANDOM_INIT, MimiCodec

    codec = MimiCodec(RANDOM_INIT, device="cpu")
    start = time.perf_counter()
    chunks = stream(model, prompt, codec, Sampling(max_frames=frames, temperature=0), chunk_frames=chunk_frames)
    next(chunks)
    t_first = time.perf_counter() - start
    for _ in chunks:
        pass
    t_stream = time.perf_counter() - start
    start = time.perf_counter()
    codec.decode(generate(model, [prompt], Sampling(max_frames=frames, temperature=0)).codes[0])
    t_whole = time.perf_counter() - start
    print(
        f"first audio  streamed after {t_first:.2f} s ({chunk_frames}-frame chunks), whole answer after {t_whole:.2f} s"
    )
    print(
        f"             {t_whole / t_first:.1f}x sooner; streaming's total {t_stream:.2f} s ({t_stream / t_whole:.2f}x)"
    )


if __name__ == "__main__":
    main()
