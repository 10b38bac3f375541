"""GGUF for csm.rs (issue 17 item 3): `python -m csm_train.convert SRC OUT.gguf --to gguf --qtype …` writes the
tensor names, types and `csm.*` metadata csm.rs's loader and scripts/quantize.py use (csm_train/gguf.py cites them),
and `CSM.from_pretrained(OUT.gguf)` reads it back within each type's error; csm.rs's own files (transformers' names,
no config of ours, Q4_K blocks) read too."""

from __future__ import annotations

import json

import gguf
import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as T

from csm_train import CSM, CSMConfig
from csm_train.convert import main as convert_main
from csm_train.formats import SESAME_FLAVORS, state_dict_from_transformers, state_dict_to_transformers
from csm_train.gguf import CONFIG_KEY, CSM_RS_KEYS, quantized_by_csm_rs, read_gguf, tensor_type

# Tiny preset, small vocabularies: every quantized row (128, 64, 384, 192 wide) is whole Q8_0/Q4_1 blocks of 32.
CONFIG = CSMConfig.preset("tiny", text_vocab_size=256, audio_vocab_size=67, num_codebooks=8)
QTYPES = {"f16": T.F16, "q8_0": T.Q8_0, "q4_1": T.Q4_1}

# Relative error ‖read − source‖ / ‖source‖ per tensor. F16 rounds each value to 11 significant bits, so no element
# is off by more than 2^-11 of itself (measured 2.1e-4). Q8_0 rounds to amax/127 per block of 32 (RMS error
# amax/(127·√12), ≈ 5.7e-3 of a Gaussian block's RMS; measured ≤ 5.6e-3); Q4_1 to (max − min)/15 (≈ 0.079; measured
# ≤ 0.079). Bounds: the measured figure with ~1.3-1.8x headroom; the seed is fixed, so they do not flake.
TENSOR_BOUND = {"f16": 2.0**-11, "q8_0": 1e-2, "q4_1": 0.1}
# Teacher-forced logits (c0 head / depth decoder) of the model read back, relative to the source's. Measured:
# f16 4.8e-4 / 7.9e-4, q8_0 9.5e-3 / 1.4e-2, q4_1 0.13 / 0.21: each quantized matmul on the way adds its tensor
# error (the depth decoder's path passes projection and 14 of them, the errors adding roughly in quadrature).
# Bounds: the measured figures with ~1.6-2.5x headroom.
LOGITS_BOUND = {"f16": 2e-3, "q8_0": 3e-2, "q4_1": 0.35}


def _model(config: CSMConfig, seed: int = 0) -> CSM:
    torch.manual_seed(seed)
    model = CSM(config).eval()
    with torch.no_grad():  # norms away from 1, so a norm stored as anything but F16 of itself would show
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
    return model


def _frames(config: CSMConfig, batch=2, text_len=5, audio_len=7, seed=0):
    g = torch.Generator().manual_seed(seed)
    K, T_ = config.num_codebooks, text_len + audio_len
    tokens = torch.zeros(batch, T_, K + 1, dtype=torch.long)
    mask = torch.zeros(batch, T_, K + 1, dtype=torch.bool)
    tokens[:, :text_len, K] = torch.randint(0, config.text_vocab_size, (batch, text_len), generator=g)
    mask[:, :text_len, K] = True
    tokens[:, text_len:, :K] = torch.randint(0, config.audio_vocab_size, (batch, audio_len, K), generator=g)
    mask[:, text_len:, :K] = True
    return tokens, mask


@torch.no_grad()
def _logits(model: CSM, tokens, mask):
    out = model(tokens, mask)
    K = model.config.num_codebooks
    h = out.hidden[:, 4:-1].reshape(-1, out.hidden.shape[-1])  # states before each audio frame
    codes = tokens[:, 5:, : K - 1].reshape(-1, K - 1)
    return out.c0_logits, model.decoder_logits(h, codes)


def _relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    directory = tmp_path_factory.mktemp("gguf") / "source"
    model = _model(CONFIG)
    model.save_pretrained(directory)
    return model, directory


@pytest.fixture(scope="module")
def written(source, tmp_path_factory):
    """qtype → the .gguf written through the CLI, each once."""
    _, directory = source
    out = {}
    for qtype in QTYPES:
        path = tmp_path_factory.mktemp("gguf") / f"tiny-{qtype}.gguf"
        convert_main([str(directory), str(path), "--to", "gguf", "--qtype", qtype])
        out[qtype] = path
    return out


def _field(reader, key):
    field = reader.get_field(key)
    assert field is not None, f"metadata key {key} missing"
    return field.contents(), field.types[0]


@pytest.mark.parametrize("qtype", list(QTYPES))
def test_csm_rs_names_types_and_metadata(source, written, qtype):
    model, _ = source
    reader = gguf.GGUFReader(written[qtype])
    # csm.rs's scripts/quantize.py writes these keys, all UINT32 but the architecture.
    assert _field(reader, "general.architecture") == ("csm", gguf.GGUFValueType.STRING)
    assert _field(reader, "general.quantization_version") == (2, gguf.GGUFValueType.UINT32)
    for key, value in CSM_RS_KEYS.items():
        assert _field(reader, key) == (value(CONFIG), gguf.GGUFValueType.UINT32), key
    assert CSMConfig(**json.loads(_field(reader, CONFIG_KEY)[0])) == CONFIG

    tensors = {t.name: t for t in reader.tensors}
    state = model.state_dict()
    assert set(tensors) == set(state)  # Sesame's names, as csm.rs's loader reads them
    for name, t in tensors.items():
        # GGUF dims innermost first: csm.rs (candle) reverses them into the torch shape.
        assert tuple(reversed(t.shape.tolist())) == tuple(state[name].shape), name
        quantized = quantized_by_csm_rs(name, state[name].ndim)
        assert t.tensor_type == (QTYPES[qtype] if quantized else T.F16), name
    # csm.rs's loader: the attention/MLP projections, projection and codebook0_head through QMatMul; the rest F16.
    expected = {"backbone.layers.0.attn.q_proj.weight", "decoder.layers.1.mlp.w2.weight", "codebook0_head.weight"}
    assert expected <= {n for n in tensors if quantized_by_csm_rs(n, state[n].ndim)}
    for name in ("text_embeddings.weight", "audio_embeddings.weight", "audio_head", "backbone.norm.scale"):
        assert tensors[name].tensor_type == T.F16
    assert list(tensors["audio_head"].shape) == [CONFIG.audio_vocab_size, CONFIG.decoder.dim, CONFIG.num_codebooks - 1]


@pytest.mark.parametrize("qtype", list(QTYPES))
def test_read_back_within_each_types_error(source, written, qtype):
    model, _ = source
    back = CSM.from_pretrained(written[qtype]).eval()
    assert back.config == CONFIG
    errors = {k: _relative(back.state_dict()[k], v) for k, v in model.state_dict().items()}
    worst = max(errors, key=errors.get)
    assert errors[worst] <= TENSOR_BOUND[qtype], (worst, errors[worst])
    if qtype != "f16":  # the quantized ones are the worst; F16 tensors stay at F16's error
        assert max(e for k, e in errors.items() if not quantized_by_csm_rs(k, model.state_dict()[k].ndim)) <= 2.0**-11

    tokens, mask = _frames(CONFIG)
    (c0, dec), (c0_back, dec_back) = _logits(model, tokens, mask), _logits(back, tokens, mask)
    assert _relative(c0_back, c0) <= LOGITS_BOUND[qtype]
    assert _relative(dec_back, dec) <= LOGITS_BOUND[qtype]


def test_rows_of_partial_blocks_stay_f16():
    """As llama.cpp: a row that is no whole number of blocks (32 for Q8_0/Q4_1, 256 for Q4_K) is not quantized."""
    assert tensor_type("decoder.layers.0.mlp.w1.weight", (96, 48), "q8_0") == T.F16
    assert tensor_type("decoder.layers.0.mlp.w1.weight", (96, 64), "q8_0") == T.Q8_0
    assert tensor_type("decoder.layers.0.mlp.w1.weight", (96, 192), "q4_k") == T.F16
    assert tensor_type("backbone.layers.0.sa_norm.scale", (64,), "q8_0") == T.F16


def test_q4_k_needs_a_quantizer(source, tmp_path, capsys):
    """gguf 0.19.0 dequantizes Q4_K but cannot quantize it: the CLI says so and names q4_1. A gguf with a Q4_K
    quantizer writes it (rows of 64 or 192 are no whole block of 256 and stay F16)."""
    _, directory = source
    out = tmp_path / "tiny-q4_k.gguf"
    try:
        gguf.quants.quantize(np.zeros((1, 256), np.float32), T.Q4_K)
    except NotImplementedError:
        with pytest.raises(SystemExit) as exit_:
            convert_main([str(directory), str(out), "--to", "gguf", "--qtype", "q4_k"])
        assert exit_.value.code == 2
        err = capsys.readouterr().err
        assert "no reference Q4_K quantizer" in err and "write q4_1" in err
        assert not out.exists()
        return
    convert_main([str(directory), str(out), "--to", "gguf", "--qtype", "q4_k"])
    types = {t.name: t.tensor_type for t in gguf.GGUFReader(out).tensors}
    assert types["backbone.layers.0.attn.q_proj.weight"] == T.Q4_K
    assert types["decoder.layers.0.attn.q_proj.weight"] == T.F16


def test_reads_a_csm_rs_gguf_with_transformers_names_and_q4_k(tmp_path, monkeypatch):
    """A file as csm.rs's quantize.py writes one from transformers' safetensors (its README's example): HF names,
    rotate-half q/k rows, only its metadata (no config of ours), Q4_K blocks, the codec's tensors beside. The flavor is
    recognised by shape as for csm-1b (a test-sized flavor is registered here); every value reads back exactly."""
    backbone = dict(num_layers=1, dim=256, num_heads=4, num_kv_heads=2, ffn_dim=512, max_seq_len=2048)
    decoder = dict(num_layers=1, dim=64, num_heads=4, num_kv_heads=2, ffn_dim=256, max_seq_len=2048)
    monkeypatch.setitem(SESAME_FLAVORS, "test-backbone", backbone)
    monkeypatch.setitem(SESAME_FLAVORS, "test-decoder", decoder)
    config = CSMConfig(backbone=backbone, decoder=decoder, text_vocab_size=64, audio_vocab_size=35, num_codebooks=4)
    hf = state_dict_to_transformers(_model(config).state_dict(), config)

    rng = np.random.default_rng(0)
    path = tmp_path / "csm-rs-q4_k.gguf"
    writer = gguf.GGUFWriter(path, "csm")
    writer.add_quantization_version(2)
    for key, value in CSM_RS_KEYS.items():
        writer.add_uint32(key, value(config))
    stored = {}
    for name, tensor in [*hf.items(), ("codec_model.quantizer.weight", torch.ones(2, 32))]:
        values = tensor.numpy()
        if quantized_by_csm_rs(name, values.ndim) and values.shape[-1] % 256 == 0:
            blocks = rng.integers(0, 256, (values.shape[0], values.shape[1] // 256, 144), dtype=np.uint8)
            blocks[..., 0:4] = np.array([0.002, 0.01], np.float16).view(np.uint8)  # d, dmin of each super-block
            data = blocks.reshape(values.shape[0], -1)
            writer.add_tensor(name, data, raw_dtype=T.Q4_K)
            stored[name] = torch.from_numpy(gguf.quants.dequantize(data, T.Q4_K))
        else:
            writer.add_tensor(name, values.astype(np.float16))
            stored[name] = torch.from_numpy(values.astype(np.float16).astype(np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    types = {t.name: t.tensor_type for t in gguf.GGUFReader(path).tensors}
    assert types["backbone_model.layers.0.self_attn.q_proj.weight"] == T.Q4_K
    assert types["lm_head.weight"] == T.Q4_K

    read_config, weights = read_gguf(path)
    assert read_config == config
    expected = state_dict_from_transformers(stored, config)
    assert set(weights) == set(expected)
    for name, tensor in expected.items():
        assert torch.equal(weights[name], tensor), name
    CSM.from_pretrained(path)  # and builds


def test_a_truncated_or_foreign_gguf_is_refused_naming_the_file(written, tmp_path):
    data = written["q8_0"].read_bytes()
    truncated = tmp_path / "truncated.gguf"
    truncated.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match=r"could not read GGUF .*truncated\.gguf.*truncated or not a GGUF"):
        CSM.from_pretrained(truncated)
    garbage = tmp_path / "garbage.gguf"
    garbage.write_bytes(b"not a gguf at all" * 10)
    with pytest.raises(ValueError, match=r"garbage\.gguf.*truncated or not a GGUF"):
        CSM.from_pretrained(garbage)

    llama = tmp_path / "llama.gguf"
    writer = gguf.GGUFWriter(llama, "llama")
    writer.add_tensor("token_embd.weight", np.zeros((4, 8), np.float16))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(ValueError, match=r"llama\.gguf: general.architecture is 'llama', not 'csm'"):
        CSM.from_pretrained(llama)


def test_cli_wants_a_gguf_file_name(source, tmp_path, capsys):
    _, directory = source
    with pytest.raises(SystemExit):
        convert_main([str(directory), str(tmp_path / "out"), "--to", "gguf"])
    assert "name it *.gguf" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        convert_main([str(directory), str(tmp_path / "out"), "--to", "ours", "--qtype", "q8_0"])
    assert "--qtype is for --to gguf" in capsys.readouterr().err
