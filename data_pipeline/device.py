"""`device: auto`, the default of every setting that places a model (Mimi, Whisper, the diarizer, the judges,
the trainer's evaluation, the server): the one rule that turns it into a device."""

from __future__ import annotations


def resolve_device(device: str) -> str:
    """`auto` → `cuda` when a GPU is visible, else `cpu`; anything else as given (`cuda:1`, `mps`)."""
    if device != "auto":
        return device
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"
