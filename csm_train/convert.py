"""Checkpoint formats: ours, Sesame's, and Hugging Face transformers' `CsmForConditionalGeneration`.

* **ours**: a directory with `model.safetensors` (Sesame's parameter names) and `config.json` holding
  `{"csm_train": <CSMConfig>}`.
* **Sesame**: `model.safetensors` or `ckpt.pt` with the same names, optionally beside Sesame's
  `config.json` (`backbone_flavor`, `decoder_flavor`, vocab sizes, `audio_num_codebooks`).
* **transformers**: a `save_pretrained` directory (`config.json` with `model_type: csm`). Its layers use
  HF names and the rotate-half RoPE layout, so q/k projections are permuted on the way in and out; the
  Mimi codec it carries (`codec_model.*`) is not part of CSM and is left out.
"""

from __future__ import annotations

import json
import pickle
import re
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

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


def _sesame_config_from_shapes(state_dict: dict[str, torch.Tensor], source: Path) -> CSMConfig:
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


# -- files -------------------------------------------------------------------------------------------------


def _load_weights(path: Path) -> dict[str, torch.Tensor]:
    """Weights from a safetensors file, a sharded safetensors index, or a torch file (never unpickled:
    `weights_only=True`)."""
    if path.name.endswith(".safetensors.index.json"):
        shards = sorted(set(json.loads(path.read_text())["weight_map"].values()))
        return {k: v for shard in shards for k, v in _load_weights(path.parent / shard).items()}
    try:
        if path.suffix == ".safetensors":
            return load_file(path)
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        from csm_train.consolidate import unpickling_reason

        raise ValueError(
            f"{path} holds objects other than tensors ({unpickling_reason(error)}); it is not read, since "
            f"unpickling runs whatever code the file names: get its weights as safetensors"
        ) from None
    except Exception as error:
        raise ValueError(
            f"could not read weights from {path} ({error}); the file is truncated or not a "
            f"safetensors/torch file: copy or download it again"
        ) from error
    return state.get("model", state) if isinstance(state, dict) else state


def _find_weights(directory: Path) -> Path:
    for name in ("model.safetensors", "model.safetensors.index.json", "ckpt.pt"):
        if (directory / name).exists():
            return directory / name
    raise FileNotFoundError(
        f"{directory}: no model.safetensors, model.safetensors.index.json or ckpt.pt; "
        f"point at a checkpoint directory written by save_pretrained (ours or transformers') or Sesame's"
    )


HUB_ID = re.compile(r"[\w-]+/[\w.-]+")  # e.g. sesame/csm-1b: a checkpoint path that is not a local file


def _download(repo_id: str) -> Path:
    """A Hub repository's config and weights (safetensors when it has them, else `ckpt.pt`), cached by the Hub."""
    from huggingface_hub import snapshot_download

    try:
        path = Path(snapshot_download(repo_id, allow_patterns=["*.json", "*.safetensors"]))
        if not any(path.glob("*.safetensors")):
            path = Path(snapshot_download(repo_id, allow_patterns=["*.json", "ckpt.pt"]))
    except Exception as error:
        raise FileNotFoundError(
            f"checkpoint {repo_id} is no local path, and downloading it from the Hugging Face Hub failed "
            f"({type(error).__name__}: {error}); for a gated repository like sesame/csm-1b accept its terms and "
            f"`huggingface-cli login`, or download it and pass the directory"
        ) from error
    return path


def is_training_checkpoint(path: Path) -> bool:
    """A Lightning `.ckpt` file, or a DeepSpeed ZeRO checkpoint directory (`latest` + per-rank states)."""
    return (path.is_file() and path.suffix == ".ckpt") or (path.is_dir() and (path / "latest").exists())


def load_checkpoint(path: str | Path, trust_pickle: bool = False) -> tuple[CSMConfig, dict[str, torch.Tensor]]:
    """(config, state dict with our names) from any supported checkpoint, training checkpoints (ZeRO ones
    consolidated) included. Nothing is unpickled beyond tensors and DeepSpeed's checkpoint records
    (csm_train.consolidate); `trust_pickle` lets a training checkpoint you trust be read with an unpickling
    `torch.load(weights_only=False)`, as DeepSpeed's own zero_to_fp32 reads."""
    path = Path(path)
    if not path.exists() and HUB_ID.fullmatch(str(path)):
        path = _download(str(path))
    if not path.exists():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    if is_training_checkpoint(path):
        from csm_train.consolidate import load_training_checkpoint

        return load_training_checkpoint(path, trust_pickle)
    directory = path.parent if path.is_file() else path
    state_dict = _load_weights(path if path.is_file() else _find_weights(path))
    config_file = directory / "config.json"
    if not config_file.exists():
        return _sesame_config_from_shapes(state_dict, path), state_dict

    meta = json.loads(config_file.read_text())
    if "csm_train" in meta:
        return CSMConfig(**meta["csm_train"]), state_dict
    if "backbone_flavor" in meta:
        return config_from_sesame(meta), state_dict
    if meta.get("model_type") == "csm":
        from transformers import CsmConfig

        config = config_from_transformers(CsmConfig.from_pretrained(directory))
        return config, state_dict_from_transformers(state_dict, config)
    raise ValueError(
        f"{config_file}: not a CSM config (expected our 'csm_train' key, Sesame's 'backbone_flavor', "
        f"or transformers' model_type 'csm')"
    )


def _weights(model: CSM) -> dict[str, torch.Tensor]:
    return {k: v.detach().contiguous() for k, v in model.state_dict().items()}


def save_checkpoint(model: CSM, directory: str | Path) -> None:
    """Ours: `model.safetensors` (Sesame's names) + `config.json` with the whole `CSMConfig`."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    save_file(_weights(model), directory / "model.safetensors")
    (directory / "config.json").write_text(json.dumps({"csm_train": model.config.to_dict()}, indent=2))


def save_sesame(model: CSM, directory: str | Path, torch_file: bool = False) -> None:
    """Sesame's: `model.safetensors` (or `ckpt.pt`, a plain state dict) + Sesame's `config.json`, as in the
    sesame/csm-1b repository; its generator's `Model.from_pretrained` reads the directory."""
    sesame_config = config_to_sesame(model.config)
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    if torch_file:
        torch.save(_weights(model), directory / "ckpt.pt")
    else:
        save_file(_weights(model), directory / "model.safetensors")
    (directory / "config.json").write_text(json.dumps(sesame_config, indent=2))


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


def save_transformers(model: CSM, directory: str | Path, codec, token_ids: dict | None = None) -> None:
    """transformers': a `CsmForConditionalGeneration.save_pretrained` directory. That model carries its Mimi
    codec, so one must be given (`codec`: a `MimiModel`); `token_ids` (bos, audio, … : TRANSFORMERS_TOKEN_IDS)
    default to transformers' own, which are Llama-3.2's and need its text vocabulary."""
    from transformers import CsmForConditionalGeneration
    from transformers.initialization import no_init_weights

    hf_config = config_to_transformers(model.config, codec_config=codec.config.to_dict(), **(token_ids or {}))
    too_large = {
        k: getattr(hf_config, k)
        for k in ("bos_token_id", "pad_token_id", "audio_token_id", "audio_eos_token_id")
        if isinstance(getattr(hf_config, k), int) and getattr(hf_config, k) >= model.config.text_vocab_size
    }
    if too_large:
        raise ValueError(
            f"token ids {too_large} are outside this model's text vocabulary ({model.config.text_vocab_size}): "
            f"take them from the transformers CSM the model should work like (convert --like DIR)"
        )
    with no_init_weights():
        hf = CsmForConditionalGeneration(hf_config)
    weights = state_dict_to_transformers(_weights(model), model.config)
    weights |= {f"codec_model.{k}": v for k, v in codec.state_dict().items()}
    hf.load_state_dict(weights, strict=True)
    hf.save_pretrained(directory)


# -- command line ------------------------------------------------------------------------------------------


def _like(directory: Path) -> tuple[object, dict]:
    """The codec and special-token ids of a transformers CSM directory."""
    from transformers import CsmForConditionalGeneration

    hf = CsmForConditionalGeneration.from_pretrained(directory)
    return hf.codec_model, {k: getattr(hf.config, k) for k in TRANSFORMERS_TOKEN_IDS}


def convert(
    source: str | Path, out: str | Path, to: str, like=None, codec=None, torch_file=False, trust_pickle=False
) -> CSM:
    """Any checkpoint (ours, Sesame's, transformers', a training `.ckpt` or ZeRO directory) → `to` format.
    `trust_pickle`: see `load_checkpoint`."""
    model = CSM.from_state_dict(*load_checkpoint(source, trust_pickle)).float()
    if to == "ours":
        save_checkpoint(model, out)
    elif to == "sesame":
        save_sesame(model, out, torch_file=torch_file)
    elif to == "transformers":
        config_file = Path(source) / "config.json"  # a ZeRO checkpoint directory has none
        if like is None and config_file.is_file() and json.loads(config_file.read_text()).get("model_type") == "csm":
            like = source  # keep the codec and token ids a transformers source came with
        if like is not None:
            mimi, token_ids = _like(Path(like))
        elif codec is not None:
            from transformers import MimiModel

            mimi, token_ids = MimiModel.from_pretrained(codec), None
        else:
            raise ValueError(
                "a transformers CSM carries its Mimi codec: give --codec (kyutai/mimi or a local MimiModel "
                "directory) or --like (a transformers CSM, e.g. sesame/csm-1b, whose codec and token ids to keep)"
            )
        save_transformers(model, out, mimi, token_ids)
    else:
        raise ValueError(f"--to {to!r}: use ours, sesame or transformers")
    return model


def main() -> None:
    import argparse

    from csm_train.consolidate import TRUST_FLAG, UntrustedCheckpointError

    parser = argparse.ArgumentParser(
        prog="python -m csm_train.convert",
        description=__doc__.split("\n\n")[0],
        epilog="Nothing from a file runs code: torch files and ZeRO shards are read with torch's restricted unpickler "
        f"(csm_train.consolidate), and a checkpoint holding more than tensors is refused; see {TRUST_FLAG}.",
    )
    parser.add_argument("source", help="checkpoint: a directory or file in any supported format")
    parser.add_argument("out", help="output directory")
    parser.add_argument("--to", required=True, choices=["ours", "sesame", "transformers"])
    parser.add_argument("--like", help="transformers: a transformers CSM directory whose codec and token ids to keep")
    parser.add_argument("--codec", help="transformers: the Mimi codec to include (Hub id or directory)")
    parser.add_argument("--torch-file", action="store_true", help="sesame: ckpt.pt instead of model.safetensors")
    parser.add_argument(
        TRUST_FLAG,
        action="store_true",
        help="a training checkpoint (ZeRO directory or .ckpt) you trust, which the safe reader refuses: read it "
        "with torch.load(weights_only=False), as DeepSpeed's zero_to_fp32 does, which runs any code its files name",
    )
    args = parser.parse_args()
    try:
        model = convert(
            args.source,
            args.out,
            args.to,
            like=args.like,
            codec=args.codec,
            torch_file=args.torch_file,
            trust_pickle=args.trust_pickle,
        )
    except UntrustedCheckpointError as error:
        parser.exit(2, f"error: {error}\n")
    print(f"{args.source} → {args.out} ({args.to}): {model.num_parameters():,} parameters")


if __name__ == "__main__":
    main()
