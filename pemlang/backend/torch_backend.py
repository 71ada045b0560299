"""The torch backend: executes a Plan layer by layer, in fp32, on the CPU or a CUDA device.

Layers are visited once for all outputs: a layer's input tensors are read once (even when several
outputs need them), every output's step for that layer is computed, cast to its output dtype,
checked finite and handed to a sink (the streaming writer) or kept (the in-memory API). Memory is
one layer of every input plus one output layer, whatever the number of layers. Inputs are read
with positioned reads in file order, hashing the file as it goes, so provenance costs no second
pass over the inputs.
"""

from __future__ import annotations

import contextlib
import errno
import math
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..hashing import sha256_file
from ..operators import OPERATORS
from ..plan import CallStep, HeadStep, LayerStep, Plan, PlanTerm, leaf_inputs, recursion_room, tensor_key
from ..types import TORCH_DTYPE_NAMES
from . import align
from .dense import (
    KERNELS,
    Pool,
    Rows,
    dropped_share,
    energy_rank,
    magnitude,
    signed_factors,
    threads,
    truncated_svd_dropped,
)

TORCH_DTYPES = {name: getattr(torch, torch_name) for name, torch_name in TORCH_DTYPE_NAMES.items()}


@dataclass
class RunReport:
    """What running a plan found beyond its results."""

    non_finite: list[tuple[str, str]] = field(default_factory=list)  # (input, tensor key)
    # A result that is not finite in its output dtype: (output index, layer or head key, dtype).
    non_finite_result: tuple[int, str, str] | None = None
    # Paper mode: per pair (input, the first input of a paper layer), per layer, the cosine of the
    # input's A with the first's A and the number of entries of A (W002).
    a_cosines: dict[tuple[str, str], dict[str, tuple[float, int]]] = field(default_factory=dict)
    # With `hash_inputs`: each input's sha256 (of its weights file), computed while reading it.
    sha256: dict[str, str] = field(default_factory=dict)
    # Per svd node (its id), per layer: the share of ‖ΔW‖²_F its truncation did not keep.
    svd_dropped: dict[str, dict[str, float]] = field(default_factory=dict)


@dataclass
class TensorCache:
    """Input tensors kept in fp32 on one device between evaluations (a sweep, a REPL session).

    Keyed by the weights file and tensor key; a file that changed on disk (mtime, size) is read
    again."""

    tensors: dict[tuple[str, int, int, str], torch.Tensor] = field(default_factory=dict)
    device: torch.device | None = None

    def clear(self) -> None:
        self.tensors.clear()


class _HashingReader:
    """Reads one safetensors file with positioned reads, hashing it front to back as it goes.

    Tensors asked for in file order are read exactly once and hashed on the way; one asked for
    behind the hashed front is read again without hashing (correct, only slower). `digest` hashes
    what was not needed and returns the file's sha256."""

    CHUNK = 1 << 22

    def __init__(self, path: Path):
        import hashlib
        import threading

        self.fd = os.open(path, os.O_RDONLY)
        self.hash = hashlib.sha256()
        self.front = 0  # bytes hashed so far
        self.path = path
        self.lock = threading.Lock()  # the prefetching thread and the caller may both read

    def read(self, begin: int, end: int, *, pinned: bool = False) -> torch.Tensor:
        """Bytes [begin, end) as a uint8 tensor; in page-locked memory with `pinned` (for CUDA: the
        copy to the device can then overlap with compute)."""
        data = torch.empty(end - begin, dtype=torch.uint8, pin_memory=pinned)
        view = data.numpy().data.cast("B") if end > begin else memoryview(b"")
        with self.lock:
            if begin < self.front:
                self._pread_into(view, begin)
                return data
            position = self.front
            while position < begin:  # skipped bytes (other tensors, the header): hashed, not kept
                chunk = self._pread(position, min(begin, position + self.CHUNK))
                self.hash.update(chunk)
                position += len(chunk)
            self._pread_into(view, begin)
            self.hash.update(view)
            self.front = end
            return data

    def digest(self) -> str:
        with self.lock:
            while True:
                chunk = os.pread(self.fd, self.CHUNK, self.front)
                if not chunk:
                    return self.hash.hexdigest()
                self.hash.update(chunk)
                self.front += len(chunk)

    def close(self) -> None:
        with self.lock:
            if self.fd >= 0:
                os.close(self.fd)
                self.fd = -1

    def _pread(self, begin: int, end: int) -> bytearray:
        data = bytearray(end - begin)
        self._pread_into(memoryview(data), begin)
        return data

    def _pread_into(self, view: memoryview, begin: int) -> None:
        read_exactly(self.fd, view, begin, f"{self.path} ends inside a tensor (it was cut off while being read)")


def read_exactly(fd: int, view: memoryview, offset: int, short: str) -> None:
    """Fill `view` from `fd` at `offset` (preadv: no copy in between; pread where the system has no
    preadv, as macOS before Python 3.12); OSError(EIO, `short`) if the file ends first."""
    position = 0
    while position < len(view):
        if hasattr(os, "preadv"):
            count = os.preadv(fd, [view[position:]], offset + position)
        else:
            chunk = os.pread(fd, len(view) - position, offset + position)
            view[position:position + len(chunk)] = chunk
            count = len(chunk)
        if count == 0:
            raise OSError(errno.EIO, short)
        position += count


class _Inputs:
    """Every input's weights, opened on first use; tensors are read on demand onto the device.

    A tensor read for the current layer is kept until `next_layer` (so outputs that share it read
    it once); `layer_tensors` is what the finiteness diagnosis looks at."""

    def __init__(self, plan: Plan, device: torch.device, stack: contextlib.ExitStack, report: RunReport,
                 cache: TensorCache | None):
        self.plan = plan
        self.device = device
        self.report = report
        self.readers: dict[str, _HashingReader] = {}
        self.readers_lock = __import__("threading").Lock()
        self.layer: dict[tuple[str, str, bool], torch.Tensor] = {}
        self.prefetched: dict[tuple[str, str], torch.Tensor] = {}
        stack.callback(self.close)
        if cache is not None and cache.device != device:
            cache.clear()
            cache.device = device
        self.cache = cache

    def next_layer(self, prefetched: dict[tuple[str, str], torch.Tensor] | None = None) -> None:
        """Forget the layer just done; `prefetched` holds the next one's tensors, already read."""
        self.layer.clear()
        self.prefetched = prefetched or {}

    def close(self) -> None:
        for reader in self.readers.values():
            reader.close()

    def _reader(self, name: str) -> _HashingReader:
        with self.readers_lock:
            if name not in self.readers:
                self.readers[name] = _HashingReader(self.plan.inputs[name].adapter.weights_file)
            return self.readers[name]

    def read_all(self, needs: list[tuple[str, str]]) -> dict[tuple[str, str], torch.Tensor]:
        """Tensors as stored, on the CPU (what the prefetching thread runs)."""
        return {need: self._raw(*need) for need in needs}

    def _raw(self, name: str, key: str) -> torch.Tensor:
        """A tensor as stored (its own dtype), on the CPU."""
        adapter = self.plan.inputs[name].adapter
        if adapter.pickled:
            return adapter.tensor(key)
        info = adapter.tensors[key]
        data = self._reader(name).read(adapter.data_start + info.begin, adapter.data_start + info.end,
                                       pinned=self.device.type == "cuda")
        return data.view(TORCH_DTYPES[info.dtype]).reshape(info.shape)

    def tensor(self, name: str, key: str, *, raw: bool = False) -> torch.Tensor:
        """One input tensor on the device: in fp32, or as stored with `raw` (copied into an output as is)."""
        memo = (name, key, raw)
        if memo in self.layer:
            return self.layer[memo]
        cache_key = None
        value = None
        if self.cache is not None and not raw:
            adapter = self.plan.inputs[name].adapter
            stat = adapter.weights_file.stat()
            cache_key = (str(adapter.weights_file), stat.st_mtime_ns, stat.st_size, key)
            value = self.cache.tensors.get(cache_key)
        if value is None:
            stored = self.layer.get((name, key, True))  # read once, whichever form is asked first
            if stored is None:
                stored = self.prefetched.pop((name, key), None)
                if stored is None:
                    stored = self._raw(name, key)
                stored = stored.to(device=self.device, non_blocking=True)
                self.layer[(name, key, True)] = stored
            value = stored if raw else stored.to(torch.float32)
            if self.cache is not None and cache_key is not None:
                self.cache.tensors[cache_key] = value
        self.layer[memo] = value
        return value

    def stored_dtype(self, name: str, key: str) -> str:
        adapter = self.plan.inputs[name].adapter
        if adapter.pickled:
            return "?"
        return adapter.tensors[key].dtype

    def lora(self, name: str, layer: str) -> tuple[torch.Tensor, torch.Tensor, float]:
        """(A, B, scaling) of one input's layer."""
        adapter = self.plan.inputs[name].adapter
        keys = adapter.layer_keys[layer]
        scaling = adapter.type.layers[layer].scaling  # type: ignore[union-attr]
        return self.tensor(name, keys["A"]), self.tensor(name, keys["B"]), scaling

    def blame(self) -> bool:
        """After a non-finite result: record which of this layer's input tensors are not finite
        (E014); False when all are finite (the result itself overflowed, E027)."""
        found = False
        for (name, key, _), value in self.layer.items():
            if not bool(torch.isfinite(value).all()) and (name, key) not in self.report.non_finite:
                self.report.non_finite.append((name, key))
                found = True
        return found

    def stop_unless_finite(self, values: list[torch.Tensor], index: int, key: str, dtype: str) -> None:
        """Stop the run (_Stop) when any of `values` is not finite: the report blames this layer's
        inputs when one of them is not (E014), else the result of output `index` at `key` (E027)."""
        if not all_finite(values):
            if not self.blame():
                self.report.non_finite_result = (index, key, dtype)
            raise _Stop

    def digests(self) -> dict[str, str]:
        """Every input's sha256: finish hashing what reading did not reach."""
        return {name: sha256_file(item.adapter.weights_file) if item.adapter.pickled else self._reader(name).digest()
                for name, item in self.plan.inputs.items()}


class _Stop(Exception):
    """Running stops: an input or a result is not finite (the report says which)."""


def all_finite(values: list[torch.Tensor]) -> bool:
    """Whether every value is finite, with one host sync for them all. A sum is finite only when
    every element is (NaN and ±inf propagate), so one reduction pass settles it, with no boolean
    tensor per element (summed in fp32: a half-precision sum would overflow far sooner); only a
    sum that overflows while every element is finite needs the exact check after it."""
    values = [v for v in values if v.numel()]
    if not values or bool(torch.isfinite(torch.stack([v.sum(dtype=torch.float32) for v in values])).all()):
        return True
    return bool(torch.stack([torch.isfinite(v).all() for v in values]).all())


# A sink takes (output index, {PEFT key: CPU tensor in the output dtype}, ready) for one layer or
# head and returns True when it consumed them (streamed to disk); otherwise the backend keeps them.
# `ready`, when not None, must be called before the tensors' bytes are read (a copy from the GPU
# may still be in flight).
Sink = Callable[[int, dict[str, torch.Tensor], Callable[[], None] | None], bool]


def _group_needs(plan: Plan, group: list[tuple[int, LayerStep | HeadStep]]) -> list[tuple[str, str]]:
    """The input tensors a layer group reads, (input, key) in file order (so hashing stays sequential)."""
    needs: dict[tuple[str, str], int] = {}

    def add(source: str, layer: str, every: bool = False) -> None:
        if source in plan.inputs:
            adapter = plan.inputs[source].adapter
            for key in adapter.layer_keys.get(layer, {}).values():
                needs[(source, key)] = adapter.tensors[key].begin if not adapter.pickled else 0
        else:
            call = plan.calls[source]
            every = every or OPERATORS[call.op].space  # a space's basis spans every input it names
            for term in call.terms:
                if term.beta != 0 or every:
                    add(term.source, layer, every)

    for _, item in group:
        for term in item.terms:
            if isinstance(item, HeadStep):
                adapter = plan.inputs[term.source].adapter
                key = adapter.head_keys[item.key]
                needs[(term.source, key)] = adapter.tensors[key].begin if not adapter.pickled else 0
            else:
                add(term.source, item.key)
    return sorted(needs, key=lambda need: (need[0], needs[need]))


def _layer_groups(plan: Plan) -> list[list[tuple[int, LayerStep | HeadStep]]]:
    """Every output's layer steps and heads, grouped by layer (first appearance order): a group's
    input tensors are read once for all the outputs that need them."""
    groups: dict[tuple[str, str], list[tuple[int, LayerStep | HeadStep]]] = {}
    for index, out in enumerate(plan.outputs):
        for step in out.layers:
            groups.setdefault(("layer", step.key), []).append((index, step))
    for index, out in enumerate(plan.outputs):
        for head in out.heads:
            groups.setdefault(("head", head.key), []).append((index, head))
    return list(groups.values())


_libc: Any = None


def release_freed_memory() -> None:
    """Give the pages of freed memory back to the system (glibc's malloc_trim, over every thread's
    heap), called when a layer is done. glibc otherwise keeps a freed layer's tensors in the heaps
    they came from (the reader's thread, the writer's, the caller's) once its mmap threshold has
    risen to their size, and peak RSS crept up with the number of layers (at 70B shapes, 348 to
    389 MiB from 28 to 448 layers). Allocation is unchanged within a layer; elsewhere (macOS,
    musl) nothing is done."""
    global _libc
    if _libc is None:
        import ctypes
        import platform

        _libc = False
        if platform.libc_ver()[0] == "glibc":
            with contextlib.suppress(OSError, AttributeError):
                _libc = ctypes.CDLL(None)
                _libc.malloc_trim  # noqa: B018 - present in every glibc
    if _libc:
        _libc.malloc_trim(0)


class TorchBackend:
    """Runs plans on one device."""

    def __init__(self, device: torch.device | str = "cpu", cache: TensorCache | None = None):
        self.device = torch.device(device)
        self.cache = cache
        self.threads = torch.get_num_threads()
        self.pool = Pool()

    def run(self, plan: Plan, *, on_layer: Callable[[], None] | None = None, sink: Sink | None = None,
            hash_inputs: bool = False) -> tuple[list[dict[str, torch.Tensor]], RunReport]:
        """The tensors of every output (PEFT keys → CPU tensors in the output dtype) that `sink`
        did not consume, and a report. A non-finite input or result stops the run: the report says
        which, and the results are empty."""
        report = RunReport()
        results: list[dict[str, torch.Tensor]] = [{} for _ in plan.outputs]
        with contextlib.ExitStack() as stack, torch.no_grad(), recursion_room():
            if plan.calls and self.device.type == "cpu":
                # LAPACK's QR and SVD (and BLAS products) round differently with the thread count;
                # one thread makes function results byte-identical across machines' core counts.
                stack.enter_context(threads(1))
            inputs = _Inputs(plan, self.device, stack, report, self.cache)
            groups = _layer_groups(plan)
            prefetch = None
            if self.cache is None and len(groups) > 1:
                # One thread reads the next layer's input tensors while this one computes (and the
                # writer's thread writes the last); at most two layers of inputs are in memory.
                from concurrent.futures import ThreadPoolExecutor

                pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="pemlang-reader")
                stack.callback(pool.shutdown, wait=True, cancel_futures=True)  # before the files close
                prefetch = pool.submit(inputs.read_all, _group_needs(plan, groups[0]))
            try:
                for number, group in enumerate(groups):
                    if prefetch is not None:
                        inputs.next_layer(prefetch.result())
                        following = groups[number + 1] if number + 1 < len(groups) else None
                        prefetch = pool.submit(inputs.read_all, _group_needs(plan, following)) if following else None
                    svd_cache: dict[tuple[str, str], Any] = {}
                    for index, item in group:
                        if isinstance(item, HeadStep):
                            produced = {f"base_model.model.{item.key}": self._head(plan, item, inputs)}
                        else:
                            produced = self._layer(plan, item, inputs, report, index, svd_cache)
                        self._keep(results[index], produced, item, index, inputs, report, sink)
                        if on_layer is not None and not isinstance(item, HeadStep):
                            on_layer()
                    inputs.next_layer()
                    self.pool.give(v for v in svd_cache.values() if isinstance(v, torch.Tensor))  # dense results
                    release_freed_memory()
                if hash_inputs:
                    report.sha256 = inputs.digests()
            except _Stop:
                return [], report
        return [dict(sorted(r.items())) for r in results], report

    @staticmethod
    def _keep(kept: dict[str, torch.Tensor], produced: dict[str, torch.Tensor], item: LayerStep | HeadStep,
              index: int, inputs: _Inputs, report: RunReport, sink: Sink | None) -> None:
        """Cast to the output dtype on the device, check finite there (one sync per layer), then
        hand to the sink or keep on the CPU. A non-finite result stops the run: the inputs of this
        layer are blamed when one of them is not finite (E014), the result otherwise (E027)."""
        dtype = TORCH_DTYPES[item.dtype]
        cast = {name: value.to(dtype) for name, value in produced.items()}
        inputs.stop_unless_finite(list(cast.values()), index, item.key, item.dtype)
        if cast and next(iter(cast.values())).device.type == "cuda":
            # Into page-locked memory without waiting; the writer waits for the copy (the event)
            # before it reads the bytes, so the next layer computes meanwhile.
            cpu = {name: value.contiguous().to("cpu", non_blocking=True) for name, value in cast.items()}
            event = torch.cuda.Event()
            event.record()
            ready: Callable[[], None] | None = event.synchronize
        else:
            cpu = {name: value.to("cpu").contiguous() for name, value in cast.items()}
            ready = None
        if sink is None or not sink(index, cpu, ready):
            if ready is not None:
                ready()
            kept.update(cpu)

    def _head(self, plan: Plan, head: HeadStep, inputs: _Inputs) -> torch.Tensor:
        mixed = sum(term.beta * inputs.tensor(term.source, plan.inputs[term.source].adapter.head_keys[head.key])
                    for term in head.terms)
        return torch.as_tensor(mixed)

    def _layer(self, plan: Plan, step: LayerStep, inputs: _Inputs, report: RunReport, index: int,
               svd_cache: dict[tuple[str, str], Any]) -> dict[str, torch.Tensor]:
        if step.op == "ia3":
            return {tensor_key(step.key, "ia3_l"): self._ia3(step, inputs)}
        if step.op == "paper":
            a, b = self._paper(step, inputs, report.a_cosines)
        else:
            a, b = self._concat(plan, step, inputs, svd_cache, index)
        return {tensor_key(step.key, "lora_A.weight"): a, tensor_key(step.key, "lora_B.weight"): b}

    def _ia3(self, step: LayerStep, inputs: _Inputs) -> torch.Tensor:
        """l = 1 + Σ beta_i·(l_i − 1): the paper's affine operators around the identity vector."""
        result = torch.ones(step.shape, dtype=torch.float32, device=self.device)
        for term in step.terms:
            vector = inputs.tensor(term.source, inputs.plan.inputs[term.source].adapter.layer_keys[step.key]["l"])
            result += term.beta * (vector - 1)
        return result

    def _paper(self, step: LayerStep, inputs: _Inputs, cosines: dict[tuple[str, str], dict[str, tuple[float, int]]]
               ) -> tuple[torch.Tensor, torch.Tensor]:
        """A = Σ alpha_i·A_i;  B = Σ beta_i·(s_i/s_out)·B_i  (paper mode)."""
        a_out = torch.zeros((step.rank, step.shape[1]), dtype=torch.float32, device=self.device)
        b_out = torch.zeros((step.shape[0], step.rank), dtype=torch.float32, device=self.device)
        for term in step.terms:
            a, b, scaling = inputs.lora(term.source, step.key)
            a_out += term.alpha * a
            b_out += (term.beta * scaling / step.scaling_out) * b
        self._a_similarity(step, inputs, cosines)
        return a_out, b_out

    def a_cosines(self, plan: Plan) -> dict[tuple[str, str], dict[str, tuple[float, int]]]:
        """What paper mode's W002 measures, without computing any output: per pair of inputs
        (an input, the first input of a paper-mode layer), per layer, the cosine of their A
        matrices and the number of entries of A. Reads the A matrices only."""
        report = RunReport()
        with contextlib.ExitStack() as stack, torch.no_grad():
            inputs = _Inputs(plan, self.device, stack, report, self.cache)
            for out in plan.outputs:
                for step in out.layers:
                    if step.op == "paper":
                        self._a_similarity(step, inputs, report.a_cosines)
                        inputs.next_layer()
        return report.a_cosines

    @staticmethod
    def _a_similarity(step: LayerStep, inputs: _Inputs,
                      cosines: dict[tuple[str, str], dict[str, tuple[float, int]]]) -> None:
        """Record the cosine of each term's A with the first term's A at this layer (W002)."""
        if len(step.terms) < 2:
            return
        first = step.terms[0].source
        first_a = inputs.tensor(first, inputs.plan.inputs[first].adapter.layer_keys[step.key]["A"])
        for term in step.terms[1:]:
            if term.source == first or step.key in cosines.get((term.source, first), {}):
                continue
            a = inputs.tensor(term.source, inputs.plan.inputs[term.source].adapter.layer_keys[step.key]["A"])
            # in float64: squared norms of large A entries overflow float32 (a cosine does not depend on scale)
            cosine = torch.nn.functional.cosine_similarity(a.flatten().double(), first_a.flatten().double(), dim=0)
            cosines.setdefault((term.source, first), {})[step.key] = (float(cosine), a.numel())

    def _factors(self, plan: Plan, source: str, layer: str, inputs: _Inputs,
                 cache: dict[tuple[str, str], Any], index: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(A, s·B) of a low-rank source at one layer: an input's own factors, or an svd node's
        result (computed once per layer for every output that uses it)."""
        if source in plan.inputs:
            a, b, scaling = inputs.lora(source, layer)
            return a, scaling * b
        if (source, layer) not in cache:
            call = plan.calls[source]
            make = {"svd": self._svd, "core": self._space, "knots": self._space, "tsv": self._tsv, "iso": self._iso}
            cache[(source, layer)] = make[call.op](plan, call, layer, inputs, cache, index)
        return cache[(source, layer)]  # type: ignore[no-any-return]

    def _rows(self, plan: Plan, terms: tuple[PlanTerm, ...], layer: str, shape: tuple[int, int], inputs: _Inputs,
              cache: dict[tuple[str, str], Any], index: int) -> Rows:
        """Σ beta_i·ΔW_i of some sources at one layer (out × in, fp32), what the element-wise
        functions act on: the dense results of other functions plus the low-rank terms' factors,
        stacked, formed a block of rows at a time by the kernels. A source without the layer
        contributes nothing."""
        low: list[PlanTerm] = []
        dense: list[tuple[float, torch.Tensor]] = []
        for term in terms:
            if term.beta == 0 or not self._has_layer(plan, term.source, layer):
                continue
            if term.source in plan.calls and plan.calls[term.source].dense:
                dense.append((term.beta, self._dense(plan, plan.calls[term.source], layer, inputs, cache, index)))
            else:
                low.append(term)
        factors = None
        if low:
            a, b = self._stack(plan, tuple(low), layer, inputs, cache, index)
            # A function can hide a non-finite input (dare may drop the very entry): E014 here, not a finite result
            inputs.stop_unless_finite([a, b], index, layer, "F32")
            factors = (b, a)
        return Rows(shape, self.device, factors, dense)

    def _dense(self, plan: Plan, call: CallStep, layer: str, inputs: _Inputs, cache: dict[tuple[str, str], Any],
               index: int) -> torch.Tensor:
        """A dense function's ΔW at one layer (computed once per layer): its kernel over its
        arguments' ΔW (operators.OPERATORS; kernels in dense.py)."""
        if (call.id, layer) not in cache:
            shape = call.layer_shapes[layer]
            # The inputs' factors are checked finite as `_rows` stacks them; the kernels' dense
            # results are checked once, by svd, before it factorises them.
            args = [self._rows(plan, arg, layer, shape, inputs, cache, index) for arg in call.args]
            cache[(call.id, layer)] = KERNELS[call.op](args, call.options, layer, self.threads,
                                                       self.pool.take(shape, self.device))
        return cache[(call.id, layer)]  # type: ignore[no-any-return]

    def _stack(self, plan: Plan, terms: tuple[PlanTerm, ...], layer: str, inputs: _Inputs,
               cache: dict[tuple[str, str], Any], index: int
               ) -> tuple[torch.Tensor, torch.Tensor]:
        a_parts, b_parts = [], []
        for term in terms:
            a, b = self._factors(plan, term.source, layer, inputs, cache, index)
            a_parts.append(a)
            b_parts.append(term.beta * b)
        return torch.cat(a_parts, dim=0), torch.cat(b_parts, dim=1)

    def _concat(self, plan: Plan, step: LayerStep, inputs: _Inputs,
                cache: dict[tuple[str, str], Any], index: int
                ) -> tuple[torch.Tensor, torch.Tensor]:
        """A = [A_1; A_2; …];  B = [beta_1·s_1·B_1 | …]: ΔW = Σ beta_i·s_i·B_i·A_i exactly (exact mode)."""
        out_features, in_features = step.shape
        if not step.terms:
            return (torch.zeros((1, in_features), device=self.device),
                    torch.zeros((out_features, 1), device=self.device))
        if self.cache is None and all(self._a_as_stored(plan, t.source, step, inputs) for t in step.terms):
            # Every A is copied as is and already in the output dtype: no round trip through fp32.
            # Each scaled B is written straight into its columns of the result (no scaled copy of
            # each B before they are joined: at 70B shapes that was a second layer's worth of memory).
            a_parts, b_parts = [], []
            for term in step.terms:
                adapter = plan.inputs[term.source].adapter
                keys = adapter.layer_keys[step.key]
                a_parts.append(inputs.tensor(term.source, keys["A"], raw=True))
                scaling = adapter.type.layers[step.key].scaling  # type: ignore[union-attr]
                b_parts.append((term.beta * scaling, inputs.tensor(term.source, keys["B"])))
            b_out = torch.empty((out_features, sum(b.shape[1] for _, b in b_parts)), dtype=b_parts[0][1].dtype,
                                device=self.device)
            column = 0
            for coefficient, b in b_parts:
                torch.mul(b, coefficient, out=b_out[:, column:column + b.shape[1]])
                column += b.shape[1]
            return torch.cat(a_parts, dim=0), b_out
        return self._stack(plan, step.terms, step.key, inputs, cache, index)

    @staticmethod
    def _a_as_stored(plan: Plan, source: str, step: LayerStep, inputs: _Inputs) -> bool:
        return source in plan.inputs and inputs.stored_dtype(
            source, plan.inputs[source].adapter.layer_keys[step.key]["A"]) == step.dtype

    def _svd(self, plan: Plan, svd: CallStep, layer: str, inputs: _Inputs,
             cache: dict[tuple[str, str], Any], index: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Best rank-R approximation of ΔW at one layer (`svd`).

        Low-rank argument: B = Q_b R_b and Aᵀ = Q_a R_a (thin QR), so ΔW = Q_b (R_b R_aᵀ) Q_aᵀ; the SVD
        of the small core U S Vᵀ gives ΔW = (Q_b U) S (Q_a V)ᵀ, at O((d + k)·m²) for a stacked rank m,
        without forming the d×k matrix; S holds all of ΔW's singular values, so the share of ‖ΔW‖²
        dropped is Σ S[R:]² / Σ S², and `energy=e` keeps the smallest R with a share ≥ e. An argument
        with a dense part (prune, dare, ties) is formed and reduced with a randomised range finder
        (`truncated_svd_dropped`). The dropped share is recorded in the run's report.
        """
        rank = svd.layer_ranks.get(layer, 0)  # with energy=, the largest the data may choose
        energy = float(svd.options["energy"]) if "energy" in svd.options else None
        terms = self._live(plan, svd.terms, layer)
        if rank == 0 or not terms:
            raise AssertionError("lowering gives svd sources only to layers they contribute to")
        if any(t.source in plan.calls and plan.calls[t.source].dense for t in terms):
            delta = self._rows(plan, terms, layer, svd.layer_shapes[layer], inputs, cache, index).whole(self.threads)
            scale = magnitude(delta)  # NaN or inf unless every entry is finite
            if not math.isfinite(scale):
                inputs.stop_unless_finite([delta], index, layer, "F32")
            a_out, b_out, share = truncated_svd_dropped(delta, rank, layer, energy=energy, workers=self.threads,
                                                        scale=scale)
            inputs.report.svd_dropped.setdefault(svd.id, {})[layer] = share
            return a_out, b_out
        a, b = self._stack(plan, terms, layer, inputs, cache, index)
        inputs.stop_unless_finite([a, b], index, layer, "F32")  # a factorisation of NaN would only crash
        # In float64 (on the CPU with one thread, see `run`), then rounded to fp32; signs are fixed
        # (the largest entry of each left singular vector positive), so the bytes are reproducible.
        u, s, vh = align.thin_svd(a, b)
        if energy is not None:
            rank = energy_rank(s, energy, rank)
        inputs.report.svd_dropped.setdefault(svd.id, {})[layer] = dropped_share(s, rank)
        return signed_factors(u[:, :rank], s[:rank], vh[:rank])

    def _live(self, plan: Plan, terms: tuple[PlanTerm, ...], layer: str) -> tuple[PlanTerm, ...]:
        return tuple(t for t in terms if t.beta != 0 and self._has_layer(plan, t.source, layer))

    def _spectrum(self, plan: Plan, terms: tuple[PlanTerm, ...], layer: str, shape: tuple[int, int], inputs: _Inputs,
                  cache: dict[tuple[str, str], Any], index: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The thin SVD (float64) of a low-rank argument's ΔW at one layer of `shape`, from its
        stacked factors (no component when no term contributes there)."""
        live = self._live(plan, terms, layer)
        if not live:
            empty = torch.zeros(0, dtype=torch.float64, device=self.device)
            return empty.new_zeros((shape[0], 0)), empty, empty.new_zeros((0, shape[1]))
        a, b = self._stack(plan, live, layer, inputs, cache, index)
        inputs.stop_unless_finite([a, b], index, layer, "F32")
        return align.thin_svd(a, b)

    def _tsv(self, plan: Plan, call: CallStep, layer: str, inputs: _Inputs,
             cache: dict[tuple[str, str], Any], index: int) -> tuple[torch.Tensor, torch.Tensor]:
        """TSV-M over the arguments that have this layer (backend/align.py)."""
        parts = [self._spectrum(plan, arg, layer, call.layer_shapes[layer], inputs, cache, index) for arg in call.args
                 if any(self._has_layer(plan, t.source, layer) for t in arg)]
        u, s, vh = align.tsv(parts, float(call.options["keep"]))
        return signed_factors(*align.padded(u, s, vh, call.layer_ranks[layer]))

    def _iso(self, plan: Plan, call: CallStep, layer: str, inputs: _Inputs,
             cache: dict[tuple[str, str], Any], index: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Iso-C: the argument's spectrum flattened to its mean (backend/align.py)."""
        u, s, vh = align.iso(*self._spectrum(plan, call.args[0], layer, call.layer_shapes[layer], inputs, cache, index))
        return signed_factors(*align.padded(u, s, vh, call.layer_ranks[layer]))

    def _space(self, plan: Plan, call: CallStep, layer: str, inputs: _Inputs,
               cache: dict[tuple[str, str], Any], index: int) -> tuple[torch.Tensor, torch.Tensor]:
        """core(E), knots(E): the inputs E names aligned in one basis (backend/align.py), E evaluated
        on their coordinates (the element-wise kernels act on those entries), and the result
        carried back: left · E(C) · right, factorised through the SVD of the small E(C)."""
        names = [n for n in leaf_inputs(plan, call.args[0]) if layer in plan.inputs[n].adapter.type.layers]
        factors = [inputs.lora(name, layer) for name in names]
        inputs.stop_unless_finite([t for a, b, _ in factors for t in (a, b)], index, layer, "F32")
        space = (align.core_space if call.op == "core" else align.knots_space)(factors)
        rank = call.layer_ranks[layer]
        out_features, in_features = call.layer_shapes[layer]
        if 0 in space.shape:  # every input is zero here (knots keeps no component)
            return (torch.zeros((rank, in_features), device=self.device),
                    torch.zeros((out_features, rank), device=self.device))
        coordinates = dict(zip(names, space.coordinates, strict=True))
        value = self._aligned(plan, call.args[0], layer, coordinates, space.shape, {}).whole(self.threads)
        if not bool(torch.isfinite(value).all()):
            inputs.stop_unless_finite([value], index, layer, "F32")
        return signed_factors(*align.factorised(space.left, value, space.right, rank))

    def _aligned(self, plan: Plan, terms: tuple[PlanTerm, ...], layer: str,
                 coordinates: dict[str, tuple[torch.Tensor, torch.Tensor]], shape: tuple[int, int],
                 done: dict[str, torch.Tensor]) -> Rows:
        """Σ beta_i·C_i in a space: the inputs' coordinates (low-rank, stacked) and the results of the
        element-wise functions inside, evaluated on them (once per call)."""
        left, right, dense = [], [], []
        for term in terms:
            if term.beta == 0:
                continue
            if term.source in plan.inputs:
                if term.source in coordinates:
                    l_i, r_i = coordinates[term.source]
                    left.append(term.beta * l_i)
                    right.append(r_i)
                continue
            inner = plan.calls[term.source]
            if inner.id not in done:
                args = [self._aligned(plan, arg, layer, coordinates, shape, done) for arg in inner.args]
                done[inner.id] = KERNELS[inner.op](args, inner.options, layer, self.threads,
                                                   torch.empty(shape, dtype=torch.float32, device=self.device))
            dense.append((term.beta, done[inner.id]))
        low = (torch.cat(left, dim=1), torch.cat(right, dim=0)) if left else None
        return Rows(shape, self.device, low, dense)

    @staticmethod
    def _has_layer(plan: Plan, source: str, layer: str) -> bool:
        if source in plan.inputs:
            return layer in plan.inputs[source].adapter.type.layers
        call = plan.calls[source]
        return layer in call.layer_shapes if call.dense else call.layer_ranks.get(layer, 0) > 0
