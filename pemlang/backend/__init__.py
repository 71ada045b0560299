"""Execution of a Plan. The torch backend is the only place pemlang imports torch."""

from __future__ import annotations

import re
from typing import Any

DEVICE_PATTERN = r"^(auto|cpu|cuda(:[0-9]+)?)$"  # the CLI's --device, the config's `device:`, the API's device=
DEVICE_FORMS = "auto, cpu, cuda, cuda:N"


def resolve_device(spec: str) -> tuple[Any, str]:
    """`auto|cpu|cuda|cuda:N` → (torch.device, a line saying which and why); ValueError otherwise."""
    if not isinstance(spec, str) or re.fullmatch(DEVICE_PATTERN, spec) is None:
        raise ValueError(f"unknown device {spec!r} (expected {DEVICE_FORMS})")
    import torch

    if spec == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda"), f"device: cuda ({torch.cuda.get_device_name(0)})"
        return torch.device("cpu"), "device: cpu (no CUDA device available)"
    device = torch.device(spec)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"--device {spec}: no CUDA device is available (use --device cpu or auto)")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ValueError(f"--device {spec}: there are only {torch.cuda.device_count()} CUDA devices")
    elif device.type != "cpu":
        raise ValueError(f"--device {spec}: expected auto, cpu, cuda or cuda:N")
    return device, f"device: {device}"
