"""Reading PEFT adapters: `adapter_config.json` + the safetensors header → a ModuleType.

Type checking never reads tensor data: the signature comes from the JSON config and the
safetensors header (an 8-byte length and a JSON table of dtypes, shapes and offsets). Tensors
are read later, one at a time, by the backend (`Adapter.tensor`).
"""

from __future__ import annotations

import json
import math
import os
import re
import stat
import struct
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .diagnostics import display_path
from .suggest import near_directory
from .types import (
    DTYPE_SIZES,
    FLOAT_DTYPES,
    BaseModelRef,
    Head,
    Ia3Layer,
    Kind,
    Layer,
    LoraLayer,
    ModuleType,
)

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
PICKLE_NAME = "adapter_model.bin"
PEFT_PREFIX = "base_model.model."
# E011's feature for LoRA on embedding layers (`lora_embedding_A/B`); its headline names it.
EMBEDDING_LORA = "LoRA on embeddings"
MAX_HEADER_BYTES = 100 * 1024 * 1024
MAX_CONFIG_BYTES = 16 * 1024 * 1024  # adapter_config.json is read at most this far

_PEFT_TYPE_NAMES = {
    "ADALORA": "AdaLoRA", "LOHA": "LoHa", "LOKR": "LoKr", "OFT": "OFT", "BOFT": "BOFT",
    "PROMPT_TUNING": "prompt tuning", "PREFIX_TUNING": "prefix tuning", "P_TUNING": "p-tuning",
    "MULTITASK_PROMPT_TUNING": "multitask prompt tuning", "VERA": "VeRA", "FOURIERFT": "FourierFT",
    "VBLORA": "VB-LoRA", "HRA": "HRA", "BONE": "Bone", "LN_TUNING": "LayerNorm tuning",
    "POLY": "Poly", "XLORA": "X-LoRA", "ADAPTION_PROMPT": "adaption prompt", "RANDLORA": "RandLoRA",
}
# Config fields that change what a LoRA adapter computes beyond ΔW = s·B·A.
_UNSUPPORTED_LORA_FIELDS = {
    "use_dora": "DoRA (use_dora)",
    "lora_bias": "LoRA bias (lora_bias)",
    "use_qalora": "QA-LoRA (use_qalora)",
    "use_bdlora": "BD-LoRA (use_bdlora)",
    "target_parameters": "LoRA on parameters (target_parameters)",
    "trainable_token_indices": "trainable tokens (trainable_token_indices)",
    "layer_replication": "layer replication (layer_replication)",
    "arrow_config": "Arrow routing (arrow_config)",
    "kasa_config": "KaSA (kasa_config)",
    "velora_config": "VeLoRA (velora_config)",
    "monteclora_config": "MonteCLoRA (monteclora_config)",
    "megatron_config": "Megatron layers (megatron_config)",
}


class AdapterError(Exception):
    """An adapter cannot be read: carries a diagnostic code, message, notes and hints."""

    def __init__(self, code: str, message: str, notes: Iterable[str] = (), hints: Iterable[str] = ()):
        super().__init__(message)
        self.code = code
        self.message = message
        self.notes = tuple(notes)
        self.hints = tuple(hints)


@dataclass(frozen=True, slots=True)
class TensorInfo:
    """One entry of a safetensors header."""

    key: str
    dtype: str
    shape: tuple[int, ...]
    begin: int
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.begin


@dataclass(frozen=True)
class Adapter:
    """A PEFT adapter directory, its type, and where each tensor lives."""

    path: Path
    config: dict[str, Any]
    type: ModuleType
    weights_file: Path
    tensors: dict[str, TensorInfo]  # by full PEFT key
    # For each layer: the PEFT keys of its tensors ("A"/"B" for LoRA, "l" for (IA)3).
    layer_keys: dict[str, dict[str, str]]
    head_keys: dict[str, str]
    unsupported: tuple[str, ...] = ()
    data_start: int = 0
    file_size: int = 0
    pickled: bool = False
    _pickled_state: dict[str, Any] | None = field(default=None, repr=False, compare=False)
    metadata: dict[str, str] = field(default_factory=dict, compare=False)  # the safetensors `__metadata__`

    @property
    def data_bytes_expected(self) -> int:
        return max((t.end for t in self.tensors.values()), default=0)

    @property
    def truncated(self) -> bool:
        """Whether the file is shorter than its header says (a cut-off download)."""
        return not self.pickled and self.data_start + self.data_bytes_expected > self.file_size

    def tensor(self, key: str, device: str = "cpu"):  # type: ignore[no-untyped-def]
        """Read one tensor by its PEFT key (imports torch; never used by the checker)."""
        if self._pickled_state is not None:
            return self._pickled_state[key].to(device)
        from safetensors import safe_open

        with safe_open(str(self.weights_file), framework="pt", device=str(device)) as f:
            return f.get_tensor(key)


MAX_HEADER_DEPTH = 64
_JSON_TOKENS = re.compile(rb'"(?:[^"\\]|\\.)*"|[\[\]{}]')


def _json_depth(raw: bytes) -> int:
    """The deepest nesting of arrays and objects in a JSON text (strings skipped), without recursion."""
    depth = deepest = 0
    for token in _JSON_TOKENS.finditer(raw):
        ch = token.group()[:1]
        if ch in (b"[", b"{"):
            depth += 1
            deepest = max(deepest, depth)
            if deepest > MAX_HEADER_DEPTH:
                break
        elif ch in (b"]", b"}"):
            depth -= 1
    return deepest


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def read_safetensors_header(path: Path) -> tuple[dict[str, TensorInfo], dict[str, str], int, int]:
    """Parse and validate a safetensors header without reading tensor data, as safetensors' own
    loader does: dtypes, shapes, offsets contiguous from 0 and in order, the data section covered
    exactly (a file shorter than that is reported as truncated by `Adapter.truncated`; a longer
    one has junk appended and is refused), `__metadata__` a flat string map, nesting bounded.

    Returns (tensors by key, `__metadata__`, offset where data starts, file size)."""
    if not _regular_file(path):
        raise AdapterError("E012", f"{path.name} not found", notes=[f"no such file: {display_path(path)}"])
    try:
        file_size = path.stat().st_size
        with path.open("rb") as f:
            prefix = f.read(8)
            if len(prefix) < 8:
                raise AdapterError("E013", f"{path.name} is too short to be a safetensors file",
                                   notes=[f"{display_path(path)}: {file_size} bytes"])
            (length,) = struct.unpack("<Q", prefix)
            if length > MAX_HEADER_BYTES or length > file_size - 8:
                raise AdapterError(
                    "E013", f"{path.name} has a truncated or malformed safetensors header",
                    notes=[f"{display_path(path)}: the header claims {length} bytes but the file has {file_size}"])
            raw = f.read(length)
    except OSError as exc:
        raise AdapterError("E012", f"cannot read {path.name}", notes=[f"{display_path(path)}: {exc.strerror}"]) from None
    try:
        if _json_depth(raw) > MAX_HEADER_DEPTH:
            raise ValueError(f"the header nests deeper than {MAX_HEADER_DEPTH} levels")
        header = json.loads(raw.decode("utf-8"), parse_constant=_refuse_constant)
        if not isinstance(header, dict):
            raise ValueError("the header is not a JSON object")
        metadata = header.pop("__metadata__", None) or {}
        if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
            raise ValueError("__metadata__ is not a map of strings to strings")
        tensors = {}
        for key, entry in header.items():
            if not isinstance(entry, dict) or set(entry) != {"dtype", "shape", "data_offsets"}:
                raise ValueError(f"tensor {key!r}: an entry has exactly dtype, shape and data_offsets")
            dtype, shape, offsets = entry["dtype"], entry["shape"], entry["data_offsets"]
            if not isinstance(dtype, str) or dtype not in DTYPE_SIZES:
                raise ValueError(f"tensor {key!r} has unknown dtype {dtype!r}")
            if not isinstance(shape, list) or not all(_is_int(d) and d >= 0 for d in shape):
                raise ValueError(f"tensor {key!r} has a malformed shape {shape!r}")
            if not (isinstance(offsets, list) and len(offsets) == 2 and all(_is_int(o) and o >= 0 for o in offsets)):
                raise ValueError(f"tensor {key!r} has malformed data_offsets {offsets!r}")
            begin, end = offsets
            numel = 1
            for d in shape:
                numel *= d
            if end < begin or end - begin != numel * DTYPE_SIZES[dtype]:
                raise ValueError(f"tensor {key!r}: offsets [{begin}, {end}] do not fit {dtype}{list(shape)}")
            tensors[key] = TensorInfo(key, dtype, tuple(shape), begin, end)
        position = 0
        for info in sorted(tensors.values(), key=lambda t: (t.begin, t.end)):
            if info.begin != position:
                what = "overlaps the tensor before it" if info.begin < position else "leaves a gap before it"
                raise ValueError(f"tensor {info.key!r} at [{info.begin}, {info.end}] {what}")
            position = info.end
        data_size = file_size - 8 - length
        if data_size > position:
            raise ValueError(f"{data_size - position} bytes after the last tensor belong to no tensor")
    except (UnicodeDecodeError, ValueError, KeyError, TypeError, RecursionError) as exc:
        detail = exc.msg if isinstance(exc, json.JSONDecodeError) else str(exc)
        raise AdapterError("E013", f"{path.name} has a malformed safetensors header",
                           notes=[f"{display_path(path)}: {detail}"]) from None
    return tensors, metadata, 8 + length, file_size


def _refuse_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def _read_config(directory: Path) -> dict[str, Any]:
    config_path = directory / CONFIG_NAME
    mode = _stat_mode(directory)
    if mode is None:
        near = near_directory(directory)
        raise AdapterError("E012", "adapter directory not found", notes=[f"no such directory: {display_path(directory)}"],
                           hints=[f"did you mean {display_path(near)}?"] if near is not None else [])
    if not stat.S_ISDIR(mode):
        raise AdapterError("E012", "not an adapter directory", notes=[f"{display_path(directory)} is {_kind(mode)}"],
                           hints=["an input is a PEFT adapter directory (adapter_config.json + weights)"])
    if not _regular_file(config_path):
        raise AdapterError("E012", f"no {CONFIG_NAME} in the adapter directory",
                           notes=[f"looked for {display_path(config_path)}"],
                           hints=["an input is a directory written by PEFT's save_pretrained"])
    try:
        with config_path.open("rb") as f:
            raw = f.read(MAX_CONFIG_BYTES + 1)
        if len(raw) > MAX_CONFIG_BYTES:
            raise AdapterError("E013", f"{CONFIG_NAME} is larger than {MAX_CONFIG_BYTES // 2**20} MiB",
                               notes=[f"{display_path(config_path)}: PEFT writes a config of a few kilobytes"])
        config = json.loads(raw.decode("utf-8"), parse_int=_parse_int)
    except OSError as exc:
        raise AdapterError("E012", f"cannot read {CONFIG_NAME}", notes=[f"{display_path(config_path)}: {exc.strerror}"]) from None
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
        raise AdapterError("E013", f"{CONFIG_NAME} is not valid JSON", notes=[f"{display_path(config_path)}: {exc}"]) from None
    if not isinstance(config, dict):
        raise AdapterError("E013", f"{CONFIG_NAME} is not a JSON object", notes=[str(config_path)])
    if (where := _find_long_int(config)) is not None:
        field_name, digits = where
        raise _config_error(config_path, field_name, f"is an integer of {digits} digits, too long to read"
                            f" (at most {MAX_JSON_INT_DIGITS})")
    _validate_config(config, config_path)
    return config


# Python refuses to turn longer digit strings into ints (sys.get_int_max_str_digits, a ValueError
# from json.loads itself); such a number is kept as a _LongInt and reported with its field.
MAX_JSON_INT_DIGITS = 4300


@dataclass(frozen=True, slots=True)
class _LongInt:
    digits: int


def _parse_int(text: str) -> int | _LongInt:
    digits = len(text.lstrip("-"))
    return _LongInt(digits) if digits > MAX_JSON_INT_DIGITS else int(text)


def _find_long_int(config: dict[str, Any]) -> tuple[str, int] | None:
    """The dotted path and length of the first over-long integer in a parsed config (no recursion)."""
    stack: list[tuple[str, Any]] = [(str(k), v) for k, v in reversed(config.items())]
    while stack:
        where, value = stack.pop()
        if isinstance(value, _LongInt):
            return where, value.digits
        if isinstance(value, dict):
            stack.extend((f"{where}.{k}", v) for k, v in reversed(value.items()))
        elif isinstance(value, list):
            stack.extend((f"{where}[{i}]", v) for i, v in reversed(list(enumerate(value))))
    return None


def _stat_mode(path: Path) -> int | None:
    """The file type and mode bits of `path` (symbolic links followed), or None when nothing is there.
    A symbolic link to nothing, or a path that cannot be looked at, is E012."""
    try:
        return os.stat(path).st_mode
    except FileNotFoundError:
        if os.path.islink(path):
            raise AdapterError("E012", f"{path.name} is a symbolic link to a missing file",
                               notes=[f"{display_path(path)} -> {os.readlink(path)}"]) from None
        return None
    except OSError as exc:
        raise AdapterError("E012", f"cannot read {path.name}", notes=[f"{display_path(path)}: {exc.strerror}"]) from None


def _kind(mode: int) -> str:
    """What a file that is not a regular file is, in words."""
    for test, words in ((stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a FIFO (named pipe)"),
                        (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"),
                        (stat.S_ISSOCK, "a socket"), (stat.S_ISREG, "a regular file")):
        if test(mode):
            return words
    return "not a regular file"


def _regular_file(path: Path) -> bool:
    """Whether `path` is a regular file (False: nothing there). Anything else there (a directory, a
    FIFO, a device such as a link to /dev/zero) is E012, decided by stat before any open: opening a
    FIFO to read waits for a writer, and a device never ends."""
    mode = _stat_mode(path)
    if mode is None:
        return False
    if not stat.S_ISREG(mode):
        shown = display_path(path)
        if os.path.islink(path):
            shown += f" -> {os.readlink(path)}"
        raise AdapterError("E012", f"{path.name} is not a regular file", notes=[f"{shown} is {_kind(mode)}"],
                           hints=["an adapter's config and weights are regular files, as PEFT's save_pretrained "
                                  "writes them"])
    return True


def _config_error(path: Path, field_name: str, message: str, hints: Iterable[str] = ()) -> AdapterError:
    return AdapterError("E013", f"{CONFIG_NAME}: `{field_name}` {message}",
                        notes=[f"{display_path(path)}: field {field_name}"], hints=hints)


def _positive_number(value: Any, *, integer: bool) -> bool:
    if integer:
        return _is_int(value) and 0 < value <= MAX_RANK
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        return False
    try:
        return math.isfinite(float(value)) and value > 0
    except OverflowError:  # an int beyond any float
        return False


# A rank beyond this is no tensor anyone can hold; scalings are applied in float32, so each must
# be a normal float32 (a subnormal or zero scaling is divided by when inputs are mixed).
MAX_RANK = 2**31
FLOAT32_TINY = 2.0**-126
FLOAT32_MAX = (2 - 2.0**-23) * 2.0**127


def scaling_of(alpha: float, rank: int, use_rslora: bool) -> float:
    """PEFT's scaling: `lora_alpha / r`, or `lora_alpha / sqrt(r)` under rsLoRA."""
    return alpha / (math.sqrt(rank) if use_rslora else rank)


def scaling_problem(alpha: float, rank: int, use_rslora: bool) -> str | None:
    """Why the scaling an (alpha, r) pair gives is unusable, or None."""
    scaling = scaling_of(alpha, rank, use_rslora)
    if FLOAT32_TINY <= scaling <= FLOAT32_MAX:
        return None
    formula = f"{alpha:g}/sqrt({rank})" if use_rslora else f"{alpha:g}/{rank}"
    side = "below float32's smallest normal number" if scaling < FLOAT32_TINY else "beyond float32's range"
    return f"gives the scaling {formula} = {scaling:g}, {side}"


MAX_PATTERN_LENGTH = 1000
MAX_PATTERN_REPEATS = 3


def pattern_problem(pattern: str) -> str | None:
    """Why a rank_pattern/alpha_pattern key cannot be matched safely, or None. Keys are regexes
    (PEFT matches `(.*\\.)?(KEY)$`); nested or alternated repeats and backreferences can take
    exponential time, so they are refused, as are more than a few repeats in one key."""
    if len(pattern) > MAX_PATTERN_LENGTH:
        return f"is longer than {MAX_PATTERN_LENGTH} characters"
    try:
        import re._parser as sre_parse  # type: ignore[import-not-found]
        from re import _constants as c  # type: ignore[attr-defined]
    except ImportError:  # pragma: no cover - Python < 3.11
        import sre_constants as c  # type: ignore[no-redef]
        import sre_parse  # type: ignore[no-redef]
    try:
        parsed = sre_parse.parse(rf"(.*\.)?({pattern})$")
    except (re.error, RecursionError, OverflowError) as exc:
        return f"is not a valid regular expression ({exc})"
    repeats = 0

    def walk(items: Any, in_repeat: bool) -> str | None:
        nonlocal repeats
        for op, av in items:
            if op in (c.MAX_REPEAT, c.MIN_REPEAT) or getattr(c, "POSSESSIVE_REPEAT", None) == op:
                low, high, sub = av
                many = high > 1
                if many and in_repeat:
                    return "nests repeats (catastrophic backtracking)"
                repeats += many
                if (found := walk(sub, in_repeat or many)) is not None:
                    return found
            elif op == c.SUBPATTERN:
                if (found := walk(av[-1], in_repeat)) is not None:
                    return found
            elif op == c.BRANCH:
                if in_repeat:
                    return "repeats an alternation (catastrophic backtracking)"
                for branch in av[1]:
                    if (found := walk(branch, in_repeat)) is not None:
                        return found
            elif op in (c.GROUPREF, c.GROUPREF_EXISTS):
                return "uses a backreference"
            elif op in (c.ASSERT, c.ASSERT_NOT) and (found := walk(av[1], in_repeat)) is not None:
                return found
        return None

    found = walk(parsed, False)
    if found is None and repeats > MAX_PATTERN_REPEATS + 1:  # + the `.*` PEFT puts in front
        found = f"has more than {MAX_PATTERN_REPEATS} repeats"
    return found


def _validate_config(config: dict[str, Any], path: Path) -> None:
    """Field types as PEFT writes them; anything else is E013 naming the field."""
    peft_type = config.get("peft_type")
    if "peft_type" in config and not isinstance(peft_type, str):
        raise _config_error(path, "peft_type", f"must be a string, not {peft_type!r}")
    if isinstance(peft_type, str) and peft_type.upper() in ("LORA", "IA3") and peft_type not in ("LORA", "IA3"):
        raise _config_error(path, "peft_type", f"is {peft_type!r}; PEFT writes {peft_type.upper()!r}",
                            hints=[f"PEFT reads only the exact spelling: set \"peft_type\": \"{peft_type.upper()}\""])
    if "r" in config and not _positive_number(config["r"], integer=True):
        raise _config_error(path, "r", f"must be a whole number from 1 to {MAX_RANK}, not {_shown(config['r'])}")
    if "lora_alpha" in config and not _positive_number(config["lora_alpha"], integer=False):
        raise _config_error(path, "lora_alpha", f"must be a finite number > 0, not {_shown(config['lora_alpha'])}")
    for field_name, integer in (("rank_pattern", True), ("alpha_pattern", False)):
        patterns = config.get(field_name)
        if patterns is None:
            continue
        if not isinstance(patterns, dict):
            raise _config_error(path, field_name, "must be a map of layer patterns to numbers")
        for key, value in patterns.items():
            if not _positive_number(value, integer=integer):
                raise _config_error(path, field_name, f"maps {key[:80]!r} to {_shown(value)}, not a "
                                    + (f"whole number from 1 to {MAX_RANK}" if integer else "finite number > 0"))
            if (problem := pattern_problem(key)) is not None:
                raise _config_error(path, field_name, f"key {key[:80]!r} {problem}")
    for field_name in ("modules_to_save", "target_modules", "feedforward_modules"):
        value = config.get(field_name)
        allowed_str = field_name != "modules_to_save"
        if value is None or (allowed_str and isinstance(value, str)):
            continue
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise _config_error(path, field_name, "must be a list of module names" + (
                ", a string" if allowed_str else "") + f" or null, not {value!r}"[:200])
    mapping = config.get("auto_mapping")
    if mapping is not None and (not isinstance(mapping, dict)
                                or not isinstance(mapping.get("base_model_class", ""), (str, type(None)))):
        raise _config_error(path, "auto_mapping", f"must be a map with a string base_model_class, or null, "
                            f"not {mapping!r}"[:200])
    for field_name in ("base_model_name_or_path", "revision", "task_type", "bias"):
        value = config.get(field_name)
        if value is not None and not isinstance(value, str):
            raise _config_error(path, field_name, f"must be a string or null, not {value!r}"[:200])
        if isinstance(value, str) and not valid_text(value):
            raise _config_error(path, field_name, f"must be text without control characters or lone surrogates, "
                                f"not {value!r}"[:200])
    for field_name in ("use_rslora", "fan_in_fan_out"):
        value = config.get(field_name)
        if value is not None and not isinstance(value, bool):
            raise _config_error(path, field_name, f"must be true or false, not {value!r}"[:200])
    _validate_scalings(config, path)


def _shown(value: Any) -> str:
    """A config value for a message: long numbers by their length, anything else shortened."""
    if _is_int(value) and abs(value) >= 10**30:
        return f"an integer of {len(str(abs(value)))} digits"
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def _validate_scalings(config: dict[str, Any], path: Path) -> None:
    """Every scaling a layer can get from the config's own numbers (lora_alpha or an alpha_pattern
    value over r or a rank_pattern value) is a normal float32; `_lora_layer` checks each layer's."""
    if config.get("peft_type") != "LORA":
        return
    use_rslora = bool(config.get("use_rslora", False))
    pairs = []
    if "lora_alpha" in config and "r" in config:
        pairs.append(("lora_alpha", config["lora_alpha"], config["r"]))
    if "r" in config:
        pairs += [(f"alpha_pattern[{k[:80]!r}]", v, config["r"]) for k, v in (config.get("alpha_pattern") or {}).items()]
    if "lora_alpha" in config:
        pairs += [(f"rank_pattern[{k[:80]!r}]", config["lora_alpha"], v)
                  for k, v in (config.get("rank_pattern") or {}).items()]
    for field_name, alpha, rank in pairs:
        if (problem := scaling_problem(float(alpha), rank, use_rslora)) is not None:
            raise _config_error(path, field_name, problem,
                                hints=["PEFT scales a layer by lora_alpha / r (lora_alpha / sqrt(r) with use_rslora)"])


def _pattern_value(patterns: dict[str, Any] | None, layer_key: str, default: Any) -> Any:
    """PEFT's rank_pattern / alpha_pattern lookup (peft.utils.other.get_pattern_key)."""
    return _pattern_match(patterns, layer_key, default)[1]


def _pattern_match(patterns: dict[str, Any] | None, layer_key: str, default: Any) -> tuple[str | None, Any]:
    """(the matching pattern key or None, the value) of a rank_pattern / alpha_pattern lookup."""
    for pattern in patterns or {}:
        if re.match(rf"(.*\.)?({pattern})$", layer_key):
            return pattern, patterns[pattern]  # type: ignore[index]
    return None, default


def _module_matches(module_path: str, names: Iterable[str]) -> bool:
    return any(module_path == n or module_path.endswith("." + n) for n in names)


def head_module(key: str, names: Iterable[str]) -> str | None:
    """The `modules_to_save` module a saved tensor belongs to: its outermost ancestor whose path
    is one of `names` or ends with `.NAME` (PEFT's own rule), or None. PEFT saves the whole
    sub-tree of such a module (`classifier.dense.weight`, `classifier.out_proj.bias`)."""
    names = list(names)
    parts = key.split(".")[:-1]
    for end in range(1, len(parts) + 1):
        path = ".".join(parts[:end])
        if _module_matches(path, names):
            return path
    return None


def config_owner(input_order: Iterable[str], betas: Mapping[str, float], inputs: Mapping[str, Adapter],
                 heads_policy: str | None, heads_from: str | None) -> str:
    """The input whose task_type and auto_mapping an output's adapter_config.json takes: the
    heads' owner (`heads from NAME`, or the first input of a convex mix of heads); with `heads
    drop`, or when no input has heads, the first input of the expression."""
    order = list(input_order)
    if heads_policy == "from" and heads_from is not None:
        return heads_from
    if heads_policy != "drop":
        for name in order:
            if betas.get(name, 0.0) != 0.0 and inputs[name].type.heads:
                return name
    return order[0]


def task_of(adapter: Adapter) -> tuple[str | None, str | None]:
    """(task_type, architecture) as the adapter's config records them (None: not recorded)."""
    task_type = adapter.config.get("task_type")
    return (task_type if isinstance(task_type, str) else None), adapter.type.architecture


def _strip(key: str) -> str:
    return key[len(PEFT_PREFIX):] if key.startswith(PEFT_PREFIX) else key


def valid_text(text: str) -> bool:
    """Text that can be written back (UTF-8) on one line: no lone surrogates, no control characters."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return not any(ord(c) < 32 or 127 <= ord(c) < 160 or c in "\u2028\u2029" for c in text)


def read_adapter(path: str | Path, *, allow_pickle: bool = False) -> Adapter:
    """Read an adapter directory's signature (config + header only; no tensor data)."""
    directory = Path(path)
    config = _read_config(directory)
    peft_type = str(config.get("peft_type", "")).upper()
    if peft_type not in {"LORA", "IA3"}:
        name = _PEFT_TYPE_NAMES.get(peft_type, peft_type or "an adapter with no peft_type")
        raise AdapterError("E011", f"{name} adapters are not supported",
                           notes=[f"{display_path(directory / CONFIG_NAME)}: peft_type {config.get('peft_type')!r}"],
                           hints=["pemlang composes LoRA and (IA)3 adapters"])
    kind: Kind = "lora" if peft_type == "LORA" else "ia3"

    weights_file = directory / WEIGHTS_NAME
    pickled_state = None
    metadata: dict[str, str] = {}
    if _regular_file(weights_file):
        tensors, metadata, data_start, file_size = read_safetensors_header(weights_file)
    elif _regular_file(directory / PICKLE_NAME):
        weights_file = directory / PICKLE_NAME
        if not allow_pickle:
            raise AdapterError("E023", f"the adapter's weights are pickled ({PICKLE_NAME})",
                               notes=[f"{display_path(weights_file)}: loading a pickle can run arbitrary code"],
                               hints=["re-save it as safetensors, or pass --allow-pickle (allow_pickle=True in the API) "
                                      "if you trust it "
                                      "(then it is loaded with torch.load(weights_only=True))"])
        tensors, pickled_state = _read_pickle(weights_file)
        data_start, file_size = 0, weights_file.stat().st_size
    else:
        raise AdapterError("E012", f"no {WEIGHTS_NAME} in the adapter directory",
                           notes=[f"looked for {display_path(weights_file)}"])

    unsupported: list[str] = []
    if kind == "lora":
        for field_name, feature in _UNSUPPORTED_LORA_FIELDS.items():
            if config.get(field_name):
                unsupported.append(feature)
    if config.get("bias", "none") not in (None, "none"):
        unsupported.append(f"bias training (bias={config['bias']!r})")

    base = BaseModelRef.from_config(config.get("base_model_name_or_path"), config.get("revision"))
    auto_mapping = config.get("auto_mapping") or {}
    heads_names = config.get("modules_to_save") or []
    fan_in_fan_out = bool(config.get("fan_in_fan_out", False))

    # Modules with LoRA on an embedding: every tensor under them (lora_embedding_A/B, and the
    # embedding itself that PEFT may save beside them) is that one feature.
    embeddings = sorted({short.partition(".lora_embedding_")[0] for short in map(_strip, tensors)
                         if ".lora_embedding_" in short})
    if embeddings:
        unsupported.insert(0, f"{EMBEDDING_LORA} (lora_embedding_A/B on {', '.join(embeddings[:3])}"
                              f"{' …' if len(embeddings) > 3 else ''})")
    layer_keys: dict[str, dict[str, str]] = {}
    head_keys: dict[str, str] = {}
    head_owner: dict[str, str] = {}
    groups: dict[str, dict[str, TensorInfo]] = {}
    names: set[str] = set()  # adapter names inside keys (`lora_A.default.weight`: a state dict saved as is)
    for key, info in tensors.items():
        short = _strip(key)
        if kind == "lora" and (m := re.fullmatch(r"(.+)\.lora_([AB])(?:\.([^.]+))?\.weight", short)):
            groups.setdefault(m.group(1), {})[m.group(2)] = info
            layer_keys.setdefault(m.group(1), {})[m.group(2)] = key
            names.add(m.group(3) or "")
        elif kind == "ia3" and (m := re.fullmatch(r"(.+)\.ia3_l(?:\.([^.]+))?", short)):
            groups.setdefault(m.group(1), {})["l"] = info
            layer_keys.setdefault(m.group(1), {})["l"] = key
            names.add(m.group(2) or "")
        elif short.endswith(".lora_magnitude_vector") or ".lora_magnitude_vector." in short:
            _note(unsupported, "DoRA (use_dora)")
        elif re.fullmatch(r".+\.lora_B\.bias", short):
            _note(unsupported, "LoRA bias (lora_bias)")
        elif any(short.startswith(module + ".") for module in embeddings):
            pass  # LoRA on embeddings, noted above
        elif "trainable_tokens" in short:
            _note(unsupported, "trainable tokens")
        elif (module := head_module(short, heads_names)) is not None:
            head_keys[short] = key
            head_owner[short] = module
        else:
            _note(unsupported, f"an unrecognised tensor {short!r}")

    if len(names) > 1:
        shown = ", ".join(sorted(repr(n) if n else "unnamed" for n in names))
        _note(unsupported, f"several adapters in one weights file ({shown}); save each on its own "
                           "(save_pretrained(..., selected_adapters=[NAME]))")
    layers: dict[str, Layer] = {}
    for layer_key, group in groups.items():
        layer: Layer | None
        if kind == "lora":
            layer = _lora_layer(directory, config, layer_key, group, fan_in_fan_out, unsupported)
        else:
            layer = _ia3_layer(layer_key, group["l"], unsupported)
        if layer is not None:
            layers[layer_key] = layer
    if not layers and not unsupported:
        raise AdapterError("E013", f"the adapter has no {'LoRA' if kind == 'lora' else '(IA)3'} tensors",
                           notes=[f"{display_path(weights_file)}: {len(tensors)} tensors, none of them adapter weights"])
    heads = {
        short: Head(short, tensors[key].shape, tensors[key].dtype, tensors[key].nbytes, head_owner[short])
        for short, key in head_keys.items()
    }
    for head in heads.values():
        if head.dtype not in FLOAT_DTYPES:
            _note(unsupported, f"a non-floating-point head tensor {head.key!r} ({head.dtype})")
    module_type = ModuleType(kind, base, dict(sorted(layers.items())), dict(sorted(heads.items())),
                             auto_mapping.get("base_model_class"))
    return Adapter(directory, config, module_type, weights_file, tensors, layer_keys, head_keys,
                   tuple(unsupported), data_start, file_size, pickled_state is not None, pickled_state, metadata)


def _note(features: list[str], feature: str) -> None:
    if feature not in features:
        features.append(feature)


def _lora_layer(directory: Path, config: dict[str, Any], layer_key: str, group: dict[str, TensorInfo],
                fan_in_fan_out: bool, unsupported: list[str]) -> LoraLayer | None:
    if set(group) != {"A", "B"}:
        missing = "lora_B" if "A" in group else "lora_A"
        raise AdapterError("E013", f"layer {layer_key} has no {missing} tensor",
                           notes=[f"{display_path(directory / WEIGHTS_NAME)}: a LoRA layer needs both lora_A and lora_B"])
    a, b = group["A"], group["B"]
    if len(a.shape) != 2 or len(b.shape) != 2:
        _note(unsupported, "LoRA on convolution layers")
        return None
    rank, in_features = a.shape
    out_features, rank_b = b.shape
    if rank_b != rank:
        raise AdapterError("E013", f"layer {layer_key}: lora_A and lora_B ranks disagree",
                           notes=[f"lora_A is {rank}×{in_features}, lora_B is {out_features}×{rank_b}"])
    if rank == 0:
        raise AdapterError("E013", f"layer {layer_key} has rank 0",
                           notes=[f"{display_path(directory / WEIGHTS_NAME)}: lora_A is 0×{in_features}"])
    configured_rank = _pattern_value(config.get("rank_pattern"), layer_key, config.get("r", rank))
    if configured_rank != rank:
        raise AdapterError("E013", f"layer {layer_key}: the tensors have rank {rank} but the config says "
                           f"{configured_rank}", notes=[f"{display_path(directory / CONFIG_NAME)}: r / rank_pattern"])
    alpha_key, alpha = _pattern_match(config.get("alpha_pattern"), layer_key, config.get("lora_alpha", 8))
    use_rslora = bool(config.get("use_rslora", False))
    if (problem := scaling_problem(float(alpha), rank, use_rslora)) is not None:
        alpha_field = "lora_alpha" if alpha_key is None else f"alpha_pattern[{alpha_key[:80]!r}]"
        raise AdapterError("E013", f"layer {layer_key}: {CONFIG_NAME}'s {alpha_field} with rank {rank} {problem}",
                           notes=[f"{display_path(directory / CONFIG_NAME)}: field {alpha_field}"],
                           hints=["PEFT scales a layer by lora_alpha / r (lora_alpha / sqrt(r) with use_rslora)"])
    for info in (a, b):
        if info.dtype not in FLOAT_DTYPES:
            _note(unsupported, f"quantised or non-float LoRA weights ({info.dtype})")
    return LoraLayer(layer_key, in_features, out_features, rank, float(alpha),
                     use_rslora, fan_in_fan_out, a.dtype, a.nbytes + b.nbytes)


def _ia3_layer(layer_key: str, info: TensorInfo, unsupported: list[str]) -> Ia3Layer | None:
    if len(info.shape) != 2 or 1 not in info.shape:
        _note(unsupported, "(IA)3 on convolution layers")
        return None
    return Ia3Layer(layer_key, info.shape, info.shape[0] == 1 and info.shape[1] != 1, info.dtype, info.nbytes)


def _read_pickle(path: Path) -> tuple[dict[str, TensorInfo], dict[str, Any]]:
    import torch

    from .types import DTYPE_SIZES as sizes

    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises many types for a bad pickle
        raise AdapterError("E013", f"cannot load {path.name}", notes=[f"{display_path(path)}: {exc}"]) from None
    names = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16", torch.float64: "F64",
             torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
             torch.bool: "BOOL"}
    if not isinstance(state, dict):
        raise AdapterError("E013", f"{path.name} does not hold a state dict",
                           notes=[f"{display_path(path)}: it holds a {type(state).__name__}, not a map of "
                                  "tensor names to tensors"])
    tensors = {}
    offset = 0
    for key, value in state.items():
        if not isinstance(key, str) or not isinstance(value, torch.Tensor) or value.layout != torch.strided \
                or value.dtype not in names:
            what = (f"key {key!r} is not a string" if not isinstance(key, str) else
                    f"{key!r} is a {type(value).__name__}, not a dense tensor" if not isinstance(value, torch.Tensor)
                    or value.layout != torch.strided else f"{key!r} has dtype {value.dtype}")
            raise AdapterError("E013", f"{path.name} is not a state dict of tensors",
                               notes=[f"{display_path(path)}: {what}"])
        dtype = names[value.dtype]
        nbytes = value.numel() * sizes[dtype]
        tensors[key] = TensorInfo(key, dtype, tuple(value.shape), offset, offset + nbytes)
        offset += nbytes
    return tensors, state
