"""Lightning wiring: the CSM training step, the optimizer and schedule, NaN skipping.

The model is `model.py`, the loss `loss.py`, the data stream and its data module `data.py`; this file only
connects them to Lightning (strategies, precision, checkpoints, logging)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import lightning as L
import torch
from lightning.pytorch.plugins.precision import MixedPrecision, Precision
from lightning.pytorch.strategies import DeepSpeedStrategy

from csm_train.checkpoint import load_initial_weights
from csm_train.data import Batch, CSMDataModule, attention_mask
from csm_train.lora import LoraConfig, apply_lora
from csm_train.loss import csm_loss, decoder_frame_generator
from csm_train.model import CSM, CSMConfig


@dataclass
class LossWeights:
    decoder_fraction: float = 1 / 16
    w_semantic: float = 1.0
    w_acoustic: float = 1.0


@dataclass
class OptimConfig:
    lr: float = 3e-4
    betas: tuple[float, float] = (0.9, 0.95)
    weight_decay: float = 0.1
    warmup_steps: int = 100
    warmup_fraction: float = 0.0  # or a share of max_steps, whichever is longer (runs whose length follows the data)
    max_steps: int = 10_000
    min_lr_ratio: float = 0.1  # cosine decays to lr * min_lr_ratio
    # Learning-rate multiplier per parameter group (the fine-tuning recipes use e.g. backbone 0.1).
    lr_multipliers: dict[str, float] = field(
        default_factory=lambda: {"backbone": 1.0, "decoder": 1.0, "embeddings": 1.0, "heads": 1.0}
    )


PARAMETER_GROUPS = ("backbone", "decoder", "embeddings", "heads")


def parameter_group(name: str) -> str:
    """Which of backbone / decoder / embeddings / heads a parameter belongs to."""
    if name.startswith("backbone."):
        return "backbone"
    if name.startswith(("decoder.", "projection.")):
        return "decoder"
    if name.startswith(("text_embeddings.", "audio_embeddings.")):
        return "embeddings"
    return "heads"  # codebook0_head, audio_head


def param_groups(model: torch.nn.Module, optim: OptimConfig) -> list[dict]:
    """AdamW groups: weight decay on matrices only (not norms, biases or embeddings, as in Llama/GPT
    recipes: decaying embeddings shrinks rare tokens' vectors for no gain), one lr multiplier per part."""
    groups: dict[tuple[str, bool], list] = {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        part = parameter_group(name)
        decay = param.ndim >= 2 and part != "embeddings"
        groups.setdefault((part, decay), []).append(param)
    return [
        {
            "params": params,
            "weight_decay": optim.weight_decay if decay else 0.0,
            "lr": optim.lr * optim.lr_multipliers.get(part, 1.0),
            "name": f"{part}{'' if decay else '_no_decay'}",
        }
        for (part, decay), params in sorted(groups.items())
    ]


def cosine_with_warmup(step: int, warmup_steps: int, max_steps: int, min_lr_ratio: float) -> float:
    """Multiplier of the base lr: linear warmup from 0, then cosine down to `min_lr_ratio`."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, max_steps - warmup_steps))
    return min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


# bf16-mixed: fp32 weights, gradients and AdamW states, bf16 compute (autocast); 16-mixed adds a loss scaler.
TRAINING_PRECISIONS = ("32-true", "bf16-mixed", "16-mixed")


def check_precision(precision: str) -> None:
    """Refuse, before the first step, precisions that would train badly rather than fail."""
    if precision in TRAINING_PRECISIONS:
        return
    why = {
        "bf16-true": "keeps the weights and AdamW's states in bf16, where an update smaller than 1/256 of a weight "
        "is lost",
        "16-true": "keeps the weights and AdamW's states in fp16, with neither a loss scale nor fp32 master weights",
    }.get(precision, "is not one the trainer is tested with")
    raise ValueError(
        f"trainer.precision={precision} {why}: use bf16-mixed (fp32 master weights and optimizer states, bf16 "
        f"compute), 16-mixed on GPUs without bf16, or 32-true"
    )


def fused_optimizer(precision: str) -> bool:
    """Fused AdamW (one kernel for every parameter instead of a chain of foreach ops) wherever the gradients can
    be clipped before the step: not under 16-mixed, whose loss scale a fused step removes internally, after
    clipping would have run on scaled gradients."""
    return precision != "16-mixed"


class CSMModule(L.LightningModule):
    def __init__(
        self,
        preset: str = "tiny",
        text_vocab_size: int | None = None,
        activation_checkpointing: bool = False,
        loss: LossWeights | dict | None = None,
        optim: OptimConfig | dict | None = None,
        seed: int = 0,
        max_bad_steps: int = 5,
        init_from: str | None = None,
        freeze: list[str] = (),
        lora: LoraConfig | dict | None = None,
    ):
        """`init_from`: start from these weights (any format `csm_train.checkpoint` reads); `freeze`: parameter
        groups (backbone, decoder, embeddings, heads: `parameter_group`) that keep their weights; `lora`: train
        adapters only (csm_train/lora.py)."""
        super().__init__()
        self.loss_weights = LossWeights(**loss) if isinstance(loss, dict) else (loss or LossWeights())
        self.optim = OptimConfig(**optim) if isinstance(optim, dict) else (optim or OptimConfig())
        overrides = {"activation_checkpointing": activation_checkpointing}
        if text_vocab_size is not None:
            overrides["text_vocab_size"] = text_vocab_size
        self.config = CSMConfig.preset(preset, **overrides)
        self.model = CSM(self.config)
        if init_from:
            load_initial_weights(self.model, init_from)
        unknown = set(freeze) - set(PARAMETER_GROUPS)
        if unknown:
            raise ValueError(f"model.freeze={list(freeze)}: unknown group(s) {sorted(unknown)}; use {PARAMETER_GROUPS}")
        for name, param in self.model.named_parameters():
            param.requires_grad_(parameter_group(name) not in freeze)  # no gradient, no optimizer state
        self.lora = LoraConfig(**lora) if isinstance(lora, dict) else (lora or LoraConfig())
        if self.lora.rank:
            apply_lora(self.model, self.lora)
        self.seed, self.max_bad_steps = seed, max_bad_steps
        self.bad_steps_in_a_row = 0
        self.bad_steps_total = 0
        self.drop_update = False  # a micro-batch of this optimizer step had a non-finite loss on some rank
        self.grad_norm_step = 0  # the last step whose DeepSpeed gradient norm was logged
        self.save_hyperparameters()

    def setup(self, stage: str) -> None:
        check_precision(self.trainer.precision)

    def training_step(self, batch: Batch, batch_idx: int):
        # The batch counts as consumed from here on: a checkpoint written after this step resumes after it
        # (callbacks' batch-end hooks, checkpointing among them, run before the module's own).
        datamodule = getattr(self._trainer, "datamodule", None)
        if isinstance(datamodule, CSMDataModule):
            datamodule.stream_state.update(batch.stream)
        generator = decoder_frame_generator(
            self.seed, self.global_step, self.global_rank, batch_idx % self.trainer.accumulate_grad_batches
        )
        out = self._loss(batch, self.loss_weights.decoder_fraction, generator)
        # One all-reduce: if any rank's loss is not finite, every rank drops this step's update.
        if not self.trainer.strategy.reduce_boolean_decision(bool(torch.isfinite(out.loss)), all=True):
            self._count_bad_step(out.loss)
        else:
            self._log_step(batch, out)
        # The loss always goes to backward, NaN or not: DDP and DeepSpeed need every rank in the gradient
        # collectives (Lightning refuses a None loss on several ranks); the update is dropped before the optimizer.
        return out.loss

    def _loss(self, batch: Batch, decoder_fraction: float, generator: torch.Generator | None = None):
        """The CSM loss of a batch; rows packed with several conversations get a block-causal mask: on CUDA as
        a FlexAttention block mask (a fused kernel that skips masked tiles, where SDPA given a dense mask loses
        flash attention), elsewhere dense (FlexAttention has no CPU backward)."""
        packed = bool((batch.doc_ids > 0).any())
        return csm_loss(
            self.model,
            batch.tokens,
            batch.tokens_mask,
            batch.labels,
            decoder_fraction=decoder_fraction,
            generator=generator,
            w_semantic=self.loss_weights.w_semantic,
            w_acoustic=self.loss_weights.w_acoustic,
            input_pos=batch.input_pos,
            mask=attention_mask(batch.doc_ids, flex=batch.doc_ids.is_cuda) if packed else None,
        )

    def validation_step(self, batch: Batch, batch_idx: int) -> None:
        # Every frame through the depth decoder: a held-out number must not depend on which 1/16 a seed picked.
        out = self._loss(batch, decoder_fraction=1.0)
        metrics = {"val/loss": out.loss, "val/c0_loss": out.c0_loss, "val/decoder_loss": out.decoder_loss}
        self.log_dict(metrics, batch_size=len(batch.tokens), sync_dist=True)

    def _count_bad_step(self, loss: torch.Tensor) -> None:
        self.drop_update = True
        self.bad_steps_in_a_row += 1
        self.bad_steps_total += 1
        self.log("train/skipped_nonfinite_steps", float(self.bad_steps_total))
        if self.bad_steps_in_a_row >= self.max_bad_steps:
            raise FloatingPointError(
                f"loss was {loss.item()} for {self.bad_steps_in_a_row} steps in a row (step {self.global_step}): "
                f"lower optim.lr, raise optim.warmup_steps, or train in bf16-mixed rather than fp16; the last "
                f"checkpoint is intact in the run directory"
            )

    def on_before_optimizer_step(self, optimizer) -> None:
        """A step with a non-finite loss on any rank changes nothing: without gradients the optimizer skips
        every parameter (no update, no weight decay, no moment or step-count change), as fp16's loss scaler
        skips an overflowing step. The step still counts (global step and schedule move on alike on every rank).
        DeepSpeed keeps gradients in its own partitions and skips non-finite ones itself (its overflow check)."""
        deepspeed = isinstance(self.trainer.strategy, DeepSpeedStrategy)
        if not deepspeed:  # the norm gradient clipping compares with (DeepSpeed's: on_train_batch_end)
            norms = [p.grad.detach().norm() for p in self.parameters() if p.grad is not None]
            if norms:
                self.log("train/grad_norm", torch.stack(norms).norm())
        if self.drop_update:
            if not deepspeed:
                optimizer.zero_grad(set_to_none=True)
            self.drop_update = False
        else:
            self.bad_steps_in_a_row = 0

    def on_train_batch_end(self, outputs, batch: Batch, batch_idx: int) -> None:
        # Under ZeRO the gradients live in DeepSpeed's partitions, not in `.grad`: its step computes their global
        # norm (before clipping), readable once the step has run, i.e. when the global step has moved on.
        strategy = self.trainer.strategy
        if isinstance(strategy, DeepSpeedStrategy) and self.global_step != self.grad_norm_step:
            self.grad_norm_step = self.global_step
            norm = strategy.deepspeed_engine.get_global_grad_norm()
            if norm is not None:
                self.log("train/grad_norm", float(norm))

    def _log_step(self, batch: Batch, out) -> None:
        frames = int(batch.tokens_mask.any(-1).sum())
        metrics = {
            "train/loss": out.loss,
            "train/c0_loss": out.c0_loss,
            "train/decoder_loss": out.decoder_loss,
            "train/audio_frames": float(out.num_audio_frames),
            "train/frames": float(frames),
            "train/skipped_samples": float(batch.stream.skipped),
            "train/truncated_samples": float(batch.stream.truncated),
        }
        for k, (loss, acc) in enumerate(zip(out.codebook_losses, out.codebook_accuracies, strict=True)):
            metrics[f"codebook_loss/{k:02d}"] = loss
            metrics[f"codebook_acc/{k:02d}"] = acc
        self.log_dict(metrics, prog_bar=False)
        self.log("loss", out.loss, prog_bar=True, logger=False)

    def configure_optimizers(self):
        optim = self.optim
        warmup = max(optim.warmup_steps, round(optim.warmup_fraction * optim.max_steps))
        groups = param_groups(self.model, optim)
        strategy = self.trainer.strategy
        offload = isinstance(strategy, DeepSpeedStrategy) and "offload_optimizer" in strategy.config.get(
            "zero_optimization", {}
        )
        if offload:  # DeepSpeed steps offloaded states on the CPU with its own vectorised Adam (AdamW mode)
            from deepspeed.ops.adam import DeepSpeedCPUAdam

            optimizer = DeepSpeedCPUAdam(groups, lr=optim.lr, betas=tuple(optim.betas), adamw_mode=True)
        else:
            optimizer = torch.optim.AdamW(
                groups, lr=optim.lr, betas=tuple(optim.betas), fused=fused_optimizer(self.trainer.precision)
            )
        schedule = torch.optim.lr_scheduler.LambdaLR(
            optimizer,
            lambda step: cosine_with_warmup(step, warmup, optim.max_steps, optim.min_lr_ratio),
        )
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}

    def configure_gradient_clipping(self, optimizer, gradient_clip_val=None, gradient_clip_algorithm=None) -> None:
        plugin = self.trainer.precision_plugin
        if gradient_clip_val and isinstance(plugin, MixedPrecision) and plugin.scaler is None:
            # bf16-mixed has no loss scale, so the gradients a fused optimizer sees are already true values and
            # clipping them is valid. Lightning refuses any fused optimizer under mixed precision, because under
            # fp16 the scaler would unscale inside the fused step, after clipping; here that cannot happen.
            Precision.clip_gradients(plugin, optimizer, gradient_clip_val, gradient_clip_algorithm)
        else:
            self.clip_gradients(optimizer, gradient_clip_val, gradient_clip_algorithm)

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint["csm_config"] = self.config.to_dict()
        if self.lora.rank:
            checkpoint["lora"] = self.lora.to_dict()  # exports merge the adapters (lora.merge_lora_weights)
        checkpoint["bad_steps_total"] = self.bad_steps_total

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        self.bad_steps_total = checkpoint.get("bad_steps_total", 0)
