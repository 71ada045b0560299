"""Writing a module merged into its base model (`output x into "BASE" -> "DIR"`), streamed.

Each of the base's weight files becomes a file of the same name in the staging directory, laid out
before anything is computed: the same header (tensor names, dtypes, shapes, data offsets) with
pemlang's provenance added to its metadata, so the base's index still holds. With a max shard size
(`--max-shard-size`) the tensors go, in the base's order, into new shards with a new index instead
(basemodel.layout). The tensors the module
leaves alone are copied byte for byte first (copy_file_range: the kernel moves the bytes); then,
as the backend hands over each output layer's factors (the sink of `TorchBackend.run`), the one
base tensor it changes is read, W + ΔW computed in fp32 (ΔW = s·B·A, transposed for a Conv1D
`fan_in_fan_out` layer as PEFT does), cast once to the tensor's dtype and written at its offset.
(IA)3 vectors multiply the weight (and a non-feed-forward layer's bias) as PEFT's merge does; heads
(`modules_to_save`) replace the base's tensors. Memory holds one base tensor and its layer's
factors. Every base file is read once; the base is never opened for writing. The written model's
pages are put on disk and dropped from the page cache every FLUSH_BYTES (MergedModel._wrote), so
writing a 140 GB model neither fills memory with it nor evicts everything else. The base's other
files (config, generation config, tokenizer, index) are copied unchanged and a model card written.
A pickled base (`pytorch_model*.bin`, --allow-pickle) is memory-mapped by torch's weights-only
unpickler and written as safetensors files (basemodel.layout), each tensor's bytes from its storage.
"""

from __future__ import annotations

import contextlib
import errno
import json
import math
import os
import re
import shutil
import struct
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from .backend.torch_backend import all_finite, read_exactly
from .basemodel import CARD_NAME, INDEX_NAME, BaseFile, Change, OutFile, layout, load_pickled
from .diagnostics import PemError, display_path, error
from .plan import PEFT_PREFIX, OutputPlan
from .types import TORCH_DTYPE_NAMES
from .writer import _dropped_lines, _fenced_text, _heading, _inputs_lines, _text, provenance_field

HEADER_ROOM = 1024  # spaces reserved in each header: the final provenance (the inputs' hashes) goes in last
COPY_CHUNK = 1 << 24  # bytes per copy_file_range call (and per read/write where the kernel cannot)
FLUSH_BYTES = 1 << 28  # bytes written to a file between flushes (see MergedModel._wrote)
BLOCK_ELEMENTS = 1 << 22  # elements of a LoRA-changed base tensor merged at a time (16 MiB in fp32)
TORCH_DTYPES = {name: getattr(torch, torch_name) for name, torch_name in TORCH_DTYPE_NAMES.items()}
_LORA_A, _LORA_B, _IA3 = ".lora_A.weight", ".lora_B.weight", ".ia3_l"


def shard_header(file: BaseFile | OutFile, meta: Mapping[str, str], length: int | None = None) -> bytes:
    """A weight file's header with `meta` added to its metadata: its tensors at their data offsets.
    Padded with spaces to `length` (an exact fit is required), or to a multiple of 8 with
    HEADER_ROOM to spare."""
    header: dict[str, Any] = {"__metadata__": {**file.metadata, **meta}}
    for name, info in file.tensors.items():
        header[name] = {"dtype": info.dtype, "shape": list(info.shape), "data_offsets": [info.begin, info.end]}
    text = json.dumps(header, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    if length is None:
        length = len(text) + HEADER_ROOM
        length += -(8 + length) % 8
    if len(text) > length:
        raise AssertionError("the final provenance does not fit the header's reserved room")
    return struct.pack("<Q", length) + text + b" " * (length - len(text))


def _copy_range(source: int, target: int, begin: int, end: int, shift: int,
                copied: Callable[[int], None] = lambda count: None) -> None:
    """Bytes [begin, end) of `source` to `target` at begin + shift: in the kernel where it can;
    `copied` is told each chunk's bytes as they land."""
    position = begin
    while position < end:
        count = min(COPY_CHUNK, end - position)
        try:
            kernel_copy = getattr(os, "copy_file_range", None)  # Linux's; elsewhere read and write
            done = kernel_copy(source, target, count, position, position + shift) if kernel_copy else 0
        except OSError as exc:
            if exc.errno not in (errno.EXDEV, errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP, errno.EPERM):
                raise
            done = 0
        if done == 0:  # another file system, or none of the kernel's help: read and write
            data = os.pread(source, count, position)
            if not data:
                raise OSError(errno.EIO, "the base model's file ended early")
            view = memoryview(data)
            offset = position + shift
            while view:
                written = os.pwrite(target, view, offset)
                view, offset = view[written:], offset + written
            done = len(data)
        copied(done)
        position += done


def _pwrite_all(fd: int, data: memoryview, offset: int) -> None:
    """Write all of `data` to `fd` at `offset`."""
    view = data.cast("B")
    while view:
        count = os.pwrite(fd, view, offset)
        view, offset = view[count:], offset + count


def _datasync(fd: int) -> None:
    """Put a file's data on disk: fdatasync, or fsync where there is none (macOS)."""
    getattr(os, "fdatasync", os.fsync)(fd)


def _within(tensor: torch.Tensor, dtype: torch.dtype) -> bool:
    """Whether every element of a float tensor is finite and within the range of `dtype` (so that it
    stays finite once cast); False also when it cannot say cheaply (an empty tensor says True)."""
    if tensor.numel() == 0:
        return True
    low, high = torch.aminmax(tensor)
    largest = torch.finfo(dtype).max
    return bool(-largest <= float(low)) and bool(float(high) <= largest)


class MergedModel:
    """One output merged into its base, written into its staging directory (see the module's
    docstring). `put` takes an output layer's tensors from the backend's sink (fp32, PEFT keys);
    `finish` writes the final headers, the base's other files and the model card."""

    def __init__(self, staging: Path, out: OutputPlan, meta: Mapping[str, str], destination: Path | None = None):
        assert out.into is not None
        self.base = out.into
        self.shards = out.shards or layout(self.base)
        self.staging = staging
        self.out = out
        self.destination = destination
        self.fan_in_fan_out = bool(out.config.get("fan_in_fan_out"))
        self.scalings = {step.key: step.scaling_out for step in out.layers}
        self.by_layer: dict[str, list[Change]] = {}
        for change in out.changes:
            self.by_layer.setdefault(change.layer, []).append(change)
        self.pending = {change.target for change in out.changes}
        self.placed = {name: number for number, file in enumerate(self.shards.files) for name in file.tensors}
        self.sources: list[int] = []  # the base's files, read (-1: a pickled one, in `self.pickled`)
        self.pickled: dict[int, dict[str, torch.Tensor]] = {}  # a pickled base file's tensors, memory-mapped
        self.targets: list[int] = []  # the written files
        self.starts: list[int] = []  # where each written file's data begins
        self.lengths: list[int] = []  # each written header's length (without its 8-byte prefix)
        self.unflushed: list[int] = []  # bytes written to each file since its last flush
        try:
            for file in self.base.files:
                self.sources.append(-1 if file.pickled else os.open(file.path, os.O_RDONLY))
            for file in self.shards.files:
                self._lay_out(file, meta)
        except BaseException:
            self.close()
            raise

    def _lay_out(self, file: OutFile, meta: Mapping[str, str]) -> None:
        """Create a written file with its full header, and copy every tensor the module leaves alone
        (the changed ones are written as their layers arrive): runs of tensors that lie one after
        the other in a base file and in this one are copied in one go."""
        target = os.open(self.staging / file.name, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
        self.targets.append(target)
        self.unflushed.append(0)
        written = len(self.targets) - 1

        def wrote(count: int) -> None:
            self._wrote(written, count)
        header = shard_header(file, meta)
        self.lengths.append(len(header) - 8)
        self.starts.append(len(header))
        os.ftruncate(target, len(header) + file.data_size)
        os.pwrite(target, header, 0)
        run: list[int] = []  # [source number, source begin, target begin, length]
        for info in sorted(file.tensors.values(), key=lambda t: t.begin):
            if info.key in self.pending:
                continue
            number = self.base.where[info.key]
            base_file = self.base.files[number]
            if base_file.pickled:  # its bytes from the tensor's storage
                _pwrite_all(target, self._pickled_bytes(number, info.key), len(header) + info.begin)
                self._wrote(written, info.nbytes)
                continue
            begin = base_file.data_start + base_file.tensors[info.key].begin
            if run and run[0] == number and run[1] + run[3] == begin and run[2] + run[3] == len(header) + info.begin:
                run[3] += info.nbytes
                continue
            if run:
                _copy_range(self.sources[run[0]], target, run[1], run[1] + run[3], run[2] - run[1], wrote)
            run = [number, begin, len(header) + info.begin, info.nbytes]
        if run:
            _copy_range(self.sources[run[0]], target, run[1], run[1] + run[3], run[2] - run[1], wrote)

    def _wrote(self, written: int, count: int) -> None:
        """Count bytes written to file `written`; every FLUSH_BYTES, put them on disk and let the page
        cache drop them. The written model's pages then stay a bounded part of memory however large
        the model is, and the next writes reuse the pages just freed: a fresh page for every byte
        written can cost more than the write (in a virtual machine that hands free memory back to
        its host), and the final fsync has only the last part left to write."""
        self.unflushed[written] += count
        if self.unflushed[written] >= FLUSH_BYTES:
            self.unflushed[written] = 0
            _datasync(self.targets[written])
            if hasattr(os, "posix_fadvise"):
                with contextlib.suppress(OSError):  # advice: a file system that does not take it loses nothing
                    os.posix_fadvise(self.targets[written], 0, 0, os.POSIX_FADV_DONTNEED)

    # -- the sink's side ---------------------------------------------------------------------------

    def put(self, tensors: Mapping[str, torch.Tensor], ready: Callable[[], None] | None = None) -> None:
        """Merge one output layer (its lora_A/lora_B, its (IA)3 vector, or a head tensor) into the
        base tensors it changes."""
        if ready is not None:
            ready()
        for key, tensor in tensors.items():
            name = key.removeprefix(PEFT_PREFIX)
            if name.endswith(_LORA_A):
                layer = name.removesuffix(_LORA_A)
                b = tensors[f"{PEFT_PREFIX}{layer}{_LORA_B}"]
                self._lora(layer, tensor, b)
            elif name.endswith(_IA3):
                self._ia3(name.removesuffix(_IA3), tensor)
            elif not name.endswith(_LORA_B):
                for change in self.by_layer.get(name, ()):
                    self._write(change.target, lambda weight, rows, head=tensor: head.to(torch.float32))

    def _lora(self, layer: str, a: torch.Tensor, b: torch.Tensor) -> None:
        scaling = self.scalings[layer]
        a, b = a.to(torch.float32), b.to(torch.float32)

        def add_delta(weight: torch.Tensor, rows: slice) -> torch.Tensor:
            """W + ΔW for rows of the weight as it is stored, in place, with ΔW as PEFT's
            get_delta_weight gives it, (B @ A) · s in fp32, transposed for a Conv1D (stored in×out):
            one fused product-and-add, no ΔW block of its own."""
            if self.fan_in_fan_out:
                return torch.addmm(weight, a[:, rows].T, b.T, alpha=scaling, out=weight)
            return torch.addmm(weight, b[rows], a, alpha=scaling, out=weight)

        for change in self.by_layer.get(layer, ()):
            self._write(change.target, add_delta, by_rows=True)

    def _ia3(self, layer: str, vector: torch.Tensor) -> None:
        scale = vector.to(torch.float32)
        for change in self.by_layer.get(layer, ()):
            if change.how == "ia3_bias":
                self._write(change.target, lambda bias, rows: bias.mul_(scale.reshape(bias.shape)))
            else:  # PEFT's merge: W · transpose(l, fan_in_fan_out), broadcast along the axis l spans
                self._write(change.target, lambda weight, rows: weight.mul_(scale.T if self.fan_in_fan_out else scale))

    def _write(self, target: str, merge: Callable[[torch.Tensor, slice], torch.Tensor], by_rows: bool = False) -> None:
        """Read the base tensor `target`, apply `merge` to it in fp32, cast once to its dtype and write
        it. With `by_rows`, block by block of rows (`merge` gets the block and its rows), so that
        memory holds BLOCK_ELEMENTS of the tensor rather than several copies of all of it."""
        number = self.base.where[target]
        file = self.base.files[number]
        info = file.tensors[target]
        dtype = TORCH_DTYPES[info.dtype]
        shape = tuple(info.shape)
        pieces = [(0, info.nbytes, shape, slice(None))]  # (offset in the tensor, bytes, shape, rows)
        if by_rows and len(shape) >= 2 and info.nbytes:
            row_bytes = info.nbytes // shape[0]
            per_block = max(1, BLOCK_ELEMENTS // math.prod(shape[1:]))
            pieces = [(start * row_bytes, (stop - start) * row_bytes, (stop - start, *shape[1:]), slice(start, stop))
                      for start in range(0, shape[0], per_block) for stop in [min(start + per_block, shape[0])]]
        written = self.placed[target]
        start_of_tensor = self.starts[written] + self.shards.files[written].tensors[target].begin
        for begin, size, block, rows in pieces:
            data = self._buffer("read", size, torch.uint8)  # reused: a fresh block costs its page faults
            if file.pickled:
                if size:
                    data.copy_(torch.frombuffer(self._pickled_bytes(number, target)[begin:begin + size], dtype=torch.uint8))
            else:
                read_exactly(self.sources[number], data.numpy().data.cast("B"), file.data_start + info.begin + begin,
                             f"{file.path.name} ended early")
            weight = data.view(dtype).reshape(block)
            wide = self._buffer("fp32", math.prod(block), torch.float32).view(block)
            wide.copy_(weight)
            merged = merge(wide, rows)
            # Finite in the weight's dtype for sure when the fp32 result's range is within it (one
            # fast pass over fp32; a sum over bf16 was a third of the merge); otherwise looked at exactly.
            surely_finite = _within(merged, dtype)
            if dtype != torch.float32:
                merged = self._buffer("cast", math.prod(block), dtype).view(block).copy_(merged)
            merged = merged.contiguous()
            if not surely_finite and not all_finite([merged]) and all_finite([weight]):
                raise PemError([error(
                    "E027", f"the merged {target} is not finite in {info.dtype}",
                    notes=[f"{display_path(self.base.path)}: W + ΔW exceeds the largest {info.dtype} number"],
                    hints=["use smaller coefficients, or merge into a base of a wider dtype; nothing was written"])])
            _pwrite_all(self.targets[written], memoryview(merged.reshape(-1).view(torch.uint8).numpy()),
                        start_of_tensor + begin)
            self._wrote(written, size)
        self.pending.discard(target)

    def _pickled_bytes(self, number: int, name: str) -> memoryview:
        """The bytes of tensor `name` of pickled base file `number`, as safetensors stores them
        (contiguous, little-endian): a view of its memory-mapped storage where it is contiguous."""
        if number not in self.pickled:
            self.pickled[number] = load_pickled(self.base.files[number].path)
        tensor = self.pickled[number][name].contiguous()
        return memoryview(tensor.reshape(-1).view(torch.uint8).numpy())

    def _buffer(self, name: str, count: int, dtype: torch.dtype) -> torch.Tensor:
        """A flat work buffer of `count` elements, reused from block to block and tensor to tensor."""
        buffers: dict[str, torch.Tensor] = self.__dict__.setdefault("_buffers", {})
        buffer = buffers.get(name)
        if buffer is None or buffer.numel() < count or buffer.dtype != dtype:
            buffer = buffers[name] = torch.empty(max(count, 1), dtype=dtype)
        return buffer[:count]

    # -- the end -----------------------------------------------------------------------------------

    def finish(self, config: Mapping[str, Any], meta: Mapping[str, str]) -> None:
        """The final headers (with the inputs' hashes), the base's other files, the model card; all
        flushed to disk. `config` (the adapter's) is not written: a merged model has the base's."""
        if self.pending:
            raise AssertionError(f"{len(self.pending)} base tensors were never merged, e.g. {sorted(self.pending)[0]}")
        for number, file in enumerate(self.shards.files):
            os.pwrite(self.targets[number], shard_header(file, meta, self.lengths[number]), 0)
            os.fsync(self.targets[number])
        self.close()
        for source in self.base.other_files():
            if self.shards.max_shard_size is not None and source.name == INDEX_NAME:
                continue  # resharded: the base's index names other files
            shutil.copyfile(source, self.staging / source.name)
        if self.shards.new_index:
            (self.staging / self.shards.index).write_text(json.dumps(self.shards.index_json(), indent=2) + "\n",
                                                          encoding="utf-8")
        architectures = self.base.config.get("architectures") or []
        (self.staging / CARD_NAME).write_text(
            merged_card(self.base.identity.name or config.get("base_model_name_or_path"),
                        architectures if isinstance(architectures, list) else [], meta),
            encoding="utf-8")
        for entry in os.scandir(self.staging):
            with open(entry.path, "rb") as f:
                os.fsync(f.fileno())

    def close(self) -> None:
        for fd in self.sources + self.targets:
            if fd >= 0:
                os.close(fd)
        self.sources, self.targets, self.pickled = [], [], {}


def merge_metadata(meta: Mapping[str, str], out: OutputPlan) -> dict[str, str]:
    """The provenance of a merged model's files: the adapter's (program, inputs, params) and the
    base it was merged into, as written and as identified."""
    assert out.into is not None
    identity = out.into.identity
    return {**meta, "pemlang.into": out.into.written,
            "pemlang.base_model": (identity.name or out.config.get("base_model_name_or_path") or "")
            + (f"@{identity.revision}" if identity.revision else "")}


def merged_card(base: str | None, architectures: Sequence[str], meta: Mapping[str, str]) -> str:
    """The model card of a model merged into its base (`output x into "BASE" -> "DIR"`): YAML front
    matter (base_model, tags pemlang and merge), what was merged — the program, each input with its
    sha256, the params — the base it went into, and how to load it with transformers."""
    import yaml

    def fenced(text: str) -> list[str]:
        longest = max((len(run) for run in re.findall(r"`+", text)), default=0)
        fence = "`" * max(3, longest + 1)
        return [fence, _fenced_text(text), fence]

    front: dict[str, Any] = {}
    if base:
        front["base_model"] = base
    front["library_name"] = "transformers"
    front["tags"] = ["pemlang", "merge"]
    into = meta.get("pemlang.into", "")
    lines = ["---", yaml.safe_dump(front, sort_keys=False, allow_unicode=True).rstrip(), "---", "",
             f"# {_heading(meta)}", "",
             f"A model made by [pemlang](https://github.com/pemlang/pemlang) {meta.get('pemlang.version', '')}: "
             f"the base model {_text(base or into)} with the adapter arithmetic below "
             f"({meta.get('pemlang.mode', 'paper')} mode) merged into its weights:", "",
             *fenced(meta.get("pemlang.expression", "")), ""]
    params = provenance_field(meta, "pemlang.params", {})
    if params:
        lines += ["Params: " + ", ".join(f"`{k} = {v}`" for k, v in params.items()) + ".", ""]
    lines += _dropped_lines(meta)
    lines += _inputs_lines(meta)
    lines += [f"Merged into {_text(into)}" + (f" ({_text(base)})" if base and base != into else "") + ": W + ΔW for "
              "each LoRA layer (ΔW in fp32, cast once to the weight's dtype), (IA)3 vectors multiplied in, heads "
              "replaced; every other tensor and file is the base's, byte for byte.", ""]
    program = meta.get("pemlang.program", "")
    if program:
        lines += ["The program:", "", *fenced(program.rstrip("\n")), ""]
    loader = next((a for a in architectures if isinstance(a, str) and a.isidentifier()), None)
    lines += ["Load it with transformers:", "", "```python",
              f"from transformers import {loader or 'AutoModel'}", "",
              f'model = {loader or "AutoModel"}.from_pretrained("path/to/this/directory")', "```", "",
              "`pemlang inspect` on this directory shows the same provenance, which is also recorded in the "
              "safetensors header of every weight file.", ""]
    return "\n".join(lines)
