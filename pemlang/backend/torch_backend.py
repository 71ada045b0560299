"""The torch backend: executes a Plan layer by layer, in fp32, on the CPU or a CUDA device.

Memory stays near one layer of every input plus the outputs being built: each input's
safetensors file is opened once and its tensors are read as the layer that needs them comes up.
Results go to the CPU in the output dtype as soon as a layer is done, so a later backend can
stream them to disk and overlap transfers with compute.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch

from ..plan import LayerStep, OutputPlan, Plan, PlanTerm, SvdStep, tensor_key

TORCH_DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "F64": torch.float64}


@dataclass
class RunReport:
    """What running a plan found beyond its results."""

    non_finite: list[tuple[str, str]] = field(default_factory=list)  # (input, tensor key)
    # A result that is not finite in its output dtype: (output index, layer or head key, dtype).
    non_finite_result: tuple[int, str, str] | None = None
    # Paper mode: per output, per input other than the first, cosines of its A with the first's A.
    a_cosines: dict[int, dict[str, list[float]]] = field(default_factory=dict)


@dataclass
class TensorCache:
    """Input tensors kept in fp32 on one device between evaluations (a sweep, a REPL session).

    Keyed by the weights file and tensor key; a file that changed on disk (mtime, size) is read
    again."""

    tensors: dict[tuple[str, int, int, str], torch.Tensor] = field(default_factory=dict)
    device: torch.device | None = None

    def clear(self) -> None:
        self.tensors.clear()


class _Inputs:
    """Every input's weights, opened on first use; tensors are read on demand, in fp32, on the device."""

    def __init__(self, plan: Plan, device: torch.device, stack: contextlib.ExitStack, report: RunReport,
                 cache: TensorCache | None):
        self.plan = plan
        self.device = device
        self.report = report
        self.stack = stack
        self.handles: dict[str, Any] = {}
        if cache is not None and cache.device != device:
            cache.clear()
            cache.device = device
        self.cache = cache

    def _handle(self, name: str):  # type: ignore[no-untyped-def]
        if name not in self.handles:
            from safetensors import safe_open

            path = str(self.plan.inputs[name].adapter.weights_file)
            self.handles[name] = self.stack.enter_context(safe_open(path, framework="pt", device="cpu"))
        return self.handles[name]

    def tensor(self, name: str, key: str) -> torch.Tensor:
        adapter = self.plan.inputs[name].adapter
        cache_key = None
        if self.cache is not None:
            stat = adapter.weights_file.stat()
            cache_key = (str(adapter.weights_file), stat.st_mtime_ns, stat.st_size, key)
            cached = self.cache.tensors.get(cache_key)
            if cached is not None:
                if not bool(torch.isfinite(cached).all()):
                    self.report.non_finite.append((name, key))
                return cached
        raw = adapter.tensor(key) if adapter.pickled else self._handle(name).get_tensor(key)
        value = raw.to(device=self.device, dtype=torch.float32, non_blocking=True)
        if not bool(torch.isfinite(value).all()):
            self.report.non_finite.append((name, key))
        if self.cache is not None and cache_key is not None:
            self.cache.tensors[cache_key] = value
        return value

    def lora(self, name: str, layer: str) -> tuple[torch.Tensor, torch.Tensor, float]:
        """(A, B, scaling) of one input's layer."""
        adapter = self.plan.inputs[name].adapter
        keys = adapter.layer_keys[layer]
        scaling = adapter.type.layers[layer].scaling  # type: ignore[union-attr]
        return self.tensor(name, keys["A"]), self.tensor(name, keys["B"]), scaling


@contextlib.contextmanager
def _threads(count: int) -> Iterator[None]:
    previous = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


class _Stop(Exception):
    """Running stops: an input or a result is not finite (the report says which)."""


def _finite(values: list[torch.Tensor]) -> bool:
    """Whether every value is finite: one reduction per tensor, one host sync for them all."""
    return bool(torch.stack([torch.isfinite(v).all() for v in values]).all())


class TorchBackend:
    """Runs plans on one device."""

    def __init__(self, device: torch.device | str = "cpu", cache: TensorCache | None = None):
        self.device = torch.device(device)
        self.cache = cache
        self._index = 0  # the output being computed (for reports from inside svd)

    def run(self, plan: Plan, *, on_layer: Callable[[], None] | None = None
            ) -> tuple[list[dict[str, torch.Tensor]], RunReport]:
        """The tensors of every output (PEFT keys → CPU tensors in the output dtype), and a report."""
        report = RunReport()
        results = []
        with contextlib.ExitStack() as stack, torch.no_grad():
            if plan.svds and self.device.type == "cpu":
                # LAPACK's QR and SVD round differently with the thread count; one thread makes svd
                # outputs byte-identical across machines' core counts (the factorisations are small:
                # d×m with m the stacked rank).
                stack.enter_context(_threads(1))
            inputs = _Inputs(plan, self.device, stack, report, self.cache)
            try:
                for index, out in enumerate(plan.outputs):
                    results.append(self._output(plan, out, index, inputs, report, on_layer))
            except _Stop:
                return [], report
        return results, report

    def _output(self, plan: Plan, out: OutputPlan, index: int, inputs: _Inputs, report: RunReport,
                on_layer: Callable[[], None] | None) -> dict[str, torch.Tensor]:
        """One output's tensors. Each layer is cast to the output dtype on the device and checked
        finite there (one sync per layer) before it goes to the CPU; a non-finite input or result
        stops the run (_Stop) with the report saying which."""
        tensors: dict[str, torch.Tensor] = {}
        for step, produced in self._layers(plan, out, inputs, report, index):
            self._keep(tensors, produced, TORCH_DTYPES[step.dtype], step.dtype, step.key, index, report)
            if on_layer is not None:
                on_layer()
        for head in out.heads:
            mixed = sum(term.beta * inputs.tensor(term.source, self._head_key(plan, term, head.key))
                        for term in head.terms)
            self._keep(tensors, {f"base_model.model.{head.key}": torch.as_tensor(mixed)}, TORCH_DTYPES[head.dtype],
                       head.dtype, head.key, index, report)
        return dict(sorted(tensors.items()))

    @staticmethod
    def _keep(tensors: dict[str, torch.Tensor], produced: dict[str, torch.Tensor], dtype: torch.dtype, dtype_name: str,
              key: str, index: int, report: RunReport) -> None:
        if report.non_finite:  # a non-finite input: reported as such (E014), not as its result
            raise _Stop
        cast = {name: value.to(dtype) for name, value in produced.items()}
        if not _finite(list(cast.values())):
            report.non_finite_result = (index, key, dtype_name)
            raise _Stop
        for name, value in cast.items():
            tensors[name] = value.to("cpu").contiguous()

    @staticmethod
    def _head_key(plan: Plan, term: PlanTerm, head_key: str) -> str:
        return plan.inputs[term.source].adapter.head_keys[head_key]

    def _layers(self, plan: Plan, out: OutputPlan, inputs: _Inputs, report: RunReport, index: int
                ) -> Iterator[tuple[LayerStep, dict[str, torch.Tensor]]]:
        self._index = index
        for step in out.layers:
            if step.op == "ia3":
                yield step, {tensor_key(step.key, "ia3_l"): self._ia3(step, inputs)}
            elif step.op == "paper":
                a, b = self._paper(step, inputs, report.a_cosines.setdefault(index, {}))
                yield step, {tensor_key(step.key, "lora_A.weight"): a, tensor_key(step.key, "lora_B.weight"): b}
            else:
                a, b = self._concat(plan, step, inputs)
                yield step, {tensor_key(step.key, "lora_A.weight"): a, tensor_key(step.key, "lora_B.weight"): b}

    def _ia3(self, step: LayerStep, inputs: _Inputs) -> torch.Tensor:
        """l = 1 + Σ beta_i·(l_i − 1): the paper's affine operators around the identity vector."""
        result = torch.ones(step.shape, dtype=torch.float32, device=self.device)
        for term in step.terms:
            vector = inputs.tensor(term.source, inputs.plan.inputs[term.source].adapter.layer_keys[step.key]["l"])
            result += term.beta * (vector - 1)
        return result

    def _paper(self, step: LayerStep, inputs: _Inputs, cosines: dict[str, list[float]]
               ) -> tuple[torch.Tensor, torch.Tensor]:
        """A = Σ alpha_i·A_i;  B = Σ beta_i·(s_i/s_out)·B_i  (SPEC §2.1)."""
        a_out = torch.zeros((step.rank, step.shape[1]), dtype=torch.float32, device=self.device)
        b_out = torch.zeros((step.shape[0], step.rank), dtype=torch.float32, device=self.device)
        first_a = None
        for term in step.terms:
            a, b, scaling = inputs.lora(term.source, step.key)
            a_out += term.alpha * a
            b_out += (term.beta * scaling / step.scaling_out) * b
            if first_a is None:
                first_a = a
            else:
                cosine = torch.nn.functional.cosine_similarity(a.flatten(), first_a.flatten(), dim=0)
                cosines.setdefault(term.source, []).append(float(cosine))
        return a_out, b_out

    def _factors(self, plan: Plan, source: str, layer: str, inputs: _Inputs,
                 cache: dict[tuple[str, str], tuple[torch.Tensor, torch.Tensor]]) -> tuple[torch.Tensor, torch.Tensor]:
        """(A, s·B) of a source at one layer: an input's own factors, or an svd node's result."""
        if source in plan.inputs:
            a, b, scaling = inputs.lora(source, layer)
            return a, scaling * b
        if (source, layer) not in cache:
            cache[(source, layer)] = self._svd(plan, plan.svds[source], layer, inputs, cache)
        return cache[(source, layer)]

    def _stack(self, plan: Plan, terms: tuple[PlanTerm, ...], layer: str, inputs: _Inputs,
               cache: dict[tuple[str, str], tuple[torch.Tensor, torch.Tensor]]) -> tuple[torch.Tensor, torch.Tensor]:
        a_parts, b_parts = [], []
        for term in terms:
            a, b = self._factors(plan, term.source, layer, inputs, cache)
            a_parts.append(a)
            b_parts.append(term.beta * b)
        return torch.cat(a_parts, dim=0), torch.cat(b_parts, dim=1)

    def _concat(self, plan: Plan, step: LayerStep, inputs: _Inputs) -> tuple[torch.Tensor, torch.Tensor]:
        """A = [A_1; A_2; …];  B = [beta_1·s_1·B_1 | …]: ΔW = Σ beta_i·s_i·B_i·A_i exactly (SPEC §2.2)."""
        out_features, in_features = step.shape
        if not step.terms:
            return (torch.zeros((1, in_features), device=self.device),
                    torch.zeros((out_features, 1), device=self.device))
        return self._stack(plan, step.terms, step.key, inputs, {})

    def _svd(self, plan: Plan, svd: SvdStep, layer: str, inputs: _Inputs,
             cache: dict[tuple[str, str], tuple[torch.Tensor, torch.Tensor]]) -> tuple[torch.Tensor, torch.Tensor]:
        """Best rank-R approximation of ΔW = B·A without forming the d×k matrix (SPEC §2.2).

        B = Q_b R_b and Aᵀ = Q_a R_a (thin QR), so ΔW = Q_b (R_b R_aᵀ) Q_aᵀ; the SVD of the small
        core U S Vᵀ gives ΔW = (Q_b U) S (Q_a V)ᵀ. Cost O((d + k)·m²) for a stacked rank m.
        """
        rank = svd.layer_ranks.get(layer, 0)
        terms = tuple(t for t in svd.terms if t.beta != 0 and self._has_layer(plan, t.source, layer))
        if rank == 0 or not terms:
            raise AssertionError("lowering gives svd sources only to layers they contribute to")
        a, b = self._stack(plan, terms, layer, inputs, cache)
        if inputs.report.non_finite:  # E014 names the input; a factorisation of NaN would only crash
            raise _Stop
        if not _finite([a, b]):
            inputs.report.non_finite_result = (self._index, layer, "F32")
            raise _Stop
        # In float64 (on the CPU with one thread, see `run`), then rounded to fp32; signs are fixed
        # (the largest entry of each left singular vector positive), so the bytes are reproducible.
        q_b, r_b = torch.linalg.qr(b.double())
        q_a, r_a = torch.linalg.qr(a.T.double())
        u, s, vh = torch.linalg.svd(r_b @ r_a.T, full_matrices=False)
        u, s, vh = u[:, :rank], s[:rank], vh[:rank]
        left = q_b @ u
        signs = torch.sign(left.gather(0, left.abs().argmax(dim=0, keepdim=True)))
        signs[signs == 0] = 1
        b_out = (left * signs) * s
        a_out = (vh * signs.T) @ q_a.T
        return a_out.float(), b_out.float()

    @staticmethod
    def _has_layer(plan: Plan, source: str, layer: str) -> bool:
        if source in plan.inputs:
            return layer in plan.inputs[source].adapter.type.layers
        return plan.svds[source].layer_ranks.get(layer, 0) > 0
