"""CSM's training loss, with Sesame's compute amortization.

* Codebook 0 (semantic): cross-entropy on every audio frame. The backbone state at frame t-1 predicts
  frame t's c0, so `c0_logits[:, t-1]` is scored against `labels[:, t, 0]`.
* Codebooks 1..K-1 (acoustic): the depth decoder is run on a random subset of the audio frames only
  (1/16 by default) and its cross-entropy is averaged over that subset. The decoder costs about as much as
  the backbone per frame at 1B scale, so this is what makes a 2048-frame batch affordable; a uniform
  subset drawn without replacement keeps the loss an unbiased estimate of the full one.

`labels [B, T, K]` follows transformers' CSM: the frame's codes where the frame is a target, -100 elsewhere
(text frames, padding, audio that is only context).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from csm_train.layout import IGNORE_INDEX
from csm_train.model import CSM


@dataclass
class LossOutput:
    loss: torch.Tensor  # w_semantic * c0_loss + w_acoustic * decoder_loss: what backward() is called on
    c0_loss: torch.Tensor
    decoder_loss: torch.Tensor
    codebook_losses: torch.Tensor  # [K]: codebook 0 from the backbone, 1..K-1 from the depth decoder
    codebook_accuracies: torch.Tensor  # [K]: top-1 accuracy, same frames
    num_audio_frames: int
    num_decoder_frames: int


def decoder_frame_generator(seed: int, step: int, rank: int = 0, micro_batch: int = 0) -> torch.Generator:
    """A generator for the frame subset of one micro-batch: different for every step, rank and
    gradient-accumulation micro-batch, the same when that micro-batch is replayed from the same seed."""
    mixed = np.random.SeedSequence([seed, step, rank, micro_batch]).generate_state(1, dtype=np.uint64)[0]
    return torch.Generator().manual_seed(int(mixed))


def select_decoder_frames(
    labels: torch.Tensor, fraction: float, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Bool `[B, T]`: the audio target frames the depth decoder trains on this step.

    Exactly `ceil(fraction * N)` of the N target frames, drawn uniformly without replacement, so the
    decoder's cost is fixed per step (no rank waits on an unlucky draw) and the mean over the subset is
    unbiased. `fraction=1.0` selects every frame (no amortization). Without a `generator` the draw comes
    from torch's global RNG."""
    if not 0.0 < fraction <= 1.0:
        raise ValueError(f"decoder fraction must be in (0, 1], got {fraction}")
    is_target = labels[..., 0] != IGNORE_INDEX
    is_target[:, 0] = False  # frame 0 has no previous backbone state to predict it from
    if fraction == 1.0:
        return is_target
    target_idx = is_target.flatten().nonzero().squeeze(1)
    n = math.ceil(fraction * target_idx.numel())
    chosen = target_idx[torch.randperm(target_idx.numel(), generator=generator)[:n].to(target_idx.device)]
    selected = torch.zeros(is_target.numel(), dtype=torch.bool, device=labels.device)
    selected[chosen] = True
    return selected.view_as(is_target)


def csm_loss(
    model: CSM,
    tokens: torch.Tensor,
    tokens_mask: torch.Tensor,
    labels: torch.Tensor,
    *,
    decoder_frames: torch.Tensor | None = None,
    decoder_fraction: float = 1 / 16,
    generator: torch.Generator | None = None,
    w_semantic: float = 1.0,
    w_acoustic: float = 1.0,
    input_pos: torch.Tensor | None = None,
    mask: torch.Tensor | None = None,
) -> LossOutput:
    """Forward + loss. The decoder trains on `decoder_frames [B, T]` if given, else on a subset drawn by
    `select_decoder_frames(labels, decoder_fraction, generator)`."""
    if not (labels[:, 1:, 0] != IGNORE_INDEX).any():
        raise ValueError("batch has no audio target frames (labels are all -100): nothing to train on")
    if decoder_frames is None:
        decoder_frames = select_decoder_frames(labels, decoder_fraction, generator)
    out = model(tokens, tokens_mask, input_pos=input_pos, mask=mask, decoder_frames=decoder_frames)

    # Codebook 0: position t-1 predicts frame t. Shifting the targets (not slicing the logits) keeps the
    # [B*T, V] logits a view: no copy of the largest tensor of the loss.
    V = out.c0_logits.shape[-1]
    c0_targets = F.pad(labels[:, 1:, 0], (0, 1), value=IGNORE_INDEX).flatten()
    c0_valid = c0_targets != IGNORE_INDEX
    c0_logits = out.c0_logits.float().view(-1, V)
    c0_loss = F.cross_entropy(c0_logits, c0_targets, ignore_index=IGNORE_INDEX)
    c0_accuracy = (c0_logits.detach().argmax(-1) == c0_targets)[c0_valid].float().mean()

    # Codebooks 1..K-1 on the chosen frames only: the decoder saw [n, K] positions, not [B*T, K] masked.
    chosen = decoder_frames[:, 1:]  # frame t is predicted from the backbone state at t-1
    frame_codes = labels[:, 1:][chosen]  # [n, K]
    logits = out.decoder_logits.float()  # [n, K-1, V]
    targets = frame_codes[:, 1:]
    per_token = F.cross_entropy(
        logits.reshape(-1, V), targets.flatten(), ignore_index=IGNORE_INDEX, reduction="none"
    ).view_as(targets)
    valid = (targets != IGNORE_INDEX).float()
    decoder_loss = (per_token * valid).sum() / valid.sum().clamp(min=1)
    codebook_losses = (per_token * valid).sum(0) / valid.sum(0).clamp(min=1)
    correct = (logits.detach().argmax(-1) == targets).float() * valid
    codebook_accuracies = correct.sum(0) / valid.sum(0).clamp(min=1)

    return LossOutput(
        loss=w_semantic * c0_loss + w_acoustic * decoder_loss,
        c0_loss=c0_loss,
        decoder_loss=decoder_loss,
        codebook_losses=torch.cat([c0_loss[None], codebook_losses]).detach(),
        codebook_accuracies=torch.cat([c0_accuracy[None], codebook_accuracies]).detach(),
        num_audio_frames=int(c0_valid.sum()),
        num_decoder_frames=int(chosen.sum()),
    )
