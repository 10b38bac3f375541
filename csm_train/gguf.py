"""GGUF files for csm.rs (github.com/cartesia-one/csm.rs, the Rust/candle CSM server): our weights written as its
loader reads them, and any csm.rs GGUF read back as (config, fp32 state dict with our names).

What csm.rs reads, from its sources (`scripts/quantize.py` at 1f48dd8a, `csm-core/csm_quantized_impl.rs` at
115390b2, `csm-core/lib.rs` at 10d4b925):

* **tensor names**: the checkpoint's own, unchanged. Its loader takes Sesame's names (ours: `backbone.layers.N.attn.
  q_proj.weight`, `….attn.output_proj.weight`, `….mlp.w1/w2/w3.weight`, `….sa_norm.scale`, `….mlp_norm.scale`,
  `backbone.norm.scale`, `decoder.*` alike, `text_embeddings.weight`, `audio_embeddings.weight`, `projection.weight`,
  `codebook0_head.weight`, `audio_head`) with torchtune's interleaved RoPE, or transformers' names (it checks for
  `embed_text_tokens.weight`) with rotate-half RoPE. We write Sesame's, so no q/k rows are permuted; both are read.
* **shapes**: GGUF's, innermost first (`ne[0]` = a row), as `gguf.GGUFWriter` writes a numpy array's shape
  reversed; candle reverses them back, so `audio_head` is read as `[K-1, D_decoder, audio_vocab]` and
  `audio_embeddings` as `[audio_vocab * K, D]`, both checked by its loader.
* **which tensors are quantized**: quantize.py's rule, `name.endswith(".weight") and ndim == 2 and "norm" not in name
  and "embeddings" not in name` (the attention and MLP projections, `projection`, `codebook0_head`); every other
  tensor (embeddings, norms, the 3-D `audio_head`) is F16. As llama.cpp does, a tensor whose rows are not a whole
  number of quantization blocks stays F16 as well (quantize.py would refuse it).
* **metadata**: `general.architecture = "csm"`, `general.quantization_version = 2` and six `csm.*` keys (CSM_RS_KEYS).
  csm.rs's loader reads none of them: its `Config` is hard-coded to csm-1b (llama-1B backbone, llama-100M decoder,
  text vocabulary 128256, 2051 audio codes, 32 codebooks), so csm.rs serves a csm-1b-shaped model only (a fine-tune of
  csm-1b); any other shape is written all the same and reads back here, with a note saying csm.rs cannot build it.
  We add our whole `CSMConfig` as JSON under `csm_train.config`, which csm.rs ignores.

Quantization is the `gguf` package's reference quantizers (`gguf.quants`, numpy ports of ggml's); its 0.19.0 has
no Q4_K quantizer (only the dequantizer), so `q4_k` is refused until it has one and `q4_1`, the closest it has (4-bit,
a scale and a minimum per block of 32, where Q4_K keeps them per 32 in 6 bits under an f16 pair per 256), is written
instead; csm.rs's candle loader reads Q4_1 as any GGML type. Reading dequantizes every type `gguf.quants` knows,
Q4_K included. A GGUF holds data only: nothing is unpickled.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import gguf
import numpy as np
import torch
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

from csm_train.formats import (
    our_name_from_transformers,
    sesame_config_from_shapes,
    state_dict_from_transformers,
)
from csm_train.model import LLAMA_1B, LLAMA_100M, CSMConfig, TransformerConfig

ARCH = "csm"
QTYPES = {
    "f16": GGMLQuantizationType.F16,
    "q8_0": GGMLQuantizationType.Q8_0,
    "q4_1": GGMLQuantizationType.Q4_1,
    "q4_k": GGMLQuantizationType.Q4_K,
}
# The metadata csm.rs's scripts/quantize.py writes (all UINT32), from our config.
CSM_RS_KEYS = {
    "csm.embedding_length": lambda c: c.backbone.dim,
    "csm.backbone.block_count": lambda c: c.backbone.num_layers,
    "csm.decoder.block_count": lambda c: c.decoder.num_layers,
    "csm.audio_num_codebooks": lambda c: c.num_codebooks,
    "csm.audio_vocab_size": lambda c: c.audio_vocab_size,
    "csm.text_vocab_size": lambda c: c.text_vocab_size,
}
CONFIG_KEY = "csm_train.config"
# csm.rs tells transformers' names from Sesame's by this tensor (csm_quantized_impl.rs, QuantizedCsmModel::from_gguf).
TRANSFORMERS_MARKER = "embed_text_tokens.weight"


def quantized_by_csm_rs(name: str, ndim: int) -> bool:
    """csm.rs's scripts/quantize.py: which tensors it quantizes (the rest it writes as F16)."""
    return name.endswith(".weight") and ndim == 2 and "norm" not in name and "embeddings" not in name


def tensor_type(name: str, shape: tuple[int, ...], qtype: str) -> GGMLQuantizationType:
    """The GGML type `name` is written as under `--qtype qtype`."""
    target = QTYPES[qtype]
    if target == GGMLQuantizationType.F16 or not quantized_by_csm_rs(name, len(shape)):
        return GGMLQuantizationType.F16
    block_size, _ = GGML_QUANT_SIZES[target]
    return target if shape[-1] % block_size == 0 else GGMLQuantizationType.F16


def csm_rs_note(config: CSMConfig) -> str | None:
    """Why csm.rs cannot serve a model of this config, or None when it can (csm-1b's shape: its hard-coded Config)."""
    csm_1b = (TransformerConfig(**LLAMA_1B), TransformerConfig(**LLAMA_100M), 128_256, 2051, 32)
    ours = (config.backbone, config.decoder, config.text_vocab_size, config.audio_vocab_size, config.num_codebooks)
    if ours == csm_1b:
        return None
    return (
        f"csm.rs builds csm-1b's shape only (llama-1B backbone, llama-100M decoder, text vocabulary 128256, 2051 "
        f"audio codes, 32 codebooks: its Config is hard-coded); this model ({config.backbone.num_layers} x "
        f"{config.backbone.dim} backbone, {config.decoder.num_layers} x {config.decoder.dim} decoder, text vocabulary "
        f"{config.text_vocab_size}) reads back here (CSM.from_pretrained) but csm.rs cannot serve it"
    )


@dataclass
class TensorReport:
    name: str
    type: str  # GGML type name: F16, Q8_0, …
    relative_error: float  # ‖dequantized − original‖ / ‖original‖ over the whole tensor


@dataclass
class GGUFReport:
    path: Path
    qtype: str
    tensors: list[TensorReport] = field(default_factory=list)
    csm_rs_note: str | None = None

    def summary(self) -> str:
        lines = []
        for type_name in sorted({t.type for t in self.tensors}):
            group = [t for t in self.tensors if t.type == type_name]
            worst = max(group, key=lambda t: t.relative_error)
            median = float(np.median([t.relative_error for t in group]))
            lines.append(
                f"  {type_name}: {len(group)} tensors, relative error median {median:.2e}, "
                f"max {worst.relative_error:.2e} ({worst.name})"
            )
        return "\n".join(lines + ([f"  note: {self.csm_rs_note}"] if self.csm_rs_note else []))


def _check_qtype(qtype: str) -> None:
    if qtype not in QTYPES:
        raise ValueError(f"--qtype {qtype!r}: use one of {sorted(QTYPES)}")
    target = QTYPES[qtype]
    block_size, _ = GGML_QUANT_SIZES[target]
    try:
        gguf.quants.quantize(np.zeros((1, block_size), np.float32), target)
    except NotImplementedError:
        from importlib.metadata import version

        raise ValueError(
            f"--qtype {qtype}: the gguf package ({version('gguf')}) has no reference {target.name} quantizer (it "
            f"dequantizes {target.name} only); write q4_1, the closest 4-bit type it quantizes (a scale and a "
            f"minimum per block of 32), or q8_0"
        ) from None


def write_gguf(
    state_dict: dict[str, torch.Tensor], config: CSMConfig, path: str | Path, qtype: str = "q8_0"
) -> GGUFReport:
    """Our state dict (Sesame's names) → a GGUF csm.rs loads, quantized by `gguf.quants`. Written to a temporary
    file beside `path` and renamed, so a crash never leaves a partial GGUF under `path`. Returns each tensor's type
    and the relative error of its stored values (dequantized from the very bytes written)."""
    _check_qtype(qtype)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    report = GGUFReport(path, qtype, csm_rs_note=csm_rs_note(config))
    partial = path.with_name(f".{path.name}.partial")
    writer = gguf.GGUFWriter(partial, ARCH)  # writes general.architecture = "csm"
    try:
        writer.add_quantization_version(gguf.GGML_QUANT_VERSION)  # 2, as csm.rs's quantize.py
        for key, value in CSM_RS_KEYS.items():
            writer.add_uint32(key, value(config))
        writer.add_string(CONFIG_KEY, json.dumps(config.to_dict()))
        for name, tensor in state_dict.items():
            values = tensor.detach().to(device="cpu", dtype=torch.float32).contiguous().numpy()
            ggml_type = tensor_type(name, values.shape, qtype)
            stored = gguf.quants.quantize(values, ggml_type)
            back = gguf.quants.dequantize(stored, ggml_type).reshape(values.shape)
            norm = float(np.linalg.norm(values))
            error = float(np.linalg.norm(back - values))
            report.tensors.append(TensorReport(name, ggml_type.name, error / norm if norm else error))
            raw_dtype = None if ggml_type == GGMLQuantizationType.F16 else ggml_type
            writer.add_tensor(name, stored, raw_dtype=raw_dtype)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
    finally:
        writer.close()
    os.replace(partial, path)
    return report


def _field(reader: gguf.GGUFReader, key: str):
    field_ = reader.get_field(key)
    return None if field_ is None else field_.contents()


def read_gguf(path: str | Path) -> tuple[CSMConfig, dict[str, torch.Tensor]]:
    """(config, fp32 state dict with our names) from a CSM GGUF: ours (its `csm_train.config`), or csm.rs's (Sesame's
    or transformers' names, csm-1b's flavors recognised by shape). Quantized tensors are dequantized."""
    path = Path(path)
    try:
        reader = gguf.GGUFReader(path)
        architecture = _field(reader, "general.architecture")
        config_json = _field(reader, CONFIG_KEY)
        tensors = {}
        for t in reader.tensors:
            if t.name.startswith("codec_model."):  # transformers' checkpoint carries its Mimi codec; CSM does not
                continue
            values = gguf.quants.dequantize(t.data, t.tensor_type).reshape(tuple(reversed(t.shape.tolist())))
            tensors[t.name] = torch.from_numpy(np.array(values, dtype=np.float32))  # a copy: the file is memory-mapped
    except Exception as error:
        raise ValueError(
            f"could not read GGUF {path} ({type(error).__name__}: {error}); the file is truncated or not a GGUF "
            f"file: copy or write it again"
        ) from error
    finally:
        reader = None  # closes the memory map
    if architecture != ARCH:
        raise ValueError(f"{path}: general.architecture is {architecture!r}, not {ARCH!r}: not a CSM GGUF")
    transformers_names = TRANSFORMERS_MARKER in tensors
    if config_json is not None:
        config = CSMConfig(**json.loads(config_json))
    elif transformers_names:
        ours = {our_name_from_transformers(k): v for k, v in tensors.items()}
        config = sesame_config_from_shapes({k: v for k, v in ours.items() if k is not None}, path)
    else:
        config = sesame_config_from_shapes(tensors, path)
    if transformers_names:
        return config, state_dict_from_transformers(tensors, config)
    return config, tensors
