"""Stage 7: turns' audio → Mimi codes (32 codebooks at 12.5 Hz), batched, on the GPU when there is one; and
back (generated codes → 24 kHz audio, for evaluation).

transformers' `MimiModel` is the codec Sesame uses through moshi (same architecture and weights, published
as `kyutai/mimi`), and installs cleanly beside everything else. Its encoder is causal, so right-padding a
batch leaves every real frame's code unchanged: turns of similar length are encoded together and each is
cut back to `ceil(samples / 1920)` frames (1920 samples = 80 ms at 24 kHz). A partial last frame is
completed with silence; the pipeline cuts turns on frame boundaries, where the codes equal Mimi's own
encoding of the turn alone.

Streaming decode (`MimiCodec.streaming_decoder()`, for audio while generation runs): transformers decodes
only whole sequences, but every layer of Mimi's decoder is causal, so decoding chunk by chunk gives the full
decode exactly when each layer carries its own state across chunks: convolutions their left context,
transposed convolutions their overlap-add tail, the transformer its KV cache (`MimiStreamingDecoder`).
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import nn

from data_pipeline.device import resolve_device
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

        self.device, self.num_codebooks = torch.device(resolve_device(device)), num_codebooks
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

    def streaming_decoder(self) -> MimiStreamingDecoder:
        """A fresh `MimiStreamingDecoder` over this codec's model: feed it frames as they are generated."""
        return MimiStreamingDecoder(self.model, self.num_codebooks, self.device)


class MimiStreamingDecoder:
    """Codes → 24 kHz audio, `n` frames in, exactly `n * 1920` samples out, as frames arrive.

    Why it is exact: every layer of Mimi's decoder is causal (output sample t depends on inputs ≤ t only), so
    the full decode of all frames can be computed chunk by chunk provided each layer carries across chunks
    the state its next chunk needs, that is, what the full pass would have seen on its left. transformers'
    `MimiModel.decode` keeps no such state for the convolutions, so here the decoder's modules are walked one
    by one (their own weights, nothing copied), each with its state:

    - causal `MimiConv1d` (stride 1): its last `padding_total` input samples; before the first chunk, the
      left padding the full pass adds (zeros, or the first sample repeated for `pad_mode="replicate"`);
    - causal `MimiConvTranspose1d` (overlap-add): a chunk of `L` steps yields `L * stride` final samples
      plus a tail of `kernel - stride` samples that the next chunk's first samples overlap; the tail is kept
      without its bias (the next chunk's output already holds it once) and added to the next chunk;
    - the decoder transformer: a KV cache (`DynamicCache`, its sliding-window layers keep the last 249
      steps, which is what the full pass's 250-step sliding-window mask lets each step see) and the
      absolute step count for the rotary positions;
    - the quantizer's dequantisation and elementwise layers (ELU) are per time step and need none.

    Unknown layer types, non-causal or strided convolutions and `pad_mode="reflect"`/`"circular"` (whose
    padding looks at later samples) raise `NotImplementedError`: a future transformers change fails loudly
    instead of decoding wrong audio. Single stream (batch of one), like `MimiCodec.decode`."""

    POINTWISE = (nn.ELU, nn.Identity, nn.LeakyReLU, nn.Tanh, nn.SiLU, nn.GELU)
    CAUSAL_PAD_MODES = ("constant", "replicate")

    def __init__(self, model, num_codebooks: int, device: torch.device | str = "cpu"):
        decoder = model.decoder
        if decoder is None:
            raise ValueError("this Mimi has no decoder (`decoder_config=None`)")
        self.model, self.decoder, self.num_codebooks = model, decoder, num_codebooks
        self.device = torch.device(device)
        for module in decoder.decoder_seanet.layers:  # fail now, not on the first frame
            self._check(module)
        if decoder.upsample is not None:
            self._check(decoder.upsample)
        self.reset()

    def reset(self) -> None:
        """Forget every frame seen: the next `decode` starts a new stream."""
        from transformers import DynamicCache

        self._state: dict[nn.Module, torch.Tensor] = {}  # per conv layer: left context / overlap-add tail
        self._cache = DynamicCache(config=self.decoder.decoder_transformer.config)
        self._steps = 0  # transformer steps seen (2 per frame): the next step's rotary position

    @torch.inference_mode()
    def decode(self, codes: np.ndarray | torch.Tensor) -> np.ndarray:
        """Codes `[num_codebooks, n]` of the next `n >= 1` frames → their `n * 1920` float32 samples."""
        codes = torch.as_tensor(codes)
        if codes.ndim != 2 or codes.shape[0] != self.num_codebooks or codes.shape[1] < 1:
            raise ValueError(f"codes of shape {tuple(codes.shape)}: expected [{self.num_codebooks}, n] with n >= 1")
        latents = self.model.quantizer.decode(codes.long()[None].to(self.device))
        hidden = latents if self.decoder.upsample is None else self._layer(self.decoder.upsample, latents)
        steps = hidden.shape[-1]
        positions = torch.arange(self._steps, self._steps + steps, device=hidden.device)[None]
        hidden = self.decoder.decoder_transformer(
            hidden.transpose(1, 2), past_key_values=self._cache, position_ids=positions, use_cache=True
        ).last_hidden_state.transpose(1, 2)
        self._steps += steps
        for module in self.decoder.decoder_seanet.layers:
            hidden = self._layer(module, hidden)
        audio = hidden[0, 0].float().cpu().numpy()
        assert len(audio) == codes.shape[1] * SAMPLES_PER_FRAME, (len(audio), codes.shape)
        return audio

    def _check(self, module: nn.Module) -> None:
        from transformers.models.mimi.modeling_mimi import MimiConv1d, MimiConvTranspose1d, MimiResnetBlock

        if isinstance(module, MimiConv1d):
            if not module.causal or module.conv.stride[0] != 1 or module.pad_mode not in self.CAUSAL_PAD_MODES:
                raise NotImplementedError(
                    f"streaming {module}: causal, stride 1, pad_mode in {self.CAUSAL_PAD_MODES} only "
                    f"(causal={module.causal}, stride={module.conv.stride[0]}, pad_mode={module.pad_mode!r})"
                )
        elif isinstance(module, MimiConvTranspose1d):
            if not module.causal or module.padding_left != 0:
                raise NotImplementedError(
                    f"streaming {module}: causal with trim_right_ratio 1.0 only (causal={module.causal}, "
                    f"padding_left={module.padding_left})"
                )
        elif isinstance(module, MimiResnetBlock):
            for sub in (*module.block, module.shortcut):
                self._check(sub)
        elif not isinstance(module, self.POINTWISE):
            raise NotImplementedError(f"streaming decode does not know layer {type(module).__name__}: {module}")

    def _layer(self, module: nn.Module, x: torch.Tensor) -> torch.Tensor:
        """One decoder layer on the chunk `x` `[1, channels, steps]`, carrying its state to the next chunk."""
        from transformers.models.mimi.modeling_mimi import MimiConv1d, MimiConvTranspose1d, MimiResnetBlock

        if isinstance(module, MimiConv1d):
            pad, state = int(module.padding_total), self._state.get(module)
            if state is None:  # the stream's start: the full pass's own left padding
                x = module._pad1d(x, (pad, 0), mode=module.pad_mode)
            else:
                x = torch.cat([state, x], dim=-1)
            self._state[module] = x[..., x.shape[-1] - pad :]
            return module.conv(x)
        if isinstance(module, MimiConvTranspose1d):
            y = module.conv(x)
            final = x.shape[-1] * module.conv.stride[0]
            tail = self._state.get(module)
            if tail is not None:
                y[..., : tail.shape[-1]] += tail
            tail = y[..., final:]
            if module.conv.bias is not None:
                tail = tail - module.conv.bias[:, None]
            self._state[module] = tail
            return y[..., :final]
        if isinstance(module, MimiResnetBlock):
            residual = x
            for sub in module.block:
                x = self._layer(sub, x)
            return self._layer(module.shortcut, residual) + x
        if isinstance(module, self.POINTWISE):
            return module(x)
        raise NotImplementedError(f"streaming decode does not know layer {type(module).__name__}: {module}")
