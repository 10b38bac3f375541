"""`python -m csm_train +experiment=tiny` (see conf/ and csm_train/train.py)."""

from pathlib import Path

import hydra
from omegaconf import DictConfig

from csm_train.train import train

CONFIG_DIR = str(Path(__file__).resolve().parents[1] / "conf")


@hydra.main(config_path=CONFIG_DIR, config_name="config", version_base="1.3")
def main(cfg: DictConfig) -> None:
    train(cfg)


if __name__ == "__main__":
    main()
