"""The CSM architecture: presets, Sesame's embedding and layout conventions, caches, checkpointing."""

import pytest
import torch
import torch.nn.functional as F
from conftest import random_frames

from csm_train import CSM, CSMConfig


def _on_meta(name):
    with torch.device("meta"):
        return CSM(CSMConfig.preset(name))


def test_1b_preset_has_csm_1b_parameter_count():
    assert _on_meta("1b").num_parameters() == 1_552_791_552


@pytest.mark.parametrize("name", ["tiny", "100m", "1b", "3b", "8b"])
def test_presets_build_with_sesame_parameter_names(name):
    model = _on_meta(name)
    names = set(dict(model.named_parameters()))
    assert {
        "text_embeddings.weight",
        "audio_embeddings.weight",
        "projection.weight",
        "codebook0_head.weight",
        "audio_head",
    } <= names
    for prefix in ("backbone", "decoder"):
        for suffix in (
            "attn.q_proj.weight",
            "attn.k_proj.weight",
            "attn.v_proj.weight",
            "attn.output_proj.weight",
            "mlp.w1.weight",
            "mlp.w2.weight",
            "mlp.w3.weight",
            "sa_norm.scale",
            "mlp_norm.scale",
        ):
            assert f"{prefix}.layers.0.{suffix}" in names
        assert f"{prefix}.norm.scale" in names
    cfg = model.config
    assert model.audio_embeddings.weight.shape == (cfg.audio_vocab_size * cfg.num_codebooks, cfg.backbone.dim)
    assert model.audio_head.shape == (cfg.num_codebooks - 1, cfg.decoder.dim, cfg.audio_vocab_size)


def test_preset_errors_are_clear():
    with pytest.raises(ValueError, match="unknown CSM preset '2b'.*'1b'"):
        CSMConfig.preset("2b")
    with pytest.raises(ValueError, match="num_heads"):
        CSMConfig.preset(
            "tiny", backbone=dict(num_layers=1, dim=100, num_heads=3, num_kv_heads=1, ffn_dim=8, max_seq_len=8)
        )


@pytest.fixture(scope="module")
def model(tiny_config):
    torch.manual_seed(0)
    return CSM(tiny_config).eval()


def test_embedding_is_sesames_masked_sum(model, tiny_config):
    """Sesame embeds all K+1 columns, zeroes the unset ones and sums; we must give the same vectors."""
    K, V = tiny_config.num_codebooks, tiny_config.audio_vocab_size
    tokens, tokens_mask, _ = random_frames(tiny_config, batch=2, text_len=4, audio_len=5)
    audio = model.audio_embeddings(tokens[..., :K] + V * torch.arange(K))
    text = model.text_embeddings(tokens[..., K:])
    reference = (torch.cat([audio, text], dim=-2) * tokens_mask[..., None]).sum(dim=2)
    torch.testing.assert_close(model.embed_frames(tokens, tokens_mask), reference, atol=1e-6, rtol=0)


def test_forward_shapes_and_causality(model, tiny_config):
    tokens, tokens_mask, _ = random_frames(tiny_config, batch=2, text_len=4, audio_len=5)
    with torch.no_grad():
        out = model(tokens, tokens_mask)
        changed = tokens.clone()
        changed[:, -1, 0] = 7  # a later frame must not change earlier outputs
        out2 = model(changed, tokens_mask)
    assert out.c0_logits.shape == (2, 10, tiny_config.audio_vocab_size)
    assert out.hidden.shape == (2, 10, tiny_config.backbone.dim)
    torch.testing.assert_close(out.c0_logits[:, :-1], out2.c0_logits[:, :-1], atol=0, rtol=0)
    logits = model.decoder_logits(out.hidden[0, :3], tokens[0, 5:8, : tiny_config.num_codebooks - 1])
    assert logits.shape == (3, tiny_config.num_codebooks - 1, tiny_config.audio_vocab_size)


def test_too_long_input_is_a_clear_error(tiny_config):
    model = CSM(CSMConfig.preset("tiny", backbone={**tiny_config.backbone.__dict__, "max_seq_len": 8}))
    tokens, tokens_mask, _ = random_frames(model.config, batch=1, text_len=4, audio_len=5)
    with pytest.raises(ValueError, match="10 positions exceed max_seq_len=8"):
        model(tokens, tokens_mask)


def test_packed_sequences_with_positions_and_block_mask_equal_separate_ones(model, tiny_config):
    """Two conversations packed in one row (positions restart, attention stays inside each) give the
    logits each gets alone: what the trainer's packing relies on."""
    a = random_frames(tiny_config, batch=1, text_len=3, audio_len=4, seed=1)
    b = random_frames(tiny_config, batch=1, text_len=5, audio_len=2, seed=2)
    tokens, tokens_mask = torch.cat([a[0], b[0]], 1), torch.cat([a[1], b[1]], 1)
    la, lb = a[0].shape[1], b[0].shape[1]
    doc = torch.tensor([0] * la + [1] * lb)
    positions = torch.cat([torch.arange(la), torch.arange(lb)])[None]
    mask = (doc[:, None] == doc[None, :]) & torch.ones(la + lb, la + lb, dtype=torch.bool).tril()
    with torch.no_grad():
        packed = model(tokens, tokens_mask, input_pos=positions, mask=mask[None, None]).c0_logits
        alone_a = model(a[0], a[1]).c0_logits
        alone_b = model(b[0], b[1]).c0_logits
    torch.testing.assert_close(packed, torch.cat([alone_a, alone_b], 1), atol=1e-5, rtol=0)


def test_kv_cache_decoding_equals_full_forward(model, tiny_config):
    """Prefill a prompt, then feed one frame at a time through the static caches: the same logits as one
    full forward (backbone), and the depth decoder run position by position equals teacher forcing."""
    K = tiny_config.num_codebooks
    tokens, tokens_mask, _ = random_frames(tiny_config, batch=2, text_len=5, audio_len=6)
    T = tokens.shape[1]
    with torch.no_grad():
        full = model(tokens, tokens_mask)
        # Depth decoder of frame T-2 (predicted from state T-3), teacher-forced.
        h, codes = full.hidden[:, T - 3], tokens[:, T - 2, : K - 1]
        teacher = model.decoder_logits(h, codes)
        model.setup_caches(batch_size=2)
        try:
            prompt = 7
            pos = torch.arange(prompt).expand(2, prompt)
            steps = [model(tokens[:, :prompt], tokens_mask[:, :prompt], input_pos=pos).c0_logits]
            for t in range(prompt, T):
                steps.append(
                    model(tokens[:, t : t + 1], tokens_mask[:, t : t + 1], input_pos=torch.full((2, 1), t)).c0_logits
                )
            torch.testing.assert_close(torch.cat(steps, 1), full.c0_logits, atol=1e-5, rtol=0)

            # The same frame one decoder position at a time: [h, c0] first, then one codebook per step.
            x = model.projection(
                torch.cat([h[:, None], model.audio_embeddings(codes + model.codebook_offsets[: K - 1])], 1)
            )
            stepwise = [model.decoder(x[:, :2], input_pos=torch.arange(2).expand(2, 2))[:, 1:]]
            for i in range(2, K):
                stepwise.append(model.decoder(x[:, i : i + 1], input_pos=torch.full((2, 1), i)))
            y = torch.cat(stepwise, 1)
            torch.testing.assert_close(torch.einsum("nkd,kdv->nkv", y, model.audio_head), teacher, atol=1e-5, rtol=0)
        finally:
            model.remove_caches()
    with pytest.raises(ValueError, match="input_pos"):
        model.setup_caches(batch_size=2)
        try:
            model(tokens, tokens_mask)
        finally:
            model.remove_caches()


def test_activation_checkpointing_gives_identical_gradients(tiny_config):
    from csm_train import csm_loss

    tokens, tokens_mask, labels = random_frames(tiny_config, batch=2, text_len=3, audio_len=6)
    grads = []
    for checkpointing in (False, True):
        torch.manual_seed(0)
        model = CSM(
            CSMConfig.preset(
                "tiny", text_vocab_size=tiny_config.text_vocab_size, activation_checkpointing=checkpointing
            )
        ).train()
        csm_loss(model, tokens, tokens_mask, labels, decoder_fraction=1.0).loss.backward()
        grads.append({n: p.grad for n, p in model.named_parameters()})
    for name, grad in grads[0].items():
        torch.testing.assert_close(grads[1][name], grad, atol=1e-6, rtol=1e-5, msg=name)


def test_bf16_autocast_tracks_fp32(model, tiny_config):
    tokens, tokens_mask, _ = random_frames(tiny_config, batch=1, text_len=4, audio_len=8)
    with torch.no_grad():
        ref = model(tokens, tokens_mask).c0_logits
        with torch.autocast("cpu", dtype=torch.bfloat16):
            low = model(tokens, tokens_mask).c0_logits
    assert low.dtype == torch.bfloat16
    # bf16 keeps ~3 significant digits; the argmax must mostly survive and values stay close.
    assert (low.float() - ref).abs().max() < 0.05
    assert F.cosine_similarity(low.float().flatten(), ref.flatten(), dim=0) > 0.999
