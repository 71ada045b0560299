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
import struct
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


def canonical_safetensors(tensors: dict[str, Any], meta: dict[str, str]) -> bytes:
    """safetensors bytes with a canonical header: the library writes its metadata map in hash
    order, so the header is re-serialised with sorted keys (the data section is unchanged)."""
    from safetensors.torch import save

    raw = save(dict(sorted(tensors.items())), metadata=meta)
    (length,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8 : 8 + length])
    text = json.dumps(header, sort_keys=True, separators=(",", ":")).encode("utf-8")
    text += b" " * (-len(text) % 8)  # keep the data 8-byte aligned, as safetensors does
    return struct.pack("<Q", len(text)) + text + raw[8 + length :]


def write_adapter(destination: Path, tensors: dict[str, Any], config: dict[str, Any], meta: dict[str, str],
                  *, force: bool = False) -> None:
    """Write an adapter directory atomically; replace an existing one only with `force`."""
    destination = Path(destination)
    if destination.exists() and not force:
        raise OutputExists(str(destination))
    destination.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{destination.name}.", suffix=".pemlang-tmp", dir=destination.parent))
    try:
        (staging / WEIGHTS_NAME).write_bytes(canonical_safetensors(tensors, meta))
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
