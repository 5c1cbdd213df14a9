"""Numerical precision of a run, decided once: float32 master weights, optionally bf16 autocast.

``Precision.resolve(device, bf16)`` checks that the device can do what was asked (a CUDA GPU without bfloat16
support refuses ``--bf16`` here, for ``train`` and ``eval`` alike) and gives the object the step, the teacher's
embedding pass and evaluation share; ``precision.autocast()`` is the one autocast context of the project.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch


def check_bf16(device: torch.device, bf16: bool, option: str = "--bf16") -> None:
    """Refuse bf16 on a CUDA device without bfloat16 support (the CPU's autocast supports it)."""
    device = torch.device(device)
    if bf16 and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise ValueError(f"{option} needs a GPU with bfloat16 support; run without {option}")


def autocast(device: torch.device, bf16: bool):
    """bf16 autocast on ``device`` when ``bf16``, else a no-op context (float32)."""
    if bf16:
        return torch.autocast(device_type=torch.device(device).type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


@dataclass(frozen=True)
class Precision:
    """A device and whether its forward passes run under bf16 autocast."""
    device: torch.device
    bf16: bool = False

    @classmethod
    def resolve(cls, device, bf16: bool = False, option: str = "--bf16") -> "Precision":
        device = torch.device(device)
        check_bf16(device, bf16, option)
        return cls(device, bool(bf16))

    def autocast(self):
        return autocast(self.device, self.bf16)
