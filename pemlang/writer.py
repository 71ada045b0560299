"""Writing PEFT adapter directories (SPEC §5), atomically and byte-for-byte reproducibly.

Files go to a temporary directory beside the destination, which is renamed into place only when
complete: an interrupted run leaves no partial output, and a replaced output (--force) is
swapped out in one rename. Keys, JSON and metadata are sorted, with no timestamps, so the same
inputs give identical bytes.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

from . import __version__
from .adapters import CONFIG_NAME, WEIGHTS_NAME
from .plan import OutputPlan, Plan, output_inputs


class OutputExists(Exception):
    """The destination exists and --force was not given."""


def sha256_file(path: Path, chunk: int = 1 << 22) -> str:
    """The sha256 of a file, read in 4 MiB chunks."""
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def metadata(plan: Plan, out: OutputPlan, input_hashes: dict[str, str]) -> dict[str, str]:
    """The provenance recorded in the safetensors header: expression, mode, params, inputs."""
    used = sorted(output_inputs(plan, out))
    return {
        "format": "pt",
        "pemlang.version": __version__,
        "pemlang.mode": plan.mode,
        "pemlang.expression": out.expression,
        "pemlang.output": out.name or "",
        "pemlang.params": json.dumps(plan.params, sort_keys=True, ensure_ascii=False),
        "pemlang.inputs": json.dumps(
            [{"name": n, "path": plan.inputs[n].written, "sha256": input_hashes[n]} for n in used],
            sort_keys=True, ensure_ascii=False),
        "pemlang.program": plan.program,
    }


def write_adapter(destination: Path, tensors: dict[str, Any], config: dict[str, Any], meta: dict[str, str],
                  *, force: bool = False) -> None:
    """Write an adapter directory atomically; replace an existing one only with `force`."""
    from safetensors.torch import save_file

    destination = Path(destination)
    if destination.exists() and not force:
        raise OutputExists(str(destination))
    destination.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{destination.name}.", suffix=".pemlang-tmp", dir=destination.parent))
    try:
        save_file(dict(sorted(tensors.items())), str(staging / WEIGHTS_NAME), metadata=meta)
        (staging / CONFIG_NAME).write_text(json.dumps(config, indent=2, sort_keys=True, ensure_ascii=False) + "\n",
                                           encoding="utf-8")
        umask = os.umask(0)
        os.umask(umask)
        for name in (WEIGHTS_NAME, CONFIG_NAME):
            with (staging / name).open("rb") as f:
                os.fsync(f.fileno())
            os.chmod(staging / name, 0o666 & ~umask)
        os.chmod(staging, 0o777 & ~umask)
        if destination.exists():
            retired = Path(tempfile.mkdtemp(prefix=f".{destination.name}.", suffix=".pemlang-old",
                                            dir=destination.parent))
            os.rename(destination, retired / "old")
            os.rename(staging, destination)
            shutil.rmtree(retired, ignore_errors=True)
        else:
            os.rename(staging, destination)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
