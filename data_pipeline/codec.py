"""Stage 7: turns' audio → Mimi codes (32 codebooks at 12.5 Hz), batched, on the GPU when there is one.

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


class MimiEncoder:
    def __init__(
        self,
        name_or_path: str = "kyutai/mimi",
        num_codebooks: int = 32,
        device: str = "auto",
        batch_size: int | None = None,
    ):
        from transformers import MimiModel

        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        self.device, self.num_codebooks = torch.device(device), num_codebooks
        # Batching pays on a GPU; on a CPU the padding costs more than it saves (bench/bench_codec.py).
        self.batch_size = batch_size or (16 if self.device.type == "cuda" else 1)
        self.model = MimiModel.from_pretrained(name_or_path).eval().to(self.device)
        self.weights_id = str(name_or_path)
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
