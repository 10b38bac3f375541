"""Fine-tuning cost: full fine-tuning vs a frozen backbone (finetune_voice) vs LoRA (finetune_lora), the same
batch, steps alternated between them. Prints step time and the training state each keeps — parameters,
gradients, AdamW moments, and the activations autograd saves for backward — counted from the tensors
themselves (CPU has no allocator peak to read; on a GPU these are what fills it).

    python bench/bench_finetune.py --preset tiny --batch 4 --frames 256
    python bench/bench_finetune.py --preset 100m --batch 1 --frames 512 --steps 3
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from bench_step import make_batch

from csm_train import csm_loss
from csm_train.module import CSMModule, OptimConfig, param_groups

MODES = {
    "full": {},
    "frozen backbone": {"freeze": ["backbone", "embeddings"]},
    "lora r16": {"lora": {"rank": 16, "alpha": 32.0}},
}


def tensor_bytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


class SavedActivations:
    """Bytes of the tensors autograd keeps for backward during a forward pass (distinct storages)."""

    def __init__(self):
        self.storages: dict[int, int] = {}

    def pack(self, tensor):
        storage = tensor.untyped_storage()
        self.storages[storage.data_ptr()] = storage.nbytes()
        return tensor

    @property
    def bytes(self) -> int:
        return sum(self.storages.values())


def step(module, optimizer, batch, decoder_frames, activations=None) -> float:
    tokens, tokens_mask, labels = batch
    began = time.perf_counter()
    hooks = torch.autograd.graph.saved_tensors_hooks(activations.pack, lambda t: t) if activations else None
    if hooks:
        hooks.__enter__()
    out = csm_loss(module.model, tokens, tokens_mask, labels, decoder_frames=decoder_frames)
    if hooks:
        hooks.__exit__(None, None, None)
    out.loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=False)  # keep the gradients allocated: they are part of the state
    return time.perf_counter() - began


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--frames", type=int, default=256)
    parser.add_argument("--steps", type=int, default=5)
    args = parser.parse_args()

    torch.manual_seed(0)
    runs = {}
    for name, settings in MODES.items():
        module = CSMModule(args.preset, text_vocab_size=4096, **settings)
        optimizer = torch.optim.AdamW(param_groups(module.model, OptimConfig(lr=1e-5)), lr=1e-5)
        runs[name] = (module, optimizer)
    batch = make_batch(next(iter(runs.values()))[0].config, args.batch, args.frames)
    audio = batch[2][..., 0] != -100
    decoder_frames = audio & (torch.rand(audio.shape, generator=torch.Generator().manual_seed(0)) < 1 / 16)

    saved = {}
    for name, (module, optimizer) in runs.items():  # warm-up step, measuring what autograd saves
        saved[name] = SavedActivations()
        step(module, optimizer, batch, decoder_frames, saved[name])
    times = {name: [] for name in runs}
    for _ in range(args.steps):
        for name, (module, optimizer) in runs.items():
            times[name].append(step(module, optimizer, batch, decoder_frames))

    print(f"preset {args.preset}, batch {args.batch} x {args.frames} frames, {args.steps} steps (median), CPU")
    columns = ["trainable", "step s", "vs full", "params", "grads", "AdamW", "saved acts"]
    print(f"{'':>16} " + " ".join(f"{c:>{w}}" for c, w in zip(columns, [12, 8, 8, 9, 9, 9, 10], strict=True)))
    base = statistics.median(times["full"])
    mib = 2**20
    for name, (module, optimizer) in runs.items():
        params = list(module.model.parameters())
        trainable = [p for p in params if p.requires_grad]
        moments = [t for state in optimizer.state.values() for t in state.values() if t.ndim > 0]
        median = statistics.median(times[name])
        print(
            f"{name:>16} {sum(p.numel() for p in trainable):>12,} {median:8.3f} {median / base:7.2f}x"
            f" {tensor_bytes(params) / mib:8.0f}M {tensor_bytes(p.grad for p in trainable) / mib:8.0f}M"
            f" {tensor_bytes(moments) / mib:8.0f}M {saved[name].bytes / mib:9.0f}M"
        )


if __name__ == "__main__":
    main()
