"""`python -m eval`: resolve the checkpoint, build the speaker and the suites, run them, write the report
(and log it to W&B when enabled)."""

from __future__ import annotations

import logging
from pathlib import Path

import hydra
from omegaconf import DictConfig, OmegaConf

from csm_train.generate import compile_decoding
from data_pipeline.device import resolve_device
from eval.report import numbers, write_report
from eval.speaker import Speaker, resolve_checkpoint
from eval.suites import JudgeUnavailable, Session, Suite, SuiteResult

log = logging.getLogger(__name__)


def run_suites(session: Session, suites: dict[str, Suite]) -> list[SuiteResult]:
    results = []
    for name, suite in suites.items():
        log.info("suite %s ...", name)
        try:
            results.append(suite.run(session))
        except JudgeUnavailable as error:
            results.append(SuiteResult(name, judge="unavailable", refused=f"its judge could not be loaded: {error}"))
        for metric, estimate in results[-1].metrics.items():
            log.info(
                "  %s/%s = %.4f [%.4f, %.4f] (n=%d)",
                name,
                metric,
                estimate.value,
                estimate.low,
                estimate.high,
                estimate.n,
            )
        if results[-1].refused:
            log.warning("  %s: no number reported: %s", name, results[-1].refused)
    return results


def default_out_dir(checkpoint) -> Path:
    if checkpoint.run_dir is not None and checkpoint.step is not None:
        return checkpoint.run_dir / "eval" / f"step-{checkpoint.step:07d}"
    return Path("eval") / checkpoint.path.stem


def evaluate(cfg: DictConfig) -> Path:
    """Runs the configured suites on `cfg.checkpoint`; returns the path of report.md."""
    tokenizer_cfg = OmegaConf.to_container(cfg.tokenizer, resolve=True) if cfg.tokenizer else None
    checkpoint = resolve_checkpoint(cfg.checkpoint, tokenizer_cfg, cfg.codec)
    device = resolve_device(cfg.device)
    speaker = Speaker.from_checkpoint(
        checkpoint, device, cfg.quantize, **OmegaConf.to_container(cfg.speaker, resolve=True)
    )
    if cfg.compile:
        compile_decoding(speaker.model)  # eager, with a warning, where compile is unavailable
    out_dir = Path(cfg.out_dir) if cfg.out_dir else default_out_dir(checkpoint)
    suites = {name: hydra.utils.instantiate(suite) for name, suite in cfg.suite.items()}
    log.info("evaluating %s (step %s) on %s → %s", checkpoint.path, checkpoint.step, ", ".join(suites), out_dir)
    results = run_suites(Session(speaker, out_dir, cfg.limit, device), suites)
    model = checkpoint.describe()
    settings = {"limit": cfg.limit, "speaker": OmegaConf.to_container(cfg.speaker), "device": device}
    report = write_report(results, model, settings, out_dir)
    if cfg.wandb.enabled:
        log_to_wandb(results, model, cfg, out_dir)
    print(f"report: {report} (and report.html, report.json beside it)")
    return report


def log_to_wandb(results: list[SuiteResult], model: dict, cfg: DictConfig, out_dir: Path) -> None:
    """The report's numbers as one W&B run (offline unless cfg.wandb.mode=online), with the linked audio."""
    import wandb

    name = f"eval-{Path(model['run_dir']).name if model['run_dir'] else Path(model['checkpoint']).stem}"
    run = wandb.init(
        project=cfg.wandb.project, name=name, mode=cfg.wandb.mode, dir=str(out_dir), config={"model": model}
    )
    metrics = {f"eval/{row['suite']}/{row['metric']}": row["value"] for row in numbers(results, model)}
    audio = {
        f"eval/{r.suite}/audio/{s['id']}": wandb.Audio(str(out_dir / s["audio"]), caption=s.get("text"))
        for r in results
        for s in r.samples
        if "audio" in s
    }
    run.log({**metrics, **audio}, step=model["step"] or 0)
    run.summary.update(metrics)
    run.finish()


def load_suites(names: list[str], judges: dict | None = None) -> dict[str, Suite]:
    """Suites by name from conf/eval/suite/ outside a Hydra app (the training callback), with the judges of
    conf/eval/config.yaml unless given."""
    conf = Path(__file__).resolve().parents[1] / "conf" / "eval"
    unknown = sorted(set(names) - {p.stem for p in (conf / "suite").glob("*.yaml")})
    if unknown:
        raise ValueError(f"unknown eval suites {unknown}: choose from the files in {conf / 'suite'}")
    node = OmegaConf.merge(
        {"judges": OmegaConf.load(conf / "config.yaml").judges},
        {"judges": judges or {}},
        {"suite": OmegaConf.merge(*(OmegaConf.load(conf / "suite" / f"{name}.yaml") for name in names))},
    )
    return {name: hydra.utils.instantiate(node.suite[name]) for name in names}
