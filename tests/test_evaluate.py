"""Evaluation against independent oracles: SPEC §2's formulas written out in plain torch, PEFT's
own add_weighted_adapter ("cat", "svd"), a dense SVD, and the logits of the base model with the
oracle ΔW added to its weights."""

from __future__ import annotations

import contextlib
import io
import warnings
from pathlib import Path

import pytest
import torch
from peft_factory import base_model
from safetensors.torch import load_file

from pemlang.cli import main

PREFIX = "base_model.model."

ADAPTER_FILES = ["README.md", "adapter_config.json", "adapter_model.safetensors"]  # a written adapter


# -- helpers: the oracle side reads files with safetensors and PEFT, never with pemlang ------------


def run(tmp_path: Path, program: str, *args: str) -> int:
    path = tmp_path / "program.pem"
    path.write_text(program, encoding="utf-8")
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        status = main(["run", str(path), "--device", "cpu", *args])
    assert status == 0, err.getvalue()
    return status


def tensors(adapter_dir: Path) -> dict[str, torch.Tensor]:
    return {k: v.float() for k, v in load_file(str(adapter_dir / "adapter_model.safetensors")).items()}


def peft_modules(adapter_dirs: dict[str, Path], **base_kwargs):  # type: ignore[no-untyped-def]
    """A PeftModel with each adapter loaded under its name, and its LoRA layers by key."""
    from peft import PeftModel

    names = list(adapter_dirs)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = PeftModel.from_pretrained(base_model(**base_kwargs), adapter_dirs[names[0]], adapter_name=names[0])
        for name in names[1:]:
            model.load_adapter(adapter_dirs[name], adapter_name=name)
    layers = {n[len(PREFIX):]: m for n, m in model.named_modules() if hasattr(m, "lora_A")}
    return model, layers


def delta(layers, adapter: str) -> dict[str, torch.Tensor]:  # type: ignore[no-untyped-def]
    """ΔW per layer as PEFT computes it (get_delta_weight), for one loaded adapter."""
    return {k: m.get_delta_weight(adapter).detach().float() for k, m in layers.items() if adapter in m.lora_A}


def factors(adapter_dir: Path, scalings: dict[str, float]) -> dict[str, tuple[torch.Tensor, torch.Tensor, float]]:
    t = tensors(adapter_dir)
    return {k: (t[f"{PREFIX}{k}.lora_A.weight"], t[f"{PREFIX}{k}.lora_B.weight"], s) for k, s in scalings.items()}


def assert_close(actual: torch.Tensor, expected: torch.Tensor, rel: float) -> None:
    error = (actual - expected).norm() / max(expected.norm().item(), 1e-30)
    assert error <= rel, f"relative error {error:.3g} > {rel}"


# -- paper mode: SPEC §2.1 written out -------------------------------------------------------------

LAM = 0.3
PAPER_CASES = [  # (expression, {input: (alpha, beta)}) — the SPEC's worked examples and more
    ("0.5*a + 0.5*b", {"a": (0.5, 0.5), "b": (0.5, 0.5)}),
    ("a - b", {"a": (1, 1), "b": (1, -1)}),
    ("lam*a + (1-lam)*(b - c)", {"a": (LAM, LAM), "b": (1 - LAM, 1 - LAM), "c": (1 - LAM, -(1 - LAM))}),
    ("-(0.7*t)", {"t": (0.7, -0.7)}),
    ("0.7*(-t)", {"t": (0.7, -0.7)}),
    ("(1+lam)*a - lam*t", {"a": (1 + LAM, 1 + LAM), "t": (LAM, -LAM)}),
    ("t ⊕ a ⊖ b", {"t": (1, 1), "a": (1, 1), "b": (1, -1)}),
    ("(a + a - b) / 2", {"a": (1, 1), "b": (0.5, -0.5)}),
]


@pytest.mark.parametrize(("expression", "coefficients"), PAPER_CASES)
def test_paper_mode_lora_is_the_papers_formula(adapters: Path, tmp_path: Path, expression: str,
                                               coefficients: dict[str, tuple[float, float]]) -> None:
    names = {"a": "llama_r8", "b": "llama_r8_b", "c": "llama_r8_c", "t": "llama_rslora"}
    program = "".join(f'input {n} = "{adapters}/{d}"\n' for n, d in names.items() if n in coefficients)
    run(tmp_path, program + f"param lam = {LAM}\noutput {expression} -> \"out\"\n")
    _, layers = peft_modules({n: adapters / names[n] for n in coefficients})
    scalings = {n: {k: m.scaling[n] for k, m in layers.items()} for n in coefficients}
    first = next(iter(coefficients))  # s_out: the first input's scaling
    written = tensors(tmp_path / "out")
    for key in scalings[first]:
        expected_a = sum(alpha * factors(adapters / names[n], scalings[n])[key][0]
                         for n, (alpha, _) in coefficients.items())
        expected_b = sum(beta * scalings[n][key] / scalings[first][key] * factors(adapters / names[n], scalings[n])[key][1]
                         for n, (_, beta) in coefficients.items())
        assert_close(written[f"{PREFIX}{key}.lora_A.weight"], expected_a, 1e-6)  # type: ignore[arg-type]
        assert_close(written[f"{PREFIX}{key}.lora_B.weight"], expected_b, 1e-6)  # type: ignore[arg-type]


@pytest.mark.parametrize("mode", ["paper", "exact"])
def test_ia3_is_affine_around_one(adapters: Path, tmp_path: Path, mode: str) -> None:
    run(tmp_path, f'mode {mode}\ninput x = "{adapters}/llama_ia3"\ninput y = "{adapters}/llama_ia3_b"\n'
                  'output 0.6*x - 0.4*y -> "out"\n')
    x, y, out = tensors(adapters / "llama_ia3"), tensors(adapters / "llama_ia3_b"), tensors(tmp_path / "out")
    assert set(out) == set(x)
    for key in x:
        expected = 1 + 0.6 * (x[key] - 1) - 0.4 * (y[key] - 1)  # l = 1 + Σ beta_i (l_i − 1)
        assert_close(out[key], expected, 1e-6)


# -- exact mode: PEFT's own "cat", and the formula where PEFT is wrong -------------------------------

EXACT_CASES = [
    ({"a": "llama_r8", "b": "llama_r8_b"}, [0.5, 0.5]),
    ({"a": "llama_r8", "b": "llama_r8_b"}, [1.0, -1.0]),
    ({"a": "llama_r8", "r4": "llama_r4"}, [0.7, -1.3]),           # different ranks
    ({"a": "llama_r8", "qv": "llama_qv", "p": "llama_pattern"}, [1.0, -0.5, 2.0]),  # missing layers, patterns
]


@pytest.mark.parametrize(("inputs", "weights"), EXACT_CASES)
def test_exact_mode_equals_peft_cat(adapters: Path, tmp_path: Path, inputs: dict[str, str],
                                    weights: list[float]) -> None:
    expression = " + ".join(f"({w})*{n}" for n, w in zip(inputs, weights, strict=True))
    program = "mode exact\n" + "".join(f'input {n} = "{adapters}/{d}"\n' for n, d in inputs.items())
    run(tmp_path, program + f'output {expression} -> "out"\n')
    model, layers = peft_modules({n: adapters / d for n, d in inputs.items()})
    model.add_weighted_adapter(list(inputs), weights, "merged", combination_type="cat")
    expected = delta(layers, "merged")
    _, ours = peft_modules({"ours": tmp_path / "out"})
    actual = delta(ours, "ours")
    assert set(actual) == set(expected)
    for key in expected:
        assert_close(actual[key], expected[key], 1e-5)


def test_exact_mode_folds_rslora_correctly(adapters: Path, tmp_path: Path) -> None:
    """ΔW = Σ beta_i·s_i·B_i·A_i with s = alpha/sqrt(r) for rsLoRA (PEFT's cat rescales it wrongly)."""
    run(tmp_path, f'mode exact\ninput rs = "{adapters}/llama_rslora"\ninput a = "{adapters}/llama_r8"\n'
                  'output 0.8*rs - 0.3*a -> "out"\n')
    _, layers = peft_modules({"rs": adapters / "llama_rslora", "a": adapters / "llama_r8"})
    expected = {k: 0.8 * d for k, d in delta(layers, "rs").items()}
    for k, d in delta(layers, "a").items():
        expected[k] = expected[k] - 0.3 * d
    _, ours = peft_modules({"ours": tmp_path / "out"})
    for key, value in delta(ours, "ours").items():
        assert_close(value, expected[key], 1e-5)
    config = (tmp_path / "out" / "adapter_config.json").read_text()
    assert '"use_rslora": false' in config


def test_exact_mode_a_minus_a_is_zero(adapters: Path, tmp_path: Path) -> None:
    run(tmp_path, f'mode exact\ninput a = "{adapters}/llama_r8"\noutput a - a -> "out"\n')
    _, ours = peft_modules({"ours": tmp_path / "out"})
    assert all(torch.count_nonzero(d) == 0 for d in delta(ours, "ours").values())


# -- svd --------------------------------------------------------------------------------------------


def dense_truncation(delta_w: torch.Tensor, rank: int) -> torch.Tensor:
    u, s, vh = torch.linalg.svd(delta_w.double(), full_matrices=False)
    return ((u[:, :rank] * s[:rank]) @ vh[:rank]).float()


@pytest.mark.parametrize(("inputs", "weights", "rank", "args"), [
    ({"a": "llama_r8", "b": "llama_r8_b", "c": "llama_r8_c"}, [1.0, 0.5, -1.0], 5, ()),
    ({"a": "llama_r8", "r4": "llama_r4"}, [0.5, 0.5], 10, ()),
    ({"bf": "llama_bf16", "a": "llama_r8"}, [1.0, -0.5], 4, ("--dtype", "float32")),  # bf16 computed in fp32
])
def test_svd_is_the_dense_truncation(adapters: Path, tmp_path: Path, inputs: dict[str, str],
                                     weights: list[float], rank: int, args: tuple[str, ...]) -> None:
    expression = " + ".join(f"({w})*{n}" for n, w in zip(inputs, weights, strict=True))
    program = "mode exact\n" + "".join(f'input {n} = "{adapters}/{d}"\n' for n, d in inputs.items())
    run(tmp_path, program + f'output svd({expression}, rank={rank}) -> "out"\n', *args)
    _, layers = peft_modules({n: adapters / d for n, d in inputs.items()})
    per_input = {n: delta(layers, n) for n in inputs}
    written = tensors(tmp_path / "out")
    for key in per_input[next(iter(inputs))]:
        oracle = sum(w * per_input[n][key] for n, w in zip(inputs, weights, strict=True))
        a, b = written[f"{PREFIX}{key}.lora_A.weight"], written[f"{PREFIX}{key}.lora_B.weight"]
        assert a.shape[0] == min(rank, sum(layers[key].r[n] for n in inputs))
        assert_close(b @ a, dense_truncation(oracle, a.shape[0]), 1e-5)  # type: ignore[arg-type]


def test_svd_equals_peft_svd(adapters: Path, tmp_path: Path) -> None:
    inputs = {"a": "llama_r8", "b": "llama_r8_b"}
    run(tmp_path, "mode exact\n" + "".join(f'input {n} = "{adapters}/{d}"\n' for n, d in inputs.items())
        + 'output svd(0.6*a + 0.4*b, rank=6) -> "out"\n')
    model, layers = peft_modules({n: adapters / d for n, d in inputs.items()})
    model.add_weighted_adapter(list(inputs), [0.6, 0.4], "merged", combination_type="svd", svd_rank=6)
    expected = delta(layers, "merged")
    _, ours = peft_modules({"ours": tmp_path / "out"})
    for key, value in delta(ours, "ours").items():
        assert_close(value, expected[key], 1e-5)


def test_nested_svd(adapters: Path, tmp_path: Path) -> None:
    run(tmp_path, f'mode exact\ninput a = "{adapters}/llama_r8"\ninput b = "{adapters}/llama_r8_b"\n'
                  'output svd(svd(a, rank=3) - b, rank=4) -> "out"\n')
    _, layers = peft_modules({"a": adapters / "llama_r8", "b": adapters / "llama_r8_b"})
    da, db = delta(layers, "a"), delta(layers, "b")
    written = tensors(tmp_path / "out")
    for key in da:
        oracle = dense_truncation(dense_truncation(da[key], 3) - db[key], 4)
        a, b = written[f"{PREFIX}{key}.lora_A.weight"], written[f"{PREFIX}{key}.lora_B.weight"]
        assert_close(b @ a, oracle, 1e-5)


# -- the written adapter in PEFT, against the base model plus the oracle ΔW -------------------------


def _load(adapter_dir: Path, **base_kwargs):  # type: ignore[no-untyped-def]
    from peft import PeftModel

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model = PeftModel.from_pretrained(base_model(**base_kwargs), adapter_dir)
    return model.eval(), {str(w.message) for w in caught}


def _load_without_warnings(adapter_dir: Path, control: Path, **base_kwargs):  # type: ignore[no-untyped-def]
    """Load our adapter; it may warn only as loading an adapter PEFT itself wrote does (the
    libraries' own deprecation notices), never about keys, shapes or config."""
    model, ours = _load(adapter_dir, **base_kwargs)
    _, baseline = _load(control, **base_kwargs)
    assert not ours - baseline, ours - baseline
    return model


def test_paper_output_logits_equal_base_plus_oracle(adapters: Path, tmp_path: Path) -> None:
    """Domain transfer with a classifier head (SEQ_CLS): the loaded model computes base + ΔW."""
    run(tmp_path, f'''input cls = "{adapters}/llama_cls"
input lm1 = "{adapters}/llama_r8"
input lm2 = "{adapters}/llama_r8_b"
heads from cls
output 0.5*cls + 0.5*(lm2 - lm1) -> "out"
''')
    model = _load_without_warnings(tmp_path / "out", adapters / "llama_cls", task="cls")
    _, layers = peft_modules({"cls": adapters / "llama_cls", "lm1": adapters / "llama_r8",
                              "lm2": adapters / "llama_r8_b"}, task="cls")
    oracle = base_model(task="cls")
    coefficients = {"cls": (0.5, 0.5), "lm2": (0.5, 0.5), "lm1": (0.5, -0.5)}
    raw = {n: tensors(d) for n, d in {"cls": adapters / "llama_cls", "lm1": adapters / "llama_r8",
                                       "lm2": adapters / "llama_r8_b"}.items()}
    with torch.no_grad():
        for key, module in layers.items():
            s_out = module.scaling["cls"]
            a = sum(al * raw[n][f"{PREFIX}{key}.lora_A.weight"] for n, (al, _) in coefficients.items())
            b = sum(be * module.scaling[n] / s_out * raw[n][f"{PREFIX}{key}.lora_B.weight"]
                    for n, (_, be) in coefficients.items())
            oracle.get_submodule(key).weight += s_out * (b @ a)  # type: ignore[operator]
        oracle.score.weight.copy_(raw["cls"][f"{PREFIX}score.weight"])
    ids = torch.randint(1, 64, (2, 7), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.allclose(model(input_ids=ids).logits, oracle(input_ids=ids).logits, atol=1e-5)


def test_exact_gpt2_fan_in_fan_out_logits(adapters: Path, tmp_path: Path) -> None:
    run(tmp_path, f'mode exact\ninput g = "{adapters}/gpt2_r8"\noutput svd(2*g, rank=3) - g -> "out"\n')
    model = _load_without_warnings(tmp_path / "out", adapters / "gpt2_r8", arch="gpt2", name=None)
    _, layers = peft_modules({"g": adapters / "gpt2_r8"}, arch="gpt2", name=None)
    oracle = base_model("gpt2", name=None)
    with torch.no_grad():
        for key, d in delta(layers, "g").items():  # PEFT's ΔW is already in the Conv1D (in, out) layout
            oracle.get_submodule(key).weight += dense_truncation(2 * d, 3) - d
    ids = torch.randint(1, 64, (2, 7), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.allclose(model(input_ids=ids).logits, oracle(input_ids=ids).logits, atol=1e-4)


# -- files ------------------------------------------------------------------------------------------


def test_outputs_are_byte_identical(adapters: Path, tmp_path: Path) -> None:
    program = f'mode exact\ninput a = "{adapters}/llama_r8"\ninput b = "{adapters}/llama_r4"\n' \
              'output svd(a - 0.5*b, rank=4) -> "out"\noutput a + b -> "cat"\n'
    run(tmp_path, program)
    first = {p.relative_to(tmp_path): p.read_bytes() for p in tmp_path.glob("*/*") if p.is_file()}
    run(tmp_path, program, "--force")
    second = {p.relative_to(tmp_path): p.read_bytes() for p in tmp_path.glob("*/*") if p.is_file()}
    assert first == second and len(first) == 6  # two outputs: weights, config and model card each


def test_provenance_metadata(adapters: Path, tmp_path: Path) -> None:
    import hashlib
    import json

    from safetensors import safe_open

    run(tmp_path, f'input a = "{adapters}/llama_r8"\ninput b = "{adapters}/llama_r8_b"\nparam lam = 0.5\n'
                  'mix = lam*a + (1-lam)*b\noutput mix -> "out"\n', "--set", "lam=0.25")
    with safe_open(str(tmp_path / "out" / "adapter_model.safetensors"), "pt") as f:
        meta = f.metadata()
    assert meta["pemlang.expression"] == "lam*a + (1-lam)*b"
    assert meta["pemlang.mode"] == "paper"
    assert json.loads(meta["pemlang.params"]) == {"lam": 0.25}
    recorded = {i["name"]: i for i in json.loads(meta["pemlang.inputs"])}
    digest = hashlib.sha256((adapters / "llama_r8" / "adapter_model.safetensors").read_bytes()).hexdigest()
    assert recorded["a"]["sha256"] == digest and recorded["a"]["path"].endswith("llama_r8")


def test_an_interrupted_write_leaves_nothing(adapters: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import json as json_module

    real_dumps = json_module.dumps

    def interrupted(obj, *args, **kwargs):  # type: ignore[no-untyped-def]
        if isinstance(obj, dict) and "peft_type" in obj:  # the config, written after the weights
            raise KeyboardInterrupt
        return real_dumps(obj, *args, **kwargs)

    monkeypatch.setattr("pemlang.writer.json.dumps", interrupted)
    path = tmp_path / "p.pem"
    path.write_text(f'input a = "{adapters}/llama_r8"\noutput 2*a -> "out"\n')
    with contextlib.redirect_stderr(io.StringIO()):
        assert main(["run", str(path), "--device", "cpu"]) == 130
    assert sorted(p.name for p in tmp_path.iterdir()) == ["p.pem"]


def test_force_replaces_but_inputs_are_never_written(adapters: Path, tmp_path: Path) -> None:
    before = (adapters / "llama_r8" / "adapter_model.safetensors").read_bytes()
    path = tmp_path / "p.pem"
    path.write_text(f'input a = "{adapters}/llama_r8"\noutput 2*a -> "{adapters}/llama_r8"\n')
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        assert main(["run", str(path), "--force", "--device", "cpu"]) == 1
    assert "E018" in err.getvalue()
    assert (adapters / "llama_r8" / "adapter_model.safetensors").read_bytes() == before
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "stale.txt").write_text("old")
    run(tmp_path, f'input a = "{adapters}/llama_r8"\noutput 2*a -> "out"\n', "--force")
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ADAPTER_FILES


def test_dtype_follows_inputs_unless_asked(adapters: Path, tmp_path: Path) -> None:
    run(tmp_path, f'input a = "{adapters}/llama_bf16"\noutput 2*a -> "out"\n')
    assert {t.dtype for t in load_file(str(tmp_path / "out" / "adapter_model.safetensors")).values()} == {torch.bfloat16}
    run(tmp_path, f'input a = "{adapters}/llama_bf16"\noutput 2*a -> "out2"\n', "--dtype", "float32")
    assert {t.dtype for t in load_file(str(tmp_path / "out2" / "adapter_model.safetensors")).values()} == {torch.float32}


# -- finiteness of results -----------------------------------------------------------------------------


def run_status(tmp_path: Path, program: str, *args: str) -> tuple[int, str]:
    path = tmp_path / "program.pem"
    path.write_text(program, encoding="utf-8")
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        status = main(["run", str(path), "--device", "cpu", *args])
    return status, err.getvalue()


def scaled_copy(adapters: Path, tmp_path: Path, factor: float) -> Path:
    """llama_r8 with every tensor multiplied by `factor` (finite in fp32)."""
    import shutil

    from safetensors.torch import save_file

    copy = tmp_path / "huge"
    shutil.copytree(adapters / "llama_r8", copy)
    state = {k: v * factor for k, v in load_file(str(copy / "adapter_model.safetensors")).items()}
    save_file(state, str(copy / "adapter_model.safetensors"), metadata={"format": "pt"})
    return copy


def test_a_result_that_overflows_the_output_dtype_is_not_written(adapters: Path, tmp_path: Path) -> None:
    status, err = run_status(tmp_path, f'input a = "{adapters}/llama_r8"\nparam k = 1\noutput k*a -> "out"\n',
                             "--dtype", "float16", "--set", "k=1e7")
    assert status == 1 and "error[E027]" in err and "F16" in err and "layers." in err, err
    assert "`k*a`" in err or "k*a" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["program.pem"]


def test_a_result_that_overflows_fp32_is_not_written_nor_any_other_output(adapters: Path, tmp_path: Path) -> None:
    huge = scaled_copy(adapters, tmp_path, 1e30)
    status, err = run_status(tmp_path, f'mode exact\ninput a = "{adapters}/llama_r8"\ninput h = "{huge}"\n'
                                       'output 2*a -> "first"\noutput 1e10*h -> "second"\n')
    assert status == 1 and "error[E027]" in err and "second" in err and "not an input" in err, err
    assert not (tmp_path / "first").exists() and not (tmp_path / "second").exists()


def test_svd_over_a_non_finite_input_reports_the_input(adapters: Path, tmp_path: Path) -> None:
    status, err = run_status(tmp_path, f'mode exact\ninput a = "{adapters}/llama_nan"\n'
                                       'output svd(a, rank=2) -> "out"\n')
    assert status == 1 and "error[E014]" in err and "LinAlgError" not in err and "internal error" not in err, err
    assert not (tmp_path / "out").exists()


def test_a_sweep_point_whose_result_overflows_stops_the_sweep(adapters: Path, tmp_path: Path) -> None:
    status, err = run_status(tmp_path, f'input a = "{adapters}/llama_r8"\nparam k = 1\noutput k*a -> "out"\n',
                             "--dtype", "float16", "--sweep", "k=1,1e7")
    assert status == 1 and "error[E027]" in err and "at k=1e+07" in err, err
    assert not (tmp_path / "out.k=10000000.0").exists()


def test_svd_bytes_do_not_depend_on_the_thread_count(tmp_path: Path) -> None:
    """The same svd program run with 1 and with 2 threads writes identical bytes."""
    import os
    import subprocess
    import sys

    from test_kill import big_lora

    big_lora(tmp_path / "a", 1, layers=4)
    big_lora(tmp_path / "b", 2, layers=4)
    (tmp_path / "p.pem").write_text('mode exact\ninput a = "a"\ninput b = "b"\n'
                                    'output svd(0.7*a - 0.3*b, rank=20) -> "out"\n', encoding="utf-8")
    root = Path(__file__).resolve().parent.parent
    written = []
    for threads in ("1", "2"):
        subprocess.run([sys.executable, "-m", "pemlang.cli", "run", str(tmp_path / "p.pem"), "--device", "cpu",
                        "--force"], check=True, capture_output=True,
                       env={**os.environ, "PYTHONPATH": str(root), "OMP_NUM_THREADS": threads,
                            "MKL_NUM_THREADS": threads})
        written.append((tmp_path / "out" / "adapter_model.safetensors").read_bytes())
    assert written[0] == written[1]
