"""Sesame's Conversational Speech Model (CSM), the whole model in one file.

CSM is two Llama-3.2-style decoders:

* the **backbone** runs over frames. A frame is one row of `tokens [B, T, K+1]`: columns `0..K-1` hold
  the K Mimi codebooks of one 80 ms audio frame, column `K` holds one text token. The backbone input at a
  frame is the sum of the embeddings of the columns set in `tokens_mask`, and its last hidden state goes
  through `codebook0_head` to predict codebook 0 of the *next* frame;
* the **depth decoder** runs *inside* one frame, over K positions `[h_t, c0, c1, ..., c(K-2)]`
  (projected from the backbone width to its own), and predicts codebooks 1..K-1 with one head each
  (`audio_head [K-1, D_decoder, audio_vocab]`).

Parameter names are those of Sesame's released checkpoint (torchtune-style: `attn.q_proj`,
`attn.output_proj`, `mlp.w1/w2/w3`, `sa_norm.scale`, `mlp_norm.scale`, `norm.scale`), so the
`sesame/csm-1b` weights load strictly. That also fixes the RoPE convention: torchtune rotates
*interleaved* pairs (dims 2i, 2i+1), Hugging Face rotates halves; `formats.py` permutes q/k rows between
the two.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib.util
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention.flex_attention import BlockMask, flex_attention
from torch.utils.checkpoint import checkpoint

# --------------------------------------------------------------------------------------------------------
# Config


@dataclass
class RopeScaling:
    """Llama 3's frequency-dependent RoPE scaling (`rope_type: llama3`), in Meta's/torchtune's terms."""

    factor: float = 32.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_context_len: int = 8192


@dataclass
class TransformerConfig:
    num_layers: int
    dim: int
    num_heads: int
    num_kv_heads: int
    ffn_dim: int
    max_seq_len: int
    norm_eps: float = 1e-5
    rope_base: float = 500_000.0
    rope_scaling: RopeScaling | None = field(default_factory=RopeScaling)

    @property
    def head_dim(self) -> int:
        return self.dim // self.num_heads

    def __post_init__(self):
        if isinstance(self.rope_scaling, dict):
            self.rope_scaling = RopeScaling(**self.rope_scaling)
        if self.dim % self.num_heads or self.num_heads % self.num_kv_heads:
            raise ValueError(
                f"dim={self.dim} must divide by num_heads={self.num_heads}, and num_heads by "
                f"num_kv_heads={self.num_kv_heads}"
            )


# Sesame's two flavors (`models.py` of SesameAILabs/csm: llama3_2_1B and llama3_2_100M).
LLAMA_1B = dict(num_layers=16, dim=2048, num_heads=32, num_kv_heads=8, ffn_dim=8192, max_seq_len=2048)
LLAMA_100M = dict(num_layers=4, dim=1024, num_heads=8, num_kv_heads=2, ffn_dim=8192, max_seq_len=2048)

# Backbone / depth-decoder shapes per preset. `1b` is the released csm-1b. `3b` and `8b` take the
# Llama-3.2-3B and Llama-3.1-8B backbones; the paper sizes their decoders at 250M and 300M without shapes.
# Sesame's "100M" decoder is the 4-layer llama-100M (111M counting its layers only), so counted the same
# way 9 layers make 250M and 11 make 306M; width stays 1024. `100m` has ~100M parameters outside the
# embeddings (229M with them, at Llama-3.2's text vocabulary); `tiny` is for tests and CPU smoke runs.
_PRESETS: dict[str, tuple[dict, dict, int]] = {
    # name: (backbone, decoder, text_vocab_size)
    "tiny": (
        dict(num_layers=2, dim=128, num_heads=4, num_kv_heads=2, ffn_dim=384, max_seq_len=2048),
        dict(num_layers=2, dim=64, num_heads=4, num_kv_heads=2, ffn_dim=192, max_seq_len=2048),
        4096,
    ),
    "100m": (
        dict(num_layers=12, dim=640, num_heads=10, num_kv_heads=2, ffn_dim=2560, max_seq_len=2048),
        dict(num_layers=4, dim=384, num_heads=6, num_kv_heads=2, ffn_dim=1536, max_seq_len=2048),
        128_256,
    ),
    "1b": (LLAMA_1B, LLAMA_100M, 128_256),
    "3b": (
        dict(num_layers=28, dim=3072, num_heads=24, num_kv_heads=8, ffn_dim=8192, max_seq_len=2048),
        dict(LLAMA_100M, num_layers=9),
        128_256,
    ),
    "8b": (
        dict(num_layers=32, dim=4096, num_heads=32, num_kv_heads=8, ffn_dim=14336, max_seq_len=2048),
        dict(LLAMA_100M, num_layers=11),
        128_256,
    ),
}


@dataclass
class CSMConfig:
    backbone: TransformerConfig
    decoder: TransformerConfig
    text_vocab_size: int = 128_256
    audio_vocab_size: int = 2051  # 2048 Mimi codes + 3 reserved
    num_codebooks: int = 32
    activation_checkpointing: bool = False  # recompute each layer in backward: memory for ~1/3 more compute

    def __post_init__(self):
        if isinstance(self.backbone, dict):
            self.backbone = TransformerConfig(**self.backbone)
        if isinstance(self.decoder, dict):
            self.decoder = TransformerConfig(**self.decoder)
        if self.num_codebooks < 2:
            raise ValueError(f"num_codebooks={self.num_codebooks}: CSM needs at least 2 (c0 + one decoder head)")

    @classmethod
    def preset(cls, name: str, **overrides) -> CSMConfig:
        """`CSMConfig.preset("1b")`; keyword overrides replace top-level fields (e.g. `text_vocab_size`)."""
        if name not in _PRESETS:
            raise ValueError(f"unknown CSM preset {name!r}; choose one of {sorted(_PRESETS)}")
        backbone, decoder, text_vocab_size = _PRESETS[name]
        fields = dict(backbone=dict(backbone), decoder=dict(decoder), text_vocab_size=text_vocab_size)
        return cls(**{**fields, **overrides})

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


# --------------------------------------------------------------------------------------------------------
# Building blocks (torchtune's modules, under their names)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.scale = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Normalise in fp32 whatever the compute dtype: bf16 sums of squares lose too much.
        x_fp32 = x.float()
        x_normed = x_fp32 * torch.rsqrt(x_fp32.pow(2).mean(-1, keepdim=True) + self.eps)
        return x_normed.type_as(x) * self.scale


def rope_frequencies(cfg: TransformerConfig) -> torch.Tensor:
    """Inverse frequencies `[head_dim/2]`, with Llama 3's scaling: long wavelengths are slowed by `factor`,
    short ones kept, the band between interpolated smoothly."""
    dim = cfg.head_dim
    freqs = 1.0 / (cfg.rope_base ** (torch.arange(0, dim, 2, dtype=torch.float) / dim))
    s = cfg.rope_scaling
    if s is None:
        return freqs
    wavelen = 2 * math.pi / freqs
    low_freq_wavelen = s.original_context_len / s.low_freq_factor
    high_freq_wavelen = s.original_context_len / s.high_freq_factor
    smooth = (s.original_context_len / wavelen - s.low_freq_factor) / (s.high_freq_factor - s.low_freq_factor)
    smoothed = (1 - smooth) * freqs / s.factor + smooth * freqs
    scaled = torch.where(wavelen > low_freq_wavelen, freqs / s.factor, smoothed)
    return torch.where(wavelen < high_freq_wavelen, freqs, scaled)


def apply_rope(x: torch.Tensor, rotation: torch.Tensor) -> torch.Tensor:
    """Rotate interleaved pairs `(x[2i], x[2i+1])` of `x [B, H, T, head_dim]` by the unit complex numbers
    `rotation [B, 1, T, head_dim/2]` (torchtune's pairing, the one Sesame's weights were trained with).
    One complex multiply in fp32 is several times faster than the cos/sin arithmetic, forward and backward."""
    pairs = torch.view_as_complex(x.float().unflatten(-1, (-1, 2)).contiguous())
    return torch.view_as_real(pairs * rotation).flatten(-2).type_as(x)


class KVCache(nn.Module):
    """Static key/value cache for one attention layer: `[B, H_kv, max_seq_len, head_dim]`, written at the
    positions being decoded. Entries past the current position are masked, so a cache never needs zeroing."""

    def __init__(self, batch_size: int, max_seq_len: int, num_kv_heads: int, head_dim: int, dtype, device):
        super().__init__()
        shape = (batch_size, num_kv_heads, max_seq_len, head_dim)
        self.register_buffer("k", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer("v", torch.zeros(shape, dtype=dtype, device=device), persistent=False)

    def update(self, positions: torch.Tensor, k: torch.Tensor, v: torch.Tensor, end: int):
        """Write `k, v [B, H_kv, T, head_dim]` at `positions [T]`; return keys/values `0..end-1`."""
        self.k[:, :, positions] = k.to(self.k.dtype)
        self.v[:, :, positions] = v.to(self.v.dtype)
        return self.k[:, :, :end], self.v[:, :, :end]


@functools.cache
def _compiled_flex_attention():
    return torch.compile(flex_attention) if importlib.util.find_spec("triton") else None


def document_attention(q, k, v, block_mask: BlockMask) -> torch.Tensor:
    """FlexAttention under a block mask (packed rows: `data.block_mask`). Only compiled is it a fused kernel
    that skips the tiles the mask rules out (eager, it materialises the scores). So on CUDA compile just this
    kernel, as torchtitan does, and leave the model eager; inside a compiled model, leave it to that compile;
    elsewhere (CPU, where it has no backward anyway, or without Triton) run the eager reference."""
    compiled = _compiled_flex_attention() if q.is_cuda and not torch.compiler.is_compiling() else None
    return (compiled or flex_attention)(q, k, v, block_mask=block_mask, enable_gqa=True)


class Attention(nn.Module):
    def __init__(self, cfg: TransformerConfig):
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        self.q_proj = nn.Linear(cfg.dim, cfg.num_heads * cfg.head_dim, bias=False)
        self.k_proj = nn.Linear(cfg.dim, cfg.num_kv_heads * cfg.head_dim, bias=False)
        self.v_proj = nn.Linear(cfg.dim, cfg.num_kv_heads * cfg.head_dim, bias=False)
        self.output_proj = nn.Linear(cfg.num_heads * cfg.head_dim, cfg.dim, bias=False)
        self.kv_cache: KVCache | None = None

    def forward(self, x, rotation, input_pos: torch.Tensor | None, mask: torch.Tensor | BlockMask | None):
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.num_heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(B, T, self.num_kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(B, T, self.num_kv_heads, self.head_dim).transpose(1, 2)
        q, k = apply_rope(q, rotation), apply_rope(k, rotation)

        if self.kv_cache is not None:
            if input_pos is None:
                raise ValueError("a model with KV caches needs input_pos: the positions being decoded")
            if isinstance(mask, BlockMask):
                raise ValueError("KV-cache decoding takes a dense bool mask, not a FlexAttention BlockMask")
            # Eager: keys up to the last position written (a host sync, no wasted work). Compiled: the whole
            # static cache, later positions masked, so shapes never change and nothing waits for the device.
            end = self.kv_cache.k.shape[2] if torch.compiler.is_compiling() else int(input_pos.max()) + 1
            k, v = self.kv_cache.update(input_pos[0], k, v, end)
            # A query at position p sees cached keys 0..p (causal over the whole cache).
            causal = torch.arange(end, device=x.device) <= input_pos[:, :, None]  # [B, T, end]
            mask = causal[:, None] if mask is None else mask[..., :end] & causal[:, None]

        if isinstance(mask, BlockMask):
            # Packed rows: SDPA given a dense mask cannot use flash attention; a block mask keeps a fused kernel.
            y = document_attention(q, k, v, mask)
        else:
            # GQA without materialising repeated K/V heads; is_causal lets SDPA pick its fused kernels.
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None, enable_gqa=True)
        return self.output_proj(y.transpose(1, 2).reshape(B, T, -1))


class FeedForward(nn.Module):
    """SwiGLU: `w2(silu(w1 x) * w3 x)`."""

    def __init__(self, dim: int, hidden_dim: int):
        super().__init__()
        self.w1 = nn.Linear(dim, hidden_dim, bias=False)
        self.w2 = nn.Linear(hidden_dim, dim, bias=False)
        self.w3 = nn.Linear(dim, hidden_dim, bias=False)

    def forward(self, x):
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class TransformerLayer(nn.Module):
    def __init__(self, cfg: TransformerConfig):
        super().__init__()
        self.sa_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.attn = Attention(cfg)
        self.mlp_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.mlp = FeedForward(cfg.dim, cfg.ffn_dim)

    def forward(self, x, rotation, input_pos, mask):
        x = x + self.attn(self.sa_norm(x), rotation, input_pos, mask)
        return x + self.mlp(self.mlp_norm(x))


class Transformer(nn.Module):
    """A Llama decoder without token embeddings or output head (Sesame's `_prepare_transformer`)."""

    def __init__(self, cfg: TransformerConfig):
        super().__init__()
        self.cfg = cfg
        self.layers = nn.ModuleList(TransformerLayer(cfg) for _ in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.register_buffer("rope_freqs", rope_frequencies(cfg), persistent=False)
        self.activation_checkpointing = False

    def forward(
        self, x: torch.Tensor, input_pos: torch.Tensor | None = None, mask: torch.Tensor | BlockMask | None = None
    ):
        """`x [B, T, dim]`; `input_pos [B, T]` positions (default 0..T-1); `mask` bool, broadcastable to
        `[B, 1, T, T]` (True = attend), or the same rule as a FlexAttention `BlockMask`; default causal."""
        B, T, _ = x.shape
        if T > self.cfg.max_seq_len:
            raise ValueError(f"{T} positions exceed max_seq_len={self.cfg.max_seq_len} of this transformer")
        positions = torch.arange(T, device=x.device).expand(B, T) if input_pos is None else input_pos
        rotation = self.rotation(positions)[:, None]  # [B, 1, T, head_dim/2]
        for layer in self.layers:
            if self.activation_checkpointing and self.training:
                x = checkpoint(layer, x, rotation, input_pos, mask, use_reentrant=False)
            else:
                x = layer(x, rotation, input_pos, mask)
        return self.norm(x)

    def rotation(self, positions: torch.Tensor) -> torch.Tensor:
        """RoPE's unit complex numbers `[..., head_dim/2]` for `positions [...]`, as `apply_rope` takes them. The
        angles are fp32 whatever the compute dtype (positions up to 2048 lose digits in bf16)."""
        angles = positions[..., None].float() * self.rope_freqs.float()
        return torch.polar(torch.ones_like(angles), angles)

    def setup_caches(self, batch_size: int, max_seq_len: int, dtype: torch.dtype, device) -> None:
        for layer in self.layers:
            attn = layer.attn
            attn.kv_cache = KVCache(batch_size, max_seq_len, attn.num_kv_heads, attn.head_dim, dtype, device)

    def remove_caches(self) -> None:
        for layer in self.layers:
            layer.attn.kv_cache = None


# --------------------------------------------------------------------------------------------------------
# CSM


class CSMOutput(NamedTuple):
    c0_logits: torch.Tensor  # [B, T, audio_vocab]: codebook 0 of frame t+1, predicted at frame t
    hidden: torch.Tensor  # [B, T, D_backbone]: final-norm backbone states, the depth decoder's input
    decoder_logits: torch.Tensor | None = None  # [n, K-1, audio_vocab] for `decoder_frames`, if given


class CodebookEmbedding(nn.Embedding):
    """The audio embedding table of all codebooks (codebook k's code c is row k·V + c). Given per-code
    weights it returns each row's weighted sum through `embedding_bag`, never materialising the
    `[B, T, K, D]` embeddings (at 2048 frames × 32 codebooks the largest activation of the step). Being a
    module call, it also lets sharding wrappers (FSDP, ZeRO-3) gather the table around it."""

    def forward(self, ids: torch.Tensor, per_sample_weights: torch.Tensor | None = None) -> torch.Tensor:
        if per_sample_weights is None:
            return super().forward(ids)
        return F.embedding_bag(ids, self.weight, per_sample_weights=per_sample_weights, mode="sum")


class CSM(nn.Module):
    def __init__(self, config: CSMConfig):
        super().__init__()
        self.config = config
        D, V, K = config.backbone.dim, config.audio_vocab_size, config.num_codebooks
        self.backbone = Transformer(config.backbone)
        self.decoder = Transformer(config.decoder)
        self.text_embeddings = nn.Embedding(config.text_vocab_size, D)
        # One table for all codebooks: codebook k's code c is row k * V + c.
        self.audio_embeddings = CodebookEmbedding(V * K, D)
        self.projection = nn.Linear(D, config.decoder.dim, bias=False)
        self.codebook0_head = nn.Linear(D, V, bias=False)
        self.audio_head = nn.Parameter(torch.empty(K - 1, config.decoder.dim, V))
        self.register_buffer("codebook_offsets", torch.arange(K) * V, persistent=False)
        self.set_activation_checkpointing(config.activation_checkpointing)
        self.reset_parameters()

    def reset_parameters(self, std: float = 0.02) -> None:
        """Llama-style init (normal, std 0.02; norms at 1). Sesame did not publish theirs."""
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.normal_(module.weight, std=std)
            elif isinstance(module, RMSNorm):
                nn.init.ones_(module.scale)
        nn.init.normal_(self.audio_head, std=std)

    def set_activation_checkpointing(self, enabled: bool) -> None:
        self.backbone.activation_checkpointing = enabled
        self.decoder.activation_checkpointing = enabled

    # -- embeddings ----------------------------------------------------------------------------------------

    def embed_frames(self, tokens: torch.Tensor, tokens_mask: torch.Tensor) -> torch.Tensor:
        """`tokens, tokens_mask [B, T, K+1]` → backbone inputs `[B, T, D]`: the sum of the embeddings of the
        set columns."""
        K = self.config.num_codebooks
        B, T, _ = tokens.shape
        audio_ids = (tokens[..., :K] + self.codebook_offsets).reshape(B * T, K)
        audio_weights = tokens_mask[..., :K].reshape(B * T, K).to(self.codebook0_head.weight.dtype)
        audio = self.audio_embeddings(audio_ids, audio_weights)
        text = self.text_embeddings(tokens[..., K]) * tokens_mask[..., K, None]
        return audio.view(B, T, -1) + text

    def embed_audio(self, codebook: int, codes: torch.Tensor) -> torch.Tensor:
        """Embedding of `codes` (any shape) as codebook `codebook`."""
        return self.audio_embeddings(codes + codebook * self.config.audio_vocab_size)

    # -- forward -------------------------------------------------------------------------------------------

    def forward(
        self,
        tokens: torch.Tensor,
        tokens_mask: torch.Tensor,
        input_pos: torch.Tensor | None = None,
        mask: torch.Tensor | None = None,
        decoder_frames: torch.Tensor | None = None,
    ) -> CSMOutput:
        """Backbone over frames; `input_pos [B, T]` and `mask` as in `Transformer.forward`. With
        `decoder_frames [B, T]` (bool) also the teacher-forced depth decoder on those frames, each from the
        backbone state before it, in row-major order. Training goes through this one call so that every
        parameter is used inside `forward`, where sharding wrappers (FSDP, ZeRO-3) gather them."""
        h = self.backbone(self.embed_frames(tokens, tokens_mask), input_pos=input_pos, mask=mask)
        decoder_logits = None
        if decoder_frames is not None:
            chosen = decoder_frames[:, 1:]
            codes = tokens[:, 1:, : self.config.num_codebooks - 1][chosen]
            decoder_logits = self.decoder_logits(h[:, :-1][chosen], codes)
        return CSMOutput(c0_logits=self.codebook0_head(h), hidden=h, decoder_logits=decoder_logits)

    def decoder_logits(self, h: torch.Tensor, codes: torch.Tensor) -> torch.Tensor:
        """Teacher-forced depth decoder. `h [N, D]`: backbone state that predicted the frame (position t-1);
        `codes [N, K-1]`: the frame's codebooks 0..K-2. Returns logits `[N, K-1, audio_vocab]` for codebooks
        1..K-1: decoder position i (input c(i-1), i ≥ 1) predicts codebook i through `audio_head[i-1]`."""
        K = self.config.num_codebooks
        code_embeds = self.audio_embeddings(codes + self.codebook_offsets[: K - 1])
        x = self.projection(torch.cat([h[:, None, :], code_embeds], dim=1))  # [N, K, D_decoder]
        y = self.decoder(x)[:, 1:]  # position 0 (h itself) predicts nothing of its own
        return torch.einsum("nkd,kdv->nkv", y, self.audio_head)

    # -- KV caches (generation) ----------------------------------------------------------------------------

    def setup_caches(self, batch_size: int, dtype: torch.dtype | None = None) -> None:
        """Static KV caches: the backbone's span `max_seq_len` frames, the decoder's one frame (K positions)."""
        dtype = dtype or self.codebook0_head.weight.dtype
        device = self.codebook0_head.weight.device
        self.backbone.setup_caches(batch_size, self.config.backbone.max_seq_len, dtype, device)
        self.decoder.setup_caches(batch_size, self.config.num_codebooks, dtype, device)

    def remove_caches(self) -> None:
        self.backbone.remove_caches()
        self.decoder.remove_caches()

    # -- checkpoints ---------------------------------------------------------------------------------------

    @classmethod
    def from_pretrained(
        cls, path: str | Path, quantize: str | None = None, group_size: int | None = None, **overrides
    ) -> CSM:
        """Load our checkpoint, Sesame's format (`ckpt.pt` / `model.safetensors`, with or without its
        `config.json`), or a transformers `CsmForConditionalGeneration` directory. `quantize="int8" | "int4"`
        makes the backbone's and decoder's linear layers weight-only quantized for CPU inference
        (csm_train/quantize.py; int4 in groups of `group_size` inputs, default 32)."""
        from csm_train.checkpoint import load_checkpoint

        config, state_dict = load_checkpoint(path)
        if overrides:
            config = dataclasses.replace(config, **overrides)
        model = cls.from_state_dict(config, state_dict)
        if quantize is not None:
            from csm_train.quantize import DEFAULT_GROUP_SIZE
            from csm_train.quantize import quantize as quantize_model

            quantize_model(model, quantize, group_size or DEFAULT_GROUP_SIZE)
        return model

    @classmethod
    def from_state_dict(cls, config: CSMConfig, state_dict: dict[str, torch.Tensor]) -> CSM:
        """Build without initialising (meta device), then adopt `state_dict`'s tensors, strictly."""
        with torch.device("meta"):
            model = cls(config)
        model.load_state_dict(state_dict, strict=True, assign=True)
        # Non-persistent buffers are derived from the config: compute them on the weights' device.
        device = model.codebook0_head.weight.device
        model.codebook_offsets = torch.arange(config.num_codebooks, device=device) * config.audio_vocab_size
        for transformer in (model.backbone, model.decoder):
            transformer.rope_freqs = rope_frequencies(transformer.cfg).to(device)
        return model

    def save_pretrained(self, directory: str | Path) -> None:
        from csm_train.checkpoint import save_checkpoint
        from csm_train.quantize import is_quantized

        if is_quantized(self):
            raise ValueError("a quantized model is not saved: save the unquantized one, quantize when loading")

        save_checkpoint(self, directory)

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())
