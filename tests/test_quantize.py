"""Weight-only int8 / int4 quantization (csm_train/quantize.py, issue 17): the packed kernels compute what the
quantized values say, a quantized tiny model agrees with fp32 teacher-forced (the bounds the issue sets), it
generates through the KV-cache path, loads through `from_pretrained(..., quantize=)`, and is inference-only."""

from __future__ import annotations

import copy
import inspect
import re
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf
from torch import nn

from csm_train import CSM, CSMConfig
from csm_train.generate import MIMI_CODES, Sampling, generate
from csm_train.quantize import (
    QuantizedLinear,
    dequantize_int4,
    is_quantized,
    quantize,
    quantize_int4,
    quantize_int8,
    reference_linear,
)

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tiny():
    """The tiny preset at its Llama-style random init (normal, std 0.02: trained weights' scale), fp32, eval."""
    torch.manual_seed(0)
    return CSM(CSMConfig.preset("tiny", text_vocab_size=256)).eval()


def frames(config: CSMConfig, batch: int = 4, length: int = 64, seed: int = 0):
    """8 text frames, then audio frames; the depth decoder teacher-forced on every audio frame after the first."""
    K = config.num_codebooks
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, MIMI_CODES, (batch, length, K + 1), generator=g)
    tokens[..., K] = torch.randint(0, config.text_vocab_size, (batch, length), generator=g)
    mask = torch.zeros(batch, length, K + 1, dtype=torch.bool)
    mask[:, :8, K] = True
    mask[:, 8:, :K] = True
    decoder_frames = torch.zeros(batch, length, dtype=torch.bool)
    decoder_frames[:, 9:] = True
    return tokens, mask, decoder_frames


@pytest.mark.parametrize(("mode", "group_size"), [("int8", None), ("int4", 32), ("int4", 64)])
def test_packed_kernel_equals_dequantized_matmul(mode, group_size):
    torch.manual_seed(0)
    linear = nn.Linear(256, 96, bias=False)
    nn.init.normal_(linear.weight, std=0.02)
    module = QuantizedLinear.from_linear(linear, mode, group_size or 32).eval()
    q, scales = quantize_int8(linear.weight) if mode == "int8" else quantize_int4(linear.weight, group_size)
    x = torch.randn(3, 5, 256).bfloat16().float()  # the kernels take bf16 activations: exact in bf16
    with torch.inference_mode():
        y = module(x)
    expected = reference_linear(module, x, q, scales)
    assert y.shape == (3, 5, 96) and y.dtype == torch.float32
    # A wrong packing or scale layout is off by O(1); bf16 output rounding is ~2^-9.
    assert (y - expected).norm() / expected.norm() < 5e-3
    dequantized = q.float() * scales.float()[:, None] if mode == "int8" else dequantize_int4(q, scales)
    weight_error = (dequantized - linear.weight).norm() / linear.weight.norm()
    assert weight_error < (0.01 if mode == "int8" else 0.1)


def test_int4_clip_search_clips_and_is_the_same_in_row_chunks():
    """The clip search picks ratios below 1 for some Gaussian groups (it does something) and gives the same
    ratios searched in row chunks as whole (the chunking is for speed only)."""
    from csm_train.quantize import _best_clip, int4_round_trip

    w = torch.randn(1100, 8, 32, generator=torch.Generator().manual_seed(0))
    chunked = _best_clip(w, int4_round_trip, rows=512)
    whole = _best_clip(w, int4_round_trip, rows=len(w))
    assert chunked.shape == (1100, 8, 1) and torch.equal(chunked, whole)
    assert 0.1 < (whole < 1).float().mean() < 1


def test_group_size_must_divide_the_inputs():
    with pytest.raises(ValueError, match="group_size=128 does not divide the 64"):
        QuantizedLinear.from_linear(nn.Linear(64, 32, bias=False), "int4", 128)
    with pytest.raises(ValueError, match="choose one of"):
        quantize(CSM(CSMConfig.preset("tiny", text_vocab_size=256)), "int3")


@pytest.mark.parametrize(("mode", "c0_agreement", "decoder_error"), [("int8", 0.95, 0.03), ("int4", 0.90, 0.25)])
def test_teacher_forced_agreement_with_fp32(tiny, mode, c0_agreement, decoder_error):
    """The issue's bounds (c0 top-1 ≥ 95 % int8, ≥ 90 % int4). Measured, seeds 0-3: int8 99.5-100 %, decoder
    logits' relative error 0.012; int4 (groups of 32) 95.0-95.9 %, 0.15."""
    tokens, mask, decoder_frames = frames(tiny.config)
    quantized = quantize(copy.deepcopy(tiny), mode)
    assert is_quantized(quantized) and not is_quantized(tiny)
    # Every linear layer of backbone and decoder is quantized; embeddings, projection and heads are not.
    for transformer in (quantized.backbone, quantized.decoder):
        assert not any(isinstance(m, nn.Linear) for m in transformer.modules())
    assert isinstance(quantized.projection, nn.Linear) and isinstance(quantized.codebook0_head, nn.Linear)
    with torch.inference_mode():
        ref = tiny(tokens, mask, decoder_frames=decoder_frames)
        out = quantized(tokens, mask, decoder_frames=decoder_frames)
    audio = slice(8, -1)  # positions predicting an audio frame's codebook 0
    top1 = lambda logits: logits[:, audio, :MIMI_CODES].argmax(-1)  # noqa: E731
    assert (top1(out.c0_logits) == top1(ref.c0_logits)).float().mean() >= c0_agreement
    error = (out.decoder_logits - ref.decoder_logits).norm() / ref.decoder_logits.norm()
    assert error < decoder_error


@pytest.mark.parametrize("mode", ["int8", "int4"])
def test_quantized_model_generates_deterministically(tiny, mode):
    quantized = quantize(copy.deepcopy(tiny), mode)
    tokens, mask, _ = frames(tiny.config, batch=2, length=12)
    prompts = [(tokens[0], mask[0]), (tokens[1, 3:], mask[1, 3:])]  # two lengths: left padding too
    sampling = Sampling(max_frames=3, temperature=0.9, topk=50, seed=0)
    first, again = generate(quantized, prompts, sampling), generate(quantized, prompts, sampling)
    for a, b in zip(first.codes, again.codes, strict=True):
        assert a.shape == (tiny.config.num_codebooks, 3) and torch.equal(a, b)
        assert 0 <= a.min() and a.max() < MIMI_CODES


def test_from_pretrained_quantizes_and_save_refuses(tiny, tmp_path):
    tiny.save_pretrained(tmp_path / "model")
    for mode in ("int8", "int4"):
        model = CSM.from_pretrained(tmp_path / "model", quantize=mode)
        assert is_quantized(model) and not model.training
        assert isinstance(model.backbone.layers[0].mlp.w1, QuantizedLinear)
        # eval's loader makes the rest fp32 without touching the kernels' bf16 scales.
        model = model.float()
        assert model.backbone.layers[0].attn.q_proj.scales.dtype == torch.bfloat16
        tokens, mask, _ = frames(tiny.config, batch=1, length=10)
        with torch.inference_mode():
            assert torch.isfinite(model(tokens, mask).c0_logits).all()
        with pytest.raises(ValueError, match="quantized model is not saved"):
            model.save_pretrained(tmp_path / "again")
    model.train()
    with pytest.raises(RuntimeError, match="inference only"):
        model(tokens, mask)
    group = CSM.from_pretrained(tmp_path / "model", quantize="int4", group_size=64)
    assert group.decoder.layers[0].attn.q_proj.group_size == 64


def test_eval_and_serve_take_the_option(tiny, tmp_path):
    from eval.speaker import Speaker, load_model

    for name in ("eval", "serve"):
        assert OmegaConf.load(ROOT / "conf" / name / "config.yaml").quantize is None
    tiny.save_pretrained(tmp_path / "model")
    assert is_quantized(load_model(tmp_path / "model", "int8")) and not is_quantized(load_model(tmp_path / "model"))
    with pytest.raises(ValueError, match="CPU kernels"):
        Speaker.from_checkpoint(None, "cuda", quantize="int8")
    # The entry points pass it on (building their speakers needs a tokenizer and codec: checked at the source).
    import eval.run
    import eval.say
    import serve.app

    for module in (eval.run, serve.app, eval.say):
        assert re.search(r"Speaker\.from_checkpoint\([^:]{0,120}?quantize", inspect.getsource(module)), module
    assert '"--quantize"' in inspect.getsource(eval.say)
