"""Checkpoint formats: how ours, Sesame's and Hugging Face transformers' `CsmForConditionalGeneration` name,
lay out and configure the same model. Pure functions over state dicts and configs; reading and writing the files is
`checkpoint.py`, the command line `convert.py`.

* **ours**: Sesame's parameter names (model.py uses them), with the whole `CSMConfig`.
* **Sesame**: the same names; its `config.json` names a flavor (`backbone_flavor`, `decoder_flavor`: llama-1B,
  llama-100M), vocab sizes and `audio_num_codebooks`, and a bare weights file is recognised by its shapes.
* **transformers**: HF names and the rotate-half RoPE layout, so q/k projections are permuted on the way in and
  out; its config spells the RoPE scaling differently; the Mimi codec it carries (`codec_model.*`) is not part of
  CSM and is left out.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch

from csm_train.model import CSM, LLAMA_1B, LLAMA_100M, CSMConfig, RopeScaling, TransformerConfig

SESAME_FLAVORS = {"llama-1B": LLAMA_1B, "llama-100M": LLAMA_100M}

# Per-layer names: ours (torchtune/Sesame) → transformers.
_LAYER_NAMES = {
    "attn.q_proj.weight": "self_attn.q_proj.weight",
    "attn.k_proj.weight": "self_attn.k_proj.weight",
    "attn.v_proj.weight": "self_attn.v_proj.weight",
    "attn.output_proj.weight": "self_attn.o_proj.weight",
    "mlp.w1.weight": "mlp.gate_proj.weight",
    "mlp.w2.weight": "mlp.down_proj.weight",
    "mlp.w3.weight": "mlp.up_proj.weight",
    "sa_norm.scale": "input_layernorm.weight",
    "mlp_norm.scale": "post_attention_layernorm.weight",
}
_TRANSFORMER_PREFIXES = {"backbone": "backbone_model", "decoder": "depth_decoder.model"}
_TOP_LEVEL_NAMES = {
    "text_embeddings.weight": "embed_text_tokens.weight",
    "audio_embeddings.weight": "backbone_model.embed_tokens.embed_audio_tokens.weight",
    "projection.weight": "depth_decoder.model.inputs_embeds_projector.weight",
    "codebook0_head.weight": "lm_head.weight",
    "audio_head": "depth_decoder.codebooks_head.weight",
    "backbone.norm.scale": "backbone_model.norm.weight",
    "decoder.norm.scale": "depth_decoder.model.norm.weight",
}
# transformers keeps a second, tied copy of the audio embeddings in the depth decoder.
_HF_TIED_AUDIO_EMBEDDINGS = "depth_decoder.model.embed_tokens.weight"


def _hf_name(name: str) -> str:
    if name in _TOP_LEVEL_NAMES:
        return _TOP_LEVEL_NAMES[name]
    match = re.fullmatch(r"(backbone|decoder)\.layers\.(\d+)\.(.+)", name)
    if match is None or match.group(3) not in _LAYER_NAMES:
        raise KeyError(f"no transformers name for CSM parameter {name!r}")
    prefix, layer, rest = match.groups()
    return f"{_TRANSFORMER_PREFIXES[prefix]}.layers.{layer}.{_LAYER_NAMES[rest]}"


# RoPE layouts: torchtune rotates pairs (2i, 2i+1) of each head; transformers rotates (i, i + head_dim/2).
# Reordering each head's q/k output rows turns one into the other.
def _interleaved_to_halves(w: torch.Tensor, num_heads: int) -> torch.Tensor:
    out_dim, in_dim = w.shape
    return w.view(num_heads, out_dim // num_heads // 2, 2, in_dim).transpose(1, 2).reshape(out_dim, in_dim)


def _halves_to_interleaved(w: torch.Tensor, num_heads: int) -> torch.Tensor:
    out_dim, in_dim = w.shape
    return w.view(num_heads, 2, out_dim // num_heads // 2, in_dim).transpose(1, 2).reshape(out_dim, in_dim)


def _rope_heads(name: str, config: CSMConfig) -> int | None:
    """Heads to permute for a q/k projection, None for any other parameter."""
    match = re.fullmatch(r"(backbone|decoder)\.layers\.\d+\.attn\.([qk])_proj\.weight", name)
    if match is None:
        return None
    cfg = config.backbone if match.group(1) == "backbone" else config.decoder
    return cfg.num_heads if match.group(2) == "q" else cfg.num_kv_heads


def _parameter_names(config: CSMConfig) -> list[str]:
    with torch.device("meta"):
        return list(CSM(config).state_dict())


def our_name_from_transformers(hf_name: str) -> str | None:
    """Our name for a transformers CSM tensor name, or None for one CSM lacks (the codec, the depth decoder's tied
    copy of the audio embeddings). Names only: the q/k rows still need `state_dict_from_transformers`."""
    top = {hf: ours for ours, hf in _TOP_LEVEL_NAMES.items()}
    if hf_name in top:
        return top[hf_name]
    prefixes = {hf: ours for ours, hf in _TRANSFORMER_PREFIXES.items()}
    layer_names = {hf: ours for ours, hf in _LAYER_NAMES.items()}
    match = re.fullmatch(r"(backbone_model|depth_decoder\.model)\.layers\.(\d+)\.(.+)", hf_name)
    if match is None or match.group(3) not in layer_names:
        return None
    prefix, layer, rest = match.groups()
    return f"{prefixes[prefix]}.layers.{layer}.{layer_names[rest]}"


def state_dict_to_transformers(state_dict: dict[str, torch.Tensor], config: CSMConfig) -> dict[str, torch.Tensor]:
    out = {}
    for name, tensor in state_dict.items():
        heads = _rope_heads(name, config)
        out[_hf_name(name)] = tensor if heads is None else _interleaved_to_halves(tensor, heads)
    out[_HF_TIED_AUDIO_EMBEDDINGS] = out[_TOP_LEVEL_NAMES["audio_embeddings.weight"]]
    return out


def state_dict_from_transformers(hf_state_dict: dict[str, torch.Tensor], config: CSMConfig) -> dict[str, torch.Tensor]:
    names = {_hf_name(name): name for name in _parameter_names(config)}
    hf_state_dict = dict(hf_state_dict)
    audio_name = _TOP_LEVEL_NAMES["audio_embeddings.weight"]
    if audio_name not in hf_state_dict and _HF_TIED_AUDIO_EMBEDDINGS in hf_state_dict:
        hf_state_dict[audio_name] = hf_state_dict[_HF_TIED_AUDIO_EMBEDDINGS]
    missing = sorted(set(names) - set(hf_state_dict))
    if missing:
        raise KeyError(f"transformers CSM checkpoint lacks {len(missing)} tensors, e.g. {missing[:3]}")
    out = {}
    for hf_name, name in names.items():
        heads = _rope_heads(name, config)
        tensor = hf_state_dict[hf_name]
        out[name] = tensor if heads is None else _halves_to_interleaved(tensor, heads)
    return out


# -- configs -----------------------------------------------------------------------------------------------


def _transformer_to_hf(cfg: TransformerConfig, max_position_embeddings: int) -> dict:
    rope = {"rope_type": "default", "rope_theta": cfg.rope_base}
    if cfg.rope_scaling is not None:
        # transformers wants original_max_position_embeddings below max_position_embeddings (csm-1b's
        # config uses half of it). Dividing it and both frequency factors by the same power of two leaves
        # every wavelength threshold and the smoothing unchanged, and is exact in floating point: 8192/1/4
        # becomes csm-1b's published 1024/0.125/0.5 (backbone) and 16/0.001953125/0.0078125 (decoder).
        s = cfg.rope_scaling
        shrink = 1
        while (
            2 * (s.original_context_len // shrink) > max_position_embeddings
            and s.original_context_len % (2 * shrink) == 0
        ):
            shrink *= 2
        rope = {
            "rope_type": "llama3",
            "rope_theta": cfg.rope_base,
            "factor": s.factor,
            "low_freq_factor": s.low_freq_factor / shrink,
            "high_freq_factor": s.high_freq_factor / shrink,
            "original_max_position_embeddings": s.original_context_len // shrink,
        }
    return dict(
        hidden_size=cfg.dim,
        intermediate_size=cfg.ffn_dim,
        num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_heads,
        num_key_value_heads=cfg.num_kv_heads,
        max_position_embeddings=max_position_embeddings,
        rms_norm_eps=cfg.norm_eps,
        rope_parameters=rope,
    )


def _transformer_from_hf(hf) -> TransformerConfig:
    rope = hf.rope_parameters
    scaling = None
    if rope.get("rope_type", "default") == "llama3":
        # Undo the power-of-two rescaling of `_transformer_to_hf` so csm-1b reads back as Meta's 8192/1/4.
        grow = 1
        while rope["low_freq_factor"] * grow < 1:
            grow *= 2
        scaling = RopeScaling(
            factor=rope["factor"],
            low_freq_factor=rope["low_freq_factor"] * grow,
            high_freq_factor=rope["high_freq_factor"] * grow,
            original_context_len=rope["original_max_position_embeddings"] * grow,
        )
    elif rope.get("rope_type", "default") != "default":
        raise ValueError(f"unsupported RoPE type {rope['rope_type']!r} in transformers CSM config")
    if hf.head_dim != hf.hidden_size // hf.num_attention_heads:
        raise ValueError(f"head_dim={hf.head_dim} != hidden_size / num_attention_heads: not a CSM layout")
    return TransformerConfig(
        num_layers=hf.num_hidden_layers,
        dim=hf.hidden_size,
        num_heads=hf.num_attention_heads,
        num_kv_heads=hf.num_key_value_heads,
        ffn_dim=hf.intermediate_size,
        max_seq_len=hf.max_position_embeddings,
        norm_eps=hf.rms_norm_eps,
        rope_base=rope["rope_theta"],
        rope_scaling=scaling,
    )


def config_to_transformers(config: CSMConfig, **extra):
    """A `transformers.CsmConfig` for our config; `extra` sets token ids, `codec_config`, …"""
    from transformers import CsmConfig, CsmDepthDecoderConfig

    depth = CsmDepthDecoderConfig(
        # transformers sizes the depth decoder for one frame (+1), where Sesame's flavor says 2048.
        **_transformer_to_hf(config.decoder, max_position_embeddings=config.num_codebooks + 1),
        num_codebooks=config.num_codebooks,
        backbone_hidden_size=config.backbone.dim,
        vocab_size=config.audio_vocab_size,
    )
    return CsmConfig(
        **_transformer_to_hf(config.backbone, max_position_embeddings=config.backbone.max_seq_len),
        num_codebooks=config.num_codebooks,
        vocab_size=config.audio_vocab_size,
        text_vocab_size=config.text_vocab_size,
        depth_decoder_config=depth.to_dict(),
        **extra,
    )


def config_from_transformers(hf_config) -> CSMConfig:
    return CSMConfig(
        backbone=_transformer_from_hf(hf_config),
        decoder=_transformer_from_hf(hf_config.depth_decoder_config),
        text_vocab_size=hf_config.text_vocab_size,
        audio_vocab_size=hf_config.vocab_size,
        num_codebooks=hf_config.num_codebooks,
    )


def config_to_sesame(config: CSMConfig) -> dict:
    """Sesame's config.json for `config`; only its flavors (llama-1B, llama-100M) can be written."""
    names = {}
    for part, transformer in (("backbone", config.backbone), ("decoder", config.decoder)):
        flavor = next((n for n, f in SESAME_FLAVORS.items() if TransformerConfig(**f) == transformer), None)
        if flavor is None:
            raise ValueError(
                f"the {part} ({transformer.num_layers} layers of width {transformer.dim}) is no Sesame flavor "
                f"({sorted(SESAME_FLAVORS)}): Sesame's code cannot build this model; convert --to ours or transformers"
            )
        names[part] = flavor
    return {
        "backbone_flavor": names["backbone"],
        "decoder_flavor": names["decoder"],
        "text_vocab_size": config.text_vocab_size,
        "audio_vocab_size": config.audio_vocab_size,
        "audio_num_codebooks": config.num_codebooks,
    }


def config_from_sesame(sesame_config: dict) -> CSMConfig:
    flavors = (sesame_config["backbone_flavor"], sesame_config["decoder_flavor"])
    unknown = [f for f in flavors if f not in SESAME_FLAVORS]
    if unknown:
        raise ValueError(f"unknown Sesame flavor(s) {unknown}; known: {sorted(SESAME_FLAVORS)}")
    return CSMConfig(
        backbone=dict(SESAME_FLAVORS[flavors[0]]),
        decoder=dict(SESAME_FLAVORS[flavors[1]]),
        text_vocab_size=sesame_config["text_vocab_size"],
        audio_vocab_size=sesame_config["audio_vocab_size"],
        num_codebooks=sesame_config["audio_num_codebooks"],
    )


def sesame_config_from_shapes(state_dict: dict[str, torch.Tensor], source: Path) -> CSMConfig:
    """A bare Sesame weights file has no config: recognise the flavors by their shapes."""

    def flavor(prefix: str) -> str:
        layers = len({k.split(".")[2] for k in state_dict if k.startswith(f"{prefix}.layers.")})
        dim = state_dict[f"{prefix}.norm.scale"].shape[0]
        ffn = state_dict[f"{prefix}.layers.0.mlp.w1.weight"].shape[0]
        for name, f in SESAME_FLAVORS.items():
            if (f["num_layers"], f["dim"], f["ffn_dim"]) == (layers, dim, ffn):
                return name
        raise ValueError(
            f"{source}: {prefix} has {layers} layers of width {dim}, which is no Sesame flavor; "
            f"put a config.json beside it (ours or Sesame's) to say what it is"
        )

    text_vocab, _ = state_dict["text_embeddings.weight"].shape
    audio_vocab = state_dict["codebook0_head.weight"].shape[0]
    return config_from_sesame(
        dict(
            backbone_flavor=flavor("backbone"),
            decoder_flavor=flavor("decoder"),
            text_vocab_size=text_vocab,
            audio_vocab_size=audio_vocab,
            audio_num_codebooks=state_dict["audio_head"].shape[0] + 1,
        )
    )


# transformers' CsmConfig keys that a converted model keeps from the transformers CSM it is modelled on.
TRANSFORMERS_TOKEN_IDS = (
    "bos_token_id",
    "eos_token_id",
    "pad_token_id",
    "audio_token_id",
    "audio_eos_token_id",
    "codebook_pad_token_id",
    "codebook_eos_token_id",
)
