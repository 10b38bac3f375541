"""`python -m serve checkpoint=…` (see conf/serve/config.yaml and serve/__init__.py)."""

import logging
from pathlib import Path

import hydra
import uvicorn
from omegaconf import DictConfig

from serve.security import api_keys, check_bind

CONFIG_DIR = str(Path(__file__).resolve().parents[1] / "conf" / "serve")
log = logging.getLogger("serve")


@hydra.main(config_path=CONFIG_DIR, config_name="config", version_base="1.3")
def main(cfg: DictConfig) -> None:
    keys = api_keys(cfg.api_keys)
    check_bind(cfg.host, keys)  # before the imports and the loading, not after
    from csm_train.console import quiet_libraries
    from serve.app import Service, create_app
    from serve.telemetry import configure_logging

    log_config = configure_logging(cfg.log_format, cfg.log_level)
    quiet_libraries()
    service = Service(cfg)
    log.info("serving %s as %r on http://%s:%d (%s; voices: %s)", service.checkpoint.path, service.model_name,
             cfg.host, cfg.port, f"{len(keys)} API keys" if keys else "no API keys: loopback only",
             ", ".join(v.name for v in service.voices.list()))  # fmt: skip
    if service.watermarker:
        log.info("outputs are watermarked: %s", service.watermarker.describe())
    else:
        log.info("outputs are not watermarked (watermark.model=null)")
    # serve.access logs every request (with more than uvicorn's access log says): uvicorn's is off
    uvicorn.run(create_app(service, keys), host=cfg.host, port=cfg.port, log_level=cfg.log_level,
                log_config=log_config, access_log=False)  # fmt: skip


if __name__ == "__main__":
    main()
