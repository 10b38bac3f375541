"""`python -m eval checkpoint=…` (see conf/eval/ and eval/run.py)."""

from pathlib import Path

import hydra
from omegaconf import DictConfig

from csm_train.console import quiet_libraries
from eval.run import evaluate

CONFIG_DIR = str(Path(__file__).resolve().parents[1] / "conf" / "eval")


@hydra.main(config_path=CONFIG_DIR, config_name="config", version_base="1.3")
def main(cfg: DictConfig) -> None:
    quiet_libraries()
    evaluate(cfg)


if __name__ == "__main__":
    main()
