"""`python -m csm_train` through `tests/cpu_launch.py` (DeepSpeed's strategy on CPU), recording on every rank,
after the last step, the live weights (gathered from their ZeRO-3 shards) and each logged gradient norm into
`run_dir/live-rank{R}.pt`. With `+poison.rank=R '+poison.steps=[S,…]'`, that rank's loss is NaN at those steps and
every rank records its steps as tests/nan_probe.py does. Lightning re-launches this script for rank 1.

usage: python tests/deepspeed_probe.py OVERRIDES…"""

from pathlib import Path

import cpu_launch  # noqa: F401  (lifts Lightning's CUDA-only checks of DeepSpeed)
import deepspeed
import hydra
import lightning as L
import torch
from nan_probe import PoisonAndRecord
from omegaconf import DictConfig

from csm_train.__main__ import CONFIG_DIR
from csm_train.train import train


class LiveWeights(L.Callback):
    def __init__(self):
        self.weights, self.grad_norms = {}, []

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        if "train/grad_norm" in trainer.callback_metrics:
            self.grad_norms.append(float(trainer.callback_metrics["train/grad_norm"]))

    def on_train_end(self, trainer, module):
        params = list(module.model.parameters())
        with deepspeed.zero.GatheredParameters(params, enabled=hasattr(params[0], "ds_id")):
            self.weights = {k: v.detach().clone() for k, v in module.model.state_dict().items()}


@hydra.main(config_path=CONFIG_DIR, config_name="config", version_base="1.3")
def main(cfg: DictConfig) -> None:
    live = LiveWeights()
    poison = PoisonAndRecord(cfg.poison.rank, list(cfg.poison.steps)) if "poison" in cfg else None
    trainer = train(cfg, extra_callbacks=[live, *([poison] if poison else [])])
    out = Path(cfg.run_dir) / f"live-rank{trainer.global_rank}.pt"
    steps = poison.records if poison else []
    torch.save(
        {"weights": live.weights, "grad_norms": live.grad_norms, "step": trainer.global_step, "steps": steps}, out
    )


if __name__ == "__main__":
    main()
