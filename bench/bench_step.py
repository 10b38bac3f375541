"""Training-step throughput: our CSM + loss vs transformers' CsmForConditionalGeneration, and the cost of
the depth decoder with and without compute amortization.

Both contenders hold the same weights and train on the same batch with the same depth-decoder frame
subset; steps alternate between them so machine noise hits both alike. Prints frames/s and the ratio.

    python bench/bench_step.py --preset tiny --batch 4 --frames 256
    python bench/bench_step.py --preset 100m --batch 1 --frames 512 --steps 4
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from csm_train import CSM, CSMConfig, csm_loss, decoder_frame_generator, select_decoder_frames
from csm_train.formats import config_to_transformers, state_dict_to_transformers


def make_batch(config: CSMConfig, batch: int, frames: int, seed: int = 0):
    """Conversations of ~12 % text and ~88 % audio frames, alternating turns of 20 text + 150 audio."""
    g = torch.Generator().manual_seed(seed)
    K = config.num_codebooks
    tokens = torch.zeros(batch, frames, K + 1, dtype=torch.long)
    tokens_mask = torch.zeros(batch, frames, K + 1, dtype=torch.bool)
    is_text = (torch.arange(frames) % 170) < 20
    tokens[:, is_text, K] = torch.randint(0, config.text_vocab_size, (batch, int(is_text.sum())), generator=g)
    tokens_mask[:, is_text, K] = True
    tokens[:, ~is_text, :K] = torch.randint(0, 2048, (batch, int((~is_text).sum()), K), generator=g)
    tokens_mask[:, ~is_text, :K] = True
    labels = torch.where(tokens_mask[..., :K], tokens[..., :K], -100)
    return tokens, tokens_mask, labels


def ours_step(model, tokens, tokens_mask, labels, decoder_frames):
    out = csm_loss(model, tokens, tokens_mask, labels, decoder_frames=decoder_frames)
    out.loss.backward()
    return out.loss.item()


def transformers_step(hf, tokens, tokens_mask, labels, decoder_frames):
    K = labels.shape[-1]
    is_audio = tokens_mask[..., :1].to(hf.dtype)
    embeds = (
        hf.embed_text_tokens(tokens[..., K]) * (1 - is_audio)
        + hf.backbone_model.embed_tokens(tokens[..., :K]) * is_audio
    )
    hf_labels = labels.clone()
    hf_labels[..., 1:][~decoder_frames] = -100  # what its processor's -101 marking turns into
    out = hf(inputs_embeds=embeds, labels=hf_labels)
    out.loss.backward()
    return out.loss.item()


def saved_activation_bytes(fn) -> int:
    """Bytes autograd keeps for backward during `fn()`: the activation memory of a step, measurable on
    CPU where there is no allocator peak to read."""
    total = 0

    def pack(t):
        nonlocal total
        total += t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return total


def timed(fn, steps: int) -> list[float]:
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return times


def interleaved(contenders: dict, steps: int, warmup: int = 1) -> dict[str, float]:
    """Median seconds per step of each contender, run in turns."""
    for fn in contenders.values():
        for _ in range(warmup):
            fn()
    samples = {name: [] for name in contenders}
    for _ in range(steps):
        for name, fn in contenders.items():
            samples[name] += timed(fn, 1)
    return {name: statistics.median(s) for name, s in samples.items()}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--frames", type=int, default=256)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--decoder-fraction", type=float, default=1 / 16)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    args = parser.parse_args()
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)

    from transformers import CsmForConditionalGeneration

    config = CSMConfig.preset(args.preset)
    torch.manual_seed(0)
    ours = CSM(config).to(device, dtype).train()
    hf = CsmForConditionalGeneration(config_to_transformers(config)).to(device, dtype).train()
    hf.load_state_dict(state_dict_to_transformers(ours.state_dict(), config), strict=False)
    tokens, tokens_mask, labels = (t.to(device) for t in make_batch(config, args.batch, args.frames))
    subset = select_decoder_frames(labels, args.decoder_fraction, decoder_frame_generator(0, 0))
    every = select_decoder_frames(labels, 1.0, decoder_frame_generator(0, 0))
    frames_per_step = args.batch * args.frames
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)

    def step(fn, model, frames):
        def run():
            model.zero_grad(set_to_none=True)
            fn(model, tokens, tokens_mask, labels, frames)
            sync()

        return run

    print(
        f"preset {args.preset}, batch {args.batch} × {args.frames} frames, {args.device} {args.dtype}, "
        f"decoder fraction {args.decoder_fraction:.4g}, torch threads {torch.get_num_threads()}"
    )

    t = interleaved(
        {"csm_train": step(ours_step, ours, subset), "transformers": step(transformers_step, hf, subset)}, args.steps
    )
    ours_fps, hf_fps = frames_per_step / t["csm_train"], frames_per_step / t["transformers"]
    print(
        f"  train step   csm_train {ours_fps:9.0f} frames/s   transformers {hf_fps:9.0f} frames/s   "
        f"ratio {ours_fps / hf_fps:.2f}x"
    )

    t = interleaved({"amortized": step(ours_step, ours, subset), "full": step(ours_step, ours, every)}, args.steps)
    mem = {
        name: saved_activation_bytes(step(ours_step, ours, frames))
        for name, frames in (("amortized", subset), ("full", every))
    }
    print(
        f"  decoder 1/{round(1 / args.decoder_fraction)} vs 1.0   "
        f"step {t['amortized'] * 1e3:7.1f} ms vs {t['full'] * 1e3:7.1f} ms (ratio {t['full'] / t['amortized']:.2f}x)   "
        f"saved activations {mem['amortized'] / 2**20:7.1f} MiB vs {mem['full'] / 2**20:7.1f} MiB "
        f"(ratio {mem['full'] / mem['amortized']:.2f}x)"
    )
    if device.type == "cuda":
        peaks = {}
        for name, frames in (("amortized", subset), ("full", every)):
            torch.cuda.reset_peak_memory_stats()
            step(ours_step, ours, frames)()
            peaks[name] = torch.cuda.max_memory_allocated() / 2**30
        print(f"  CUDA peak memory   amortized {peaks['amortized']:.2f} GiB   full {peaks['full']:.2f} GiB")


if __name__ == "__main__":
    main()
