"""W002, paper mode over LoRA inputs whose A matrices differ: said once per program, wherever the
program is evaluated (`run`, `run --sweep`, `tune`, the API), and telling apart inputs initialised
separately (cosine ≈ 0, what independent random matrices give) from inputs trained from one
initialisation that drifted apart (cosine ≈ 0.5)."""

from __future__ import annotations

import contextlib
import io
import math
import os
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import pemlang
from pemlang.cli import main
from pemlang.run import separate_bound


def perturbed(adapters: Path, out: Path, noise: float, seed: int) -> Path:
    """A copy of the PEFT adapter llama_r8 as if trained on from its initialisation: each A gets
    independent noise of `noise` times the A's own standard deviation (0.1), each B is new. The
    expected cosine of a new A with the old is 1/sqrt(1 + noise²)."""
    shutil.copytree(adapters / "llama_r8", out)
    state = load_file(str(out / "adapter_model.safetensors"))
    generator = torch.Generator().manual_seed(seed)
    for key, value in state.items():
        fresh = 0.1 * torch.randn(value.shape, generator=generator)
        state[key] = value + noise * fresh if "lora_A" in key else fresh
    save_file(state, str(out / "adapter_model.safetensors"), metadata={"format": "pt"})
    return out


def a_cosines(first: Path, other: Path) -> list[float]:
    """The oracle: per layer, the cosine of `other`'s A with `first`'s, straight from the files."""
    a, b = load_file(str(first / "adapter_model.safetensors")), load_file(str(other / "adapter_model.safetensors"))
    return [float(torch.nn.functional.cosine_similarity(a[k].flatten().double(), b[k].flatten().double(), dim=0))
            for k in sorted(a) if "lora_A" in k]


def program_text(inputs: dict[str, Path], expression: str, out: Path, *, param: bool = False) -> str:
    lines = [f'input {name} = "{path}"' for name, path in inputs.items()]
    if param:
        lines.append("param w = 0.5")
    return "\n".join([*lines, f'output {expression} -> "{out}"', ""])


def cli(*args: str) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        status = main(list(args))
    return status, out.getvalue(), err.getvalue()


@pytest.fixture(scope="module")
def drifted(adapters: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("w002")
    return {"half": perturbed(adapters, root / "half", math.sqrt(3), 40),   # cosine ≈ 0.5
            "half_b": perturbed(adapters, root / "half_b", math.sqrt(3), 41),
            "close": perturbed(adapters, root / "close", 0.05, 42)}        # cosine ≈ 0.999


def test_the_bound_is_what_independent_matrices_give() -> None:
    # 8 layers of 8×32 A matrices: each cosine has standard deviation 1/16, their mean 1/16/sqrt(8).
    layers = {f"l{i}": (0.0, 256) for i in range(8)}
    assert separate_bound(layers) == pytest.approx(4 / 16 / math.sqrt(8))
    # Independent random matrices fall inside it (4 standard deviations), seed after seed.
    generator = torch.Generator().manual_seed(0)
    for _ in range(200):
        a, b = torch.randn(8, 8, 32, generator=generator).double(), torch.randn(8, 8, 32, generator=generator).double()
        cosines = torch.nn.functional.cosine_similarity(a.flatten(1), b.flatten(1), dim=1)
        assert abs(float(cosines.mean())) <= separate_bound(layers)
    # Tiny matrices, where chance alone reaches large cosines, are capped.
    assert separate_bound({"l": (0.0, 4)}) == 0.25


def test_run_says_it_once_for_separately_initialised_inputs(adapters: Path, tmp_path: Path) -> None:
    inputs = {"a": adapters / "llama_r8", "b": adapters / "llama_r8_b", "c": adapters / "llama_r8_c"}
    pem = tmp_path / "three.pem"
    pem.write_text(program_text(inputs, "0.4*a + 0.3*b + 0.3*c", tmp_path / "out"), encoding="utf-8")
    status, _, err = cli("run", str(pem), "--device", "cpu")
    assert status == 0, err
    assert err.count("warning[W002]") == 1, err  # one per program, not one per input
    assert "paper mode over LoRA inputs that were initialised separately (b vs a, c vs a)" in err
    for name in ("b", "c"):
        values = a_cosines(inputs["a"], inputs[name])
        assert f"{name} vs a: the cosine of their A matrices over 8 layers is mean {sum(values) / 8:.3f}, " \
               f"min {min(values):.3f}" in err
    assert "use `mode exact`" in err


def test_run_tells_drift_from_one_initialisation(adapters: Path, drifted: dict[str, Path], tmp_path: Path) -> None:
    inputs = {"a": adapters / "llama_r8", "b": drifted["half"], "c": drifted["half_b"]}
    pem = tmp_path / "drift.pem"
    pem.write_text(program_text(inputs, "a + b - c", tmp_path / "out"), encoding="utf-8")
    status, _, err = cli("run", str(pem), "--device", "cpu")
    assert status == 0, err
    assert err.count("warning[W002]") == 1, err
    assert "paper mode over LoRA inputs whose A matrices drifted apart in training (b vs a, c vs a)" in err
    assert "initialised separately" not in err
    for name in ("b", "c"):
        mean = sum(a_cosines(inputs["a"], inputs[name])) / 8
        assert 0.4 < mean < 0.6
        assert f"{name} vs a: the cosine of their A matrices over 8 layers is mean {mean:.3f}" in err
    # A drift within the warning's threshold says nothing.
    close = tmp_path / "close.pem"
    close.write_text(program_text({"a": adapters / "llama_r8", "b": drifted["close"]}, "a + b", tmp_path / "out2"),
                     encoding="utf-8")
    status, _, err = cli("run", str(close), "--device", "cpu")
    assert status == 0 and "W002" not in err, err


def test_a_sweep_says_it_once_before_the_points(adapters: Path, tmp_path: Path) -> None:
    pem = tmp_path / "sweep.pem"
    pem.write_text(program_text({"a": adapters / "llama_r8", "b": adapters / "llama_r8_b"}, "w*a + (1 - w)*b",
                                tmp_path / "out", param=True), encoding="utf-8")
    status, out, err = cli("run", str(pem), "--device", "cpu", "--sweep", "w=0.25,0.5,0.75")
    assert status == 0, err
    assert err.count("warning[W002]") == 1, err
    assert "initialised separately (b vs a)" in err
    assert "wrote 3 adapters" in out


def test_the_api_attaches_it_to_the_program_once(adapters: Path, drifted: dict[str, Path], tmp_path: Path) -> None:
    program = pemlang.compile("w*a + (1 - w)*b", inputs={"a": adapters / "llama_r8", "b": drifted["half"]},
                              params={"w": 0.5}, device="cpu")
    assert [d.code for d in program.warnings] == []  # nothing read yet
    points = program.sweep(w=[0.25, 0.75])
    next(points)
    assert [d.code for d in program.warnings] == ["W002"]  # measured before the first point
    assert "drifted apart in training" in program.warnings[0].message
    assert program.warnings[0].hints[0].startswith('`mode="exact"` adds')  # the API's spelling
    list(points)
    program.save(tmp_path / "saved", w=0.5)
    assert [d.code for d in program.warnings] == ["W002"]  # still once
    # save alone (no sweep before it) attaches it too
    fresh = pemlang.compile("a + b", inputs={"a": adapters / "llama_r8", "b": adapters / "llama_r8_b"}, device="cpu")
    fresh.save(tmp_path / "fresh")
    assert [d.code for d in fresh.warnings] == ["W002"]
    assert "initialised separately" in fresh.warnings[0].message


def test_tune_says_it_once_before_the_trials(adapters: Path, tmp_path: Path) -> None:
    pytest.importorskip("optuna")
    from tests.peft_factory import base_model

    base = tmp_path / "base"
    base_model("llama").save_pretrained(base)
    (tmp_path / "w002_objective.py").write_text("def zero(model, params):\n    return 0.0\n", encoding="utf-8")
    pem = tmp_path / "tune.pem"
    pem.write_text(program_text({"a": adapters / "llama_r8", "b": adapters / "llama_r8_b"}, "w*a + (1 - w)*b",
                                tmp_path / "out", param=True), encoding="utf-8")
    cwd = os.getcwd()
    os.chdir(tmp_path)
    try:
        status, out, err = cli("tune", str(pem), "--base", str(base), "--objective", "w002_objective:zero",
                               "--param", "w=0:1:0.5", "--no-save", "--device", "cpu")
    finally:
        os.chdir(cwd)
    assert status == 0, err
    assert err.count("warning[W002]") == 1, err
    assert "initialised separately (b vs a)" in err
