"""Execution of a Plan. The torch backend is the only place pemlang imports torch."""

from __future__ import annotations

import re
from typing import Any

DEVICE_PATTERN = r"^(auto|cpu|cuda(:[0-9]+)?)$"  # the CLI's --device, the config's `device:`, the API's device=
DEVICE_FORMS = "auto, cpu, cuda, cuda:N"


# torch keeps a device index in 8 bits: `cuda:128` would name another device (`cuda:255` the current
# one), and `cuda:2147483648` raises torch's own error. No machine has more GPUs than this.
MAX_CUDA_INDEX = 127


def device_problem(spec: object) -> str | None:
    """Why `spec` is not a device (auto, cpu, cuda, cuda:N for N up to MAX_CUDA_INDEX), or None.
    Read from the text alone: the CLI, configs and the API check a device without importing torch."""
    if not isinstance(spec, str) or re.fullmatch(DEVICE_PATTERN, spec) is None:
        shown = repr(spec[:40] + "…" if len(spec) > 40 else spec) if isinstance(spec, str) else type(spec).__name__
        return f"unknown device {shown} (expected {DEVICE_FORMS})"
    written = spec.partition(":")[2]
    index = written.lstrip("0")
    if len(index) > 3 or index and int(index) > MAX_CUDA_INDEX:
        shown = spec if len(spec) <= 40 else spec[:40] + "…"
        return (f"unknown device {shown!r}: N in cuda:N is a GPU's index, from 0 (the first GPU) to at most "
                f"{MAX_CUDA_INDEX}")
    if len(written) > 1 and written.startswith("0"):  # torch refuses `cuda:01` with an error of its own
        return f"unknown device {spec!r}: write cuda:{index or '0'} (an index has no leading zeros)"
    return None


class DeviceError(ValueError):
    """A device that cannot be used, said as the user gave it: `--device cuda` on the command line,
    `device="cuda"` in the API (`as_api`)."""

    def __init__(self, spec: str, reason: str, alternatives: tuple[str, ...] = (), *, api: bool = False):
        self.spec, self.reason, self.alternatives, self.api = spec, reason, alternatives, api
        super().__init__(self.spelled(api=api))

    def spelled(self, *, api: bool) -> str:
        name = f'device="{self.spec}"' if api else f"--device {self.spec}"
        if not self.alternatives:
            return f"{name}: {self.reason}"
        forms = (" or ".join(f'"{a}"' for a in self.alternatives) if api else " or ".join(self.alternatives))
        return f"{name}: {self.reason} (use {'device=' if api else '--device '}{forms})"

    def as_api(self) -> DeviceError:
        return DeviceError(self.spec, self.reason, self.alternatives, api=True)


def resolve_device(spec: str) -> tuple[Any, str]:
    """`auto|cpu|cuda|cuda:N` → (torch.device, a line saying which and why); ValueError otherwise."""
    problem = device_problem(spec)
    if problem is not None:
        raise ValueError(problem)
    import torch

    if spec == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda"), f"device: cuda ({torch.cuda.get_device_name(0)})"
        return torch.device("cpu"), "device: cpu (no CUDA device available)"
    device = torch.device(spec)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise DeviceError(spec, "no CUDA device is available", ("cpu", "auto"))
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise DeviceError(spec, f"there are only {torch.cuda.device_count()} CUDA devices")
    elif device.type != "cpu":
        raise DeviceError(spec, "expected auto, cpu, cuda or cuda:N")
    return device, f"device: {device}"
