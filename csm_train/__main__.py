"""`python -m csm_train +experiment=tiny` (see conf/ and csm_train/train.py)."""

from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig

from csm_train.train import pin_sweep_point, train

CONFIG_DIR = str(Path(__file__).resolve().parents[1] / "conf")


@hydra.main(config_path=CONFIG_DIR, config_name="config", version_base="1.3")
def main(cfg: DictConfig) -> None:
    job = HydraConfig.get()
    if job.mode == RunMode.MULTIRUN:
        pin_sweep_point(cfg, job.job.override_dirname)
    train(cfg)


if __name__ == "__main__":
    main()
