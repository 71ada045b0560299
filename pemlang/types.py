"""Types of values: Scalar, and Module[kind, base, signature].

A module's signature is everything the checker needs to decide whether modules combine: per
adapted layer its shapes, rank and scaling, and the full tensors of `modules_to_save` (heads).
Signatures are built from `adapter_config.json` and the safetensors header alone.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Literal

Kind = Literal["lora", "ia3"]

# Bytes per element of the safetensors dtypes an adapter may use.
DTYPE_SIZES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "F8_E4M3": 1, "F8_E5M2": 1,
               "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1}
FLOAT_DTYPES = {"F64", "F32", "F16", "BF16"}
# The float dtypes by their torch names: the backend's table of torch dtypes, and the writer's way
# back from a tensor to its safetensors name, both come from this one (neither imports the other).
TORCH_DTYPE_NAMES = {"F32": "float32", "F16": "float16", "BF16": "bfloat16", "F64": "float64"}


# A snapshot directory of the Hugging Face cache: …/models--org--name/snapshots/<commit sha>[/…]
_HF_CACHE_PATH = re.compile(r"(?:^|/)models--(?P<repo>[^/]+)/snapshots/(?P<sha>[0-9a-f]{40})(?:/|$)")


@dataclass(frozen=True, slots=True)
class BaseModelRef:
    """The base model an adapter was trained on, as its adapter_config.json records it."""

    name: str | None
    revision: str | None = None

    @property
    def recorded(self) -> bool:
        return self.name is not None

    def describe(self) -> str:
        if self.name is None:
            return "not recorded"
        return f'"{self.name}"' + (f" @ {self.revision}" if self.revision else "")

    @classmethod
    def from_config(cls, name: str | None, revision: str | None) -> BaseModelRef:
        """The base as recorded, a path inside a Hugging Face cache read as the repo it caches:
        `…/models--org--name/snapshots/<sha>` is `org/name` at revision `<sha>` (a revision the
        config records wins)."""
        name = name.strip() if isinstance(name, str) else name
        if not name:
            return cls(None, revision)
        if name:
            match = _HF_CACHE_PATH.search(name.replace("\\", "/"))
            if match:
                return cls(match["repo"].replace("--", "/", 1), revision or match["sha"])
        return cls(name, revision)

    def same_as(self, other: BaseModelRef) -> bool:
        """False only when both are recorded and differ (an unrecorded base is a warning)."""
        if not (self.recorded and other.recorded):
            return True
        if self.name != other.name:
            return False
        return self.revision is None or other.revision is None or self.revision == other.revision


@dataclass(frozen=True, slots=True)
class LoraLayer:
    """One LoRA-adapted layer: ΔW = scaling · B A, with A: r×in and B: out×r."""

    key: str
    in_features: int
    out_features: int
    rank: int
    alpha: float
    use_rslora: bool
    fan_in_fan_out: bool
    dtype: str
    nbytes: int

    @property
    def scaling(self) -> float:
        """`lora_alpha / r`, or `lora_alpha / sqrt(r)` under rsLoRA."""
        return self.alpha / (math.sqrt(self.rank) if self.use_rslora else self.rank)

    @property
    def shape_text(self) -> str:
        return f"{self.out_features}×{self.in_features}"


@dataclass(frozen=True, slots=True)
class Ia3Layer:
    """One (IA)3-adapted layer: a scaling vector l, of shape (out, 1), or (1, in) when feed-forward."""

    key: str
    shape: tuple[int, ...]
    feedforward: bool
    dtype: str
    nbytes: int

    @property
    def shape_text(self) -> str:
        return "×".join(map(str, self.shape))


@dataclass(frozen=True, slots=True)
class Head:
    """A full tensor saved through `modules_to_save` (e.g. a classifier head's weight).

    PEFT saves the whole sub-tree of a `modules_to_save` module: `module` is that module's path
    (`classifier`), `key` the tensor's (`classifier.out_proj.weight`)."""

    key: str
    shape: tuple[int, ...]
    dtype: str
    nbytes: int
    module: str = ""

    @property
    def module_name(self) -> str:
        """The head module this tensor belongs to (its parent module when none was recorded)."""
        return self.module or self.key.rsplit(".", 1)[0]


def head_modules(heads: Iterable[Head]) -> dict[str, tuple[str, ...]]:
    """{head module: its tensor keys, sorted}, modules in sorted order."""
    modules: dict[str, list[str]] = {}
    for head in heads:
        modules.setdefault(head.module_name, []).append(head.key)
    return {module: tuple(sorted(keys)) for module, keys in sorted(modules.items())}


def describe_heads(modules: Mapping[str, tuple[str, ...]]) -> str:
    """`1 head (classifier, 4 tensors)`, `2 heads (lm_head, score)`: head modules, not tensors."""
    count = f"{len(modules)} head{'s' if len(modules) != 1 else ''}"
    if len(modules) == 1:
        (module, keys), = modules.items()
        return f"{count} ({module}, {len(keys)} tensor{'s' if len(keys) != 1 else ''})"
    return f"{count} ({', '.join(modules)})"


Layer = LoraLayer | Ia3Layer


@dataclass(frozen=True)
class ModuleType:
    """Module[kind, base, signature]."""

    kind: Kind
    base: BaseModelRef
    layers: Mapping[str, Layer]
    heads: Mapping[str, Head]
    architecture: str | None = None  # auto_mapping's base_model_class, when recorded

    @property
    def head_modules(self) -> dict[str, tuple[str, ...]]:
        """{head module: its tensor keys}: a head is a whole modules_to_save sub-tree."""
        return head_modules(self.heads.values())


def architecture_families(layer_keys) -> set[str]:  # type: ignore[no-untyped-def]
    """The module-path stems before the first layer index: `model.layers`, `transformer.h`."""
    families = set()
    for key in layer_keys:
        match = re.match(r"(.*?)\.\d+\.", key)
        families.add(match.group(1) if match else key.rsplit(".", 1)[0])
    return families
