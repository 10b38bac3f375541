"""Packed rows through FlexAttention (`data.block_mask`) equal the dense block-causal mask SDPA gets."""

import pytest
import torch
import torch.nn.attention.flex_attention as flex_module
from conftest import random_frames
from torch.nn.attention.flex_attention import BlockMask

from csm_train import CSM, CSMConfig
from csm_train.data import attention_mask, block_mask

pytestmark = pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")

# Row layouts, in frames: conversations then padding. T = 300 spans three 128-frame tiles, so the block
# mask holds empty, full and partial tiles; row 2 is all padding.
T = 300
ROWS = [[70, 90, 45, 60], [200], []]


def packed_batch(config):
    K = config.num_codebooks
    tokens = torch.zeros(len(ROWS), T, K + 1, dtype=torch.long)
    tokens_mask = torch.zeros(len(ROWS), T, K + 1, dtype=torch.bool)
    input_pos = torch.zeros(len(ROWS), T, dtype=torch.long)
    doc_ids = torch.full((len(ROWS), T), -1)
    for row, lengths in enumerate(ROWS):
        start = 0
        for doc, n in enumerate(lengths):
            t, m, _ = random_frames(config, batch=1, text_len=n // 4, audio_len=n - n // 4 - 1, seed=10 * row + doc)
            tokens[row, start : start + n], tokens_mask[row, start : start + n] = t[0], m[0]
            input_pos[row, start : start + n] = torch.arange(n)
            doc_ids[row, start : start + n] = doc
            start += n
    return tokens, tokens_mask, input_pos, doc_ids


@pytest.fixture
def flex_backward_on_cpu(monkeypatch):
    """FlexAttention refuses `requires_grad` inputs on CPU: it has no fused CPU backward. Its eager path (the
    math reference torch checks its GPU kernels against) differentiates all the same; lift the guard so
    that gradients through a block mask can be compared here."""
    monkeypatch.setattr(flex_module, "_validate_device", lambda *tensors: None)


def test_block_mask_is_the_dense_mask_tile_by_tile():
    """Elementwise the same rule; and the tile classes the GPU kernel trusts without evaluating the rule
    (empty: skipped, full: computed unmasked) agree with the dense mask."""
    _, _, _, doc_ids = packed_batch(CSMConfig.preset("tiny"))
    dense = attention_mask(doc_ids)[:, 0]
    blocks = attention_mask(doc_ids, flex=True)
    assert isinstance(blocks, BlockMask)
    elementwise = flex_module.create_mask(blocks.mask_mod, len(ROWS), 1, T, T)
    assert torch.equal(elementwise[:, 0], dense)

    Q, KV = blocks.BLOCK_SIZE
    n = -(-T // Q)
    counts = {"full": 0, "partial": 0, "empty": 0}
    for b in range(len(ROWS)):
        for i in range(n):
            partial = set(blocks.kv_indices[b, 0, i, : blocks.kv_num_blocks[b, 0, i]].tolist())
            full = set(blocks.full_kv_indices[b, 0, i, : blocks.full_kv_num_blocks[b, 0, i]].tolist())
            assert not partial & full
            for j in range(n):
                tile = dense[b, i * Q : (i + 1) * Q, j * KV : (j + 1) * KV]
                kind = "full" if j in full else "partial" if j in partial else "empty"
                counts[kind] += 1
                if kind == "full":
                    assert tile.all(), (b, i, j)
                elif kind == "empty":
                    assert not tile.any(), (b, i, j)
    # Per row 9 tiles: the 3 above the diagonal are empty, and so is every tile that no conversation spans
    # (rows 0 and 1: queries 256+ against keys 0-127). The all-padding row is one causal document: full
    # below the diagonal, except where the last tile overhangs T=300 (kept partial, conservatively).
    assert counts == {"full": 1, "partial": 15, "empty": 11}


@pytest.mark.parametrize("checkpointing", [False, True])
def test_flex_block_mask_equals_dense_mask_in_logits_and_gradients(flex_backward_on_cpu, checkpointing):
    config = CSMConfig.preset("tiny", activation_checkpointing=checkpointing)
    tokens, tokens_mask, input_pos, doc_ids = packed_batch(config)
    decoder_frames = tokens_mask[..., 0].clone()  # every audio frame through the depth decoder
    g = torch.Generator().manual_seed(0)
    outputs, grads = [], []
    for flex in (False, True):
        torch.manual_seed(0)
        model = CSM(config).train()
        out = model(tokens, tokens_mask, input_pos, attention_mask(doc_ids, flex=flex), decoder_frames)
        if not outputs:  # one random readout of every logit, padding included: stricter than the loss
            w0, w1 = torch.randn(out.c0_logits.shape, generator=g), torch.randn(out.decoder_logits.shape, generator=g)
        ((out.c0_logits * w0).sum() + (out.decoder_logits * w1).sum()).backward()
        outputs.append(out)
        grads.append({name: p.grad for name, p in model.named_parameters()})

    dense, flex = outputs
    assert flex.decoder_logits.shape[0] == int(decoder_frames[:, 1:].sum()) > 300
    torch.testing.assert_close(flex.c0_logits, dense.c0_logits, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(flex.decoder_logits, dense.decoder_logits, atol=1e-5, rtol=1e-5)
    for name, grad in grads[0].items():  # fp32 round-off: 1e-5 of each gradient's largest entry
        assert grad is not None and grads[1][name] is not None, name
        torch.testing.assert_close(grads[1][name], grad, atol=1e-5 * grad.abs().max().item(), rtol=1e-4, msg=name)
    assert grads[0]["backbone.layers.0.attn.q_proj.weight"].abs().max() > 1e-2  # not vacuously equal


def test_flex_block_mask_under_bf16_autocast():
    torch.manual_seed(0)
    config = CSMConfig.preset("tiny")
    model = CSM(config).eval()
    tokens, tokens_mask, input_pos, doc_ids = packed_batch(config)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        dense = model(tokens, tokens_mask, input_pos, attention_mask(doc_ids)).c0_logits
        flex = model(tokens, tokens_mask, input_pos, attention_mask(doc_ids, flex=True)).c0_logits
        unmasked = model(tokens, tokens_mask, input_pos).c0_logits  # causal across conversations: wrong
    assert flex.dtype == torch.bfloat16
    assert (flex.float() - dense.float()).abs().max() < 0.05
    assert (unmasked.float() - dense.float()).abs().max() > 0.2  # the mask matters on these rows


def test_kv_cache_rejects_a_block_mask():
    model = CSM(CSMConfig.preset("tiny")).eval()
    tokens, tokens_mask, input_pos, doc_ids = packed_batch(model.config)
    model.setup_caches(batch_size=len(ROWS))
    try:
        with pytest.raises(ValueError, match="dense bool mask"), torch.no_grad():
            model(tokens, tokens_mask, input_pos, block_mask(doc_ids))
    finally:
        model.remove_caches()
