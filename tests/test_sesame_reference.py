"""Our Sesame-format checkpoints against Sesame's own architecture: `sesame_reference.Model` is Sesame's
`models.py` on the real torchtune `llama3_2` builder. Our export (`python -m csm_train.convert … --to sesame`)
loads into it strictly, from `model.safetensors` through Sesame's loader (`PyTorchModelHubMixin.from_pretrained`)
and from `ckpt.pt`, and gives our logits (1e-5, fp32): codebook 0 from the backbone, codebooks 1..K-1 from the depth
decoder, teacher-forced and through Sesame's own `generate_frame` with its KV caches. The reverse too: what
Sesame's model saves, `CSM.from_pretrained` reads, with Sesame's logits.

Sesame's flavors are shrunk (fewer layers, narrower) but keep their structure: head dim, GQA ratio, FFN,
RoPE (base 500 000, llama3 scaling ×32), norm eps, max_seq_len. The shrunk flavors take Sesame's names on both
sides (`sesame_reference.FLAVORS`, `csm_train.formats.SESAME_FLAVORS`); the released sizes are checked apart,
by names, shapes and hyperparameters on the meta device, and llama-100M end to end at its real size."""

import copy
import json
import sys

import pytest
import sesame_reference as sesame
import torch
from torchtune.models.llama3_1._position_embeddings import Llama3ScaledRoPE

from csm_train import CSM, CSMConfig, formats
from csm_train import convert as convert_cli
from csm_train.model import TransformerConfig, rope_frequencies

TOL = dict(atol=1e-5, rtol=0)
TEXT_VOCAB, AUDIO_VOCAB, K = 64, 35, 8  # small vocabularies (2051 = 2048 + 3 reserved, odd like it)

# Shrunk flavors: Sesame's head dims (2048/32 = 64, 1024/8 = 128) and GQA ratio (4 query heads per KV head).
SHRUNK = {
    "llama-1B": dict(num_layers=2, dim=256, num_heads=4, num_kv_heads=1, ffn_dim=512),
    "llama-100M": dict(num_layers=2, dim=512, num_heads=4, num_kv_heads=1, ffn_dim=512),
}
BUILDERS = {"llama-1B": sesame.llama3_2_1B, "llama-100M": sesame.llama3_2_100M}


@pytest.fixture
def shrunk_flavors(monkeypatch):
    """Shrunk flavors under Sesame's names, in Sesame's model and in our format code alike."""
    for name, dims in SHRUNK.items():
        builder = sesame.shrunk(
            BUILDERS[name],
            num_layers=dims["num_layers"],
            embed_dim=dims["dim"],
            num_heads=dims["num_heads"],
            num_kv_heads=dims["num_kv_heads"],
            intermediate_dim=dims["ffn_dim"],
            vocab_size=8,  # the token embeddings _prepare_transformer drops
        )
        monkeypatch.setitem(sesame.FLAVORS, name, builder)
        monkeypatch.setitem(formats.SESAME_FLAVORS, name, dict(formats.SESAME_FLAVORS[name], **dims))


def _config(backbone: str, decoder: str = "llama-100M", **sizes) -> CSMConfig:
    sizes = dict(dict(text_vocab_size=TEXT_VOCAB, audio_vocab_size=AUDIO_VOCAB, num_codebooks=K), **sizes)
    return CSMConfig(
        backbone=dict(formats.SESAME_FLAVORS[backbone]), decoder=dict(formats.SESAME_FLAVORS[decoder]), **sizes
    )


def _randomize(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Every weight random, norm scales too (both inits set them to 1, which would hide a swapped norm)."""
    torch.manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("scale"):
                p.uniform_(0.5, 1.5)
            else:
                p.normal_(std=0.02)
    return model.eval()


def _frames(config: CSMConfig, batch=2, text_len=5, audio_len=7, seed=0):
    """Text frames then audio frames (Sesame's layout: K audio columns, the text column last)."""
    g = torch.Generator().manual_seed(seed)
    k = config.num_codebooks
    T = text_len + audio_len
    tokens = torch.zeros(batch, T, k + 1, dtype=torch.long)
    mask = torch.zeros(batch, T, k + 1, dtype=torch.bool)
    tokens[:, :text_len, k] = torch.randint(0, config.text_vocab_size, (batch, text_len), generator=g)
    mask[:, :text_len, k] = True
    tokens[:, text_len:, :k] = torch.randint(0, config.audio_vocab_size, (batch, audio_len, k), generator=g)
    mask[:, text_len:, :k] = True
    return tokens, mask, text_len


def _max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    torch.testing.assert_close(a, b, **TOL)
    return (a - b).abs().max().item()


@torch.no_grad()
def _compare_logits(ours: CSM, theirs: sesame.Model, config: CSMConfig, monkeypatch) -> dict[str, float]:
    """Teacher-forced backbone and depth decoder, then two frames of Sesame's `generate_frame` (KV caches,
    greedy) against ours on the same codes. Returns the largest absolute logit difference of each."""
    tokens, mask, text_len = _frames(config)
    k = config.num_codebooks
    out = ours(tokens, mask)
    c0, h = sesame.backbone_logits(theirs, tokens, mask)
    diffs = {"backbone c0": _max_diff(c0, out.c0_logits), "backbone hidden": _max_diff(h, out.hidden)}

    # Depth decoder on every audio frame after the first, from the backbone state before it.
    prev_h = out.hidden[:, text_len:-1].reshape(-1, config.backbone.dim)
    codes = tokens[:, text_len + 1 :, : k - 1].reshape(-1, k - 1)
    diffs["decoder (teacher-forced)"] = _max_diff(
        sesame.decoder_logits(theirs, prev_h, codes), ours.decoder_logits(prev_h, codes)
    )

    # Sesame's generate_frame, its sampler replaced by one that records the logits and picks the top code.
    seen = []

    def greedy(logits, topk, temperature):
        seen.append(logits)
        return logits.argmax(-1, keepdim=True).to(torch.int)

    monkeypatch.setattr(sesame, "sample_topk", greedy)
    theirs.setup_caches(tokens.shape[0])
    T = tokens.shape[1]
    input_pos = torch.arange(T).unsqueeze(0).repeat(tokens.shape[0], 1)
    frame = theirs.generate_frame(tokens, mask, input_pos, temperature=1.0, topk=5).long()
    diffs["generate_frame c0"] = _max_diff(seen[0], out.c0_logits[:, -1])
    diffs["generate_frame decoder"] = _max_diff(
        torch.stack(seen[1:], dim=1), ours.decoder_logits(out.hidden[:, -1], frame[:, : k - 1])
    )
    # The next frame through the backbone's KV cache, against ours over the whole sequence.
    seen.clear()
    next_tokens = torch.cat([frame, torch.zeros_like(frame[:, :1])], dim=1)[:, None]
    next_mask = torch.ones_like(next_tokens, dtype=torch.bool)
    next_mask[..., k] = False
    second = theirs.generate_frame(next_tokens, next_mask, input_pos[:, -1:] + 1, temperature=1.0, topk=5).long()
    out2 = ours(torch.cat([tokens, next_tokens], dim=1), torch.cat([mask, next_mask], dim=1))
    diffs["generate_frame c0 (cached)"] = _max_diff(seen[0], out2.c0_logits[:, -1])
    diffs["generate_frame decoder (cached)"] = _max_diff(
        torch.stack(seen[1:], dim=1), ours.decoder_logits(out2.hidden[:, -1], second[:, : k - 1])
    )
    theirs.reset_caches()
    return diffs


def _run_convert_cli(monkeypatch, *args: str) -> None:
    """`python -m csm_train.convert …` in this process (so the shrunk flavors apply): argparse and all."""
    monkeypatch.setattr(sys, "argv", ["python -m csm_train.convert", *map(str, args)])
    convert_cli.main()


def _load_as_sesame(directory, torch_file: bool) -> sesame.Model:
    """As Sesame's code loads: the Hub mixin reads `config.json` + `model.safetensors`; `ckpt.pt` is a plain state
    dict for `load_state_dict`. Strict both ways."""
    if not torch_file:
        return sesame.Model.from_pretrained(directory, strict=True).eval()
    args = sesame.ModelArgs(**json.loads((directory / "config.json").read_text()))
    model = sesame.Model(args)
    model.load_state_dict(torch.load(directory / "ckpt.pt", weights_only=True), strict=True)
    return model.eval()


@pytest.mark.parametrize("torch_file", [False, True], ids=["safetensors", "ckpt.pt"])
@pytest.mark.parametrize("backbone", ["llama-1B", "llama-100M"])
def test_sesame_model_loads_our_export_with_our_logits(shrunk_flavors, backbone, torch_file, tmp_path, monkeypatch):
    config = _config(backbone)
    ours = _randomize(CSM(config), seed=0)
    ours.save_pretrained(tmp_path / "ours")
    flags = ["--torch-file"] if torch_file else []
    _run_convert_cli(monkeypatch, tmp_path / "ours", tmp_path / "sesame", "--to", "sesame", *flags)

    theirs = _load_as_sesame(tmp_path / "sesame", torch_file)
    assert theirs.config == sesame.ModelArgs(backbone, "llama-100M", TEXT_VOCAB, AUDIO_VOCAB, K)
    assert set(theirs.state_dict()) == set(ours.state_dict())
    diffs = _compare_logits(ours, theirs, config, monkeypatch)
    print(f"\n{backbone} backbone, {'ckpt.pt' if torch_file else 'safetensors'}: max |Δlogit| {diffs}")


@pytest.mark.parametrize("backbone", ["llama-1B", "llama-100M"])
def test_what_sesame_saves_loads_in_ours_with_its_logits(shrunk_flavors, backbone, tmp_path, monkeypatch):
    """Sesame's model, saved by its Hub mixin (config.json + model.safetensors) and as a bare ckpt.pt state dict
    (recognised by shapes): `CSM.from_pretrained` reads both, with Sesame's logits."""
    args = sesame.ModelArgs(backbone, "llama-100M", TEXT_VOCAB, AUDIO_VOCAB, K)
    theirs = _randomize(sesame.Model(args), seed=1)
    theirs.save_pretrained(tmp_path / "hub")
    (tmp_path / "bare").mkdir()
    torch.save(theirs.state_dict(), tmp_path / "bare" / "ckpt.pt")

    for source in (tmp_path / "hub", tmp_path / "bare" / "ckpt.pt"):
        ours = CSM.from_pretrained(source).eval()
        assert ours.config == _config(backbone), source
        diffs = _compare_logits(ours, copy.deepcopy(theirs), ours.config, monkeypatch)  # it sets up caches
        print(f"\n{backbone} backbone, Sesame's {source.name}: max |Δlogit| {diffs}")


def _transformer_config(decoder) -> dict:
    """What a torchtune TransformerDecoder built by Sesame's flavor is, in our TransformerConfig's terms."""
    layer = decoder.layers[0]
    attn, rope = layer.attn, layer.attn.pos_embeddings
    return dict(
        num_layers=len(decoder.layers),
        dim=attn.embed_dim,
        num_heads=attn.num_heads,
        num_kv_heads=attn.num_kv_heads,
        ffn_dim=layer.mlp.w1.out_features,
        max_seq_len=decoder.max_seq_len,
        norm_eps=layer.sa_norm.eps,
        rope_base=rope.base,
        head_dim=attn.head_dim,
    )


def test_sesame_builds_exactly_our_1b_preset():
    """At the released sizes, on the meta device: Sesame's Model for our `1b` preset's Sesame config takes our
    state dict strictly (names and shapes), its transformers have our hyperparameters and RoPE frequencies, and a
    bare Sesame state dict is recognised as the `1b` preset by its shapes."""
    preset = CSMConfig.preset("1b")
    args = sesame.ModelArgs(**formats.config_to_sesame(preset))
    with torch.device("meta"):
        theirs = sesame.Model(args)
        ours = CSM(preset)
    theirs.load_state_dict(ours.state_dict(), strict=True)
    assert {k: v.shape for k, v in theirs.state_dict().items()} == {k: v.shape for k, v in ours.state_dict().items()}
    assert formats.sesame_config_from_shapes(theirs.state_dict(), "ckpt.pt") == preset

    for part in ("backbone", "decoder"):
        cfg: TransformerConfig = getattr(preset, part)
        built = _transformer_config(getattr(theirs, part))
        expected = {f: getattr(cfg, f) for f in built}  # head_dim is a property of ours
        assert built == expected, part
        # RoPE: torchtune's Llama3ScaledRoPE as Sesame's flavor configures it (built off the meta device).
        rope = getattr(theirs, part).layers[0].attn.pos_embeddings
        s = cfg.rope_scaling
        assert (rope.scale_factor, rope.low_freq_factor, rope.high_freq_factor, rope.old_context_len) == (
            s.factor,
            s.low_freq_factor,
            s.high_freq_factor,
            s.original_context_len,
        )
        real = Llama3ScaledRoPE(dim=rope.dim, max_seq_len=rope.max_seq_len, base=rope.base, scale_factor=32)
        torch.testing.assert_close(rope_frequencies(cfg), real.theta, rtol=1e-6, atol=0)
        assert isinstance(getattr(theirs, part).tok_embeddings, torch.nn.Identity)
        assert isinstance(getattr(theirs, part).output, torch.nn.Identity)


@pytest.mark.slow
def test_real_size_llama_100m_unpatched(tmp_path, monkeypatch):
    """Sesame's llama-100M flavor at its real size as backbone and decoder, nothing patched: the CLI's export
    loads into Sesame's Model through its Hub mixin, strictly, with our logits."""
    config = _config("llama-100M", num_codebooks=4)
    ours = _randomize(CSM(config), seed=2)
    ours.save_pretrained(tmp_path / "ours")
    _run_convert_cli(monkeypatch, tmp_path / "ours", tmp_path / "sesame", "--to", "sesame")
    theirs = _load_as_sesame(tmp_path / "sesame", torch_file=False)
    diffs = _compare_logits(ours, theirs, config, monkeypatch)
    print(f"\nllama-100M real size: max |Δlogit| {diffs}")
