"""Sesame's CSM as Sesame builds it: a re-statement of `models.py` of SesameAILabs/csm (Apache-2.0), written for
these tests from that file, on the real torchtune package (`torchtune.models.llama3_2.llama3_2`, the component
builder Sesame calls).

What is Sesame's and kept as it is: the two flavor builders and their arguments (`llama3_2_1B`: 16 layers, width
2048, 32 heads over 8 KV heads; `llama3_2_100M`: 4 layers, width 1024, 8 heads over 2 KV heads; both FFN 8192,
`max_seq_len` 2048, RoPE base 500 000 with llama3 scaling `scale_factor=32`, norm eps 1e-5, vocabulary 128 256),
the `FLAVORS` names, `_prepare_transformer` (token embeddings and output replaced by `nn.Identity`),
`_create_causal_mask`, `_index_causal_mask`, `ModelArgs`, and `Model`: its parameter names (`text_embeddings`,
`audio_embeddings`, `projection`, `codebook0_head`, `audio_head`), `setup_caches`, `generate_frame`,
`reset_caches`, `_embed_audio` and `_embed_tokens`, with `PyTorchModelHubMixin` as the loader of
`config.json` + `model.safetensors` directories.

What is not: `shrunk(**dims)` gives the same builders with fewer layers / narrower widths (every other argument as
Sesame's), which tests put into `FLAVORS` under Sesame's names, so that the structure (GQA ratio, head dim, RoPE
scaling) is Sesame's and the tests stay fast. `sample_topk` keeps Sesame's signature; tests replace it to see the
logits `generate_frame` samples from. Sesame has no `forward` (it released inference only): teacher-forced logits
over whole sequences are `backbone_logits` / `decoder_logits` below, built from the same pieces `generate_frame`
uses.
"""

import functools
import importlib
import importlib.util
import sys
from dataclasses import dataclass

import torch
import torch.nn as nn
from huggingface_hub import PyTorchModelHubMixin

# torchtune 0.6.1 (its last release) imports NF4 from `torchao.dtypes.nf4tensor`, which torchao 0.15 moved to
# `torchao.quantization.quantize_.workflows.nf4.nf4_tensor`, and peft (our LoRA) refuses a torchao older than
# 0.16 once one is installed: the same module under its old name lets both live in one environment.
if importlib.util.find_spec("torchao.dtypes.nf4tensor") is None:
    sys.modules["torchao.dtypes.nf4tensor"] = importlib.import_module(
        "torchao.quantization.quantize_.workflows.nf4.nf4_tensor"
    )
import torchtune  # noqa: E402
from torchtune.models import llama3_2  # noqa: E402


def llama3_2_1B(**dims) -> torchtune.modules.transformer.TransformerDecoder:
    args = dict(
        vocab_size=128_256,
        num_layers=16,
        num_heads=32,
        num_kv_heads=8,
        embed_dim=2048,
        max_seq_len=2048,
        intermediate_dim=8192,
        attn_dropout=0.0,
        norm_eps=1e-5,
        rope_base=500_000,
        scale_factor=32,
    )
    return llama3_2.llama3_2(**{**args, **dims})


def llama3_2_100M(**dims) -> torchtune.modules.transformer.TransformerDecoder:
    args = dict(
        vocab_size=128_256,
        num_layers=4,
        num_heads=8,
        num_kv_heads=2,
        embed_dim=1024,
        max_seq_len=2048,
        intermediate_dim=8192,
        attn_dropout=0.0,
        norm_eps=1e-5,
        rope_base=500_000,
        scale_factor=32,
    )
    return llama3_2.llama3_2(**{**args, **dims})


FLAVORS = {
    "llama-1B": llama3_2_1B,
    "llama-100M": llama3_2_100M,
}

SHRINKABLE = {"num_layers", "num_heads", "num_kv_heads", "embed_dim", "intermediate_dim", "vocab_size"}


def shrunk(builder, **dims):
    """`builder` with fewer layers / narrower widths; RoPE, norms, `max_seq_len` and the rest stay Sesame's."""
    if set(dims) - SHRINKABLE:
        raise ValueError(f"only {sorted(SHRINKABLE)} shrink, not {sorted(set(dims) - SHRINKABLE)}")
    return functools.partial(builder, **dims)


def _prepare_transformer(model):
    embed_dim = model.tok_embeddings.embedding_dim
    model.tok_embeddings = nn.Identity()
    model.output = nn.Identity()
    return model, embed_dim


def _create_causal_mask(seq_len: int, device: torch.device):
    return torch.tril(torch.ones(seq_len, seq_len, dtype=torch.bool, device=device))


def _index_causal_mask(mask: torch.Tensor, input_pos: torch.Tensor):
    """`mask [max_seq_len, max_seq_len]`, `input_pos [batch, seq]` → `[batch, seq, max_seq_len]`."""
    return mask[input_pos, :]


def sample_topk(logits: torch.Tensor, topk: int, temperature: float):
    """Sesame samples top-k with temperature; the tests replace this to record logits and pick greedily."""
    logits = logits / temperature
    logits = logits.masked_fill(logits < torch.topk(logits, topk)[0][..., -1, None], -float("inf"))
    probs = torch.softmax(torch.log_softmax(logits, dim=-1), dim=-1)
    q = torch.empty_like(probs).exponential_(1)
    return torch.argmax(probs / q, dim=-1, keepdim=True).to(dtype=torch.int)


@dataclass
class ModelArgs:
    backbone_flavor: str
    decoder_flavor: str
    text_vocab_size: int
    audio_vocab_size: int
    audio_num_codebooks: int


class Model(
    nn.Module,
    PyTorchModelHubMixin,
    repo_url="https://github.com/SesameAILabs/csm",
    pipeline_tag="text-to-speech",
    license="apache-2.0",
):
    def __init__(self, config: ModelArgs):
        super().__init__()
        self.config = config

        self.backbone, backbone_dim = _prepare_transformer(FLAVORS[config.backbone_flavor]())
        self.decoder, decoder_dim = _prepare_transformer(FLAVORS[config.decoder_flavor]())

        self.text_embeddings = nn.Embedding(config.text_vocab_size, backbone_dim)
        self.audio_embeddings = nn.Embedding(config.audio_vocab_size * config.audio_num_codebooks, backbone_dim)

        self.projection = nn.Linear(backbone_dim, decoder_dim, bias=False)
        self.codebook0_head = nn.Linear(backbone_dim, config.audio_vocab_size, bias=False)
        self.audio_head = nn.Parameter(
            torch.empty(config.audio_num_codebooks - 1, decoder_dim, config.audio_vocab_size)
        )

    def setup_caches(self, max_batch_size: int) -> torch.Tensor:
        """KV caches for both transformers, and the causal masks `generate_frame` indexes."""
        dtype = next(self.parameters()).dtype
        device = next(self.parameters()).device

        with device:
            self.backbone.setup_caches(max_batch_size, dtype)
            self.decoder.setup_caches(max_batch_size, dtype, decoder_max_seq_len=self.config.audio_num_codebooks)

        self.register_buffer("backbone_causal_mask", _create_causal_mask(self.backbone.max_seq_len, device))
        self.register_buffer("decoder_causal_mask", _create_causal_mask(self.config.audio_num_codebooks, device))

    def generate_frame(
        self,
        tokens: torch.Tensor,
        tokens_mask: torch.Tensor,
        input_pos: torch.Tensor,
        temperature: float,
        topk: int,
    ) -> torch.Tensor:
        """`tokens, tokens_mask [batch, seq, K+1]`, `input_pos [batch, seq]` → the next frame's K codes."""
        dtype = next(self.parameters()).dtype

        assert self.backbone.caches_are_enabled(), "backbone caches are not enabled"
        curr_backbone_mask = _index_causal_mask(self.backbone_causal_mask, input_pos)
        embeds = self._embed_tokens(tokens)
        h = (embeds * tokens_mask.unsqueeze(-1)).sum(dim=2)
        h = self.backbone(h, input_pos=input_pos, mask=curr_backbone_mask).to(dtype=dtype)

        last_h = h[:, -1, :]
        c0_logits = self.codebook0_head(last_h)
        c0_sample = sample_topk(c0_logits, topk, temperature)
        c0_embed = self._embed_audio(0, c0_sample)

        curr_h = torch.cat([last_h.unsqueeze(1), c0_embed], dim=1)
        curr_sample = c0_sample.clone()
        curr_pos = torch.arange(0, curr_h.size(1), device=curr_h.device).unsqueeze(0).repeat(curr_h.size(0), 1)

        # The decoder's caches hold one frame: reset for every frame.
        self.decoder.reset_caches()
        for i in range(1, self.config.audio_num_codebooks):
            curr_decoder_mask = _index_causal_mask(self.decoder_causal_mask, curr_pos)
            decoder_h = self.decoder(self.projection(curr_h), input_pos=curr_pos, mask=curr_decoder_mask).to(
                dtype=dtype
            )
            ci_logits = torch.mm(decoder_h[:, -1, :], self.audio_head[i - 1])
            ci_sample = sample_topk(ci_logits, topk, temperature)
            ci_embed = self._embed_audio(i, ci_sample)

            curr_h = ci_embed
            curr_sample = torch.cat([curr_sample, ci_sample], dim=1)
            curr_pos = curr_pos[:, -1:] + 1

        return curr_sample

    def reset_caches(self):
        self.backbone.reset_caches()
        self.decoder.reset_caches()

    def _embed_audio(self, codebook: int, tokens: torch.Tensor) -> torch.Tensor:
        return self.audio_embeddings(tokens + codebook * self.config.audio_vocab_size)

    def _embed_tokens(self, tokens: torch.Tensor) -> torch.Tensor:
        """`[batch, seq, K+1]` → `[batch, seq, K+1, dim]`: K audio embeddings, then the text one."""
        text_embeds = self.text_embeddings(tokens[:, :, -1]).unsqueeze(-2)

        audio_tokens = tokens[:, :, :-1] + (
            self.config.audio_vocab_size * torch.arange(self.config.audio_num_codebooks, device=tokens.device)
        )
        audio_embeds = self.audio_embeddings(audio_tokens.view(-1)).reshape(
            tokens.size(0), tokens.size(1), self.config.audio_num_codebooks, -1
        )

        return torch.cat([audio_embeds, text_embeds], dim=-2)


# -- teacher-forced logits from Sesame's pieces (no caches) ------------------------------------------------------


def backbone_logits(model: Model, tokens: torch.Tensor, tokens_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Codebook-0 logits `[batch, seq, audio_vocab]` and backbone states at every frame: `generate_frame`'s
    backbone step over a whole sequence (masked embedding sum, causal mask indexed by position)."""
    b, s, _ = tokens.shape
    input_pos = torch.arange(s, device=tokens.device).unsqueeze(0).repeat(b, 1)
    mask = _index_causal_mask(_create_causal_mask(s, tokens.device), input_pos)
    h = (model._embed_tokens(tokens) * tokens_mask.unsqueeze(-1)).sum(dim=2)
    h = model.backbone(h, input_pos=input_pos, mask=mask)
    return model.codebook0_head(h), h


def decoder_logits(model: Model, last_h: torch.Tensor, codes: torch.Tensor) -> torch.Tensor:
    """`generate_frame`'s depth decoder, teacher-forced: `last_h [n, dim]`, `codes [n, K-1]` (codebooks 0..K-2) →
    logits `[n, K-1, audio_vocab]` of codebooks 1..K-1, position i through `audio_head[i-1]`."""
    n, k = codes.shape
    embeds = torch.stack([model._embed_audio(i, codes[:, i]) for i in range(k)], dim=1)
    curr_h = torch.cat([last_h.unsqueeze(1), embeds], dim=1)
    pos = torch.arange(k + 1, device=codes.device).unsqueeze(0).repeat(n, 1)
    mask = _index_causal_mask(_create_causal_mask(k + 1, codes.device), pos)
    decoder_h = model.decoder(model.projection(curr_h), input_pos=pos, mask=mask)
    return torch.stack([decoder_h[:, i] @ model.audio_head[i - 1] for i in range(1, k + 1)], dim=1)
