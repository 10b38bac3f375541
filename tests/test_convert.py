"""Our CSM is transformers' CSM: same weights → same logits and the same loss; checkpoints convert both
ways bit-exactly."""

import dataclasses
import json
import re
import subprocess
import sys

import numpy as np
import pytest
import torch
from conftest import random_frames

from csm_train import CSM, CSMConfig, Segment, collate, conversation_frames, csm_loss
from csm_train.convert import convert
from csm_train.convert import main as convert_main
from csm_train.formats import (
    SESAME_FLAVORS,
    config_from_sesame,
    config_from_transformers,
    config_to_sesame,
    config_to_transformers,
    sesame_config_from_shapes,
    state_dict_from_transformers,
    state_dict_to_transformers,
)

AUDIO_FRAME = 1920  # samples per Mimi frame at 24 kHz (12.5 Hz)


def _non_codec(state_dict):
    return {k: v for k, v in state_dict.items() if not k.startswith("codec_model.")}


def test_state_dict_round_trip_is_bit_exact(hf_pair, tiny_config):
    hf, ours = hf_pair
    hf_weights = _non_codec(hf.state_dict())
    back = state_dict_to_transformers(state_dict_from_transformers(hf_weights, tiny_config), tiny_config)
    assert set(back) == set(hf_weights)
    for name, tensor in hf_weights.items():
        assert torch.equal(back[name], tensor), name
    # and ours → HF → ours
    ours_again = state_dict_from_transformers(state_dict_to_transformers(ours.state_dict(), tiny_config), tiny_config)
    assert all(torch.equal(ours_again[k], v) for k, v in ours.state_dict().items())


def test_config_matches_published_csm_1b_layout():
    hf_config = config_to_transformers(CSMConfig.preset("1b"))
    # The values in sesame/csm-1b's config.json (llama3 RoPE re-expressed below max_position_embeddings).
    assert hf_config.rope_parameters == {
        "rope_type": "llama3",
        "rope_theta": 500000.0,
        "factor": 32.0,
        "low_freq_factor": 0.125,
        "high_freq_factor": 0.5,
        "original_max_position_embeddings": 1024,
    }
    depth = hf_config.depth_decoder_config
    assert depth.rope_parameters["original_max_position_embeddings"] == 16
    assert depth.rope_parameters["low_freq_factor"] == 0.001953125
    assert (depth.hidden_size, depth.num_hidden_layers, depth.max_position_embeddings) == (1024, 4, 33)
    assert (hf_config.hidden_size, hf_config.num_hidden_layers, hf_config.text_vocab_size) == (2048, 16, 128256)
    back = config_from_transformers(hf_config)
    assert back.backbone == CSMConfig.preset("1b").backbone
    assert dataclasses.replace(back.decoder, max_seq_len=2048) == CSMConfig.preset("1b").decoder


def test_rope_frequencies_equal_transformers(hf_pair):
    hf, ours = hf_pair
    torch.testing.assert_close(ours.backbone.rope_freqs, hf.backbone_model.rotary_emb.inv_freq, rtol=1e-6, atol=0)
    torch.testing.assert_close(ours.decoder.rope_freqs, hf.depth_decoder.model.rotary_emb.inv_freq, rtol=1e-6, atol=0)


@torch.no_grad()
def test_logits_equal_transformers_on_mixed_frames(hf_pair, tiny_config):
    hf, ours = hf_pair
    K = tiny_config.num_codebooks
    tokens, tokens_mask, labels = random_frames(tiny_config, batch=2, text_len=6, audio_len=9)
    out = ours(tokens, tokens_mask)

    # transformers embeds text and audio frames with its own tables; we only say which frame is which.
    is_audio = tokens_mask[..., :1].float()
    embeds = (
        hf.embed_text_tokens(tokens[..., K]) * (1 - is_audio)
        + hf.backbone_model.embed_tokens(tokens[..., :K]) * is_audio
    )
    hf_out = hf(inputs_embeds=embeds, labels=labels)
    torch.testing.assert_close(out.c0_logits, hf_out.logits, atol=1e-5, rtol=0)

    # Depth decoder on every target frame (transformers' order: row-major over (batch, frame)),
    # including the all-zero end-of-audio frame.
    frames = labels[..., 0] != -100
    frames[:, 0] = False
    assert frames[:, -1].all() and (tokens[:, -1, :K] == 0).all()
    logits = ours.decoder_logits(out.hidden[:, :-1][frames[:, 1:]], labels[:, 1:][frames[:, 1:]][:, :-1])
    torch.testing.assert_close(logits, hf_out.depth_decoder_logits, atol=1e-5, rtol=0)

    ours_loss = csm_loss(ours, tokens, tokens_mask, labels, decoder_fraction=1.0)
    torch.testing.assert_close(ours_loss.c0_loss, hf_out.backbone_loss, atol=1e-5, rtol=0)
    torch.testing.assert_close(ours_loss.decoder_loss, hf_out.depth_decoder_loss, atol=1e-5, rtol=0)
    torch.testing.assert_close(ours_loss.loss, hf_out.loss, atol=1e-5, rtol=0)


def _conversation(hf, tokenizer, seconds, seed):
    """Real audio-shaped input (noise + tones), its Mimi codes through transformers' own codec."""
    rng = np.random.default_rng(seed)
    speakers, texts = [0, 1, 0], ["We have a chance for a new life here.", "Do you remember?", "I wound the bandage."]
    audios = []
    for s in seconds:
        n = int(s * 12.5) * AUDIO_FRAME
        t = np.arange(n) / 24000
        audios.append(
            (0.3 * np.sin(2 * np.pi * rng.uniform(100, 400) * t) + 0.05 * rng.standard_normal(n)).astype(np.float32)
        )
    with torch.no_grad():
        codes = [hf.codec_model.encode(torch.from_numpy(a)[None, None]).audio_codes[0] for a in audios]
    segments = [Segment(sp, tx, c) for sp, tx, c in zip(speakers, texts, codes, strict=True)]
    template = "<|begin_of_text|>[{}]{}<|end_of_text|><|AUDIO|><|audio_eos|>"
    text = "".join(template.format(sp, tx) for sp, tx in zip(speakers, texts, strict=True))
    return segments, text, audios


@pytest.mark.slow
def test_full_transformers_path_processor_codec_and_loss(hf_pair, hf_tokenizer, text_tokenizer, tiny_config):
    """transformers' processor + Mimi codec + model + loss (with its -101 depth-decoder marking) against
    our layout + model + loss on the same conversations, batched and right-padded on our side."""
    from transformers import CsmProcessor, EncodecFeatureExtractor

    hf, ours = hf_pair
    K = tiny_config.num_codebooks
    processor = CsmProcessor(EncodecFeatureExtractor(feature_size=1, sampling_rate=24000), hf_tokenizer)
    audio_id = hf_tokenizer.convert_tokens_to_ids("<|AUDIO|>")
    eos_id = hf_tokenizer.convert_tokens_to_ids("<|audio_eos|>")

    conversations = [
        _conversation(hf, hf_tokenizer, seconds, seed)
        for seed, seconds in enumerate([(0.8, 0.48, 1.2), (0.4, 0.96, 0.56)])
    ]
    ours_frames = [conversation_frames(segments, text_tokenizer, K) for segments, _, _ in conversations]
    batch = collate(ours_frames)
    with torch.no_grad():
        ours_out = ours(batch.tokens, batch.tokens_mask)

    for i, (_, text, audios) in enumerate(conversations):
        torch.manual_seed(100 + i)  # transformers draws its -101 frames from the global RNG
        inputs = processor(text, audio=audios, output_labels=True, depth_decoder_labels_ratio=0.5)
        frames = ours_frames[i]
        T = len(frames)

        # Layout: same length, text where transformers has text, audio where it has <|AUDIO|>/<|audio_eos|>.
        input_ids = inputs["input_ids"][0]
        assert input_ids.shape[0] == T
        is_audio = (input_ids == audio_id) | (input_ids == eos_id)
        assert torch.equal(frames.tokens_mask[:, :K].all(-1), is_audio)
        assert torch.equal(frames.tokens[~is_audio, K], input_ids[~is_audio])
        assert torch.equal(
            frames.tokens[input_ids == eos_id, :K], torch.zeros((input_ids == eos_id).sum(), K, dtype=torch.long)
        )
        hf_labels = inputs["labels"][0]
        assert torch.equal(frames.labels[:, 0] != -100, hf_labels != -100)

        with torch.no_grad():
            hf_out = hf(**inputs)
        torch.testing.assert_close(ours_out.c0_logits[i, :T], hf_out.logits[0], atol=1e-5, rtol=0)

        # The decoder subset transformers trained on: audio/eos frames not marked -101.
        decoder_frames = ((hf_labels == audio_id) | (hf_labels == eos_id))[None]
        assert 0 < decoder_frames.sum() < is_audio.sum()
        with torch.no_grad():
            loss = csm_loss(
                ours, frames.tokens[None], frames.tokens_mask[None], frames.labels[None], decoder_frames=decoder_frames
            )
        assert loss.num_decoder_frames == int(decoder_frames.sum())
        torch.testing.assert_close(loss.c0_loss, hf_out.backbone_loss, atol=1e-5, rtol=0)
        torch.testing.assert_close(loss.decoder_loss, hf_out.depth_decoder_loss, atol=1e-5, rtol=0)
        torch.testing.assert_close(loss.loss, hf_out.loss, atol=1e-5, rtol=0)


@pytest.mark.slow
def test_from_pretrained_reads_transformers_save_pretrained(hf_pair, tiny_config, tmp_path):
    hf, ours = hf_pair
    hf.save_pretrained(tmp_path / "hf")
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["model_type"] == "csm"
    loaded = CSM.from_pretrained(tmp_path / "hf")
    assert loaded.config.backbone == tiny_config.backbone
    # transformers sizes the depth decoder's positions for one frame; everything else reads back as ours.
    assert dataclasses.replace(loaded.config.decoder, max_seq_len=2048) == tiny_config.decoder
    assert loaded.config.decoder.max_seq_len == tiny_config.num_codebooks + 1
    for name, tensor in ours.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], tensor), name
    tokens, tokens_mask, _ = random_frames(tiny_config, batch=1, text_len=3, audio_len=4)
    with torch.no_grad():
        torch.testing.assert_close(
            loaded(tokens, tokens_mask).c0_logits, ours(tokens, tokens_mask).c0_logits, atol=0, rtol=0
        )


def test_from_pretrained_reads_ours(hf_pair, tmp_path):
    # Sesame's format is tested against Sesame's own model (test_sesame_reference.py), its ckpt.pt included;
    # that a ckpt.pt holding more than tensors is refused, in test_untrusted.py.
    _, ours = hf_pair
    ours.save_pretrained(tmp_path / "ours")
    loaded = CSM.from_pretrained(tmp_path / "ours")
    assert loaded.config == ours.config
    assert all(torch.equal(loaded.state_dict()[k], v) for k, v in ours.state_dict().items())


def test_sesame_configs_map_to_the_1b_preset():
    # Sesame's config.json for csm-1b, and a bare weights file recognised by its shapes.
    sesame_json = {
        "backbone_flavor": "llama-1B",
        "decoder_flavor": "llama-100M",
        "text_vocab_size": 128256,
        "audio_vocab_size": 2051,
        "audio_num_codebooks": 32,
    }
    assert config_from_sesame(sesame_json) == CSMConfig.preset("1b")
    assert config_to_sesame(CSMConfig.preset("1b")) == sesame_json
    with pytest.raises(ValueError, match="no Sesame flavor.*--to ours or transformers"):
        config_to_sesame(CSMConfig.preset("tiny"))
    with torch.device("meta"):
        shapes = CSM(CSMConfig.preset("1b")).state_dict()
    assert sesame_config_from_shapes(shapes, "ckpt.pt") == CSMConfig.preset("1b")
    with torch.device("meta"):
        tiny = CSM(CSMConfig.preset("tiny")).state_dict()
    with pytest.raises(ValueError, match="no Sesame flavor.*config.json"):
        sesame_config_from_shapes(tiny, "ckpt.pt")


def test_from_pretrained_errors_name_the_file_and_the_fix(hf_pair, tmp_path):
    _, ours = hf_pair
    with pytest.raises(FileNotFoundError, match="does not exist"):
        CSM.from_pretrained(tmp_path / "missing")
    with pytest.raises(FileNotFoundError, match="no local path.*Hub.*login"):  # the tests run with HF_HUB_OFFLINE
        CSM.from_pretrained("sesame/csm-1b")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no model.safetensors"):
        CSM.from_pretrained(tmp_path / "empty")

    ours.save_pretrained(tmp_path / "llama")
    (tmp_path / "llama" / "config.json").write_text(json.dumps({"model_type": "llama"}))
    with pytest.raises(ValueError, match="not a CSM config"):
        CSM.from_pretrained(tmp_path / "llama")

    ours.save_pretrained(tmp_path / "truncated")
    weights = tmp_path / "truncated" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    with pytest.raises(ValueError, match=r"truncated.*model\.safetensors"):
        CSM.from_pretrained(tmp_path / "truncated")


def test_cli_names_a_bad_source_and_exits_2(hf_pair, tmp_path, capsys):
    """The CLI turns a bad source into one line on stderr and exit status 2, for every target, not a traceback."""
    _, ours = hf_pair
    ours.save_pretrained(tmp_path / "truncated")
    weights = tmp_path / "truncated" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    for source, to, message in [
        (tmp_path / "missing", "ours", "does not exist"),
        (tmp_path / "truncated", "sesame", r"truncated.*model\.safetensors"),
        (tmp_path / "truncated", "transformers", r"truncated.*model\.safetensors"),
    ]:
        with pytest.raises(SystemExit) as exit_:
            convert_main([str(source), str(tmp_path / f"out-{to}"), "--to", to])
        assert exit_.value.code == 2
        assert re.search(f"error: .*{message}", capsys.readouterr().err)
        assert not (tmp_path / f"out-{to}").exists()


@pytest.mark.slow
def test_transformers_export_import_export_gives_the_same_logits_through_transformers(hf_pair, tiny_config, tmp_path):
    """A random transformers CSM → ours (CLI) → transformers again, keeping its codec and token ids: the same
    tensors, and the same logits through transformers itself."""
    from transformers import CsmForConditionalGeneration

    hf, _ = hf_pair
    hf.save_pretrained(tmp_path / "hf")
    cli = [sys.executable, "-m", "csm_train.convert", str(tmp_path / "hf"), str(tmp_path / "ours"), "--to", "ours"]
    done = subprocess.run(cli, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    convert(tmp_path / "ours", tmp_path / "hf2", "transformers", like=tmp_path / "hf")

    again = CsmForConditionalGeneration.from_pretrained(tmp_path / "hf2", attn_implementation="eager").eval()
    assert again.config.audio_token_id == hf.config.audio_token_id
    expected = hf.state_dict()
    assert set(again.state_dict()) == set(expected)
    for name, tensor in again.state_dict().items():
        assert torch.equal(tensor, expected[name]), name
    tokens, tokens_mask, labels = random_frames(tiny_config, batch=2, text_len=4, audio_len=6)
    is_audio, K = tokens_mask[..., :1].float(), tiny_config.num_codebooks

    def outputs(model):
        embeds = model.embed_text_tokens(tokens[..., K]) * (1 - is_audio)
        embeds = embeds + model.backbone_model.embed_tokens(tokens[..., :K]) * is_audio
        with torch.no_grad():
            out = model(inputs_embeds=embeds, labels=labels)
        return out.logits, out.depth_decoder_logits, out.loss

    for a, b in zip(outputs(again), outputs(hf), strict=True):
        assert torch.equal(a, b)


def test_transformers_export_needs_a_codec(hf_pair, tmp_path):
    _, ours = hf_pair
    ours.save_pretrained(tmp_path / "ours")
    with pytest.raises(ValueError, match="--codec.*--like"):
        convert(tmp_path / "ours", tmp_path / "hf", "transformers")


@pytest.mark.slow
@pytest.mark.parametrize("torch_file", [False, True])
def test_sesame_round_trip_is_bit_exact(tmp_path, torch_file):
    """On Sesame's smallest flavors (its code builds only llama-1B and llama-100M): ours → Sesame's → ours.
    Small vocabularies, 4 codebooks and bf16 keep each copy at 0.4 GB (1.4 GB at the released sizes in fp32)."""
    config = CSMConfig(backbone=dict(SESAME_FLAVORS["llama-100M"]), decoder=dict(SESAME_FLAVORS["llama-100M"]))
    config = dataclasses.replace(config, text_vocab_size=512, audio_vocab_size=128, num_codebooks=4)
    torch.manual_seed(0)
    model = CSM(config).to(torch.bfloat16)
    model.save_pretrained(tmp_path / "ours")
    convert(tmp_path / "ours", tmp_path / "sesame", "sesame", torch_file=torch_file)
    files = sorted(p.name for p in (tmp_path / "sesame").iterdir())
    assert files == sorted(["config.json", "ckpt.pt" if torch_file else "model.safetensors"])
    assert json.loads((tmp_path / "sesame" / "config.json").read_text())["backbone_flavor"] == "llama-100M"
    convert(tmp_path / "sesame", tmp_path / "back", "ours")
    back = CSM.from_pretrained(tmp_path / "back")
    assert back.config == config
    for name, tensor in model.state_dict().items():
        assert torch.equal(back.state_dict()[name], tensor), name
