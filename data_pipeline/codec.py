"""Stage 7: turns' audio → Mimi codes (32 codebooks at 12.5 Hz), batched, on the GPU when there is one; and
back (generated codes → 24 kHz audio, for evaluation).

transformers' `MimiModel` is the codec Sesame uses through moshi (same architecture and weights, published
as `kyutai/mimi`), and installs cleanly beside everything else. Its encoder is causal, so right-padding a
batch leaves every real frame's code unchanged: turns of similar length are encoded together and each is
cut back to `ceil(samples / 1920)` frames (1920 samples = 80 ms at 24 kHz). A partial last frame is
completed with silence; the pipeline cuts turns on frame boundaries, where the codes equal Mimi's own
encoding of the turn alone.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from data_pipeline.shards import MIMI_FRAME_RATE, MIMI_SAMPLE_RATE

SAMPLES_PER_FRAME = int(MIMI_SAMPLE_RATE / MIMI_FRAME_RATE)  # 1920


RANDOM_INIT = "random-init"


def fill_codebooks(mimi) -> None:
    """Random centroids for every codebook of a transformers Mimi (a fresh one's are all zero, so every code
    would be 0)."""
    from transformers.models.mimi.modeling_mimi import MimiEuclideanCodebook

    for module in mimi.modules():
        if isinstance(module, MimiEuclideanCodebook):
            module.embed_sum.normal_()
            module._embed = None  # the cached centroids


def random_mimi(seed: int = 0):
    """The real Mimi architecture with random weights, for offline runs and tests (kyutai/mimi cannot be
    downloaded there). Same seed, same weights."""
    from transformers import MimiConfig, MimiModel

    torch.manual_seed(seed)
    model = MimiModel(MimiConfig())
    fill_codebooks(model)
    return model


class MimiCodec:
    """`name_or_path`: a Hub id or a local `save_pretrained` directory; `random-init` builds `random_mimi(seed)`
    (its codes are a fixed function of the audio, fine for smoke runs, meaningless as speech tokens)."""

    def __init__(
        self,
        name_or_path: str = "kyutai/mimi",
        num_codebooks: int = 32,
        device: str = "auto",
        batch_size: int | None = None,
        seed: int = 0,
    ):
        from transformers import MimiModel

        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        self.device, self.num_codebooks = torch.device(device), num_codebooks
        # Batching pays on a GPU; on a CPU the padding costs more than it saves (bench/bench_codec.py).
        self.batch_size = batch_size or (16 if self.device.type == "cuda" else 1)
        if name_or_path == RANDOM_INIT:
            model, self.weights_id = random_mimi(seed), f"{RANDOM_INIT}:seed={seed}"
        else:
            model, self.weights_id = MimiModel.from_pretrained(name_or_path), str(name_or_path)
        self.model = model.eval().to(self.device)
        if (self.model.config.sampling_rate, self.model.config.frame_rate) != (MIMI_SAMPLE_RATE, MIMI_FRAME_RATE):
            raise ValueError(f"{name_or_path}: not Mimi's 24 kHz / 12.5 Hz configuration")

    @torch.inference_mode()
    def encode(self, audios: list[np.ndarray]) -> list[np.ndarray]:
        """24 kHz mono float32 arrays → uint16 codes `[num_codebooks, ceil(len / 1920)]`, in input order."""
        codes: list[np.ndarray | None] = [None] * len(audios)
        order = sorted(range(len(audios)), key=lambda i: len(audios[i]))  # similar lengths share a batch
        for start in range(0, len(order), self.batch_size):
            chunk = order[start : start + self.batch_size]
            length = max(len(audios[i]) for i in chunk)
            length = math.ceil(length / SAMPLES_PER_FRAME) * SAMPLES_PER_FRAME
            batch = torch.zeros(len(chunk), 1, length)
            for row, i in enumerate(chunk):
                batch[row, 0, : len(audios[i])] = torch.from_numpy(audios[i])
            out = self.model.encode(batch.to(self.device), num_quantizers=self.num_codebooks).audio_codes
            for row, i in enumerate(chunk):
                frames = math.ceil(len(audios[i]) / SAMPLES_PER_FRAME)
                codes[i] = out[row, :, :frames].cpu().numpy().astype(np.uint16)
        return codes

    @torch.inference_mode()
    def decode(self, codes: np.ndarray | torch.Tensor) -> np.ndarray:
        """Codes `[num_codebooks, n_frames]` → 24 kHz mono float32, 1920 samples per frame."""
        codes = torch.as_tensor(codes)
        if codes.ndim != 2 or codes.shape[0] != self.num_codebooks:
            raise ValueError(f"codes of shape {tuple(codes.shape)}: expected [{self.num_codebooks}, n_frames]")
        audio = self.model.decode(codes.long()[None].to(self.device)).audio_values
        return audio[0, 0, : codes.shape[1] * SAMPLES_PER_FRAME].float().cpu().numpy()
