"""Laws of the algebra, checked through the whole pipeline (parse → check → lower → run)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pemlang.check import check_source
from pemlang.run import execute
from pemlang.source import Source

DEVICES = ["cpu", pytest.param("cuda", marks=[pytest.mark.cuda, pytest.mark.skipif(
    not torch.cuda.is_available(), reason="no CUDA device")])]


def evaluate(adapters: Path, expression: str, mode: str = "paper", device: str = "cpu",
             extra: str = "") -> dict[str, torch.Tensor]:
    text = (f'mode {mode}\ninput a = "{adapters}/llama_r8"\ninput b = "{adapters}/llama_r8_b"\n'
            f'input c = "{adapters}/llama_r8_c"\ninput r4 = "{adapters}/llama_r4"\n{extra}'
            f'output {expression} -> "{adapters}/../never_written"\n')
    program = check_source(Source(text))
    assert program.ok, [d.message for d in program.diagnostics if d.is_error]
    (tensors,) = execute(program, device=device).tensors
    return tensors


def delta_w(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """ΔW per layer of an exact-mode output (written with scaling 1)."""
    out = {}
    for key, a in tensors.items():
        if key.endswith("lora_A.weight"):
            out[key] = tensors[key.replace("lora_A", "lora_B")].double() @ a.double()
    return out


def assert_same(x: dict[str, torch.Tensor], y: dict[str, torch.Tensor], atol: float = 1e-6) -> None:
    assert x.keys() == y.keys()
    for key in x:
        assert torch.allclose(x[key].double(), y[key].double(), atol=atol), key


coefficient = st.floats(min_value=-3, max_value=3, allow_nan=False).filter(lambda v: abs(v) > 1e-3)
SETTINGS = settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


@given(lam=coefficient, mu=coefficient)
@SETTINGS
def test_addition_commutes(adapters: Path, lam: float, mu: float) -> None:
    # Paper mode keeps the first input's scaling; with equal scalings the tensors themselves commute.
    assert_same(evaluate(adapters, f"({lam})*a + ({mu})*b"), evaluate(adapters, f"({mu})*b + ({lam})*a"))
    assert_same(delta_w(evaluate(adapters, f"({lam})*a + ({mu})*r4", "exact")),
                delta_w(evaluate(adapters, f"({mu})*r4 + ({lam})*a", "exact")))


@given(k=coefficient)
@SETTINGS
def test_scaling_distributes(adapters: Path, k: float) -> None:
    assert_same(evaluate(adapters, f"({k})*(a + b - c)"), evaluate(adapters, f"({k})*a + ({k})*b - ({k})*c"))
    assert_same(delta_w(evaluate(adapters, f"({k})*(a + r4)", "exact")),
                delta_w(evaluate(adapters, f"({k})*a + ({k})*r4", "exact")))


def test_exact_mode_is_a_vector_space(adapters: Path) -> None:
    assert all(torch.count_nonzero(d) == 0 for d in delta_w(evaluate(adapters, "a - a", "exact")).values())
    assert_same(delta_w(evaluate(adapters, "(a + r4) - r4", "exact")), delta_w(evaluate(adapters, "a", "exact")),
                atol=1e-5)


@pytest.mark.parametrize("mode", ["paper", "exact"])
def test_inlining_a_binding_keeps_the_value(adapters: Path, mode: str) -> None:
    bound = evaluate(adapters, "0.5*d + 0.5*c", mode, extra="d = a - 2*b\n")
    inlined = evaluate(adapters, "0.5*(a - 2*b) + 0.5*c", mode)
    assert_same(bound, inlined)


@pytest.mark.parametrize("device", DEVICES)
def test_devices_agree(adapters: Path, device: str) -> None:
    expression = "svd(0.5*a - b + 2*r4, rank=6) + c"
    on_device = evaluate(adapters, expression, "exact", device=device)
    on_cpu = evaluate(adapters, expression, "exact")
    assert_same(delta_w(on_device), delta_w(on_cpu), atol=1e-5)
    assert_same(evaluate(adapters, "0.3*a + 0.7*(b - c)", device=device), evaluate(adapters, "0.3*a + 0.7*(b - c)"))
