"""Compiled decoding (issue 17, item 2): `compile_decoding` runs the frame step through `torch.compile` with
static shapes and gives the same codes as eager for the same seed, compiling a bounded number of graphs; where
compile is unavailable it falls back to eager with one warning. CPU, the tiny preset, one compile (~15-40 s)."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch._dynamo.utils import counters

from csm_train import CSM, CSMConfig
from csm_train.generate import EAGER, Sampling, compile_decoding, decode_frame, frame_steps, generate, prompt_frames
from csm_train.layout import Segment
from csm_train.quantize import quantize
from csm_train.tokenizer import ByteTokenizer


@pytest.fixture
def model():
    torch.manual_seed(0)
    model = CSM(CSMConfig.preset("tiny", text_vocab_size=ByteTokenizer.vocab_size)).eval()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny ops on a shared CPU: one thread is several times faster than two
    torch._dynamo.reset()
    counters.clear()
    yield model
    torch._dynamo.reset()
    torch.set_num_threads(threads)


def prompts(K: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Two prompts of different lengths (left-padded into one batch)."""
    codes = torch.randint(1, 2048, (K, 8), generator=torch.Generator().manual_seed(1))
    context = [Segment(1, "so what did you think", codes)]
    return [
        prompt_frames(ByteTokenizer(), K, "i liked it", 0, context),
        prompt_frames(ByteTokenizer(), K, "me too", 1, []),
    ]


def test_compiled_decoding_gives_eager_codes_with_a_bounded_number_of_graphs(model):
    K, batch = model.config.num_codebooks, prompts(model.config.num_codebooks)
    seeded, greedy = Sampling(max_frames=20, seed=7), Sampling(max_frames=20, temperature=0)
    eager, eager_greedy = generate(model, batch, seeded), generate(model, batch, greedy)

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert compile_decoding(model)
        compiled = generate(model, batch, seeded)
    assert not [w for w in caught if "decoding eagerly" in str(w.message)]  # compiled, no fallback
    # The prompt's step stays eager; the backbone's one-frame step, the decoder's first step (2 positions) and
    # its 30 later steps (one graph for all codebooks and frames) are the 3 graphs.
    assert counters["stats"]["unique_graphs"] == 3
    assert not counters["graph_break"]
    for a, b in zip(eager.codes, compiled.codes, strict=True):
        assert a.shape == (K, 20) and torch.equal(a, b)
    torch.testing.assert_close(compiled.decoder_logits, eager.decoder_logits, rtol=1e-4, atol=1e-5)

    # Another call (caches set up anew), greedy: the same graphs (sampling stays outside them).
    assert all(torch.equal(a, b) for a, b in zip(eager_greedy.codes, generate(model, batch, greedy).codes, strict=True))
    # The caches' tensors are kept across calls (static inputs of a CUDA graph): one pair per layer and shape.
    assert len(frame_steps(model).kept) == model.config.backbone.num_layers + model.config.decoder.num_layers
    # The server's way: decode_frame on caches it sets up itself each step, a row sampled by its own generator.
    h = torch.randn(2, model.config.backbone.dim)
    frames = []
    for steps in (EAGER, frame_steps(model)):
        model._frame_steps = steps
        model.decoder.setup_caches(2, K, h.dtype, h.device)
        generator = torch.Generator().manual_seed(3)

        def sample(logits, codebook, generator=generator):
            return torch.multinomial(logits.softmax(-1), 1, generator=generator)[:, 0]

        with torch.inference_mode():
            frames.append(decode_frame(model, h, sample)[0])
    assert torch.equal(*frames)
    assert counters["stats"]["unique_graphs"] == 3  # no recompiles across calls, caches or samplers
    compile_decoding(model, enabled=False)
    assert frame_steps(model) is EAGER


def test_without_compile_decoding_falls_back_to_eager_with_one_warning(model, monkeypatch):
    batch, sampling = prompts(model.config.num_codebooks), Sampling(max_frames=3, seed=7)
    eager = generate(model, batch, sampling)

    def unavailable(*args, **kwargs):
        raise RuntimeError("torch.compile is not supported on this platform")

    monkeypatch.setattr(torch, "compile", unavailable)
    with pytest.warns(UserWarning, match="unavailable.*decoding eagerly") as caught:
        assert not compile_decoding(model)
    assert len(caught) == 1 and frame_steps(model) is EAGER

    # torch.compile accepts, but compiling fails at the first call (say, no C++ compiler): one warning, eager.
    def fails_when_called(fn, **kwargs):
        def compiled(*args):
            raise RuntimeError("InvalidCxxCompiler: No working C++ compiler found")

        return compiled

    monkeypatch.setattr(torch, "compile", fails_when_called)
    assert compile_decoding(model)
    with pytest.warns(UserWarning, match="compiling the frame step failed.*decoding eagerly") as caught:
        fallback = generate(model, batch, sampling)
    assert len(caught) == 1 and frame_steps(model) is EAGER
    assert all(torch.equal(a, b) for a, b in zip(eager.codes, fallback.codes, strict=True))


def test_the_servers_engine_compiled_pads_to_one_batch_size(model):
    """serve's Engine after compile_decoding: jobs joining and leaving (batches of 1 and 2) decode padded to
    `max_batch`, so one pair of decoder graphs serves every step, and each job gets the codes it gets alone."""
    import asyncio

    from serve.engine import Engine

    batch = prompts(model.config.num_codebooks)
    samplings = [Sampling(max_frames=6, seed=1), Sampling(max_frames=3, seed=2)]
    alone = [generate(model, [p], s).codes[0] for p, s in zip(batch, samplings, strict=True)]
    compile_decoding(model)

    async def run():
        engine = Engine(model, queue_size=2, max_batch=2)
        jobs = [engine.submit(p, s, 60) for p, s in zip(batch, samplings, strict=True)]
        out = []
        for job in jobs:
            out.append(torch.cat([c async for c in job.chunks(100)], dim=1))
        engine.close()
        return out

    got = asyncio.run(run())
    assert all(torch.equal(a, b) for a, b in zip(got, alone, strict=True))
    assert counters["stats"]["unique_graphs"] == 2  # decoder_start and decoder_next at batch 2; the backbone eager


@pytest.mark.parametrize("mode", ["int8", "int4"])
def test_compiled_quantized_decoding_gives_its_eager_codes(model, mode):
    """`quantize=... compile=true` together: the packed int8/int4 kernels inside the compiled steps give the
    quantized model's eager codes (bench/RESULTS.md: the pair is the fastest CPU decoding)."""
    quantize(model, mode)
    batch, sampling = prompts(model.config.num_codebooks), Sampling(max_frames=6, seed=7)
    eager = generate(model, batch, sampling)
    assert compile_decoding(model)
    compiled = generate(model, batch, sampling)
    assert counters["stats"]["unique_graphs"] == 3 and not counters["graph_break"]
    for a, b in zip(eager.codes, compiled.codes, strict=True):
        assert a.shape == (model.config.num_codebooks, 6) and torch.equal(a, b)
    torch.testing.assert_close(compiled.decoder_logits, eager.decoder_logits, rtol=1e-3, atol=1e-3)
