"""Frame-by-frame generation with KV caches, as Sesame's generator does it.

The prompt is a conversation (csm_train/layout.py): context turns with their audio, then the turn to speak
as text only. Each step the backbone reads one new frame (the whole prompt on the first step) through its
KV cache; codebook 0 is sampled from `codebook0_head` of its last state; then the depth decoder produces
codebooks 1..K-1 one at a time from [that state, c0, c1, ...] — its cache spans one frame and is simply
overwritten by the next (positions restart at 0). The frame goes back into the backbone as its next input.
Generation stops at an all-zero frame (end of audio, as trained) or after `max_frames`.

Prompts of different lengths are left-padded to one batch: RoPE scores depend only on the distance between
positions, so a row shifted right by its padding attends exactly as it would alone, with the pad keys
masked.

`compile_decoding(model)` makes every frame step after the prompt run `torch.compile`d (CUDA graphs on a GPU):
see `FrameSteps`.
"""

from __future__ import annotations

import functools
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np
import torch

from csm_train.layout import Segment, conversation_frames
from csm_train.model import CSM, KVCache, Transformer
from csm_train.tokenizer import TextTokenizer

# Mimi's codebook size. The model's audio vocabulary has 3 more ids (reserved, as in Sesame's 2051), which no
# codec can decode: sampling is restricted to real codes (a trained model gives them ~0 probability anyway).
MIMI_CODES = 2048


@dataclass(frozen=True)
class Sampling:
    """How an answer's frames are drawn (Sesame's generator's defaults): among the `topk` most likely codes at
    `temperature` (0: greedy), the same codes for the same `seed` (None: unseeded); `max_frames` bounds the
    answer (250 frames = 20 s)."""

    max_frames: int = 250
    temperature: float = 0.9
    topk: int = 50
    seed: int | None = None


@dataclass
class Generated:
    codes: list[torch.Tensor]  # per prompt: [K, n_frames] Mimi codes, without the end-of-audio frame
    c0_logits: torch.Tensor  # [B, steps, audio_vocab], each step's codebook-0 logits
    decoder_logits: torch.Tensor  # [B, steps, K-1, audio_vocab], each step's codebook 1..K-1 logits


def sample_topk(
    logits: torch.Tensor, temperature: float | torch.Tensor, topk: int | torch.Tensor, uniform: torch.Tensor
) -> torch.Tensor:
    """`logits [B, V]` → codes `[B]`: each row drawn among its `topk` most likely codes after dividing by its
    `temperature` (0: the argmax); both a number, or one per row `[B]`. The draw inverts the row's cumulative
    distribution at `uniform [B]` (numbers in [0, 1), one per row), so a row's code depends only on its own
    logits, settings and number: the same alone as in any batch (the server batches requests, each with its seed),
    with one vectorised draw for the whole batch where `torch.multinomial` would take a generator per row."""
    B, V = logits.shape
    temperature = torch.as_tensor(temperature, dtype=torch.float, device=logits.device).expand(B)
    greedy = logits.argmax(dim=-1)
    if not temperature.any():
        return greedy
    topk = torch.as_tensor(topk, device=logits.device).clamp(max=V).expand(B)
    scaled = logits.float() / torch.where(temperature > 0, temperature, 1.0)[:, None]
    kth = scaled.topk(int(topk.max()), dim=-1).values.gather(1, topk[:, None] - 1)
    cdf = scaled.masked_fill(scaled < kth, float("-inf")).softmax(dim=-1).cumsum(dim=-1)
    drawn = torch.searchsorted(cdf, uniform.float()[:, None] * cdf[:, -1:], right=True)[:, 0].clamp(max=V - 1)
    return torch.where(temperature > 0, drawn, greedy)


def frame_uniforms(num_codebooks: int, generators: list[torch.Generator | None], device) -> torch.Tensor:
    """`[B, K]`: the numbers one frame's `sample_topk` calls use, drawn per row from its own generator (None:
    torch's global one), K at a time: a row's draws never depend on the other rows."""
    return torch.stack([torch.rand(num_codebooks, generator=g, device=device) for g in generators])


def frame_sampler(temperature, topk, uniforms: torch.Tensor) -> Callable[[torch.Tensor, int], torch.Tensor]:
    """`decode_frame`'s `sample` for one frame: each row's codebook `i` drawn with its number `uniforms[:, i]`."""
    return lambda logits, codebook: sample_topk(logits, temperature, topk, uniforms[:, codebook])


def prompt_frames(
    tokenizer: TextTokenizer, num_codebooks: int, text: str, speaker: int, context: list[Segment]
) -> tuple[torch.Tensor, torch.Tensor]:
    frames = conversation_frames([*context, Segment(speaker, text)], tokenizer, num_codebooks)
    return frames.tokens, frames.tokens_mask


@dataclass
class Step:
    frame: torch.Tensor  # [B, K] this step's codes (all zero: that prompt's audio has ended)
    c0_logits: torch.Tensor  # [B, audio_vocab]
    decoder_logits: torch.Tensor  # [B, K-1, audio_vocab]


def generate_steps(
    model: CSM, prompts: list[tuple[torch.Tensor, torch.Tensor]], sampling: Sampling = Sampling()
) -> Iterator[Step]:
    """The frame loop, one `Step` per generated frame, until every prompt has ended or `sampling.max_frames`.
    Prompts are `(tokens, tokens_mask)`, each `[T, K+1]`, from `prompt_frames`. Same seed, same codes."""
    K, device = model.config.num_codebooks, model.codebook0_head.weight.device
    lengths = [len(tokens) for tokens, _ in prompts]
    B, T = len(prompts), max(lengths)
    limit = model.config.backbone.max_seq_len
    max_frames = sampling.max_frames
    if T + max_frames > limit:
        raise ValueError(
            f"Inputs too long: a prompt of {T} frames plus max_frames={max_frames} exceeds the backbone's "
            f"max_seq_len={limit}. Drop context turns or lower max_frames."
        )
    # One generator for the batch, the rows drawing K numbers each per frame in turn: a prompt alone draws as a
    # server's job with the same seed does, batched or not (serve/engine.py).
    generators = [None if sampling.seed is None else torch.Generator(device).manual_seed(sampling.seed)] * B

    tokens = torch.zeros(B, T, K + 1, dtype=torch.long, device=device)
    tokens_mask = torch.zeros(B, T, K + 1, dtype=torch.bool, device=device)
    keys = torch.zeros(B, 1, 1, limit, dtype=torch.bool, device=device)  # which cache positions hold real frames
    for row, (t, m) in enumerate(prompts):
        tokens[row, T - len(t) :], tokens_mask[row, T - len(t) :] = t, m
        keys[row, ..., T - len(t) : T] = True
    keys[..., T:] = True  # generated frames

    # Pad queries may see every key before them: a fully masked row would make NaNs that reach real rows
    # through the cached values (0 attention weight times NaN is NaN). Real queries never see pad keys.
    pad_queries = torch.arange(T, device=device) < T - torch.tensor(lengths, device=device)[:, None]
    mask = keys | pad_queries[:, None, :, None]
    positions = torch.arange(T, device=device).expand(B, T)
    done = torch.zeros(B, dtype=torch.bool, device=device)
    steps = frame_steps(model)
    model.setup_caches(B)
    steps.keep_caches(model.backbone)
    try:
        for n in range(max_frames):
            with torch.inference_mode():
                # The prompt (its length varies) always eagerly; each later frame, one position, by `steps`.
                h = (steps.backbone if n else backbone_step)(model, tokens, tokens_mask, positions, mask)
                sample = frame_sampler(sampling.temperature, sampling.topk, frame_uniforms(K, generators, device))
                frame, c0_logits, decoder_logits = decode_frame(model, h, sample)
            yield Step(frame, c0_logits, decoder_logits)
            done |= (frame == 0).all(dim=-1)
            if done.all():
                return
            tokens = torch.cat([frame, torch.zeros_like(frame[:, :1])], dim=-1)[:, None]
            tokens_mask = torch.ones_like(tokens, dtype=torch.bool)
            tokens_mask[..., K] = False
            positions, mask = positions[:, -1:] + 1, keys
    finally:  # also when the caller stops early (closing the generator)
        model.remove_caches()


def generate(
    model: CSM, prompts: list[tuple[torch.Tensor, torch.Tensor]], sampling: Sampling = Sampling()
) -> Generated:
    """Generate audio codes for each prompt, each answer at most `sampling.max_frames` long."""
    steps = list(generate_steps(model, prompts, sampling))
    stacked = torch.stack([s.frame for s in steps], dim=1)  # [B, steps, K]
    codes = []
    for row in range(len(prompts)):
        end = (stacked[row] == 0).all(dim=-1).nonzero()
        n = int(end[0]) if len(end) else stacked.shape[1]
        codes.append(stacked[row, :n].T.cpu())
    return Generated(
        codes,
        torch.stack([s.c0_logits for s in steps], dim=1),
        torch.stack([s.decoder_logits for s in steps], dim=1),
    )


def stream(
    model: CSM,
    prompt: tuple[torch.Tensor, torch.Tensor],
    codec,
    sampling: Sampling = Sampling(),
    chunk_frames: int = 5,
) -> Iterator[np.ndarray]:
    """24 kHz audio of one prompt's answer in chunks of `chunk_frames` frames (80 ms each), decoded while
    the next frames are generated: the first chunk is playable after `chunk_frames` steps rather than at the
    end. `codec` is a `data_pipeline.codec.MimiCodec`; the chunks concatenate to `codec.decode` of all codes."""
    decoder = codec.streaming_decoder()
    pending = []
    for step in generate_steps(model, [prompt], sampling):
        if (step.frame == 0).all():
            break
        pending.append(step.frame[0])
        if len(pending) == chunk_frames:
            yield decoder.decode(torch.stack(pending, dim=1).cpu())
            pending = []
    if pending:
        yield decoder.decode(torch.stack(pending, dim=1).cpu())


def decode_frame(
    model: CSM, h: torch.Tensor, sample: Callable[[torch.Tensor, int], torch.Tensor]
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One frame from the backbone's last state `h [B, D]`: c0 from `codebook0_head`, then codebooks 1..K-1
    from the depth decoder, each fed back as its next input. `sample(logits, codebook)` turns logits over the
    real codes `[B, MIMI_CODES]` into codes `[B]` (`frame_sampler`). Returns the frame `[B, K]` and the c0 and
    depth-decoder logits. The decoder's steps are compiled after `compile_decoding(model)`; sampling always runs
    eagerly, between them."""
    K, steps = model.config.num_codebooks, frame_steps(model)
    h = h.clone(memory_format=torch.contiguous_format)  # `[:, -1]` of one row keeps odd strides: a recompile
    steps.keep_caches(model.decoder)
    c0_logits = model.codebook0_head(h)
    code = sample(c0_logits[:, :MIMI_CODES], 0)
    codes, logits = [code], [steps.decoder_start(model, h, code)]
    positions = torch.ones(len(h), 1, dtype=torch.long, device=h.device)
    for i in range(1, K):
        code = sample(logits[-1][:, :MIMI_CODES], i)
        codes.append(code)
        if i < K - 1:
            positions = positions + 1
            offset, head = model.codebook_offsets[i : i + 1], model.audio_head[i]  # views: tensors, not ints
            logits.append(steps.decoder_next(model, code, positions, offset, head))
    return torch.stack(codes, dim=-1), c0_logits, torch.stack(logits, dim=1)


# --------------------------------------------------------------------------------------------------------
# The frame step's pieces, as functions of tensors only (positions and codebook indices included, never Python
# ints), so that compiled, one graph of each serves every frame and codebook.


def backbone_step(
    model: CSM, tokens: torch.Tensor, tokens_mask: torch.Tensor, positions: torch.Tensor, mask: torch.Tensor
) -> torch.Tensor:
    """The backbone over `tokens, tokens_mask [B, T, K+1]` at `positions [B, T]` through its KV cache: the last
    state `[B, D]`."""
    return model.backbone(model.embed_frames(tokens, tokens_mask), input_pos=positions, mask=mask)[:, -1]


def decoder_start(model: CSM, h: torch.Tensor, c0: torch.Tensor) -> torch.Tensor:
    """The depth decoder's first step: positions 0 and 1 (`h [B, D]` and the embedding of codebook 0's
    `c0 [B]`) into its one-frame cache (positions restart at 0 each frame); codebook 1's logits `[B, V]`."""
    x = model.projection(torch.stack([h, model.embed_audio(0, c0)], dim=1))  # [B, 2, D_decoder]
    positions = torch.arange(2, device=h.device).expand(len(h), 2)
    return model.decoder(x, input_pos=positions)[:, -1] @ model.audio_head[0]


def decoder_next(
    model: CSM, code: torch.Tensor, positions: torch.Tensor, offset: torch.Tensor, head: torch.Tensor
) -> torch.Tensor:
    """A later step: `code [B]` of the codebook whose rows of the audio table start at `offset [1]`, at decoder
    `positions [B, 1]`; the next codebook's logits `[B, V]` through its `head [D_decoder, V]` (of `audio_head`)."""
    x = model.projection(model.audio_embeddings(code + offset))[:, None]  # [B, 1, D_decoder]
    return model.decoder(x, input_pos=positions)[:, -1] @ head


@dataclass(frozen=True)
class FrameSteps:
    """The functions a frame step runs: `backbone_step`, `decoder_start`, `decoder_next`, eager or compiled.

    Compiled (`compile_decoding`), each has static shapes: one new frame of a fixed batch, the KV caches
    attended whole (`Attention`: later positions masked, no slice at a host-read position), positions and the
    codebook as tensors. So the depth decoder's 30 later steps of every frame replay one graph (its first step,
    which reads two positions, is another), and generating any number of frames compiles 3 graphs at a batch
    size; another batch size compiles 3 more. The prompt's step stays eager (its length varies), and so does
    sampling, between the steps: a seeded `torch.Generator` does not trace, and eager it draws the same numbers as
    without compile, so a seed gives the same codes (up to the compiled kernels'
    rounding, which could flip a near-tie: exactly equal in fp32 on CPU in tests/test_compile.py)."""

    backbone: Callable[..., torch.Tensor] = backbone_step
    decoder_start: Callable[..., torch.Tensor] = decoder_start
    decoder_next: Callable[..., torch.Tensor] = decoder_next
    kept: dict | None = None  # compiled: the KV caches' tensors by (transformer, layer, shape, dtype, device)

    def keep_caches(self, transformer: Transformer) -> None:
        """Compiled, give `transformer`'s KV caches the tensors its caches of the same shape had before. Module
        tensors are static inputs of a compiled graph: with CUDA graphs, new cache tensors (each `generate`;
        each server step, which sets up the decoder's anew) would make every graph record again. Stale entries
        are masked like any not yet written (finite, as left by the last generation)."""
        if self.kept is None:
            return
        for name, cache in transformer.named_modules():
            if isinstance(cache, KVCache):
                key = (id(transformer), name, cache.k.shape, cache.k.dtype, cache.k.device)
                cache.k, cache.v = self.kept.setdefault(key, (cache.k, cache.v))


EAGER = FrameSteps()
STEPS = ("backbone", "decoder_start", "decoder_next")


def frame_steps(model: CSM) -> FrameSteps:
    return getattr(model, "_frame_steps", EAGER)


def compile_decoding(model: CSM, enabled: bool = True, mode: str | None = None) -> bool:
    """Run `model`'s frame steps compiled from now on, wherever it decodes (`generate`, `generate_steps`,
    `stream`, `decode_frame`, the server); `enabled=False` goes back to eager. `mode`: torch.compile's, by
    default "reduce-overhead" (CUDA graphs) on CUDA and the default elsewhere. Compiling happens at each step's
    first call (seconds to a minute), again for each new batch size: the static KV caches fix it (a caller whose
    batch varies pads it to its largest).

    Where compile is unavailable (torch.compile raises: no C++ compiler, an unsupported platform, an error while
    compiling), decoding falls back to eager with one warning. Returns whether decoding is now compiled."""
    if not enabled:
        vars(model).pop("_frame_steps", None)
        return False
    if mode is None:
        mode = "reduce-overhead" if model.codebook0_head.weight.is_cuda else "default"
    try:
        compiled = {}
        for name in STEPS:
            eager = getattr(EAGER, name)
            graph = torch.compile(eager, fullgraph=True, dynamic=False, mode=mode)
            compiled[name] = _fallible(graph, eager, model, mode)
    except Exception as error:  # torch.compile itself refused (e.g. an unsupported Python or platform)
        warnings.warn(f"torch.compile is unavailable ({error!r}): decoding eagerly", stacklevel=2)
        return False
    model._frame_steps = FrameSteps(**compiled, kept={})
    return True


def _fallible(compiled: Callable, eager: Callable, model: CSM, mode: str) -> Callable:
    """`compiled`, falling back for good to `eager` (all steps, with one warning) if compiling it fails. A
    failed compile runs nothing, so the step is simply run again eagerly (an error of the step itself then
    raises there). With CUDA graphs, the outputs are cloned: the next replay overwrites the graph's own."""
    cuda_graphs = mode == "reduce-overhead"

    @functools.wraps(eager)
    def step(*args):
        if frame_steps(model) is EAGER:  # another step has failed meanwhile
            return eager(*args)
        try:
            if cuda_graphs:
                torch.compiler.cudagraph_mark_step_begin()
            out = compiled(*args)
        except Exception as error:
            warnings.warn(f"compiling the frame step failed ({error!r:.500}): decoding eagerly", stacklevel=2)
            compile_decoding(model, enabled=False)
            return eager(*args)
        return out.clone() if cuda_graphs else out

    return step
