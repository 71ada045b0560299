"""Writing PEFT adapter directories, atomically and byte-for-byte reproducibly.

Every write goes through `guard` first: an input (or a directory containing or inside one) is never
written, an existing directory is replaced only with `force`, two outputs never share a directory,
and a destination that cannot be created is a diagnostic before anything is written.

Files go to a staging directory beside the destination (`.NAME.PID-XXXX.pemlang-tmp`), which is
renamed into place only when complete: an interrupted run leaves no partial output. A replaced
output (--force) is swapped with `renameat2(RENAME_EXCHANGE)` where the system has it, so the
destination is never missing; elsewhere it is two renames. Writers into one directory hold an
flock on that directory while they stage and swap, so concurrent writers take turns, and staging
left by a killed writer (whose lock died with it) is removed by the next. Keys, JSON and
metadata are sorted, with no timestamps, so the same inputs give identical bytes.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import json
import math
import os
import platform
import re
import shutil
import struct
import sys
import tempfile
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from . import interrupts
from .about import __version__
from .adapters import CONFIG_NAME, WEIGHTS_NAME
from .diagnostics import Diagnostic, PemError, display_path, error
from .formatting import dropped_text, human_bytes, visible
from .plan import DTYPE_BYTES, Dropped, OutputPlan, Plan, output_inputs
from .plan import dropped as svd_dropped
from .types import TORCH_DTYPE_NAMES

# What a writer leaves beside the destination while it works: `.NAME.PID-RANDOM.pemlang-tmp`
# (staging) and `.NAME.PID-RANDOM.pemlang-old` (an old directory on its way out).
STAGING = re.compile(r"^\..+\.\d+-[a-z0-9_]+\.pemlang-(tmp|old)$")
# Each is created with a sibling claim file, NAME + CLAIM: only a directory with its claim (or an
# empty one) is ever removed as stale, so a user's directory that happens to match the pattern —
# an input, say — is never touched.
CLAIM = ".claim"
FORCE_HINT = "pass --force (force=True in the API) to replace it"


class OutputExists(PemError):
    """The destination exists and `force` was not given."""

    def __init__(self, destination: Path):
        self.path = destination
        super().__init__([error("E018", f"output directory already exists: {display_path(destination)}",
                                hints=[FORCE_HINT])])

    def __str__(self) -> str:
        return str(self.path)


class WriteError(PemError):
    """A destination that cannot be written (E018): refused by the guard, or an OS error while writing."""


CARD_NAME = "README.md"


def _heading(meta: Mapping[str, str]) -> str:
    """The card's title: the output's name, else its expression on one line (comments dropped)."""
    name = meta.get("pemlang.output") or ""
    if name:
        return _text(name)
    lines = [line.split("#")[0].strip() for line in meta.get("pemlang.expression", "").splitlines()]
    text = " ".join(line for line in lines if line)
    return _text(text[:120] + "…" if len(text) > 120 else text) or "pemlang adapter"


# Markdown's punctuation that could start emphasis, code, a link or an image, or end a table cell.
_MARKDOWN = re.compile(r"([\\`*_\[\]|~!])")


def _text(value: Any) -> str:
    """What the card quotes (a path, a name), as Markdown that renders as that text on one line:
    control characters (a CR, an escape) shown as escapes, HTML's `& < >` as entities, Markdown's
    punctuation backslash-escaped (a `|` cannot end a table cell)."""
    text = visible(str(value))
    text = text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")
    return _MARKDOWN.sub(r"\\\1", text)



def _digest(value: Any) -> str:
    """A sha256 as code; anything else (a header pemlang did not write) as text."""
    return f"`{value}`" if isinstance(value, str) and re.fullmatch(r"[0-9a-f]{64}", value) else _text(value)


def _fenced_text(text: str) -> str:
    """Text for a fenced block (where Markdown and HTML are literal): lines as they are, other
    control characters shown as escapes."""
    return visible(text.replace("\r\n", "\n"), keep="\n\t")


def provenance_field(meta: Mapping[str, str], key: str, default: Any = None) -> Any:
    """A provenance entry `metadata` recorded as JSON (params, inputs, tune), or `default` when it
    is missing or does not parse (a header pemlang did not write)."""
    try:
        return json.loads(meta[key])
    except (KeyError, ValueError, RecursionError):
        return default


def _inputs_lines(meta: Mapping[str, str]) -> list[str]:
    """A model card's table of the inputs (name, path, sha256), from the provenance metadata."""
    inputs = provenance_field(meta, "pemlang.inputs", [])
    if not inputs:
        return []
    return ["| input | adapter | sha256 |", "|---|---|---|",
            *[f"| {_text(i.get('name'))} | {_text(i.get('path'))} | {_digest(i.get('sha256'))} |" for i in inputs
              if isinstance(i, dict)], ""]


def model_card(config: Mapping[str, Any], meta: Mapping[str, str]) -> str:
    """The Hub's model card for a written adapter: YAML front matter (base_model, library_name,
    tags) and what made it — the program, each input with its sha256, the params — and how to load
    it. Deterministic: the same inputs give the same card."""
    import yaml

    def fenced(text: str, language: str = "") -> list[str]:  # a fence longer than any backtick run inside
        longest = max((len(run) for run in re.findall(r"`+", text)), default=0)
        fence = "`" * max(3, longest + 1)
        return [fence + language, _fenced_text(text), fence]

    base = config.get("base_model_name_or_path")
    kind = "lora" if config.get("peft_type") == "LORA" else "ia3"
    front: dict[str, Any] = {}
    if base:
        front["base_model"] = base
    front["library_name"] = "peft"
    front["tags"] = ["pemlang", kind, "merge"]
    lines = ["---", yaml.safe_dump(front, sort_keys=False, allow_unicode=True).rstrip(), "---", "",
             f"# {_heading(meta)}", "",
             f"A {'LoRA' if kind == 'lora' else '(IA)3'} adapter made by [pemlang](https://github.com/pemlang/pemlang) "
             f"{meta.get('pemlang.version', '')} ({meta.get('pemlang.mode', 'paper')} mode) from other adapters by "
             "arithmetic, without training:", "", *fenced(meta.get("pemlang.expression", "")), ""]
    params = provenance_field(meta, "pemlang.params", {})
    if params:
        lines += ["Params: " + ", ".join(f"`{k} = {v}`" for k, v in params.items()) + ".", ""]
    tuned = provenance_field(meta, "pemlang.tune")
    if isinstance(tuned, dict):
        lines += [f"The params were chosen by `pemlang tune`: {_text(tuned.get('direction'))} "
                  f"{_text(tuned.get('objective'))}, best value {_text(tuned.get('value'))} at trial "
                  f"{_text(tuned.get('trial'))} of {_text(tuned.get('trials'))}.", ""]
    lines += _dropped_lines(meta)
    lines += _inputs_lines(meta)
    program = meta.get("pemlang.program", "")
    if program:
        lines += ["The program:", "", *fenced(program.rstrip("\n")), ""]
    classifier = config.get("task_type") == "SEQ_CLS" or bool({"score", "classifier"} & set(config.get("modules_to_save")
                                                                                        or []))
    loader = "AutoModelForSequenceClassification" if classifier else "AutoModelForCausalLM"
    lines += ["Load it with PEFT:", "", "```python", "from peft import PeftModel",
              f"from transformers import {loader}", "",
              f"base = {loader}.from_pretrained({json.dumps(base or 'BASE_MODEL', ensure_ascii=False)})",
              'model = PeftModel.from_pretrained(base, "path/to/this/directory")', "```", "",
              "`pemlang inspect` on this directory shows the same provenance, which is also recorded in the "
              "safetensors header.", ""]
    return "\n".join(lines)


def dropped_field(report: Sequence[Dropped]) -> str:
    """`pemlang.svd_dropped`: per svd call of the output, the call, its layers and the largest and
    mean share of ‖ΔW‖² it dropped, as JSON whose numbers have a fixed width (`%.6e`): the header's
    length is known before the shares are (the streaming writer lays the file out first)."""
    def number(share: float) -> str:
        return f"{share if share >= 1e-99 else 0.0:.6e}"  # two exponent digits: a fixed width

    return "[" + ",".join(
        f'{{"call":{json.dumps(d.call, ensure_ascii=False)},"largest":{number(d.largest)},"layers":{d.layers},'
        f'"mean":{number(d.mean)}}}' for d in report) + "]"


def dropped_report(meta: Mapping[str, str]) -> list[str]:
    """What the svd calls dropped, as `metadata` recorded it, in words (one line per call; [] when
    the header has no such field or it does not parse)."""
    report = provenance_field(meta, "pemlang.svd_dropped", [])
    lines = []
    for item in report if isinstance(report, list) else []:
        try:
            lines.append(dropped_text(str(item["call"]), int(item["layers"]), float(item["largest"]),
                                      float(item["mean"])))
        except (KeyError, TypeError, ValueError):
            continue
    return lines


def _dropped_lines(meta: Mapping[str, str]) -> list[str]:
    """The model card's account of what svd dropped (the share of ‖ΔW‖²_F per layer not kept)."""
    lines = dropped_report(meta)
    if not lines:
        return []
    return ["What `svd` dropped (per layer, the share of the weight update's squared Frobenius norm ‖ΔW‖² "
            "that the truncation did not keep):", "", *[f"- {_text(line)}" for line in lines], ""]


def metadata(plan: Plan, out: OutputPlan, input_hashes: dict[str, str],
             dropped: Sequence[Dropped] | None = None) -> dict[str, str]:
    """The provenance recorded in the safetensors header: expression, mode, params, inputs, and
    for an output made through `svd`, what each svd call dropped (`dropped`; zeros when None, a
    placeholder of the final length)."""
    used = sorted(output_inputs(plan, out))
    report = list(dropped) if dropped is not None else svd_dropped(plan, out)
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
        **({"pemlang.svd_dropped": dropped_field(report)} if report else {}),
        **dict(plan.provenance),
    }


# safetensors lays tensors out by dtype, widest first, then by name; the header lists them sorted.
DTYPE_ORDER = {"F64": 4, "F32": 3, "BF16": 2, "F16": 1}


@dataclass(frozen=True)
class Layout:
    """Where everything goes in a safetensors file, known before any tensor is computed."""

    header: bytes  # the 8-byte length and the JSON header, padded to 8 bytes
    offsets: dict[str, tuple[int, int]]  # tensor key → [begin, end) in the file
    size: int  # the whole file


def layout(entries: Mapping[str, tuple[str, Sequence[int]]], meta: Mapping[str, str]) -> Layout:
    """The canonical layout of tensors `entries` (key → (dtype, shape)) with metadata `meta`: the
    data as safetensors' own `save` orders it, the header JSON with sorted keys and no spaces
    (the library writes its metadata map in hash order), padded with spaces to 8 bytes."""
    header: dict[str, Any] = {"__metadata__": dict(meta)}
    position = 0
    for key in sorted(entries, key=lambda k: (-DTYPE_ORDER[entries[k][0]], k)):
        dtype, shape = entries[key]
        size = math.prod(shape) * DTYPE_BYTES[dtype]
        header[key] = {"dtype": dtype, "shape": list(shape), "data_offsets": [position, position + size]}
        position += size
    text = json.dumps(header, sort_keys=True, separators=(",", ":")).encode("utf-8")
    text += b" " * (-len(text) % 8)  # keep the data 8-byte aligned, as safetensors does
    start = 8 + len(text)
    offsets = {key: (start + value["data_offsets"][0], start + value["data_offsets"][1])
               for key, value in header.items() if key != "__metadata__"}
    return Layout(struct.pack("<Q", len(text)) + text, offsets, start + position)


def tensor_bytes(tensor: Any) -> memoryview:
    """A CPU tensor's bytes, little-endian as safetensors stores them, without a copy."""
    import torch

    flat = tensor.detach().to("cpu").contiguous().reshape(-1)
    return memoryview(flat.view(torch.uint8).numpy()).cast("B")


def tensor_dtype(tensor: Any) -> str:
    """A tensor's safetensors dtype name (`F32`…): the table of torch names, read backwards."""
    torch_name = str(tensor.dtype).removeprefix("torch.")
    return next(name for name, candidate in TORCH_DTYPE_NAMES.items() if candidate == torch_name)


# -- the guard: every write is checked here first ---------------------------------------------------


def _nearest_existing(path: Path) -> Path:
    while not os.path.lexists(path) and path != path.parent:
        path = path.parent
    return path


def _overlaps(a: Path, b: Path) -> bool:
    return a == b or a.is_relative_to(b) or b.is_relative_to(a)


def _real_inputs(inputs: Mapping[str, Path]) -> list[tuple[str, Path]]:
    """Every input resolved, with what its files link to: an input's files may be symbolic links
    elsewhere (the Hugging Face cache links snapshots to blobs), which are as much the input."""
    real_inputs = []
    for name, path in inputs.items():
        try:
            real_inputs.append((name, Path(path).resolve()))
        except (OSError, RuntimeError):  # a symbolic link loop: the path as written is still guarded
            real_inputs.append((name, Path(os.path.abspath(path))))
    for name, path in list(real_inputs):
        for file_name in (WEIGHTS_NAME, CONFIG_NAME, "adapter_model.bin"):
            with contextlib.suppress(OSError, RuntimeError):
                if (path / file_name).is_symlink():
                    real_inputs.append((name, (path / file_name).resolve()))
    return real_inputs


def file_clash(path: Path, inputs: Mapping[str, Path]) -> str | None:
    """Which of `inputs` (adapter directories or single files, by name) writing the file `path`
    would touch: `path` is one, is inside one, or is one of their files by another name (a link);
    None when it touches none. The guard for a file that a session appends to (the REPL's history)."""
    try:
        real = Path(os.path.abspath(path)).resolve()
    except (OSError, RuntimeError):
        return None
    real_inputs = _real_inputs(inputs)
    for name, location in real_inputs:
        if real == location or real.is_relative_to(location):
            return name
    for name, location in real_inputs:  # a hard link to an input's file
        candidates = [location] if location.is_file() else [location / n for n in (WEIGHTS_NAME, CONFIG_NAME,
                                                                                     "adapter_model.bin")]
        for candidate in candidates:
            with contextlib.suppress(OSError):
                if os.path.samefile(real, candidate):
                    return name
    return None


def destination_problems(destinations: Sequence[Path], inputs: Mapping[str, Path], *, force: bool,
                         bases: Mapping[str, Path] | None = None) -> list[Diagnostic]:
    """Why any of `destinations` cannot be written (empty when all can): the one guard in front of
    every write (CLI run, eval and sweep; the API's save, write and sweep; the REPL's :save).

    An input, or a directory containing or inside an input, is refused with or without `force`;
    so are two destinations that are one directory, a destination that is a file, a parent that is
    a file or not writable, and a name too long for the file system. An existing directory is
    refused without `force`. `bases` (as written → directory) are the base models outputs are merged
    into: never written either."""
    problems: list[Diagnostic] = []
    real_bases = _real_inputs(bases or {})
    existing: list[Path] = []
    seen: dict[Path, Path] = {}
    real_inputs = _real_inputs(inputs)
    for destination in destinations:
        destination = Path(os.path.abspath(destination))
        shown = display_path(destination)
        if "\0" in str(destination):
            problems.append(error("E018", "an output path contains a NUL character", notes=[repr(str(destination))]))
            continue
        try:
            real = destination.resolve()
        except (OSError, RuntimeError) as exc:  # a symbolic link loop, a path too long to resolve
            problems.append(error("E018", f"cannot resolve the output path {shown}", notes=[str(exc)]))
            continue
        if real in seen:
            problems.append(error("E018", "two outputs write the same directory",
                                  notes=[f"{shown} is written twice (also as {display_path(seen[real])})"]))
            continue
        seen[real] = destination
        clash = list({name: path for name, path in real_inputs if _overlaps(real, path)}.items())
        for name, path in clash:
            where = ("is the input's directory" if real == path else
                     "contains the input" if path.is_relative_to(real) else "is inside the input")
            problems.append(error("E018", f"output would overwrite input `{name}`", notes=[f"{shown} {where}"],
                                  hints=["inputs are never written: choose another output directory"]))
        clash_bases = list({name: path for name, path in real_bases if _overlaps(real, path)}.items())
        for name, path in clash_bases:
            where = ("is the base model's directory" if real == path else
                     "contains the base model" if path.is_relative_to(real) else "is inside the base model")
            problems.append(error("E018", "output would overwrite the base model", notes=[f"{shown} {where} {name}"],
                                  hints=["the base is never written (not even with --force): choose another output "
                                         "directory"]))
        if clash or clash_bases:
            continue
        if os.path.lexists(destination):
            if not destination.is_dir():
                problems.append(error("E018", "output path is a file" if destination.exists() else
                                      "output path is a broken symbolic link", notes=[shown],
                                      hints=["an output is a directory: choose another path"]))
            elif not force:
                existing.append(destination)
            continue
        ancestor = _nearest_existing(destination.parent)
        if not ancestor.is_dir():
            problems.append(error("E018", f"cannot create {shown}: {display_path(ancestor)} is not a directory",
                                  hints=["choose an output path whose parents are directories"]))
        elif not os.access(ancestor, os.W_OK | os.X_OK):
            problems.append(error("E018", f"cannot create {shown}: {display_path(ancestor)} is not writable",
                                  hints=["choose a writable output directory"]))
        else:
            limit = _name_max(ancestor)
            # The staging name adds a dot, the pid and a random part to the destination's name.
            too_long = [part for part in destination.relative_to(ancestor).parts
                        if len(os.fsencode(part)) + 40 > limit]
            if too_long:
                problems.append(error("E018", f"cannot create {shown}: a name is too long for the file system",
                                      notes=[f"{too_long[0][:40]}… is {len(os.fsencode(too_long[0]))} bytes; "
                                             f"the limit there is {limit - 40} for an output"]))
    if existing:
        many = len(existing) > 1
        problems.append(error("E018", f"{len(existing)} output directories already exist" if many else
                              "output directory already exists",
                              notes=[display_path(existing[0])] + ([f"and {len(existing) - 1} more"] if many else []),
                              hints=[FORCE_HINT.replace("it", "them") if many else FORCE_HINT]))
    return problems


def _name_max(directory: Path) -> int:
    try:
        return int(os.pathconf(directory, "PC_NAME_MAX"))
    except (OSError, ValueError, AttributeError):
        return 255


def guard(destinations: Sequence[Path], inputs: Mapping[str, Path], *, force: bool,
          bases: Mapping[str, Path] | None = None) -> None:
    """Raise WriteError (E018) unless every destination can be written (`destination_problems`)."""
    problems = destination_problems(destinations, inputs, force=force, bases=bases)
    if problems:
        raise WriteError(problems)


def check_free_space(destinations: Sequence[Path], total_bytes: int) -> Diagnostic | None:
    """E018 when `total_bytes` exceed the free space where the first destination would go."""
    if not destinations:
        return None
    where = _nearest_existing(Path(os.path.abspath(destinations[0])).parent)
    try:
        free = shutil.disk_usage(where).free
    except OSError:
        return None
    if total_bytes <= free:
        return None
    return error("E018", f"the outputs need {human_bytes(total_bytes)}, but only {human_bytes(free)} is free "
                 f"on {display_path(where)}", hints=["free some space, or write fewer points"])


# -- the lock and stale staging --------------------------------------------------------------------


@contextlib.contextmanager
def locked(directory: Path) -> Iterator[None]:
    """Hold an exclusive flock on `directory` (waiting for another writer's turn); it is released
    when the block ends or the process dies, so it cannot be lost."""
    try:
        import fcntl
    except ImportError:  # not POSIX: no lock, writes still atomic
        yield
        return
    fd = os.open(directory, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def remove_stale_staging(directory: Path, *, wait: bool = True) -> int:
    """Remove the staging and retired directories that dead writers left in `directory`.

    Staging exists only while its writer holds the lock on the directory; a writer that was killed
    released the lock with its death. So whatever is found while holding the lock is stale (pid
    reuse cannot fool this). Without `wait`, nothing is done when another writer holds the lock."""
    import fcntl

    fd = os.open(directory, os.O_RDONLY)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
        except BlockingIOError:
            return 0
        return _remove_staging(directory)
    finally:
        os.close(fd)


def _remove_staging(directory: Path, protect: Sequence[Path] = ()) -> int:
    """Remove stale staging in `directory`; never an entry that is, contains or is inside one of
    `protect` (the run's inputs), whatever its name and claim."""
    removed = 0
    entries = []
    with contextlib.suppress(OSError), os.scandir(directory) as scan:
        entries = list(scan)
    names = {entry.name for entry in entries}
    guarded = [Path(os.path.realpath(path)) for path in protect]
    for entry in entries:
        if not STAGING.match(entry.name):
            continue
        real = Path(os.path.realpath(entry.path))
        if any(_overlaps(real, path) for path in guarded):
            continue
        if entry.name + CLAIM in names:
            _remove(Path(entry.path))
            removed += 1
        elif entry.is_dir(follow_symlinks=False):
            with contextlib.suppress(OSError):  # unclaimed: only if empty (a writer killed right after mkdtemp)
                os.rmdir(entry.path)
                removed += 1
    for name in names:  # claims left without their entry (a kill between the two removals)
        if name.endswith(CLAIM) and STAGING.match(name[: -len(CLAIM)]) and not os.path.lexists(
                directory / name[: -len(CLAIM)]):
            with contextlib.suppress(OSError):
                os.unlink(directory / name)
    return removed


def _remove(path: Path) -> None:
    """Remove a staging entry: a directory tree, or a symbolic link (never what it points to)."""
    if path.is_symlink() or not path.is_dir():
        with contextlib.suppress(OSError):
            os.unlink(path)
    else:
        shutil.rmtree(path, ignore_errors=True)


def _claimed_directory(destination: Path, suffix: str) -> Path:
    """A new `.NAME.PID-RANDOM.pemlang-SUFFIX` directory beside `destination`, with its claim."""
    with interrupts.deferred():  # a signal cannot land between creating it and knowing its name
        path = Path(tempfile.mkdtemp(prefix=f".{destination.name}.{os.getpid()}-", suffix=f".pemlang-{suffix}",
                                     dir=destination.parent))
        path.with_name(path.name + CLAIM).touch()
    return path


def _release(path: Path) -> None:
    """Remove a staging entry and then its claim."""
    _remove(path)
    with contextlib.suppress(OSError):
        os.unlink(path.with_name(path.name + CLAIM))


# -- the atomic swap -------------------------------------------------------------------------------

_RENAME_EXCHANGE = 2
_AT_FDCWD = -100
_SYSCALL_RENAMEAT2 = {"x86_64": 316, "amd64": 316, "aarch64": 276, "arm64": 276}


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths atomically with Linux's renameat2(RENAME_EXCHANGE): True when done, False
    where the system or file system lacks it (the caller falls back to two renames)."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(None, use_errno=True)
    except OSError:
        return False
    old, new = os.fsencode(a), os.fsencode(b)
    function = getattr(libc, "renameat2", None)
    if function is not None:
        result = function(_AT_FDCWD, old, _AT_FDCWD, new, _RENAME_EXCHANGE)
    elif (number := _SYSCALL_RENAMEAT2.get(platform.machine().lower())) is not None:
        result = libc.syscall(number, _AT_FDCWD, old, _AT_FDCWD, new, _RENAME_EXCHANGE)
    else:
        return False
    if result == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP, errno.ENOTSUP):
        return False
    raise OSError(code, os.strerror(code), os.fsdecode(new))


def exchange_supported(directory: Path) -> bool:
    """Whether atomic exchange works in `directory` (tried on two scratch directories)."""
    with tempfile.TemporaryDirectory(dir=directory) as scratch:
        (Path(scratch) / "a").mkdir()
        (Path(scratch) / "b").mkdir()
        return _exchange(Path(scratch) / "a", Path(scratch) / "b")


def _fsync_directory(directory: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


# -- writing ---------------------------------------------------------------------------------------


class StagedAdapter:
    """One output being written into its staging directory: the weights file is laid out from the
    plan (every tensor's dtype and shape) before a tensor is computed, each tensor is written at its
    offset as soon as it exists, and the header, whose metadata (the inputs' hashes) is known only
    at the end, goes in last, at the same length. Nothing holds the whole output."""

    def __init__(self, staging: Path, entries: Mapping[str, tuple[str, Sequence[int]]], meta: Mapping[str, str],
                 background: _Background | None = None, destination: Path | None = None):
        self.staging = staging
        self.destination = destination
        self.entries = dict(entries)
        self.layout = layout(self.entries, meta)
        self.written: set[str] = set()
        self.background = background
        self.fd = os.open(staging / WEIGHTS_NAME, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        os.ftruncate(self.fd, self.layout.size)

    def put(self, tensors: Mapping[str, Any], ready: Callable[[], None] | None = None) -> None:
        """Write tensors (CPU, in their output dtype) at their offsets; in the background when the
        writer has a background thread, so the next layer computes meanwhile. `ready` is called
        before any byte is read (a copy from the GPU may still be in flight)."""
        if ready is not None and self.background is None:
            ready()
            ready = None
        if self.background is not None:
            self.background.layer()  # the last layer is on disk before this one queues
        for key, tensor in tensors.items():
            begin, end = self.layout.offsets[key]
            if (tensor_dtype(tensor), tuple(tensor.shape)) != (self.entries[key][0], tuple(self.entries[key][1])):
                raise AssertionError(f"{key}: {tensor_dtype(tensor)}{list(tensor.shape)} is not the planned "
                                     f"{self.entries[key][0]}{list(self.entries[key][1])}")
            data = tensor_bytes(tensor)
            assert len(data) == end - begin
            self.written.add(key)
            if self.background is not None:
                self.background.submit(_pwrite_all, self.fd, data, begin, ready, self.destination)
                ready = None  # one wait covers the layer's tensors: they were copied before the event
            else:
                _pwrite_all(self.fd, data, begin, None, self.destination)

    def finish(self, config: Mapping[str, Any], meta: Mapping[str, str]) -> None:
        """Write the header (with the final metadata) and the config, and flush both to disk."""
        missing = sorted(set(self.entries) - self.written)
        if missing:
            raise AssertionError(f"{len(missing)} planned tensors were never written, e.g. {missing[0]}")
        if self.background is not None:
            self.background.drain()
        final = layout(self.entries, meta)
        if final.offsets != self.layout.offsets:
            raise AssertionError("the final metadata changed the header's length")
        _pwrite_all(self.fd, memoryview(final.header), 0)
        os.fsync(self.fd)
        self.close()
        self._config_and_card(config, meta)

    def _config_and_card(self, config: Mapping[str, Any], meta: Mapping[str, str]) -> None:
        """adapter_config.json and the model card, flushed to disk."""
        (self.staging / CONFIG_NAME).write_text(json.dumps(config, indent=2, sort_keys=True, ensure_ascii=False)
                                                + "\n", encoding="utf-8")
        (self.staging / CARD_NAME).write_text(model_card(config, meta), encoding="utf-8")
        for name in (CONFIG_NAME, CARD_NAME):
            with (self.staging / name).open("rb") as f:
                os.fsync(f.fileno())

    def close(self) -> None:
        """Close the file (after any write still in flight: never under a background write)."""
        if self.fd >= 0:
            if self.background is not None:
                self.background.settle()
            os.close(self.fd)
            self.fd = -1


SPILL_NAME = ".tensors.pemlang-spill"  # beside the weights file in staging, removed before the swap
COPY_CHUNK = 1 << 22  # bytes copied at a time from the spill file into place


class SpilledAdapter(StagedAdapter):
    """An output whose ranks are chosen from the data (`svd(…, energy=e)`): its tensors' shapes,
    hence the file's layout, are known only once every layer is computed. Each tensor is appended
    to a spill file in the staging directory as it comes (in the background, like StagedAdapter);
    `finish` lays out the canonical file (the same bytes as for planned shapes: safetensors' own
    order) and copies every tensor into place a chunk at a time, then removes the spill file.
    Memory holds a chunk, never the output; the disk holds the output twice until the end."""

    def __init__(self, staging: Path, entries: Mapping[str, tuple[str, Sequence[int]]], meta: Mapping[str, str],
                 background: _Background | None = None, destination: Path | None = None):
        self.staging = staging
        self.destination = destination
        self.planned = dict(entries)  # dtypes, and shapes whose ranks are upper bounds
        self.entries: dict[str, tuple[str, Sequence[int]]] = {}  # as the tensors came
        self.spilled: dict[str, int] = {}  # key → offset in the spill file
        self.size = 0
        self.written: set[str] = set()
        self.background = background
        self.fd = os.open(staging / SPILL_NAME, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)

    @property
    def ranks(self) -> dict[str, int]:
        """The rank each layer got (from its lora_A's shape), as layer key → rank."""
        suffix = ".lora_A.weight"
        return {key.removeprefix("base_model.model.").removesuffix(suffix): int(shape[0])
                for key, (_, shape) in self.entries.items() if key.endswith(suffix)}

    def put(self, tensors: Mapping[str, Any], ready: Callable[[], None] | None = None) -> None:
        """Append tensors (CPU, in their output dtype) to the spill file; see StagedAdapter.put."""
        if ready is not None and self.background is None:
            ready()
            ready = None
        if self.background is not None:
            self.background.layer()
        for key, tensor in tensors.items():
            dtype, shape = tensor_dtype(tensor), tuple(tensor.shape)
            planned_dtype, bound = self.planned[key]
            if dtype != planned_dtype or len(shape) != len(bound) or any(n > b for n, b in zip(shape, bound, strict=True)):
                raise AssertionError(f"{key}: {dtype}{list(shape)} is not within the planned "
                                     f"{planned_dtype}{list(bound)}")
            data = tensor_bytes(tensor)
            self.entries[key] = (dtype, shape)
            self.spilled[key] = self.size
            self.size += len(data)
            self.written.add(key)
            if self.background is not None:
                self.background.submit(_pwrite_all, self.fd, data, self.spilled[key], ready, self.destination)
                ready = None
            else:
                _pwrite_all(self.fd, data, self.spilled[key], None, self.destination)

    def finish(self, config: Mapping[str, Any], meta: Mapping[str, str]) -> None:
        """Lay the weights file out from the shapes the tensors came with, copy each into place,
        remove the spill file; then the config and the card."""
        missing = sorted(set(self.planned) - self.written)
        if missing:
            raise AssertionError(f"{len(missing)} planned tensors were never written, e.g. {missing[0]}")
        if self.background is not None:
            self.background.drain()
        final = layout(self.entries, meta)
        target = os.open(self.staging / WEIGHTS_NAME, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            os.ftruncate(target, final.size)
            _pwrite_all(target, memoryview(final.header), 0, None, self.destination)
            for key, (begin, end) in final.offsets.items():
                source = self.spilled[key]
                for start in range(0, end - begin, COPY_CHUNK):
                    chunk = os.pread(self.fd, min(COPY_CHUNK, end - begin - start), source + start)
                    if len(chunk) != min(COPY_CHUNK, end - begin - start):
                        raise OSError(errno.EIO, "the spill file ends early", str(self.staging / SPILL_NAME))
                    _pwrite_all(target, memoryview(chunk), begin + start, None, self.destination)
            os.fsync(target)
        finally:
            os.close(target)
        self.close()
        self._config_and_card(config, meta)

    def close(self) -> None:
        """Close and remove the spill file (after any write still in flight)."""
        super().close()
        with contextlib.suppress(OSError):
            os.unlink(self.staging / SPILL_NAME)


def _pwrite_all(fd: int, data: memoryview, offset: int, ready: Callable[[], None] | None = None,
                destination: Path | None = None) -> None:
    if ready is not None:
        ready()
    try:
        while data:
            count = os.pwrite(fd, data, offset)
            data, offset = data[count:], offset + count
    except OSError as exc:
        if destination is not None:  # which output failed (E018 names it); else `staged` knows
            exc.destination = destination  # type: ignore[attr-defined]
        raise


class _Background:
    """One thread that writes while the caller computes, a layer at a time: when the next layer
    is handed over (`layer()`), the writes of the one before have finished, so memory holds the layer
    being written and the one being computed, whatever the number of layers. An error in the
    thread is raised in the caller."""

    def __init__(self) -> None:
        from concurrent.futures import ThreadPoolExecutor

        self.pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="pemlang-writer")
        self.pending: list[Any] = []

    def submit(self, function: Any, *args: Any) -> None:
        self.pending.append(self.pool.submit(function, *args))

    def layer(self) -> None:
        """A new layer is handed over: the last one's writes finish first."""
        self.drain()

    def drain(self) -> None:
        while self.pending:
            self.pending.pop(0).result()

    def settle(self) -> None:
        """Wait for every write in flight, ignoring their errors (the caller is already failing)."""
        for future in self.pending:
            with contextlib.suppress(BaseException):
                future.result()
        self.pending.clear()

    def close(self) -> None:
        self.pool.shutdown(wait=True, cancel_futures=True)
        self.pending.clear()


def _os_error(exc: OSError, destination: Path) -> WriteError:
    reason = exc.strerror or str(exc)
    return WriteError([error("E018", f"cannot write output {display_path(destination)}: {reason}",
                             notes=[f"{exc.filename}" if exc.filename else display_path(destination)],
                             hints=["nothing was written there; check the path, its permissions and free space"])])


@contextlib.contextmanager
def staged(destinations: Sequence[Path], *, force: bool = False, background: bool = True,
           protect: Sequence[Path] = ()) -> Iterator[tuple[list[Path], _Background | None]]:
    """Staging directories for `destinations`, each swapped into place when the block ends normally
    (one after the other); on any exception every staging directory is removed and nothing is
    written. The destinations' parent directories stay locked meanwhile (in sorted order, so two
    writers never wait on each other crosswise), and stale staging in them is removed first.

    Yields the staging directories and a background writer thread (or None). OS errors (no space,
    read-only file system, permissions, a name too long) become WriteError (E018)."""
    destinations = [Path(os.path.abspath(d)) for d in destinations]
    stagings: list[Path] = []
    writer = _Background() if background else None
    current = destinations[0] if destinations else Path(".")
    created: list[Path] = []  # parent directories made here: removed again if nothing is written
    try:
        with contextlib.ExitStack() as locks:
            for destination in destinations:
                current = destination
                missing = [d for d in [destination.parent, *destination.parent.parents] if not os.path.lexists(d)]
                destination.parent.mkdir(parents=True, exist_ok=True)
                created += missing  # deepest first
            for parent in sorted({d.parent for d in destinations}):
                current = parent
                locks.enter_context(locked(parent))
                _remove_staging(parent, protect)
            for destination in destinations:
                if os.path.lexists(destination) and not force:
                    raise OutputExists(destination)
            try:
                for destination in destinations:
                    current = destination
                    stagings.append(_claimed_directory(destination, "tmp"))
                yield stagings, writer
                if writer is not None:
                    writer.drain()
                umask = os.umask(0)
                os.umask(umask)
                for staging in stagings:
                    for entry in os.scandir(staging):  # an adapter's three files, or a merged model's
                        if entry.is_file(follow_symlinks=False):
                            os.chmod(entry.path, 0o666 & ~umask)
                    os.chmod(staging, 0o777 & ~umask)
                interrupts.raise_if_interrupted()  # a signal that some library swallowed still stops the write
                for destination, staging in zip(destinations, stagings, strict=True):
                    current = destination
                    _swap(staging, destination)
            except BaseException:
                if writer is not None:
                    writer.close()
                with interrupts.deferred(raise_after=False):
                    for staging in stagings:
                        if os.path.lexists(staging) or os.path.lexists(staging.with_name(staging.name + CLAIM)):
                            _release(staging)
                raise
    except BaseException as exc:
        for directory in created:  # deepest first; only if still empty
            with contextlib.suppress(OSError):
                os.rmdir(directory)
        if isinstance(exc, OSError):
            raise _os_error(exc, getattr(exc, "destination", None) or current) from None
        raise
    finally:
        if writer is not None:
            writer.close()


def _swap(staging: Path, destination: Path) -> None:
    """Put a complete staging directory in the destination's place, atomically."""
    with interrupts.deferred(raise_after=True):  # the swap and its clean-up are not cut in half
        if not os.path.lexists(destination):
            os.rename(staging, destination)
        elif _exchange(staging, destination):
            _remove(staging)  # staging now holds the old directory (or the old symbolic link)
        else:
            retired = _claimed_directory(destination, "old")
            os.rename(destination, retired / "old")
            os.rename(staging, destination)
            _release(retired)
        with contextlib.suppress(OSError):
            os.unlink(staging.with_name(staging.name + CLAIM))
        _fsync_directory(destination.parent)


def write_adapter(destination: Path, tensors: dict[str, Any], config: dict[str, Any], meta: dict[str, str],
                  *, force: bool = False, protect: Sequence[Path] = ()) -> None:
    """Write an adapter held in memory atomically; replace an existing one only with `force`.

    OS errors (no space, read-only file system, permissions, a name too long) become WriteError
    (E018) naming the destination; nothing partial is left."""
    with staged([destination], force=force, background=False, protect=protect) as (stagings, _):
        entries = {key: (tensor_dtype(t), tuple(t.shape)) for key, t in tensors.items()}
        adapter = StagedAdapter(stagings[0], entries, meta, destination=Path(os.path.abspath(destination)))
        try:
            adapter.put(tensors)
            adapter.finish(config, meta)
        finally:
            adapter.close()
