"""Fine-tuning: the recipes (conf/experiment/finetune_*.yaml) compose, start from other weights strictly, keep
frozen groups bit-identical without optimizer state, and turn epochs into steps."""

import csv
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir

from csm_train import CSM, CSMConfig
from csm_train.data import positions_per_epoch
from csm_train.module import CSMModule, parameter_group
from csm_train.tokenizer import ByteTokenizer
from csm_train.train import steps_for_epochs, train

CONF = str(Path(__file__).resolve().parents[1] / "conf")
RECIPES = ["finetune_voice", "finetune_style", "finetune_domain", "finetune_conversational"]


def config(*overrides):
    with initialize_config_dir(config_dir=CONF, version_base="1.3"):
        return compose(config_name="config", overrides=list(overrides))


def tiny_recipe(recipe: str, start: Path, run_dir: Path, *overrides: str):
    """A fine-tuning recipe shrunk for CPU: the tiny preset on the byte tokenizer, starting from `start`."""
    return config(
        f"+experiment={recipe}",
        "model=tiny",
        "trainer=cpu",
        f"model.init_from={start}",
        f"run_dir={run_dir}",
        "evaluate.every_n_steps=0",
        *overrides,
    )


def steps(data: Path, n: int) -> list[str]:
    """n steps on the synthetic corpus at `data`, one checkpoint at the end."""
    return [
        "data=synthetic",
        f"data.path={data}",
        "epochs=null",
        f"trainer.max_steps={n}",
        f"checkpoint.every_n_steps={n}",
    ]


@pytest.fixture(scope="module")
def start(tmp_path_factory):
    """A tiny CSM with the byte tokenizer's vocabulary, saved in our format: what a recipe starts from."""
    torch.manual_seed(1)
    model = CSM(CSMConfig.preset("tiny", text_vocab_size=ByteTokenizer.vocab_size))
    path = tmp_path_factory.mktemp("start")
    model.save_pretrained(path)
    return path, model.state_dict()


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return tmp_path_factory.mktemp("finetune") / "synthetic"


def test_a_recipe_without_weights_to_start_from_is_refused(tmp_path):
    cfg = config("+experiment=finetune_voice", "data.path=/data/x", f"run_dir={tmp_path}")
    with pytest.raises(ValueError, match=r"finetune_voice fine-tunes existing weights: .*model.init_from="):
        train(cfg)
    assert not tmp_path.exists() or not any(tmp_path.iterdir())


@pytest.mark.parametrize("recipe", RECIPES)
def test_recipes_compose_with_the_practice_settings(recipe):
    cfg = config(f"+experiment={recipe}", "model.init_from=/models/csm-1b", "data.path=/data/x")
    assert cfg.model.preset == "1b" and cfg.data.tokenizer.name_or_path == "meta-llama/Llama-3.2-1B"
    assert cfg.model.optim.weight_decay == 0.01 and cfg.model.optim.warmup_fraction == 0.1
    assert dict(cfg.model.optim.lr_multipliers) == {"backbone": 0.1, "decoder": 1.0, "embeddings": 0.5, "heads": 1.0}
    settings = {
        "finetune_voice": (2e-5, 20.0, ["backbone", "embeddings"]),
        "finetune_style": (1e-5, 50.0, ["embeddings"]),
        "finetune_domain": (5e-6, 150.0, ["decoder"]),
        "finetune_conversational": (2e-5, 1.0, []),
    }[recipe]
    assert (cfg.model.optim.lr, cfg.model.loss.w_semantic, list(cfg.model.freeze)) == settings


@pytest.mark.slow
def test_frozen_groups_stay_bit_identical_and_hold_no_optimizer_state(start, data, tmp_path):
    path, initial = start
    cfg = tiny_recipe("finetune_voice", path, tmp_path, *steps(data, 4))
    train(cfg)
    state = torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=True)
    weights = {k.removeprefix("model."): v for k, v in state["state_dict"].items()}
    frozen = [k for k in initial if parameter_group(k) in ("backbone", "embeddings")]
    trained = [k for k in initial if k not in frozen]
    assert frozen and all(torch.equal(weights[k], initial[k]) for k in frozen)
    assert all(not torch.equal(weights[k], initial[k]) for k in trained if k.endswith("weight"))
    (optimizer,) = state["optimizer_states"]
    assert len(optimizer["state"]) == len(trained)  # Adam moments only for what trains
    lrs = {g["name"]: g["initial_lr"] for g in optimizer["param_groups"]}
    assert {name.removesuffix("_no_decay") for name in lrs} == {"decoder", "heads"}
    assert lrs["decoder"] == pytest.approx(2e-5) and lrs["heads"] == pytest.approx(2e-5)


def test_init_from_another_vocabulary_says_what_differs_and_why(start, tmp_path):
    torch.manual_seed(0)
    CSM(CSMConfig.preset("tiny")).save_pretrained(tmp_path / "llama_vocab")  # 4096 text tokens
    with pytest.raises(ValueError, match=r"text_embeddings.weight: \(4096, 128\).*\(258, 128\).*tokenizer"):
        CSMModule("tiny", text_vocab_size=ByteTokenizer.vocab_size, init_from=str(tmp_path / "llama_vocab"))
    with pytest.raises(ValueError, match="unknown group.*backbone"):
        CSMModule("tiny", text_vocab_size=ByteTokenizer.vocab_size, freeze=["encoder"])
    module = CSMModule("tiny", text_vocab_size=ByteTokenizer.vocab_size, init_from=str(start[0]))
    assert all(torch.equal(module.model.state_dict()[k], v) for k, v in start[1].items())


def test_epochs_become_steps_from_the_dataset(data):
    from data_pipeline.synthetic import write_synthetic_corpus

    if not (data / "manifest.jsonl").exists():
        write_synthetic_corpus(data, num_codebooks=32)
    cfg = config("+experiment=tiny", f"data.path={data}", "epochs=3", "data.batch_size=2", "data.max_seq_len=256")
    positions = positions_per_epoch(data, ByteTokenizer(), 32, 256)
    assert positions > 0
    assert steps_for_epochs(cfg, ByteTokenizer()) == -(-3 * positions // (2 * 256))


def test_lora_trains_the_configured_adapters_only():
    lora = {"rank": 4, "alpha": 8.0, "targets": ["q_proj", "v_proj"], "parts": ["backbone"]}
    module = CSMModule("tiny", text_vocab_size=ByteTokenizer.vocab_size, lora=lora)
    trainable = {n: p.numel() for n, p in module.model.named_parameters() if p.requires_grad}
    adapted = [m for n, m in module.model.named_modules() if n.startswith("backbone.") and hasattr(m, "base_layer")]
    assert len(adapted) == 2 * module.config.backbone.num_layers  # q_proj and v_proj of every backbone layer
    expected = sum(4 * (m.base_layer.in_features + m.base_layer.out_features) for m in adapted)
    assert sum(trainable.values()) == expected and all(".lora_" in n for n in trainable)
    with pytest.raises(ValueError, match="unknown.*'wq'"):
        CSMModule("tiny", lora={"rank": 4, "targets": ["wq"]})


@pytest.mark.slow
def test_lora_merge_then_export_equals_the_adapted_model(start, data, tmp_path):
    """A LoRA fine-tune of 4 steps; its checkpoint exported (adapters merged) gives the adapted model's logits."""
    from conftest import random_frames

    from csm_train.convert import convert

    path, initial = start
    cfg = tiny_recipe("finetune_lora", path, tmp_path / "run", *steps(data, 4), "model.optim.lr=1e-2")
    adapted = train(cfg).lightning_module.model.eval()
    convert(tmp_path / "run" / "checkpoints" / "last.ckpt", tmp_path / "merged", "ours")
    merged = CSM.from_pretrained(tmp_path / "merged").eval()
    assert set(merged.state_dict()) == set(initial)
    changed = [k for k, v in merged.state_dict().items() if not torch.equal(v, initial[k])]
    assert changed and all(
        k.split(".")[-2] in ("q_proj", "k_proj", "v_proj", "output_proj", "w1", "w2", "w3") for k in changed
    )
    tokens, tokens_mask, _ = random_frames(merged.config, batch=2, text_len=5, audio_len=7)
    with torch.no_grad():
        a, b = adapted(tokens, tokens_mask), merged(tokens, tokens_mask)
    torch.testing.assert_close(a.c0_logits, b.c0_logits, atol=1e-5, rtol=0)
    torch.testing.assert_close(a.hidden, b.hidden, atol=1e-5, rtol=0)


@pytest.fixture(scope="module")
def one_voice(tmp_path_factory):
    """32 sentences in one espeak-ng voice, Mimi-coded (random-init Mimi), one turn per sample."""
    from data_pipeline.codec import RANDOM_INIT, MimiCodec
    from data_pipeline.demo_corpus import SENTENCES, VOICES, speak
    from data_pipeline.shards import MIMI_FRAME_RATE, ShardWriter, Window, sample_key

    path = tmp_path_factory.mktemp("one_voice")
    texts = SENTENCES[:32]
    codes = MimiCodec(RANDOM_INIT, device="cpu").encode([speak(text, VOICES[0], 155) for text in texts])
    writer = ShardWriter(path, samples_per_shard=8)
    for i, (text, c) in enumerate(zip(texts, codes, strict=True)):
        n = c.shape[1]
        segment = {
            "speaker": 0,
            "text": text,
            "start": 0.0,
            "end": n / MIMI_FRAME_RATE,
            "frame_start": 0,
            "frame_end": n,
        }
        writer.write(Window(sample_key(f"voice/line_{i:03d}", 0), c, [segment], {"duration": n / MIMI_FRAME_RATE}))
    writer.close()
    return path


def held_out_loss(model: CSM, dataset, holdout: float) -> float:
    from csm_train.data import HeldOutSet
    from csm_train.loss import csm_loss

    held = HeldOutSet(dataset, ByteTokenizer(), 32, 1024, holdout)
    batch = held.collate(list(held))
    with torch.no_grad():
        out = csm_loss(model.eval(), batch.tokens, batch.tokens_mask, batch.labels, decoder_fraction=1.0)
    return float(out.loss)


@pytest.fixture(scope="module")
def adapted(one_voice, start, tmp_path_factory):
    """finetune_voice on a tiny model and the one-voice lines (a quarter held out): (run directory, config, trainer)."""
    path, _ = start
    run_dir = tmp_path_factory.mktemp("adapted")
    one_voice_data = ["data=speech_demo", f"data.path={one_voice}", "data.holdout=0.25", "data.batch_size=1"]
    cfg = tiny_recipe("finetune_voice", path, run_dir, *one_voice_data, "epochs=12", "model.optim.lr=3e-3")
    return run_dir, cfg, train(cfg)


@pytest.mark.slow
def test_voice_adaptation_lowers_held_out_loss_on_that_voice(adapted, one_voice, start):
    """Epochs become steps, validation runs every epoch on the held-out lines, and the held-out loss in that voice
    falls while the backbone stays as it was."""
    (path, initial), (run_dir, cfg, trainer) = start, adapted
    assert cfg.trainer.max_steps >= 12 and cfg.trainer.val_check_interval == cfg.trainer.max_steps // 12
    with open(run_dir / "logs" / "metrics.csv") as f:
        val = {int(row["step"]): float(row["val/loss"]) for row in csv.DictReader(f) if row.get("val/loss")}
    assert len(val) >= 3 and min(val.values()) < next(iter(val.values()))
    best_step = min(val, key=val.get)  # logged at the step it validated after: global_step - 1
    assert torch.load(run_dir / "best" / "best.ckpt", weights_only=True)["global_step"] == best_step + 1
    before = held_out_loss(CSM.from_pretrained(path), one_voice, 0.25)
    after = held_out_loss(trainer.lightning_module.model, one_voice, 0.25)
    assert after < 0.9 * before, (before, after)
    adapted = trainer.lightning_module.model.state_dict()
    assert all(torch.equal(adapted[k], v) for k, v in initial.items() if k.startswith("backbone."))


@pytest.mark.slow
def test_say_speaks_a_line_from_the_adapted_run(adapted, one_voice, tmp_path):
    """The third command of the README's fine-tuning flow: a run directory in, a 24 kHz sample out."""
    import subprocess
    import sys

    import soundfile as sf

    run_dir = adapted[0]
    out = tmp_path / "sample.wav"
    command = [sys.executable, "-m", "eval.say", str(run_dir), "Hello there.", f"--out={out}", "--max-seconds=2"]
    done = subprocess.run([*command, "--codec=random-init", "--device=cpu"], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    audio, rate = sf.read(out)
    assert rate == 24000 and 0 < len(audio) <= 2 * 24000 and f"{out}:" in done.stdout
    bad = subprocess.run([*command, "--context=x.wav"], capture_output=True, text=True)
    assert bad.returncode == 2 and "--context-text" in bad.stderr
