"""Generation with KV caches: the cached, frame-by-frame logits equal a full forward pass over the same
frames; batching prompts of different lengths changes nothing; sampling is reproducible; too-long inputs
fail clearly."""

import numpy as np
import pytest
import torch

from csm_train import CSM, CSMConfig
from csm_train.generate import Sampling, generate, prompt_frames, sample_topk, stream
from csm_train.layout import Segment
from csm_train.tokenizer import ByteTokenizer

K = 32


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    config = CSMConfig.preset("tiny", text_vocab_size=ByteTokenizer.vocab_size)
    return CSM(config).eval()


def prompt(text, speaker=0, context_frames=0, seed=0):
    g = torch.Generator().manual_seed(seed)
    context = []
    if context_frames:
        context = [Segment(1, "hello there", torch.randint(1, 2048, (K, context_frames), generator=g))]
    return prompt_frames(ByteTokenizer(), K, text, speaker, context)


def test_cached_logits_equal_a_full_forward_pass(model):
    tokens, mask = prompt("how are you today", context_frames=6)
    out = generate(model, [(tokens, mask)], Sampling(max_frames=5, temperature=0.9, topk=50, seed=0))
    steps = out.c0_logits.shape[1]
    frames = out.codes[0].T  # [n, K]
    assert steps == 5 and frames.shape == (5, K)
    # The same frames as one sequence, no cache: prompt + every generated frame but the last.
    audio = torch.cat([frames[:-1], torch.zeros(steps - 1, 1, dtype=torch.long)], dim=1)
    full_tokens = torch.cat([tokens, audio])[None]
    full_mask = torch.cat([mask, torch.ones_like(audio, dtype=torch.bool)])[None]
    full_mask[0, len(tokens) :, K] = False
    with torch.no_grad():
        full = model(full_tokens, full_mask)
        h = full.hidden[0, len(tokens) - 1 :]  # the states that predicted each generated frame
        decoder = model.decoder_logits(h, frames[:, : K - 1])
    torch.testing.assert_close(out.c0_logits[0], full.c0_logits[0, len(tokens) - 1 :], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out.decoder_logits[0], decoder, atol=1e-5, rtol=1e-5)


def test_batched_prompts_of_different_lengths_generate_as_alone(model):
    short, long = prompt("hi", seed=1), prompt("a much longer line of text", context_frames=9, seed=2)
    alone = [generate(model, [p], Sampling(max_frames=4, temperature=0)) for p in (short, long)]
    together = generate(model, [short, long], Sampling(max_frames=4, temperature=0))
    for row, single in enumerate(alone):
        torch.testing.assert_close(together.c0_logits[row], single.c0_logits[0], atol=1e-4, rtol=1e-4)
        assert torch.equal(together.codes[row], single.codes[0])


def test_sampling_is_reproducible_from_a_seed(model):
    p = prompt("same seed, same audio")
    first, second = (generate(model, [p], Sampling(max_frames=4, seed=7)).codes[0] for _ in range(2))
    other = generate(model, [p], Sampling(max_frames=4, seed=8)).codes[0]
    assert torch.equal(first, second) and not torch.equal(first, other)


def test_top_k_never_samples_outside_the_k_most_likely():
    logits = torch.randn(64, 100, generator=torch.Generator().manual_seed(0))
    allowed = logits.topk(5).indices
    uniform = torch.rand(64, generator=torch.Generator().manual_seed(1))
    samples = sample_topk(logits, temperature=1.0, topk=5, uniform=uniform)
    assert (allowed == samples[:, None]).any(dim=1).all()
    assert torch.equal(sample_topk(logits, 0, 5, uniform), logits.argmax(dim=-1))


def test_sampling_draws_the_softmax_and_a_row_alone_as_in_any_batch():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(1, 8, generator=g).expand(200_000, 8)
    codes = sample_topk(logits, 0.7, 5, torch.rand(200_000, generator=g))
    scaled = logits[0] / 0.7
    want = scaled.masked_fill(scaled < scaled.topk(5).values[-1], float("-inf")).softmax(-1)
    assert (torch.bincount(codes, minlength=8) / len(codes) - want).abs().max() < 0.005  # ~4 sigma
    # Rows with their own temperature and top-k: each row's code is what it gets sampled alone.
    logits, uniform = torch.randn(6, 2051, generator=g), torch.rand(6, generator=g)
    temperature, topk = torch.tensor([0.9, 0.0, 1.3, 0.5, 0.9, 2.0]), torch.tensor([50, 50, 7, 2051, 1, 300])
    batched = sample_topk(logits, temperature, topk, uniform)
    alone = [sample_topk(logits[i : i + 1], float(temperature[i]), int(topk[i]), uniform[i : i + 1]) for i in range(6)]
    assert torch.equal(batched, torch.cat(alone)) and batched[1] == logits[1].argmax()


def test_an_all_zero_frame_ends_the_audio(model, monkeypatch):
    import csm_train.generate as gen

    def end_at_third_step(logits, temperature, topk, uniform, calls=[0]):  # noqa: B006 (a call counter)
        calls[0] += 1
        step = (calls[0] - 1) // K  # K samples per frame
        return torch.zeros(len(logits), dtype=torch.long) if step == 2 else logits.argmax(dim=-1).clamp(min=1)

    monkeypatch.setattr(gen, "sample_topk", end_at_third_step)
    out = generate(model, [prompt("stop soon")], Sampling(max_frames=10))
    assert out.codes[0].shape == (K, 2) and out.c0_logits.shape[1] == 3


def test_too_long_inputs_fail_clearly(model):
    limit = model.config.backbone.max_seq_len
    with pytest.raises(ValueError, match="Inputs too long"):
        generate(model, [prompt("x", context_frames=limit - 40)], Sampling(max_frames=50))


def test_streamed_audio_joins_to_the_decoded_answer(model):
    from data_pipeline.codec import RANDOM_INIT, MimiCodec

    codec = MimiCodec(RANDOM_INIT, device="cpu")
    p = prompt("streaming, chunk by chunk")
    chunks = list(stream(model, p, codec, Sampling(max_frames=8, temperature=0.9, seed=0), chunk_frames=3))
    codes = generate(model, [p], Sampling(max_frames=8, temperature=0.9, seed=0)).codes[0]
    assert [len(c) for c in chunks] == [3 * 1920, 3 * 1920, 2 * 1920]  # random weights never end early
    whole = codec.decode(codes)
    # fp32 rounding of a random Mimi reaches ~1e-4 on peaks of ~30: compare relative to the peak
    assert abs(np.concatenate(chunks) - whole).max() <= 1e-5 * abs(whole).max()
