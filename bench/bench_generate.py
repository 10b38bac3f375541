"""Generation speed of several contenders, side by side in one run on the same weights, prompt and seed (greedy):

* `fp32`, `bf16`: csm_train.generate (frame by frame with KV caches) in that precision;
* `int8`, `int4`: the same with weight-only quantized backbone and decoder (csm_train/quantize.py);
* `eager`, `compiled`: csm_train.generate in `--dtype`, eager or with `compile_decoding` (torch.compile; CUDA graphs on
  a GPU), for `--device cuda`; any of ours with `+compiled` (`int8+compiled`) decodes compiled too;
* `nocache`: fp32, recomputing the whole sequence every step (must give fp32's codes);
* `transformers`: transformers' `CsmForConditionalGeneration.generate` on the same fp32 weights (its prompt is the
  same number of positions, all embedded as text: it takes context audio only as waveforms through its codec).

Each contender is timed generating 1 frame (the prompt's prefill + one frame: time to first frame) and `--frames`
frames; the decode rate is (frames - 1) / the difference. Rounds alternate the contenders (`--rounds`, the best
of each kept), so a shared machine's load falls on all of them alike. Frames/s and the real-time factor (RTF =
wall seconds per second of audio; 1 frame = 80 ms; below 1 is faster than real time), as csm.rs reports them;
the Mimi decode is not included (the same for all).

`--quality` adds the teacher-forced agreement of each contender's logits with fp32's on the same frames (the
prompt and fp32's answer): codebook-0 top-1 agreement, depth-decoder top-1 agreement, and the relative error
‖logits − fp32's‖ / ‖fp32's‖. With --stream, also the latency to the first playable audio: streaming (`stream`,
5-frame chunks through Mimi's streaming decoder, random weights) against generating everything and then
decoding it once.

    python bench/bench_generate.py --preset tiny --frames 64
    python bench/bench_generate.py --preset 100m --frames 32 --quality
    python bench/bench_generate.py --preset 1b --frames 4 --context 50 --rounds 1 --quality \
        --contenders fp32,bf16,int8,int4,transformers
    python bench/bench_generate.py --checkpoint runs/tiny/speech_demo/checkpoints/last.ckpt --quality \
        --contenders fp32,int8,int4
"""

from __future__ import annotations

import argparse
import gc
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from csm_train import CSM, CSMConfig
from csm_train.checkpoint import load_checkpoint
from csm_train.generate import MIMI_CODES, Sampling, compile_decoding, generate, prompt_frames, stream
from csm_train.layout import Segment
from csm_train.quantize import quantize
from csm_train.tokenizer import ByteTokenizer

FRAME_SECONDS = 0.08
ALL_CONTENDERS = ("fp32", "bf16", "int8", "int4", "eager", "compiled", "nocache", "transformers")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


@dataclass
class Contender:
    """One way to generate: `run(frames)` → greedy codes `[K, frames]` for the bench's prompt. `model` is the CSM
    it runs (for --quality; None: not one of ours)."""

    name: str
    run: Callable[[int], torch.Tensor]
    model: CSM | None = None


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
        row = torch.cat([frame, torch.zeros_like(frame[:, :1])], -1)[:, None]
        row_mask = torch.ones_like(row, dtype=torch.bool)
        row_mask[..., K] = False
        tokens, tokens_mask = torch.cat([tokens, row], 1), torch.cat([tokens_mask, row_mask], 1)
    return torch.stack(out, 1)


def random_weights(config: CSMConfig, seed: int = 0, std: float = 0.02) -> dict[str, torch.Tensor]:
    """Llama-style random init (normal, std 0.02; norms at 1), built without a throw-away init: cheap at 1b."""
    with torch.device("meta"):
        shapes = CSM(config).state_dict()
    generator = torch.Generator().manual_seed(seed)
    return {
        name: torch.ones(t.shape) if name.endswith("norm.scale") else torch.randn(t.shape, generator=generator) * std
        for name, t in shapes.items()
    }


def ours(name: str, model: CSM, prompt) -> Contender:
    def run(frames: int) -> torch.Tensor:  # greedy; random weights never emit the end-of-audio frame
        return generate(model, [prompt], Sampling(max_frames=frames, temperature=0)).codes[0]

    return Contender(name, run, model)


def transformers_contender(config: CSMConfig, weights: dict[str, torch.Tensor], prompt) -> Contender:
    """transformers' CSM holding the same tensors (q/k rows permuted to its RoPE halves; the rest shared)."""
    from transformers import CsmForConditionalGeneration
    from transformers.initialization import no_init_weights

    from csm_train.formats import config_to_transformers, state_dict_to_transformers

    V = config.text_vocab_size
    hf_config = config_to_transformers(
        config, bos_token_id=V - 2, pad_token_id=0, audio_token_id=V - 1, audio_eos_token_id=V - 1
    )
    with no_init_weights():
        hf = CsmForConditionalGeneration(hf_config)
    missing, unexpected = hf.load_state_dict(state_dict_to_transformers(weights, config), strict=False, assign=True)
    assert not unexpected and all(k.startswith("codec_model.") for k in missing), (missing, unexpected)
    hf.eval()
    K = config.num_codebooks
    input_ids = prompt[0][None, :, K]  # the text column: as many positions as our prompt

    def run(frames: int) -> torch.Tensor:
        with torch.inference_mode():
            out = hf.generate(
                input_ids=input_ids, max_new_tokens=frames, min_new_tokens=frames, do_sample=False,
                depth_decoder_do_sample=False,
            )  # fmt: skip
        return out[0].T

    return Contender("transformers", run)


def build_contenders(names: list[str], config: CSMConfig, weights, prompt, group_size: int, dtype) -> list[Contender]:
    contenders = []
    for full_name in names:
        name, _, suffix = full_name.partition("+")
        if suffix not in ("", "compiled") or (suffix and name not in (*DTYPES, "int8", "int4")):
            raise ValueError(f"unknown contender {full_name!r}: '+compiled' follows fp32, bf16, int8 or int4")
        model = CSM.from_state_dict(config, weights).eval()  # shares `weights`' tensors: no copy
        if name in DTYPES:
            contenders.append(ours(name, model.to(DTYPES[name]), prompt))
        elif name in ("eager", "compiled"):
            model = model.to(dtype)
            if name == "compiled":
                compile_decoding(model)
            contenders.append(ours(name, model, prompt))
        elif name in ("int8", "int4"):
            contenders.append(ours(name, quantize(model, name, group_size), prompt))
        elif name == "nocache":
            contenders.append(Contender(name, lambda n, m=model: generate_without_cache(m, *prompt, n)))
        elif name == "transformers":
            contenders.append(transformers_contender(config, weights, prompt))
        else:
            raise ValueError(f"unknown contender {name!r}: choose from {ALL_CONTENDERS}")
        if suffix:
            compile_decoding(model)
            contenders[-1].name = full_name
        gc.collect()
    return contenders


def timed(run: Callable[[int], torch.Tensor], frames: int) -> tuple[float, torch.Tensor]:
    start = time.perf_counter()
    codes = run(frames)
    return time.perf_counter() - start, codes


def bench_speed(contenders: list[Contender], frames: int, rounds: int) -> dict[str, torch.Tensor]:
    first = {c.name: float("inf") for c in contenders}
    whole = dict(first)
    codes = {}
    for c in contenders:
        c.run(2)  # warm-up (a compiled contender compiles its prompt's and its later frames' steps)
    for _ in range(rounds):
        for c in contenders:
            first[c.name] = min(first[c.name], timed(c.run, 1)[0])
            t, codes[c.name] = timed(c.run, frames)
            whole[c.name] = min(whole[c.name], t)
    base = next(iter(whole))
    rate = {n: (frames - 1) / max(whole[n] - first[n], 1e-9) for n in whole}
    print(f"| contender | first frame (prefill + 1) s | decode frames/s | RTF | vs {base} | {frames} frames s |")
    print("| --- | --- | --- | --- | --- | --- |")
    for n in whole:
        print(
            f"| {n} | {first[n]:.3f} | {rate[n]:.2f} | {1 / (rate[n] * FRAME_SECONDS):.3f} | "
            f"{rate[n] / rate[base]:.2f}x | {whole[n]:.2f} |"
        )
    same = [n for n in codes if n != base and torch.equal(codes[n], codes[base])]
    print(f"codes identical to {base}'s: {', '.join(same) or 'none'}")
    return codes


@torch.inference_mode()
def bench_quality(contenders: list[Contender], prompt, answer: torch.Tensor) -> None:
    """Teacher-forced on the prompt followed by `answer [K, n]` (fp32's codes), against the first contender."""
    tokens, mask = prompt
    K, answer = answer.shape[0], answer.to(tokens.device)
    rows = torch.cat([answer.T, torch.zeros_like(answer[:1]).T], 1)
    row_mask = torch.ones_like(rows, dtype=torch.bool)
    row_mask[:, K] = False
    tokens, mask = torch.cat([tokens, rows])[None], torch.cat([mask, row_mask])[None]
    audio = mask[..., 0]  # frames holding audio: their codes are predicted, c0 by the frame before
    targets = audio.clone()
    targets[:, 0] = False
    ours_ = [c for c in contenders if c.model is not None]
    outs = {c.name: c.model(tokens, mask, decoder_frames=targets) for c in ours_}
    base = ours_[0].name
    ref = outs[base]
    c0_ref = ref.c0_logits[:, :-1][targets[:, 1:]].float()
    dec_ref = ref.decoder_logits.float()
    print(f"\nteacher-forced on {int(targets.sum())} audio frames, against {base}:")
    print("| contender | c0 top-1 agreement | c0 rel. error | decoder top-1 agreement | decoder rel. error |")
    print("| --- | --- | --- | --- | --- |")
    for name, out in outs.items():
        if name == base:
            continue
        c0 = out.c0_logits[:, :-1][targets[:, 1:]].float()
        dec = out.decoder_logits.float()
        agree = lambda a, b: (a[..., :MIMI_CODES].argmax(-1) == b[..., :MIMI_CODES].argmax(-1)).float().mean()  # noqa: E731
        rel = lambda a, b: (a - b).norm() / b.norm()  # noqa: E731
        print(
            f"| {name} | {agree(c0, c0_ref):.1%} | {rel(c0, c0_ref):.4f} | {agree(dec, dec_ref):.1%} | "
            f"{rel(dec, dec_ref):.4f} |"
        )


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="tiny")
    parser.add_argument(
        "--checkpoint", help="a trained model (any format csm_train reads) instead of --preset's random weights"
    )
    parser.add_argument("--frames", type=int, default=64, help="frames to generate (80 ms each)")
    parser.add_argument("--context", type=int, default=150, help="audio frames of context (one earlier turn)")
    parser.add_argument("--contenders", default=",".join(ALL_CONTENDERS), help=f"comma-separated: {ALL_CONTENDERS}")
    parser.add_argument("--rounds", type=int, default=2, help="timed rounds, contenders alternating; best kept")
    parser.add_argument("--device", default="cpu", help="cpu | cuda (int8/int4 and transformers: cpu only)")
    parser.add_argument("--dtype", default="fp32", choices=DTYPES, help="the eager and compiled contenders'")
    parser.add_argument("--group-size", type=int, default=32, help="int4's group size")
    parser.add_argument("--threads", type=int, help="torch threads (default torch's); 1 is steadier on a busy CPU")
    parser.add_argument("--quality", action="store_true", help="also teacher-forced agreement with the first")
    parser.add_argument("--stream", action="store_true", help="also time to first audio, streaming vs not")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.checkpoint:
        config, weights = load_checkpoint(args.checkpoint)
    else:
        config = CSMConfig.preset(args.preset, text_vocab_size=ByteTokenizer.vocab_size)
        weights = random_weights(config)
    weights = {name: t.to(args.device) for name, t in weights.items()}
    K = config.num_codebooks
    torch.manual_seed(0)
    context = [Segment(1, "so what did you think of it", torch.randint(1, 2048, (K, args.context)))]
    prompt = prompt_frames(ByteTokenizer(), K, "i liked it more than i expected", 0, context)
    prompt = tuple(t.to(args.device) for t in prompt)
    names = args.contenders.split(",")
    contenders = build_contenders(names, config, weights, prompt, args.group_size, DTYPES[args.dtype])
    print(
        f"{args.checkpoint or args.preset}: {len(prompt[0])} prompt frames, {args.frames} generated "
        f"({args.frames * FRAME_SECONDS:.2f} s of audio), {torch.get_num_threads()} threads, best of {args.rounds} "
        "alternating rounds"
    )
    codes = bench_speed(contenders, args.frames, args.rounds)
    if args.quality:
        bench_quality(contenders, prompt, codes[contenders[0].name])
    if args.stream:
        time_to_first_audio(contenders[0].model, prompt, args.frames)


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
