"""A CPU smoke run of the whole training step: layout → model → amortized loss → AdamW, on a few
synthetic two-speaker conversations. It shows the loss falling in about a minute; the real trainer
(`python -m csm_train +experiment=...`) replaces it."""

from __future__ import annotations

import time

import torch

from csm_train.layout import Segment, collate, conversation_frames
from csm_train.loss import csm_loss, decoder_frame_generator
from csm_train.model import CSM, CSMConfig
from csm_train.tokenizer import ByteTokenizer

LINES = [
    "Did you hear the news this morning?",
    "No, what happened?",
    "They finally opened the new library downtown.",
    "Oh nice, we should go this weekend.",
]


def synthetic_conversations(num_codebooks: int, count: int, seed: int) -> list[list[Segment]]:
    """Two speakers alternating over `LINES`, each turn with 0.5–2 s of random Mimi codes."""
    g = torch.Generator().manual_seed(seed)
    conversations = []
    for _ in range(count):
        turns = []
        for i, line in enumerate(LINES):
            n_frames = int(torch.randint(6, 25, (1,), generator=g))
            turns.append(Segment(i % 2, line, torch.randint(0, 2048, (num_codebooks, n_frames), generator=g)))
        conversations.append(turns)
    return conversations


def run(preset: str = "tiny", steps: int = 40, batch_size: int = 4, lr: float = 2e-3, seed: int = 0) -> list[float]:
    torch.manual_seed(seed)
    tokenizer = ByteTokenizer()
    config = CSMConfig.preset(preset, text_vocab_size=tokenizer.vocab_size)
    model = CSM(config).train()
    batch = collate(
        [
            conversation_frames(c, tokenizer, config.num_codebooks)
            for c in synthetic_conversations(config.num_codebooks, batch_size, seed)
        ]
    )
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    print(f"CSM {preset}: {model.num_parameters():,} parameters; batch {tuple(batch.tokens.shape)} frames")
    losses = []
    start = time.perf_counter()
    for step in range(steps):
        out = csm_loss(
            model, batch.tokens, batch.tokens_mask, batch.labels, generator=decoder_frame_generator(seed, step)
        )
        optimizer.zero_grad(set_to_none=True)
        out.loss.backward()
        optimizer.step()
        losses.append(out.loss.item())
        if step % 5 == 0 or step == steps - 1:
            print(
                f"step {step:3d}  loss {out.loss.item():.3f}  c0 {out.c0_loss.item():.3f}  "
                f"decoder {out.decoder_loss.item():.3f} ({out.num_decoder_frames}/{out.num_audio_frames} frames)  "
                f"{time.perf_counter() - start:.1f}s"
            )
    print(f"loss {losses[0]:.3f} → {losses[-1]:.3f}")
    return losses
