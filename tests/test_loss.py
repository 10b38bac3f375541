"""The compute-amortized loss: unbiased, seeded, and really cheaper."""

import copy
import math

import pytest
import torch
from conftest import random_frames
from torch.utils.flop_counter import FlopCounterMode

from csm_train import CSM, csm_loss, decoder_frame_generator, select_decoder_frames


@pytest.fixture(scope="module")
def model(tiny_config):
    torch.manual_seed(0)
    return CSM(tiny_config).eval()


@pytest.fixture(scope="module")
def batch(tiny_config):
    return random_frames(tiny_config, batch=2, text_len=8, audio_len=150)


def test_subset_size_membership_and_reproducibility(batch):
    _, _, labels = batch
    n_targets = int((labels[:, 1:, 0] != -100).sum())  # 151 per row: 150 audio + the end frame
    subsets = {}
    for step in range(3):
        for rank in range(2):
            frames = select_decoder_frames(labels, 1 / 16, decoder_frame_generator(seed=7, step=step, rank=rank))
            assert int(frames.sum()) == math.ceil(n_targets / 16)
            assert (labels[..., 0][frames] != -100).all() and not frames[:, 0].any()
            again = select_decoder_frames(labels, 1 / 16, decoder_frame_generator(seed=7, step=step, rank=rank))
            assert torch.equal(frames, again)  # replayable from the seed (exact resume)
            subsets[step, rank] = frames
    assert len({tuple(f.flatten().nonzero().flatten().tolist()) for f in subsets.values()}) == 6  # all differ
    full = select_decoder_frames(labels, 1.0, decoder_frame_generator(0, 0))
    assert int(full.sum()) == n_targets
    with pytest.raises(ValueError, match=r"decoder fraction must be in \(0, 1\], got 0"):
        select_decoder_frames(labels, 0.0, decoder_frame_generator(0, 0))


@pytest.mark.slow
@torch.no_grad()
def test_amortized_decoder_loss_is_unbiased(model, batch):
    """Mean of the 1/16-subset decoder loss over many steps → the full decoder loss.

    Tolerance: a size-n subset drawn without replacement from N per-frame losses of spread s has mean with
    variance s²/n · (N-n)/(N-1); averaging S independent draws divides that by S. A 4-sigma bound fails a
    correct implementation with probability ~6e-5; a biased one (e.g. always the first frames, or the
    subset mean mis-normalised) lands far outside it."""
    tokens, tokens_mask, labels = batch
    # Sharpen the untrained decoder so per-frame losses spread out: with near-uniform logits every frame
    # costs ~log V and any subset, biased or not, would pass.
    model = copy.deepcopy(model)
    model.audio_head.mul_(30)
    full = csm_loss(model, tokens, tokens_mask, labels, decoder_fraction=1.0)

    out = model(tokens, tokens_mask)
    frames = select_decoder_frames(labels, 1.0, decoder_frame_generator(0, 0))[:, 1:]
    codes = labels[:, 1:][frames]
    logits = model.decoder_logits(out.hidden[:, :-1][frames], codes[:, :-1])
    per_frame = torch.nn.functional.cross_entropy(logits.transpose(1, 2), codes[:, 1:], reduction="none").mean(1)
    torch.testing.assert_close(per_frame.mean(), full.decoder_loss, atol=1e-4, rtol=0)

    S, N = 300, per_frame.numel()
    n = math.ceil(N / 16)
    draws = torch.stack(
        [
            csm_loss(model, tokens, tokens_mask, labels, generator=decoder_frame_generator(0, step)).decoder_loss
            for step in range(S)
        ]
    )
    stderr = per_frame.std() / math.sqrt(n) * math.sqrt((N - n) / (N - 1)) / math.sqrt(S)
    assert abs(draws.mean() - full.decoder_loss) < 4 * stderr, (draws.mean(), full.decoder_loss, stderr)
    # The bound has teeth: always training on the first n frames (a biased subset) falls outside it.
    first = torch.zeros_like(frames).flatten()
    first[frames.flatten().nonzero().flatten()[:n]] = True
    first = torch.cat([torch.zeros_like(labels[:, :1, 0], dtype=torch.bool), first.view_as(frames)], 1)
    biased = csm_loss(model, tokens, tokens_mask, labels, decoder_frames=first).decoder_loss
    assert abs(biased - full.decoder_loss) > 4 * stderr
    # c0 is always trained on every frame: identical whatever the subset.
    torch.testing.assert_close(
        csm_loss(model, tokens, tokens_mask, labels, generator=decoder_frame_generator(0, 1)).c0_loss, full.c0_loss
    )


def test_decoder_runs_on_the_subset_only(model, batch, tiny_config):
    """The decoder's input has N/16 rows (not N rows with a mask), and its FLOPs shrink accordingly."""
    tokens, tokens_mask, labels = batch
    rows = []
    hook = model.decoder.register_forward_hook(lambda module, args, out: rows.append(args[0].shape[0]))
    flops = {}
    try:
        for fraction in (1.0, 1 / 16):
            counter = FlopCounterMode(display=False)
            with counter, torch.no_grad():
                csm_loss(
                    model,
                    tokens,
                    tokens_mask,
                    labels,
                    decoder_fraction=fraction,
                    generator=decoder_frame_generator(0, 0),
                )
            flops[fraction] = sum(counter.get_flop_counts()["Global"].values())
    finally:
        hook.remove()
    N = int((labels[:, 1:, 0] != -100).sum())
    assert rows == [N, math.ceil(N / 16)]
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(tokens, tokens_mask)
    backbone = sum(counter.get_flop_counts()["Global"].values())
    decoder_full, decoder_amortized = flops[1.0] - backbone, flops[1 / 16] - backbone
    assert decoder_amortized / decoder_full == pytest.approx(math.ceil(N / 16) / N, rel=0.01)


def test_loss_weights_and_per_codebook_metrics(model, batch, tiny_config):
    tokens, tokens_mask, labels = batch
    K = tiny_config.num_codebooks
    frames = select_decoder_frames(labels, 0.25, decoder_frame_generator(3, 0))
    plain = csm_loss(model, tokens, tokens_mask, labels, decoder_frames=frames)
    weighted = csm_loss(model, tokens, tokens_mask, labels, decoder_frames=frames, w_semantic=20.0, w_acoustic=1.0)
    torch.testing.assert_close(weighted.loss, 20 * plain.c0_loss + plain.decoder_loss)
    torch.testing.assert_close(plain.loss, plain.c0_loss + plain.decoder_loss)
    assert plain.codebook_losses.shape == plain.codebook_accuracies.shape == (K,)
    torch.testing.assert_close(plain.codebook_losses[0], plain.c0_loss.detach())
    torch.testing.assert_close(plain.codebook_losses[1:].mean(), plain.decoder_loss.detach())
    assert ((plain.codebook_accuracies >= 0) & (plain.codebook_accuracies <= 1)).all()
    assert plain.num_decoder_frames == int(frames.sum()) and plain.num_audio_frames == 302
    # An untrained model is near uniform over the 2051 codes.
    assert abs(plain.c0_loss.item() - math.log(tiny_config.audio_vocab_size)) < 0.5


def test_gradients_reach_every_parameter(tiny_config, batch):
    tokens, tokens_mask, labels = batch
    torch.manual_seed(0)
    model = CSM(tiny_config).train()
    csm_loss(model, tokens, tokens_mask, labels, generator=decoder_frame_generator(0, 0)).loss.backward()
    no_grad = [n for n, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert no_grad == []


def test_batch_without_audio_targets_is_a_clear_error(model, batch):
    tokens, tokens_mask, labels = batch
    with pytest.raises(ValueError, match="no audio target frames"):
        csm_loss(model, tokens, tokens_mask, torch.full_like(labels, -100))
