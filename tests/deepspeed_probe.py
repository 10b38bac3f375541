"""Train the tiny CSM for a few steps with DeepSpeed's own engine on CPU (gloo), ZeRO stage given on the
command line, under `torchrun --nproc_per_node=2`. Lightning's DeepSpeed strategy refuses a CPU
accelerator; the engine does not, so this runs the real ZeRO-2/3 partitioning, gradient reduction and
checkpointing that a GPU run uses. Writes, into OUT:

* `zero/`           the engine's checkpoint, in the layout Lightning's DeepSpeed strategy writes
                    (module `model.*` names, `csm_config` in the client state);
* `engine.pt`       rank 0's full weights gathered from the engine after training;
* `reference.pt`    the same steps on one process without DeepSpeed (both ranks' batches, loss averaged).

usage: torchrun --nproc_per_node=2 tests/deepspeed_probe.py STAGE DATASET OUT
"""

import sys
from pathlib import Path

import deepspeed
import torch
import torch.distributed as dist

from csm_train import CSM, CSMConfig, csm_loss, decoder_frame_generator
from csm_train.data import FrameStream
from csm_train.module import OptimConfig, param_groups
from csm_train.tokenizer import ByteTokenizer

STEPS, LR = 3, 0.05


def make_optimizer(trainee):
    # SGD with momentum: linear in the gradients, so the ZeRO run and the reference agree to rounding
    # (Adam divides by sqrt(v) and magnifies rounding on near-zero gradients into lr-sized differences).
    groups = param_groups(trainee.model, OptimConfig(lr=LR, weight_decay=0.1))
    return torch.optim.SGD(groups, lr=LR, momentum=0.9)


class Trainee(torch.nn.Module):
    """What Lightning hands DeepSpeed: a module holding the CSM as `model`, loss computed in forward."""

    def __init__(self, config):
        super().__init__()
        self.model = CSM(config)

    def forward(self, batch, step, rank):
        out = csm_loss(
            self.model,
            batch["tokens"],
            batch["tokens_mask"],
            batch["labels"],
            generator=decoder_frame_generator(0, step, rank),
        )
        return out.loss


def batches(dataset, rank, world_size):
    stream = FrameStream(
        dataset, ByteTokenizer(), 32, max_seq_len=256, batch_size=1, rank=rank, world_size=world_size, lookahead=1
    )
    it = iter(stream)
    return [next(it) for _ in range(STEPS)]


def main(stage: int, dataset: str, out: Path):
    deepspeed.init_distributed(dist_backend="gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    config = CSMConfig.preset("tiny", text_vocab_size=ByteTokenizer.vocab_size)
    torch.manual_seed(0)
    trainee = Trainee(config)
    initial = {k: v.clone() for k, v in trainee.state_dict().items()}
    optimizer = make_optimizer(trainee)
    ds_config = {
        "train_micro_batch_size_per_gpu": 1,
        "gradient_accumulation_steps": 1,
        "zero_optimization": {"stage": stage, "stage3_param_persistence_threshold": 0},
        "zero_allow_untested_optimizer": True,  # plain torch SGD (see make_optimizer)
        "gradient_clipping": 0.0,  # DeepSpeed clips at 1.0 unless told otherwise; the reference does not
        "fp16": {"enabled": False},
        "bf16": {"enabled": False},
    }
    engine, *_ = deepspeed.initialize(model=trainee, optimizer=optimizer, config=ds_config)
    for step, batch in enumerate(batches(dataset, rank, world)):
        loss = engine(batch, step, rank)
        engine.backward(loss)
        engine.step()
    engine.save_checkpoint(str(out / "zero"), tag="step3", client_state={"csm_config": config.to_dict()})
    with deepspeed.zero.GatheredParameters(list(engine.module.parameters()), enabled=stage == 3):
        if rank == 0:
            torch.save({k: v.detach().clone() for k, v in engine.module.state_dict().items()}, out / "engine.pt")
    dist.barrier()
    if rank == 0:
        reference(config, initial, dataset, world, out)


def reference(config, initial, dataset, world, out):
    """One process, no DeepSpeed: each step's gradient is the mean over both ranks' batches."""
    trainee = Trainee(config)
    trainee.load_state_dict(initial)
    optimizer = make_optimizer(trainee)
    per_rank = [batches(dataset, r, world) for r in range(world)]
    for step in range(STEPS):
        loss = sum(trainee(per_rank[r][step], step, r) for r in range(world)) / world
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    torch.save(trainee.state_dict(), out / "reference.pt")


if __name__ == "__main__":
    main(int(sys.argv[1]), sys.argv[2], Path(sys.argv[3]))
