"""`python tests/cpu_launch.py OVERRIDES…` is `python -m csm_train OVERRIDES…` with the two CUDA-only assumptions of
Lightning's DeepSpeed strategy lifted, so the tests run the `trainer=deepspeed_*` configs as shipped, on CPU.

The assumptions: `DeepSpeedStrategy.setup_environment` raises unless the accelerator is CUDA, and the strategy hands
DeepSpeed its device's index as the local rank (a CUDA device has one, Lightning's CPU devices have None). DeepSpeed
itself runs on CPU (its CPU accelerator, gloo collectives). So the environment is set up by the parent's (DDP's)
method, which DeepSpeed's then extends as usual, and CPU devices carry their rank as index (`cpu:1` is the CPU).
Lightning re-runs this script for every other rank, so each rank gets the same patch."""

import torch
from lightning.pytorch.accelerators import CPUAccelerator
from lightning.pytorch.strategies import DDPStrategy, DeepSpeedStrategy

from csm_train.__main__ import main


def indexed_cpus(devices) -> list[torch.device]:
    return [torch.device("cpu", i) for i in range(CPUAccelerator.parse_devices(devices))]


DeepSpeedStrategy.setup_environment = DDPStrategy.setup_environment
CPUAccelerator.get_parallel_devices = staticmethod(indexed_cpus)

if __name__ == "__main__":
    main()
