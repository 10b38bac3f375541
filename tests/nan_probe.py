"""Run `python -m csm_train` under DDP with the loss made NaN on one rank at chosen steps (the semantic weight set
to NaN for that batch: the real loss, the real backward), and record per rank, after every batch, the global step,
the learning rate and digests of the weights and of AdamW's state (Lightning re-launches this script for rank 1).

usage: python tests/nan_probe.py OVERRIDES… +poison.rank=R '+poison.steps=[S,…]'"""

import hashlib
import json
from pathlib import Path

import hydra
import lightning as L
import torch
from omegaconf import DictConfig

from csm_train.__main__ import CONFIG_DIR
from csm_train.train import train


def digest(tensors) -> str:
    h = hashlib.sha256()
    for tensor in tensors:
        h.update(tensor.detach().cpu().float().numpy().tobytes())
    return h.hexdigest()[:16]


class PoisonAndRecord(L.Callback):
    def __init__(self, rank: int, steps: list[int]):
        self.rank, self.steps, self.records, self.weight = rank, set(steps), [], None

    def on_train_batch_start(self, trainer, module, batch, batch_idx):
        self.weight = module.loss_weights.w_semantic
        if trainer.global_rank == self.rank and trainer.global_step in self.steps:
            module.loss_weights.w_semantic = float("nan")

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        module.loss_weights.w_semantic = self.weight
        optimizer = trainer.optimizers[0]
        moments = [v for state in optimizer.state.values() for v in state.values() if torch.is_tensor(v)]
        self.records.append(
            {
                "step": trainer.global_step,
                "lr": optimizer.param_groups[0]["lr"],
                "weights": digest(module.state_dict().values()),
                "optimizer": digest(moments),
                "skipped": module.bad_steps_total,
            }
        )


@hydra.main(config_path=CONFIG_DIR, config_name="config", version_base="1.3")
def main(cfg: DictConfig) -> None:
    recorder = PoisonAndRecord(cfg.poison.rank, list(cfg.poison.steps))
    trainer = train(cfg, extra_callbacks=[recorder])
    (Path(cfg.run_dir) / f"steps-rank{trainer.global_rank}.json").write_text(json.dumps(recorder.records))


if __name__ == "__main__":
    main()
