"""Shared pieces of the benchmarks: model shapes, synthetic PEFT-format LoRA adapters, a bf16 base
model, per-child peak RSS, and the results files (markdown table + PNG plot).

Adapters are synthetic (seeded random factors) but in PEFT's format: PEFT's key names
(`base_model.model.model.layers.N.self_attn.q_proj.lora_A.weight`, ...), fp32 safetensors with
`{"format": "pt"}` metadata, and an adapter_config.json written by PEFT's own `LoraConfig.save_pretrained`
(with `inference_mode` true, as `PeftModel.save_pretrained` leaves it). Everything generated is cached under
CACHE, keyed by size and layer count; a directory counts only once its `.complete` marker is written.

Where things go, never inside the repository unless asked: results (tables, plots) in
$PEMLANG_BENCH_RESULTS, fixtures in $PEMLANG_BENCH_CACHE, by default `results/` and `cache/` under
$PEMLANG_BENCH_DIR (default: pemlang-bench in the system's temporary directory). run_all.py sets them
from its --out and --cache options.

The benchmarks drive pemlang only through its CLI (`python -m pemlang.cli`) and its public API, so they
measure whatever pemlang is importable (set PYTHONPATH to measure a checkout).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, replace
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing is fetched: PEFT's config writer must not try the hub

HERE = Path(__file__).resolve().parent
WORKDIR = Path(os.environ.get("PEMLANG_BENCH_DIR") or Path(tempfile.gettempdir()) / "pemlang-bench")
CACHE = Path(os.environ.get("PEMLANG_BENCH_CACHE") or WORKDIR / "cache").absolute()
RESULTS = Path(os.environ.get("PEMLANG_BENCH_RESULTS") or WORKDIR / "results").absolute()
COMMITTED = HERE / "results"  # the results the README links: written only when RESULTS names it
BASE_NAME = "bench/llama"  # base_model_name_or_path recorded in every adapter
TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
EXPRESSION = "0.5*a + 0.3*b - 0.2*c"
WEIGHTS = {"a": 0.5, "b": 0.3, "c": -0.2}
MiB = 2**20


@dataclass(frozen=True)
class Shape:
    name: str
    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    rank: int
    vocab: int = 32000

    @property
    def kv_dim(self) -> int:
        return self.kv_heads * (self.hidden // self.heads)

    def with_layers(self, layers: int) -> Shape:
        return replace(self, layers=layers)

    @property
    def key(self) -> str:
        """The cache key: the size's name, plus the layer count where it differs from the size's."""
        default = SIZES[self.name].layers if self.name in SIZES else None
        return self.name if self.layers == default else f"{self.name}-L{self.layers}"


SIZES = {
    "tinyllama": Shape("tinyllama", hidden=2048, intermediate=5632, layers=22, heads=32, kv_heads=4, rank=16),
    "7b": Shape("7b", hidden=4096, intermediate=11008, layers=32, heads=32, kv_heads=32, rank=16),
    "70b-slice": Shape("70b-slice", hidden=8192, intermediate=28672, layers=4, heads=64, kv_heads=8, rank=64),
}
# A tiny shape for checking a script itself in seconds (`--size smoke`), not for measuring.
SMOKE = Shape("smoke", hidden=256, intermediate=704, layers=2, heads=8, kv_heads=2, rank=8, vocab=1024)


def module_shapes(shape: Shape) -> dict[str, tuple[str, int, int]]:
    """Per target module: (parent, out_features, in_features), as in LlamaForCausalLM."""
    h, i, kv = shape.hidden, shape.intermediate, shape.kv_dim
    return {"q_proj": ("self_attn", h, h), "k_proj": ("self_attn", kv, h), "v_proj": ("self_attn", kv, h),
            "o_proj": ("self_attn", h, h), "gate_proj": ("mlp", i, h), "up_proj": ("mlp", i, h),
            "down_proj": ("mlp", h, i)}


def module_prefix(layer: int, module: str, parent: str) -> str:
    return f"base_model.model.model.layers.{layer}.{parent}.{module}"


def write_adapter_config(directory: Path, rank: int, alpha: int) -> None:
    """adapter_config.json as PEFT writes it: a real LoraConfig, saved by PEFT."""
    from peft import LoraConfig

    config = LoraConfig(r=rank, lora_alpha=alpha, target_modules=list(TARGETS), lora_dropout=0.0, bias="none",
                        task_type="CAUSAL_LM")
    config.base_model_name_or_path = BASE_NAME
    config.inference_mode = True
    config.save_pretrained(str(directory))


def _fresh(directory: Path) -> Path:
    staging = directory.with_name(directory.name + ".partial")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    return staging


def _publish(staging: Path, directory: Path) -> None:
    (staging / ".complete").write_text("")
    shutil.rmtree(directory, ignore_errors=True)
    staging.rename(directory)


def make_adapter(directory: Path, shape: Shape, seed: int, independent: bool = False) -> None:
    """One synthetic LoRA adapter, fp32: A = (A0 + 0.3·N)/√in, A0 shared by every adapter (trained from one
    initialisation, as the paper's adapters are, so that paper mode is meaningful), B ~ N(0, 0.01²).
    With `independent`, nothing is shared: A = N/√in from the adapter's own seed (adapters trained
    separately, from other initialisations: their ΔW do not share a basis)."""
    import torch
    from safetensors.torch import save_file

    staging = _fresh(directory)
    shared = torch.Generator().manual_seed(10_000)  # the A matrices' common initialisation
    generator = torch.Generator().manual_seed(seed)
    tensors = {}
    for layer in range(shape.layers):
        for module, (parent, out_f, in_f) in module_shapes(shape).items():
            prefix = module_prefix(layer, module, parent)
            if independent:
                a = torch.randn(shape.rank, in_f, generator=generator)
            else:
                a = torch.randn(shape.rank, in_f, generator=shared) + 0.3 * torch.randn(shape.rank, in_f, generator=generator)
            tensors[f"{prefix}.lora_A.weight"] = a / in_f**0.5
            tensors[f"{prefix}.lora_B.weight"] = torch.randn(out_f, shape.rank, generator=generator) * 0.01
    save_file(tensors, str(staging / "adapter_model.safetensors"), metadata={"format": "pt"})
    write_adapter_config(staging, shape.rank, 2 * shape.rank)
    _publish(staging, directory)


def adapters(shape: Shape, names: tuple[str, ...] = ("a", "b", "c"), independent: bool = False) -> dict[str, Path]:
    """The cached input adapters of a shape, made on first use; `independent`: no shared initialisation,
    each adapter from its own seed (see make_adapter), cached apart from the others."""
    result = {}
    for seed, name in enumerate(names):
        directory = CACHE / shape.key / ("adapters-independent" if independent else "adapters") / name
        if not (directory / ".complete").exists():
            print(f"[cache] making {'independent ' if independent else ''}adapter {name} for {shape.key} ...",
                  file=sys.stderr, flush=True)
            make_adapter(directory, shape, seed, independent)
        result[name] = directory
    return result


def llama_config(shape: Shape):  # type: ignore[no-untyped-def]
    from transformers import LlamaConfig

    return LlamaConfig(vocab_size=shape.vocab, hidden_size=shape.hidden, intermediate_size=shape.intermediate,
                       num_hidden_layers=shape.layers, num_attention_heads=shape.heads,
                       num_key_value_heads=shape.kv_heads, max_position_embeddings=4096, torch_dtype="bfloat16",
                       tie_word_embeddings=False)


def base_bytes(shape: Shape) -> int:
    """bf16 bytes of a LlamaForCausalLM of this shape (embeddings, layers, norms, lm_head)."""
    h, i, kv = shape.hidden, shape.intermediate, shape.kv_dim
    per_layer = 2 * h * h + 2 * kv * h + 3 * h * i + 2 * h
    return 2 * (2 * shape.vocab * h + shape.layers * per_layer + h)


def base_model(shape: Shape, shard_bytes: int = 2 * 2**30) -> Path:
    """A random bf16 LlamaForCausalLM of the shape, saved once as sharded safetensors (as
    `save_pretrained` writes it), built without ever holding the whole model in memory."""
    import torch
    from safetensors.torch import save_file
    from transformers import LlamaForCausalLM

    directory = CACHE / shape.key / "base"
    if (directory / ".complete").exists():
        return directory
    print(f"[cache] making a bf16 base model for {shape.key} ({base_bytes(shape) / 2**30:.1f} GiB) ...",
          file=sys.stderr, flush=True)
    staging = _fresh(directory)
    config = llama_config(shape)
    with torch.device("meta"):
        skeleton = LlamaForCausalLM(config)
    names = [(name, tuple(t.shape)) for name, t in skeleton.state_dict().items()]
    del skeleton
    generator = torch.Generator().manual_seed(1234)
    shards: list[list[str]] = []
    current: dict[str, torch.Tensor] = {}
    size = 0

    def flush() -> None:  # full shards are written at once: memory stays at about one shard
        nonlocal current, size
        save_file(current, str(staging / f"shard-{len(shards)}.safetensors"), metadata={"format": "pt"})
        shards.append(list(current))
        current, size = {}, 0

    for name, dims in names:
        tensor = torch.ones(dims) if name.endswith("norm.weight") else torch.randn(dims, generator=generator) * 0.02
        current[name] = tensor.to(torch.bfloat16)
        size += current[name].numel() * 2
        if size >= shard_bytes:
            flush()
    if current:
        flush()
    weight_map = {}
    for index, shard_names in enumerate(shards):
        file = f"model-{index + 1:05d}-of-{len(shards):05d}.safetensors"
        (staging / f"shard-{index}.safetensors").rename(staging / file)
        weight_map.update(dict.fromkeys(shard_names, file))
    total = sum(p.stat().st_size for p in staging.glob("model-*.safetensors"))
    (staging / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
    config.save_pretrained(str(staging))
    _publish(staging, directory)
    return directory


# -- measuring a child process --------------------------------------------------------------------


@dataclass
class Measured:
    wall_s: float
    peak_rss: int  # bytes
    returncode: int
    stdout: str
    stderr: str


# A small launcher between the benchmark and the measured command: a child forked from a big process
# inherits that process's RSS high-water mark (Linux carries it across fork and exec into ru_maxrss), so
# the command is started from this ~10 MiB Python instead, which reports wait4's rusage for it alone.
_LAUNCHER = """
import json, os, subprocess, sys, time
report, command = sys.argv[1], sys.argv[2:]
start = time.perf_counter()
process = subprocess.Popen(command)
_, status, usage = os.wait4(process.pid, 0)
wall = time.perf_counter() - start
scale = 1 if sys.platform == "darwin" else 1024
with open(report, "w") as f:
    json.dump({"wall": wall, "maxrss": usage.ru_maxrss * scale, "returncode": os.waitstatus_to_exitcode(status)}, f)
"""


class Phases:
    """Seconds spent in each named phase of a run, each counted from the end of the one before:
    `mark("import")` after the imports, `mark("load base")` after loading, … (`seconds`, in order)."""

    def __init__(self) -> None:
        self.start = time.perf_counter()
        self.seconds: dict[str, float] = {}

    def mark(self, name: str) -> None:
        self.seconds[name] = time.perf_counter() - self.start - sum(self.seconds.values())


def load_bf16_llama(path: Path | str):  # type: ignore[no-untyped-def]
    """A Llama base model loaded in bfloat16, as the PEFT routes load it (transformers 5 names the
    option `dtype`, 4 `torch_dtype`)."""
    import torch
    import transformers
    from transformers import LlamaForCausalLM

    dtype_key = "dtype" if int(transformers.__version__.split(".")[0]) >= 5 else "torch_dtype"
    return LlamaForCausalLM.from_pretrained(path, **{dtype_key: torch.bfloat16})


def measure(command: list[str], *, env: dict[str, str] | None = None, check: bool = True) -> Measured:
    """Run `command` as a child: its wall time and peak RSS (the kernel's high-water mark for that
    process, from wait4 in a small launcher; psutil polling every 10 ms where there is no wait4)."""
    import tempfile

    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err, \
            tempfile.NamedTemporaryFile(suffix=".json") as report:
        if hasattr(os, "wait4"):
            subprocess.run([sys.executable, "-c", _LAUNCHER, report.name, *command], stdout=out, stderr=err,
                           env=env, check=False)
            data = json.loads(Path(report.name).read_text() or "{}")
            if not data:
                raise RuntimeError(f"the launcher did not report on {command}")
            wall, peak, returncode = data["wall"], data["maxrss"], data["returncode"]
        else:  # pragma: no cover - platforms without wait4
            import psutil

            start = time.perf_counter()
            process = subprocess.Popen(command, stdout=out, stderr=err, env=env)
            child = psutil.Process(process.pid)
            peak = 0
            while process.poll() is None:
                try:
                    peak = max(peak, child.memory_info().rss)
                except psutil.Error:
                    break
                time.sleep(0.01)
            wall, returncode = time.perf_counter() - start, process.returncode
        out.seek(0)
        err.seek(0)
        result = Measured(wall, peak, returncode, out.read().decode(errors="replace"),
                          err.read().decode(errors="replace"))
    if check and result.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed ({result.returncode}):\n{result.stderr[-4000:]}")
    return result


def pemlang_cli() -> list[str]:
    return [sys.executable, "-m", "pemlang.cli"]


def baseline_rss() -> int:
    """Peak RSS of a Python that imports torch and safetensors and does nothing else."""
    return measure([sys.executable, "-c", "import torch, safetensors.torch"]).peak_rss


def lora_bytes(directory: Path) -> int:
    return sum(p.stat().st_size for p in directory.glob("*.safetensors"))


def dtypes(directory: Path) -> str:
    """The dtypes in an adapter's safetensors header, e.g. "F32" or "BF16+F32"."""
    import struct

    with open(directory / "adapter_model.safetensors", "rb") as f:
        header = json.loads(f.read(struct.unpack("<Q", f.read(8))[0]))
    return "+".join(sorted({v["dtype"] for k, v in header.items() if k != "__metadata__"}))


# -- checks on adapters ---------------------------------------------------------------------------


def delta_weights(directory: Path, modules: list[str], dtype=None) -> dict:  # type: ignore[no-untyped-def]
    """ΔW = scaling·B·A per module prefix of a PEFT LoRA directory (rank_pattern/alpha_pattern and
    rsLoRA honoured), in `dtype` (default float64)."""
    import torch
    from safetensors import safe_open

    dtype = dtype or torch.float64
    config = json.loads((directory / "adapter_config.json").read_text())
    result = {}
    with safe_open(str(directory / "adapter_model.safetensors"), "pt") as f:
        for prefix in modules:
            a = f.get_tensor(f"{prefix}.lora_A.weight").to(dtype)
            b = f.get_tensor(f"{prefix}.lora_B.weight").to(dtype)
            rank = _pattern(config.get("rank_pattern") or {}, prefix, config["r"])
            alpha = _pattern(config.get("alpha_pattern") or {}, prefix, config["lora_alpha"])
            scaling = alpha / (rank**0.5 if config.get("use_rslora") else rank)
            result[prefix] = (b @ a) * scaling
    return result


def _pattern(patterns: dict, prefix: str, default: float) -> float:  # type: ignore[type-arg]
    import re

    name = prefix.removeprefix("base_model.model.")
    for pattern, value in patterns.items():
        if re.match(rf"(.*\.)?({pattern})$", name):
            return value
    return default


def truncated_svd(matrix, rank: int):  # type: ignore[no-untyped-def]
    import torch

    u, s, vh = torch.linalg.svd(matrix, full_matrices=False)
    return (u[:, :rank] * s[:rank]) @ vh[:rank]


def relative_error(x, reference) -> float:  # type: ignore[no-untyped-def]
    import torch

    return float(torch.linalg.norm(x - reference) / torch.linalg.norm(reference))


# -- results --------------------------------------------------------------------------------------


def require_bench_extra(*more: str) -> None:
    """Exit with a clear message when the `bench` extra (matplotlib, psutil; transformers for end_to_end) is missing."""
    import importlib.util

    missing = [name for name in ("matplotlib", "psutil", *more) if importlib.util.find_spec(name) is None]
    if missing:
        sys.exit(f"the benchmarks need {', '.join(missing)}, which are not installed: pip install -e '.[bench]'")


def pyplot():  # type: ignore[no-untyped-def]
    try:
        import matplotlib
    except ImportError:
        sys.exit("the benchmarks' plots need matplotlib: pip install -e '.[bench]'")
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig, path: Path, dpi: int = 100) -> None:  # type: ignore[no-untyped-def]
    """Lay a finished figure out, write it to `path` and free it."""
    fig.tight_layout()
    fig.savefig(path, dpi=dpi)
    pyplot().close(fig)


def markdown_table(header: list[str], rows: list[list[object]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines)


def write_results(stem: str, text: str, device: str = "cpu") -> Path:
    """RESULTS/STEM.md (STEM-cuda.md for a GPU run, so it does not replace the CPU's)."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{stem}{'' if device == 'cpu' else '-' + device.replace(':', '')}.md"
    path.write_text(text.rstrip() + "\n")
    return path


def environment_line(device: str) -> str:
    import platform

    import torch

    import pemlang

    return (f"pemlang {pemlang.__version__} from `{Path(pemlang.__file__).parent}`, torch {torch.__version__}, "
            f"Python {platform.python_version()}, {os.cpu_count()} CPUs, device {device}, "
            f"{time.strftime('%Y-%m-%d %H:%M')}")


def cuda_or_exit(device: str) -> None:
    """With `--device cuda` and no CUDA device: say so and exit 0."""
    if device.startswith("cuda"):
        import torch

        if not torch.cuda.is_available():
            print("no CUDA device: GPU benchmark skipped")
            sys.exit(0)


def mib(n: float) -> str:
    return f"{n / MiB:,.0f}"
