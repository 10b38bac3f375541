"""The run directory: what makes a run that run, and who may write to it.

`runs/{experiment}/{run_id}` is resumed by starting the same command again, so before anything is built the
directory is checked to hold the same run (`run.json`: model, tokenizer and dataset by content, split, seed) and,
while the run trains, rank 0 holds a lock on it (`run.lock`) so that a second process cannot write beside it."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import lightning as L
from omegaconf import DictConfig, OmegaConf

from csm_train.model import CSMConfig
from data_pipeline.files import ExclusiveLock, LockedError, atomic_write
from data_pipeline.shards import read_card

RUN_LOCK, RUN_IDENTITY = "run.lock", "run.json"


class RunDirectoryError(RuntimeError):
    """The run directory is in use by another process, or holds a different run."""


class RunLock(ExclusiveLock):
    """`run_dir/run.lock`: a second process started on the same run directory is refused while the first runs."""

    def __init__(self, run_dir: Path):
        super().__init__(run_dir / RUN_LOCK)

    def acquire(self) -> RunLock:
        try:
            return super().acquire()
        except LockedError as error:
            raise RunDirectoryError(
                f"run directory {self.path.parent} is in use by {error.holder} ({self.path} is locked): two processes "
                f"on one run would overwrite each other's checkpoints. Wait for it to end or stop it, or start "
                f"this one as a new run with run_id=NAME"
            ) from None


def _flat(prefix: str, value) -> dict:
    if isinstance(value, dict):
        return {k: v for key, item in value.items() for k, v in _flat(f"{prefix}.{key}", item).items()}
    return {prefix: value}


def config_identity(cfg: DictConfig) -> dict:
    """The settings that make a run what it is (a resume must not change them), flat: the model preset and what
    changes its parameters (LoRA, frozen groups, starting weights), the tokenizer, the data split and the seed
    (it orders the data stream)."""
    model = OmegaConf.to_container(cfg.model, resolve=True)
    lora = model.get("lora") or {}
    return {
        "model.preset": model["preset"],
        **_flat("model.lora", lora if lora.get("rank") else {"rank": 0}),
        "model.freeze": sorted(model.get("freeze") or []),
        "model.init_from": model.get("init_from"),
        **_flat("tokenizer.config", OmegaConf.to_container(cfg.data.tokenizer, resolve=True)),
        "data.path": str(Path(cfg.data.path).resolve()),
        "data.holdout": cfg.data.get("holdout", 0.0),
        "seed": cfg.seed,
    }


def dataset_identity(path: str | Path) -> dict:
    """What tells one dataset from another: its samples (the manifest's hash and row count: keys, shards,
    lengths), its codec (which codes) and the pipeline settings that made it. Empty while it does not exist."""
    path = Path(path)
    if not (path / "manifest.jsonl").exists():
        return {}
    digest, samples = hashlib.sha256(), 0
    with open(path / "manifest.jsonl", "rb") as f:
        for line in f:
            digest.update(line)
            samples += bool(line.strip())
    card = read_card(path)
    identity = {"dataset.samples": samples, "dataset.manifest_sha256": digest.hexdigest()[:16]}
    identity.update(_flat("dataset.codec", card.get("codec") or {}))
    if "config_hash" in card:
        identity["dataset.pipeline_config_hash"] = card["config_hash"]
    return identity


# Text that tells tokenizers apart by what they do with it: speaker tags, cases, digits, punctuation, accents, scripts.
TOKENIZER_PROBE = "[0]Hello, world! It's 3:45 p.m., 2024-06-01 — naïve café, Straße, Ωμέγα, Москва, 東京\n[1]ok?"


def tokenizer_fingerprint(tokenizer) -> str:
    """The tokenizer by content: its vocabulary size, special ids and the ids of `TOKENIZER_PROBE` (the same
    tokenizer from another path or the Hub matches; another vocabulary does not)."""
    ids = [tokenizer.vocab_size, tokenizer.bos_id, tokenizer.eos_id, *tokenizer.encode(TOKENIZER_PROBE)]
    return hashlib.sha256(json.dumps(ids).encode()).hexdigest()[:16]


def run_identity(cfg: DictConfig, tokenizer, model_config: CSMConfig | None = None) -> dict:
    """`config_identity`, the model's shapes (`model_config`, else the preset's with the tokenizer's vocabulary, as
    the module builds it), the tokenizer's vocabulary size and fingerprint, and `dataset_identity`."""
    model_config = model_config or CSMConfig.preset(cfg.model.preset, text_vocab_size=tokenizer.vocab_size)
    architecture = {k: v for k, v in model_config.to_dict().items() if k != "activation_checkpointing"}
    return {
        **config_identity(cfg),
        **_flat("model.architecture", architecture),
        "tokenizer.vocab_size": tokenizer.vocab_size,
        "tokenizer.fingerprint": tokenizer_fingerprint(tokenizer),
        **dataset_identity(cfg.data.path),
    }


# Compared by content where both sides know it: (content key, its group, the keys that only say where it came from)
BY_CONTENT = (
    ("dataset.manifest_sha256", "dataset.", "data.path"),
    ("tokenizer.fingerprint", "tokenizer.", "tokenizer.config."),
)


def identity_differences(then: dict, now: dict) -> list[str]:
    """`key: then → now` for each setting both identities record and that differs. A key only one side has is not
    compared (a run written before the key existed). The dataset and the tokenizer are compared by content
    (`BY_CONTENT`): where they come from (a path, a Hub id) counts only where a side does not know the content, and
    is shown beside a content difference. Architecture details are left out when the preset differs."""
    differ = [k for k in now if k in then and then[k] != now[k]]
    for content, group, where in BY_CONTENT:
        if content in then and content in now:
            same = not any(k.startswith(group) and not k.startswith(where) for k in differ)
            differ = [k for k in differ if not (same and k.startswith(where))]
    if "model.preset" in differ:
        differ = [k for k in differ if not k.startswith("model.architecture.")]
    return [f"{k}: {then[k]} → {now[k]}" for k in differ]


def previous_identity(run_dir: Path) -> dict | None:
    """The identity the run directory's run was started with: its run.json, or for a run from before run.json
    existed, what its config.yaml says; None for a new run directory."""
    if (run_dir / RUN_IDENTITY).exists():
        return json.loads((run_dir / RUN_IDENTITY).read_text())
    if (run_dir / "config.yaml").exists():
        return config_identity(OmegaConf.load(run_dir / "config.yaml"))
    return None


def check_run_dir(cfg: DictConfig, run_dir: Path, identity: dict) -> list[str]:
    """Refuse a run directory that holds a different run (`identity_differences`) unless `resume=force`; returns
    the differences `resume=force` accepted. Reads only: every rank may call it, before anything is built."""
    force = cfg.resume
    if force not in ("auto", "force"):
        raise ValueError(f"resume={force}: use auto (resume when the run is the same) or force")
    then = previous_identity(run_dir)
    differences = identity_differences(then, identity) if then is not None else []
    if differences and force != "force":
        raise RunDirectoryError(
            f"run directory {run_dir} holds a different run, so this one does not resume it (then → now):\n"
            + "".join(f"  {d}\n" for d in differences)
            + "Start a new run beside it with run_id=NAME (or another run_dir=), or resume it with these settings "
            "anyway with resume=force (its checkpoint must still fit the model)."
        )
    return differences


def claim_run_dir(cfg: DictConfig, run_dir: Path, trainer: L.Trainer, identity: dict) -> RunLock:
    """Before the run writes anything: rank 0 locks the run directory, checks it again under the lock
    (`check_run_dir`, now with the dataset the data module may just have written) and writes `config.yaml` and
    `run.json` (the identity). The other ranks of a multi-process run are the same run, relaunched: they neither
    lock nor write. Returns the lock, held until the caller releases it or the process ends."""
    lock = RunLock(run_dir)
    if not trainer.is_global_zero:
        return lock
    run_dir.mkdir(parents=True, exist_ok=True)
    lock.acquire()
    try:
        differences = check_run_dir(cfg, run_dir, identity)
        if differences:
            lines = "".join(f"  {d}\n" for d in differences)
            print(f"resume=force: resuming a run whose settings differ (then → now):\n{lines}", end="")
        atomic_write(run_dir / "config.yaml", OmegaConf.to_yaml(cfg, resolve=True))
        atomic_write(run_dir / RUN_IDENTITY, json.dumps(identity, indent=2) + "\n")
    except BaseException:
        lock.release()
        raise
    return lock
