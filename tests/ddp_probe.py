"""Run `python -m csm_train` under DDP and record, per rank, the sample keys it trained on and a checksum
of its final weights (Lightning re-launches this script for rank 1)."""

import hashlib
from pathlib import Path

import hydra
import lightning as L
from omegaconf import DictConfig

from csm_train.__main__ import CONFIG_DIR
from csm_train.train import train


class RecordKeys(L.Callback):
    def __init__(self):
        self.keys = []

    def on_train_batch_start(self, trainer, module, batch, batch_idx):
        self.keys += batch.stream.keys


@hydra.main(config_path=CONFIG_DIR, config_name="config", version_base="1.3")
def main(cfg: DictConfig) -> None:
    recorder = RecordKeys()
    trainer = train(cfg, extra_callbacks=[recorder])
    rank, run_dir = trainer.global_rank, Path(cfg.run_dir)
    (run_dir / f"keys-rank{rank}.txt").write_text("\n".join(recorder.keys))
    digest = hashlib.sha256()
    for name, tensor in sorted(trainer.lightning_module.state_dict().items()):
        digest.update(name.encode() + tensor.detach().cpu().numpy().tobytes())
    (run_dir / f"weights-rank{rank}.txt").write_text(digest.hexdigest())


if __name__ == "__main__":
    main()
