"""Reading a base model directory for `output x into "BASE" -> "DIR"`: config.json and
the safetensors headers of its weight files, never a tensor (pickled `.bin` weights, allowed with
--allow-pickle, are memory-mapped: their tensors' names, dtypes and shapes without their data). What the checker needs to decide
whether a module fits the base (which tensor each adapted layer changes, of what shape), and what
the merging writer needs to lay out every output shard before anything is computed.
"""

from __future__ import annotations

import json
import os
import pickle
import re
import stat
import zipfile
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from .adapters import AdapterError, TensorInfo, read_safetensors_header
from .diagnostics import display_path
from .suggest import near_directory
from .types import FLOAT_DTYPES, BaseModelRef, Head, Ia3Layer, LoraLayer, ModuleType

CONFIG_NAME = "config.json"
INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"
PICKLE_NAMES = ("pytorch_model.bin", "pytorch_model.bin.index.json")
PICKLE_INDEX_NAME = "pytorch_model.bin.index.json"
CARD_NAME = "README.md"
MAX_CONFIG_BYTES = 16 * 1024 * 1024
# Weight files of other formats that a merged model must not carry over unchanged (they would hold
# the unmerged weights): never copied.
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".h5", ".msgpack", ".gguf", ".onnx")

# The tensors a base ties together when `tie_word_embeddings` is on: the output embedding is the
# input embedding (transformers saves one of them). Changing one changes both.
OUTPUT_EMBEDDINGS = ("lm_head", "cls.predictions.decoder", "embed_out", "lm_head.decoder")
INPUT_EMBEDDINGS = ("embed_tokens", "wte", "word_embeddings", "embed_in", "shared", "tok_embeddings")


class BaseModelError(AdapterError):
    """A base model cannot be used: a diagnostic code, message, notes and hints (as an adapter that
    cannot be read carries them)."""


@dataclass(frozen=True)
class BaseFile:
    """One weight file of the base: its header, where its data starts, its size."""

    path: Path
    tensors: dict[str, TensorInfo]
    metadata: dict[str, str]
    data_start: int
    size: int
    # A pickled `.bin` file (--allow-pickle): `tensors` place them one after the other as a
    # safetensors file would (begin/end are offsets in the written file, not in this one)
    pickled: bool = False


@dataclass(frozen=True)
class BaseModel:
    """A model directory: config.json, its safetensors weight files (one, or shards named by an
    index), and every tensor's place."""

    path: Path
    written: str  # as the program wrote it
    config: dict[str, Any]
    files: tuple[BaseFile, ...]
    index: str | None  # the index file's name, when the weights are sharded
    where: dict[str, int] = field(repr=False)  # tensor name → index into `files`
    identity: BaseModelRef = BaseModelRef(None)

    @property
    def nbytes(self) -> int:
        """The size of every weight file together (what the merged model's weights take)."""
        return sum(f.size for f in self.files)

    @property
    def pickled(self) -> bool:
        """Whether the weights are pickled `.bin` files (written as safetensors when merged)."""
        return any(f.pickled for f in self.files)

    @property
    def tied(self) -> bool:
        """Whether the base ties its output embedding to its input embedding (transformers' default
        when config.json does not say)."""
        return self.config.get("tie_word_embeddings", True) is not False

    def tensor(self, name: str) -> TensorInfo | None:
        index = self.where.get(name)
        return None if index is None else self.files[index].tensors[name]

    def other_files(self) -> list[Path]:
        """The base's own files that the merged model carries unchanged (config, generation config,
        tokenizer, the index…): regular files at the top level, neither weights nor its model card."""
        weights = {f.path.name for f in self.files}
        kept = []
        for entry in sorted(self.path.iterdir()):
            name = entry.name
            if (name.startswith(".") or name in weights or name == CARD_NAME or name.endswith(WEIGHT_SUFFIXES)
                    or name.endswith(".bin.index.json")):  # names pickled files the merged model has not
                continue
            if stat.S_ISREG(entry.stat().st_mode):
                kept.append(entry)
        return kept


def _is_file(path: Path) -> bool:
    """Whether `path` is a regular file (after links); False also where it cannot be looked at (a
    name too long, a directory without permission: pathlib's is_file raises there)."""
    try:
        return stat.S_ISREG(path.stat().st_mode)
    except (OSError, ValueError):
        return False


def _read_json(path: Path, what: str) -> Any:
    try:
        with path.open("rb") as f:
            raw = f.read(MAX_CONFIG_BYTES + 1)
    except OSError as exc:
        raise BaseModelError("E035", f"cannot read the base model's {what}",
                             notes=[f"{display_path(path)}: {exc.strerror}"]) from None
    if len(raw) > MAX_CONFIG_BYTES:
        raise BaseModelError("E035", f"the base model's {what} is larger than {MAX_CONFIG_BYTES // 2**20} MiB",
                             notes=[display_path(path)])
    try:
        return json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise BaseModelError("E035", f"the base model's {what} is not valid JSON",
                             notes=[f"{display_path(path)}: {exc}"]) from None


def _quantization(config: Mapping[str, Any]) -> str | None:
    """The quantization method a config records (`bitsandbytes 4-bit`, `gptq`, `awq`…), if any."""
    quant = config.get("quantization_config")
    if quant is None:
        return None
    if isinstance(quant, dict):
        method = str(quant.get("quant_method") or "unknown")
        if quant.get("load_in_4bit"):
            method += " 4-bit"
        elif quant.get("load_in_8bit"):
            method += " 8-bit"
        return method
    return "unknown"


_HF_SNAPSHOT = re.compile(r"(?:^|/)models--[^/]+/snapshots/[0-9a-f]{40}$")


def identity(path: Path, config: Mapping[str, Any], hub_id: str | None = None) -> BaseModelRef:
    """Which model a base directory is, as far as it says: a Hub id resolved here, a
    snapshot of the Hugging Face cache (`org/name` at its commit), or the `_name_or_path` its
    config.json records; not recorded otherwise (a plain local directory)."""
    if hub_id is not None:
        name, _, revision = hub_id.partition("@")
        return BaseModelRef(name, revision or None)
    text = str(path).replace("\\", "/")
    if _HF_SNAPSHOT.search(text):
        return BaseModelRef.from_config(text, None)
    recorded = config.get("_name_or_path")
    return BaseModelRef.from_config(recorded if isinstance(recorded, str) else None, None)


def read_base(path: Path, written: str, *, hub_id: str | None = None, allow_pickle: bool = False) -> BaseModel:
    """Read a base model directory's config and weight headers; BaseModelError when it cannot be
    merged into (missing or damaged files, a quantized base, a pickled one unless `allow_pickle`)."""
    try:
        mode = path.stat().st_mode
    except OSError:
        near = near_directory(path)
        raise BaseModelError("E035", "base model directory not found",
                             notes=[f"no such directory: {display_path(path)}"],
                             hints=[f"did you mean {display_path(near)}?"] if near is not None else []) from None
    if not stat.S_ISDIR(mode):
        raise BaseModelError("E035", "the base model is not a directory", notes=[display_path(path)],
                             hints=["a base model is a directory written by transformers' save_pretrained "
                                    "(config.json and *.safetensors)"])
    config_path = path / CONFIG_NAME
    if not _is_file(config_path):
        raise BaseModelError("E035", f"no {CONFIG_NAME} in the base model directory",
                             notes=[f"looked for {display_path(config_path)}"],
                             hints=["a base model is a directory written by transformers' save_pretrained"])
    config = _read_json(config_path, CONFIG_NAME)
    if not isinstance(config, dict):
        raise BaseModelError("E035", f"the base model's {CONFIG_NAME} is not a JSON object",
                             notes=[display_path(config_path)])
    quantized = _quantization(config)
    if quantized is not None:
        raise BaseModelError("E036", f"the base model is quantized ({quantized}): pemlang merges into full-precision "
                             "weights only", notes=[f"{display_path(config_path)} has a quantization_config"],
                             hints=["merge into the unquantized base model, then quantize the merged model"])
    pickled = False
    index_name: str | None = None
    if _is_file(path / INDEX_NAME):
        names, weight_map = _index(path, INDEX_NAME)
        index_name = INDEX_NAME
    elif _is_file(path / SINGLE_NAME):
        names, weight_map = [SINGLE_NAME], {}
    else:
        found = [n for n in PICKLE_NAMES if _is_file(path / n)]
        if not found:
            raise BaseModelError("E035", "the base model has no safetensors weights",
                                 notes=[f"{display_path(path)} has neither {SINGLE_NAME} nor {INDEX_NAME}"])
        if not allow_pickle:
            convert = ("convert the base once: AutoModel.from_pretrained(BASE).save_pretrained(NEW_DIR) writes "
                       "safetensors")
            raise BaseModelError("E023", f"the base model's weights are pickled ({found[0]}): pemlang merges into "
                                 "safetensors weights only", notes=[display_path(path / found[0])],
                                 hints=[convert + " (a Hub base's pickled weights are not used, even with "
                                        "--allow-pickle)"] if hub_id is not None else
                                 [convert, "or pass --allow-pickle (allow_pickle=True in the API) if you trust the "
                                  "files; the merged model is written as safetensors"])
        pickled = True
        if _is_file(path / PICKLE_INDEX_NAME):
            names, weight_map = _index(path, PICKLE_INDEX_NAME)
            index_name = PICKLE_INDEX_NAME
        else:
            names, weight_map = [PICKLE_NAMES[0]], {}
    files: list[BaseFile] = []
    where: dict[str, int] = {}
    for name in names:
        file_path = path / name
        if not _is_file(file_path):
            raise BaseModelError("E035", f"the base model's weight file {name} is missing",
                                 notes=[f"{index_name} names it; no such file: {display_path(file_path)}"]
                                 if index_name else [display_path(file_path)],
                                 hints=["the download is incomplete: fetch the base model again"])
        if pickled:
            files.append(_pickled_file(file_path))
            tensors = files[-1].tensors
        else:
            files.append(_safetensors_file(file_path, name))
            tensors = files[-1].tensors
        number = len(files) - 1
        for tensor in tensors:
            if tensor in where:
                raise BaseModelError("E035", f"tensor {tensor} is in two of the base model's weight files",
                                     notes=[f"{files[where[tensor]].path.name} and {name}"])
            where[tensor] = number
    for tensor, name in weight_map.items():
        if tensor not in where or files[where[tensor]].path.name != name:
            raise BaseModelError("E035", f"the base model's {index_name} places {tensor} in {name}, which does not "
                                 "hold it", notes=[display_path(path / name)],
                                 hints=["the index and the shards are from different downloads: fetch the base "
                                        "model again"])
    return BaseModel(path, written, config, tuple(files), index_name, where, identity(path, config, hub_id))


def _index(path: Path, index_name: str) -> tuple[list[str], dict[str, str]]:
    """The weight files an index names, and its weight_map."""
    index_path = path / index_name
    index = _read_json(index_path, index_name)
    weight_map = index.get("weight_map") if isinstance(index, dict) else None
    if not isinstance(weight_map, dict) or not all(isinstance(k, str) and isinstance(v, str)
                                                   for k, v in weight_map.items()):
        raise BaseModelError("E035", f"the base model's {index_name} has no weight_map of tensor names to files",
                             notes=[display_path(index_path)])
    names = sorted(set(weight_map.values()))
    for name in names:
        if "/" in name or "\\" in name or name in (".", ".."):
            raise BaseModelError("E035", f"the base model's {index_name} names a file outside the directory",
                                 notes=[f"{display_path(index_path)}: {name!r}"])
    return names, weight_map


def _safetensors_file(file_path: Path, name: str) -> BaseFile:
    """A safetensors weight file's header, checked against the file's size."""
    try:
        tensors, metadata, data_start, size = read_safetensors_header(file_path)
    except AdapterError as exc:
        raise BaseModelError("E035", f"the base model's {exc.message}", notes=exc.notes,
                             hints=["the file is damaged (an interrupted download?): fetch the base model again"]
                             ) from None
    expected = data_start + max((t.end for t in tensors.values()), default=0)
    if expected > size:
        raise BaseModelError("E035", f"the base model's weight file {name} is truncated",
                             notes=[f"{display_path(file_path)}: the header promises {expected} bytes, "
                                    f"the file has {size}"],
                             hints=["the file was cut off (an interrupted copy or download?): fetch it again"])
    return BaseFile(file_path, tensors, metadata, data_start, size)


def load_pickled(file_path: Path) -> dict[str, Any]:
    """A pickled state dict (`pytorch_model*.bin`) with torch's weights-only unpickler: memory-mapped
    (tensors read when used) unless the file is in the legacy pre-zip format, which is read whole.
    BaseModelError when it is not a state dict of named tensors."""
    import torch

    try:
        mmap = zipfile.is_zipfile(file_path)
        state = torch.load(file_path, map_location="cpu", weights_only=True, mmap=mmap)
    except Exception as exc:  # noqa: BLE001 — torch reports a damaged or hostile pickle in many ways
        raise BaseModelError("E035", f"the base model's weight file {file_path.name} cannot be read as PyTorch "
                             "weights", notes=[f"{display_path(file_path)}: {_load_failure(exc)}"],
                             hints=["the file is damaged, or holds objects that are not tensors (which could run code "
                                    "when unpickled, and are never loaded): fetch the base model again"]) from None
    odd = (f"it holds a {type(state).__name__}" if not isinstance(state, dict) else
           next((f"{k!r} is a {type(v).__name__}, not a dense tensor" for k, v in state.items()
                 if not isinstance(k, str) or not isinstance(v, torch.Tensor) or v.layout != torch.strided), None))
    if odd is not None:
        raise BaseModelError("E035", f"the base model's weight file {file_path.name} is not a state dict of "
                             "named tensors", notes=[f"{display_path(file_path)}: {odd}"])
    return state


def _load_failure(exc: Exception) -> str:
    """What torch.load says went wrong, without its advice to load with weights_only=False."""
    from .diagnostics import first_line

    paragraphs = [p.strip() for p in str(exc).split("\n\n") if p.strip()]
    told = [p for p in paragraphs if not p.startswith(("Weights only load failed", "Check the documentation",
                                                          "Please file an issue", "In PyTorch"))]
    if isinstance(exc, pickle.UnpicklingError) and told:
        return "torch's weights-only unpickler refused it: " + " ".join(told[-1].split())[:300]
    return first_line(exc)


def _safetensors_dtype(dtype: Any) -> str | None:
    import torch

    names = {torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
             torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
             torch.bool: "BOOL", torch.float8_e4m3fn: "F8_E4M3", torch.float8_e5m2: "F8_E5M2"}
    return names.get(dtype)


def _pickled_file(file_path: Path) -> BaseFile:
    """A pickled weight file's tensors (names, dtypes, shapes: the data stays on disk), placed one
    after the other in the state dict's order as the safetensors file they become."""
    state = load_pickled(file_path)
    tensors: dict[str, TensorInfo] = {}
    position = 0
    for key, tensor in state.items():
        dtype = _safetensors_dtype(tensor.dtype)
        if dtype is None:
            raise BaseModelError("E035", f"the base model's tensor {key} is {tensor.dtype}, which safetensors cannot "
                                 "hold", notes=[display_path(file_path)])
        nbytes = tensor.numel() * tensor.element_size()
        tensors[key] = TensorInfo(key, dtype, tuple(tensor.shape), position, position + nbytes)
        position += nbytes
    return BaseFile(file_path, tensors, {"format": "pt"}, 0, os.stat(file_path).st_size, pickled=True)


# -- the merged model's weight files -----------------------------------------------------------------


@dataclass(frozen=True)
class OutFile:
    """One weight file of a merged model: its name, its tensors at their data offsets in it, and the
    metadata its header starts from (pemlang's provenance is added to it)."""

    name: str
    tensors: dict[str, TensorInfo]
    metadata: dict[str, str]

    @property
    def data_size(self) -> int:
        return max((t.end for t in self.tensors.values()), default=0)


@dataclass(frozen=True)
class Layout:
    """The weight files a merged model is written as: the base's own (same names, same tensors at
    the same offsets, so its index holds), or new shards of at most `max_shard_size` bytes each,
    in the base's tensor order, with an index of their own when there are several."""

    files: tuple[OutFile, ...]
    index: str | None  # the index file of the written model (None: a single model.safetensors)
    max_shard_size: int | None = None  # resharded: the base's index is not copied, a new one is written
    converted: bool = False  # from pickled weights: safetensors files of their own, a new index if sharded

    @property
    def new_index(self) -> bool:
        """Whether the written model's index is written anew (the base's names other files)."""
        return self.index is not None and (self.max_shard_size is not None or self.converted)

    @property
    def nbytes(self) -> int:
        """The bytes of every tensor together (the headers add a few KiB per file)."""
        return sum(f.data_size for f in self.files)

    def index_json(self) -> dict[str, Any]:
        """The index of resharded weights, as transformers writes it."""
        return {"metadata": {"total_size": self.nbytes},
                "weight_map": {name: f.name for f in self.files for name in sorted(f.tensors)}}


def layout(base: BaseModel, max_shard_size: int | None = None) -> Layout:
    """The weight files of `base` merged: its own, or (with `max_shard_size`) new shards filled in
    the base's tensor order, a tensor larger than the size alone in its shard, as transformers'
    save_pretrained shards; one shard is `model.safetensors`, several `model-0000i-of-0000n.safetensors`.
    Pickled weights become safetensors files of the same tensors, one per base file, so named."""
    if max_shard_size is None and base.pickled:
        count = len(base.files)
        return Layout(tuple(OutFile(SINGLE_NAME if count == 1 else f"model-{number:05d}-of-{count:05d}.safetensors",
                                    f.tensors, f.metadata) for number, f in enumerate(base.files, 1)),
                      INDEX_NAME if count > 1 else None, converted=True)
    if max_shard_size is None:
        return Layout(tuple(OutFile(f.path.name, f.tensors, f.metadata) for f in base.files), base.index)
    groups: list[list[TensorInfo]] = [[]]
    size = 0
    for file in base.files:
        for info in sorted(file.tensors.values(), key=lambda t: t.begin):
            if groups[-1] and size + info.nbytes > max_shard_size:
                groups.append([])
                size = 0
            groups[-1].append(info)
            size += info.nbytes
    meta = {**(base.files[0].metadata if base.files else {}), "format": "pt"}
    files = []
    for number, group in enumerate(groups, 1):
        name = SINGLE_NAME if len(groups) == 1 else f"model-{number:05d}-of-{len(groups):05d}.safetensors"
        tensors, position = {}, 0
        for info in group:
            tensors[info.key] = TensorInfo(info.key, info.dtype, info.shape, position, position + info.nbytes)
            position += info.nbytes
        files.append(OutFile(name, tensors, meta))
    return Layout(tuple(files), INDEX_NAME if len(groups) > 1 else None, max_shard_size, base.pickled)


def merge_summary(base: BaseModel, changes: Iterable[Change], shards: Layout | None = None,
                  files_shown: int = 8) -> list[str]:
    """What merging into `base` writes, read from headers only (`check`, `plan`): the weight files
    with their sizes and how many of their tensors change, and the changed tensors, grouped by
    block (`model.layers.[0-1].self_attn.q_proj.weight`)."""
    from .formatting import compact_indices, human_bytes

    shards = shards or layout(base)
    changed = {c.target for c in changes}
    count = sum(len(f.tensors) for f in shards.files)
    plural = "s" if len(shards.files) != 1 else ""
    how = f"resharded at {human_bytes(shards.max_shard_size)}" if shards.max_shard_size else "as the base is"
    if base.pickled:
        how += "; safetensors, from the base's pickled weights"
    lines = [f"writes {len(shards.files)} weight file{plural} ({how}), {human_bytes(shards.nbytes)} of tensors; "
             f"{len(changed)} of {count} tensors change, every other is copied byte for byte"]
    for f in shards.files[:files_shown]:
        lines.append(f"  {f.name}: {human_bytes(f.data_size)}, {len(changed & f.tensors.keys())} of "
                     f"{len(f.tensors)} tensors change")
    if len(shards.files) > files_shown:
        lines.append(f"  … and {len(shards.files) - files_shown} more")
    groups: dict[str, list[int]] = {}
    for name in sorted(changed):
        match = re.search(r"\.(\d+)\.", name)
        pattern = name[: match.start(1)] + "{}" + name[match.end(1):] if match else name
        groups.setdefault(pattern, []).extend([int(match.group(1))] if match else [])
    shown = [p.format(f"[{compact_indices(i)}]" if len(set(i)) > 1 else i[0]) if i else p for p, i in groups.items()]
    lines.append("changes: " + (", ".join(shown) if shown else "nothing"))
    return lines


# -- what a module changes in a base ---------------------------------------------------------------


@dataclass(frozen=True)
class Change:
    """One base tensor that merging a layer or head changes."""

    target: str  # the base tensor's name
    layer: str  # the layer key (LoRA, (IA)3) or head key the change comes from
    how: Literal["lora", "ia3", "ia3_bias", "head"]


@dataclass(frozen=True)
class Misfit:
    """Why a layer or head does not fit the base."""

    kind: Literal["missing", "shape", "tied", "dtype"]
    layer: str
    target: str
    expected: tuple[int, ...] = ()
    found: tuple[int, ...] = ()
    dtype: str = ""


def _target(base: BaseModel, key: str) -> str | None:
    """The base tensor a module path's `.weight` is: its own name, or without the first component
    (a base saved from the inner model: `h.0.attn.c_attn` for `transformer.h.0.attn.c_attn`)."""
    for candidate in (key, key.split(".", 1)[1] if "." in key else None):
        if candidate is not None and base.tensor(f"{candidate}.weight") is not None:
            return candidate
    return None


def _tied_name(base: BaseModel, module: str) -> bool:
    if not base.tied:
        return False
    names = OUTPUT_EMBEDDINGS + INPUT_EMBEDDINGS
    return any(module == n or module.endswith("." + n) for n in names)


def _lora_shape(layer: LoraLayer) -> tuple[int, int]:
    return (layer.in_features, layer.out_features) if layer.fan_in_fan_out else (layer.out_features, layer.in_features)


def ia3_axis(layer: Ia3Layer, fan_in_fan_out: bool) -> int:
    """The axis of the base weight that an (IA)3 vector scales, as PEFT merges it: the input axis
    of a feed-forward layer, the output axis otherwise; a Conv1D weight (`fan_in_fan_out`) is
    stored in×out, so the axes swap."""
    axis = 1 if layer.feedforward else 0
    return 1 - axis if fan_in_fan_out else axis


def _ia3_expected(layer: Ia3Layer, shape: tuple[int, ...], fan_in_fan_out: bool) -> tuple[int, ...]:
    """The weight shape the vector fits, with the other axis taken from the base (which it leaves free)."""
    size = max(layer.shape)
    axis = ia3_axis(layer, fan_in_fan_out)
    other = shape[1 - axis] if len(shape) == 2 else 0
    return (size, other) if axis == 0 else (other, size)


def changes(base: BaseModel, module: ModuleType, *, fan_in_fan_out: bool = False) -> tuple[list[Change], list[Misfit]]:
    """The base tensors that merging `module` changes, and the layers or heads that do not fit it:
    missing from the base, of another shape, or on a tensor the base ties to another.
    `fan_in_fan_out`: an (IA)3 module's (its config's), for the axis its vectors scale."""
    found: list[Change] = []
    misfits: list[Misfit] = []
    for key, layer in sorted(module.layers.items()):
        prefix = _target(base, key)
        if _tied_name(base, key):
            misfits.append(Misfit("tied", key, f"{prefix or key}.weight"))
            continue
        if prefix is None:
            misfits.append(Misfit("missing", key, f"{key}.weight"))
            continue
        info = base.tensor(f"{prefix}.weight")
        assert info is not None
        if info.dtype not in FLOAT_DTYPES:
            misfits.append(Misfit("dtype", key, info.key, dtype=info.dtype))
            continue
        if isinstance(layer, LoraLayer):
            if info.shape != _lora_shape(layer):
                misfits.append(Misfit("shape", key, info.key, _lora_shape(layer), info.shape))
                continue
            found.append(Change(info.key, key, "lora"))
        else:
            expected = _ia3_expected(layer, info.shape, fan_in_fan_out)
            if info.shape != expected:
                misfits.append(Misfit("shape", key, info.key, expected, info.shape))
                continue
            bias = base.tensor(f"{prefix}.bias")
            if bias is not None and not layer.feedforward:  # PEFT scales the bias of a non-feed-forward layer too
                if bias.dtype not in FLOAT_DTYPES:
                    misfits.append(Misfit("dtype", key, bias.key, dtype=bias.dtype))
                    continue
                if bias.shape != (max(layer.shape),):  # one scale per output feature
                    misfits.append(Misfit("shape", key, bias.key, (max(layer.shape),), bias.shape))
                    continue
            found.append(Change(info.key, key, "ia3"))
            if bias is not None and not layer.feedforward:
                found.append(Change(bias.key, key, "ia3_bias"))
    for key, head in sorted(module.heads.items()):
        found_head = _head_target(base, head)
        if _tied_name(base, head.key.rsplit(".", 1)[0]):
            misfits.append(Misfit("tied", key, found_head or head.key))
            continue
        info = base.tensor(found_head) if found_head else None
        if info is None:
            misfits.append(Misfit("missing", key, head.key))
        elif info.shape != head.shape:
            misfits.append(Misfit("shape", key, info.key, head.shape, info.shape))
        elif info.dtype not in FLOAT_DTYPES:
            misfits.append(Misfit("dtype", key, info.key, dtype=info.dtype))
        else:
            found.append(Change(info.key, key, "head"))
    return found, misfits


def _head_target(base: BaseModel, head: Head) -> str | None:
    for candidate in (head.key, head.key.split(".", 1)[1] if "." in head.key else None):
        if candidate is not None and base.tensor(candidate) is not None:
            return candidate
    return None

