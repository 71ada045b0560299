"""prune, dare, ties on ΔW: against PEFT's own merge_utils applied to the dense ΔW that PEFT
computes from the input files, against the SPEC's formulas written out, their laws, the rank
reduction against a dense SVD, and the written adapter loaded by PEFT."""

from __future__ import annotations

import contextlib
import io
import math
from pathlib import Path

import pytest
import torch
from peft.utils import merge_utils
from peft_factory import base_model
from safetensors.torch import load_file

from pemlang.backend.dense import dare, keep_count, prune, ties, truncated_svd
from pemlang.cli import main

PREFIX = "base_model.model."
INPUTS = {"a": "llama_r8", "b": "llama_r8_b", "c": "llama_r8_c"}


def run(tmp_path: Path, body: str, adapters: Path, *args: str) -> Path:
    """Run `mode exact` + inputs a, b, c + body; return tmp_path/out."""
    text = "mode exact\n" + "".join(f'input {n} = "{adapters / d}"\n' for n, d in INPUTS.items()) + body
    tmp_path.mkdir(parents=True, exist_ok=True)
    path = tmp_path / "program.pem"
    path.write_text(text, encoding="utf-8")
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        status = main(["run", str(path), "--device", "cpu", *args])
    assert status == 0, err.getvalue()
    return tmp_path / "out"


def input_deltas(adapters: Path) -> dict[str, dict[str, torch.Tensor]]:
    """ΔW = s·B·A per input and layer, as PEFT itself computes it (get_delta_weight)."""
    from peft import PeftModel

    model = PeftModel.from_pretrained(base_model(), adapters / INPUTS["a"], adapter_name="a")
    for name in ("b", "c"):
        model.load_adapter(adapters / INPUTS[name], adapter_name=name)
    layers = {n[len(PREFIX):]: m for n, m in model.named_modules() if hasattr(m, "lora_A")}
    return {name: {k: m.get_delta_weight(name).detach().float() for k, m in layers.items()} for name in INPUTS}


def output_deltas(out: Path) -> dict[str, torch.Tensor]:
    """B·A of a written output (scaling 1: lora_alpha = r), per layer."""
    tensors = load_file(str(out / "adapter_model.safetensors"))
    keys = sorted(k[len(PREFIX):-len(".lora_A.weight")] for k in tensors if k.endswith(".lora_A.weight"))
    return {k: tensors[f"{PREFIX}{k}.lora_B.weight"].float() @ tensors[f"{PREFIX}{k}.lora_A.weight"].float()
            for k in keys}


FULL = 64  # above every fixture layer's min(out, in): svd(…, rank=FULL) writes the dense value exactly


def test_ties_total_equals_peft_merge_utils(adapters: Path, tmp_path: Path) -> None:
    deltas = input_deltas(adapters)
    out = run(tmp_path, f'output svd(ties(0.5*a, 0.3*b, 0.2*c, density=0.25), rank={FULL}) -> "out"\n', adapters)
    written = output_deltas(out)
    for key, value in written.items():
        # Weights go inside the arguments, so the sign is elected on the weighted updates: PEFT's
        # routine with unit weights over the weighted ΔW (its own weights multiply after the election).
        stacked = torch.stack([w * deltas[n][key] for n, w in zip(INPUTS, (0.5, 0.3, 0.2), strict=True)])
        assert (0.25 * stacked[0].numel()).is_integer()  # PEFT keeps int(d·n), the SPEC ⌈d·n⌉: equal here
        expected = merge_utils.ties(stacked, torch.ones(3), density=0.25, majority_sign_method="total")
        assert torch.allclose(value, expected, atol=1e-6, rtol=1e-4), key


def test_prune_equals_peft_magnitude_prune(adapters: Path, tmp_path: Path) -> None:
    deltas = input_deltas(adapters)
    out = run(tmp_path, f'output svd(prune(a - 0.5*b, density=0.5), rank={FULL}) -> "out"\n', adapters)
    for key, value in output_deltas(out).items():
        expected = merge_utils.prune(deltas["a"][key] - 0.5 * deltas["b"][key], 0.5, method="magnitude")
        assert torch.allclose(value, expected, atol=1e-6, rtol=1e-4), key


def test_ties_frequency_is_the_spec_formula(adapters: Path, tmp_path: Path) -> None:
    """sign="frequency", written out: where the signs tie (Σ sign = 0) the SPEC elects 0 and keeps
    nothing, where PEFT would elect + (so PEFT is not the oracle here)."""
    deltas = input_deltas(adapters)
    out = run(tmp_path, f'output svd(ties(a, -b, density=0.5, sign="frequency"), rank={FULL}) -> "out"\n', adapters)
    for key, value in output_deltas(out).items():
        trimmed = []
        for d in (deltas["a"][key], -deltas["b"][key]):
            flat = d.flatten()
            keep = math.ceil(0.5 * flat.numel())
            order = sorted(range(flat.numel()), key=lambda i: (-abs(float(flat[i])), i))[:keep]
            kept = torch.zeros_like(flat)
            kept[order] = flat[order]
            trimmed.append(kept.view_as(d))
        expected = torch.zeros_like(trimmed[0])
        for index in range(expected.numel()):
            values = [float(t.flatten()[index]) for t in trimmed]
            elected = math.copysign(1, sum(math.copysign(1, v) for v in values if v)) \
                if sum(math.copysign(1, v) for v in values if v) else 0
            agree = [v for v in values if v and math.copysign(1, v) == elected]
            expected.view(-1)[index] = sum(agree) / max(1, len(agree))
        assert torch.allclose(value, expected, atol=1e-6, rtol=1e-4), key
        break  # one layer written out element by element is enough (it is slow in Python)


def test_dare_structure_and_reproducibility(adapters: Path, tmp_path: Path) -> None:
    """Every entry is 0 or ΔW/(1−p); the kept fraction is within binomial bounds; the same seed
    gives the same bytes whatever the thread count; another seed another mask."""
    deltas = input_deltas(adapters)
    p = 0.7
    outputs = {}
    for name, seed, threads in (("one", 5, 1), ("two", 5, 2), ("other", 6, 1)):
        torch.set_num_threads(threads)
        try:
            outputs[name] = run(tmp_path / name, f'output svd(dare(a, p={p}, seed={seed}), rank={FULL}) -> "out"\n',
                                adapters)
        finally:
            torch.set_num_threads(2)
    one, two, other = (output_deltas(outputs[n]) for n in ("one", "two", "other"))
    assert (outputs["one"] / "adapter_model.safetensors").read_bytes() == \
        (outputs["two"] / "adapter_model.safetensors").read_bytes()
    kept = total = 0
    for key, value in one.items():
        scaled = deltas["a"][key] / (1 - p)
        is_kept = torch.isclose(value, scaled, atol=1e-6, rtol=1e-4)
        is_dropped = value.abs() <= 1e-6
        assert bool((is_kept | is_dropped).all()), key
        kept += int(is_kept.sum())
        total += value.numel()
        assert not torch.equal(value, other[key])
        assert torch.equal(value, two[key])
    expected, spread = total * (1 - p), math.sqrt(total * p * (1 - p))
    assert abs(kept - expected) <= 5 * spread, (kept, expected)


# -- laws, on the kernels ---------------------------------------------------------------------------

X = torch.randn(40, 70, generator=torch.Generator().manual_seed(1))
Y = torch.randn(40, 70, generator=torch.Generator().manual_seed(2))


def test_laws() -> None:
    assert torch.equal(prune(X, 1.0), X)
    assert torch.equal(ties([X], 1.0, "total"), X)
    assert torch.equal(dare(X, 0.0, 3, "layer"), X)
    assert torch.equal(prune(2.5 * X, 0.3), 2.5 * prune(X, 0.3))
    assert torch.equal(prune(-X, 0.3), -prune(X, 0.3))
    for sign in ("total", "frequency"):
        assert torch.allclose(ties([X, Y, 0.5 * X], 0.4, sign), ties([0.5 * X, Y, X], 0.4, sign), atol=0, rtol=1e-6)


def test_prune_keeps_the_ceiling_and_breaks_ties_by_index() -> None:
    assert keep_count(0.2, 100) == 20 and keep_count(0.21, 100) == 21 and keep_count(0.001, 10) == 1
    values = torch.tensor([[1.0, -3.0, 3.0, 2.0, -3.0]])
    assert prune(values, 0.4).tolist() == [[0.0, -3.0, 3.0, 0.0, 0.0]]  # |−3| at index 1 and 3 at 2 come first
    assert prune(values, 0.5).tolist() == [[0.0, -3.0, 3.0, 0.0, -3.0]]  # ⌈2.5⌉ = 3


def test_dare_mask_depends_on_seed_and_layer_only() -> None:
    first = dare(X, 0.5, 7, "model.layers.0.q_proj")
    assert torch.equal(first, dare(X.clone(), 0.5, 7, "model.layers.0.q_proj"))
    assert not torch.equal(first, dare(X, 0.5, 7, "model.layers.1.q_proj"))
    assert not torch.equal(first, dare(X, 0.5, 8, "model.layers.0.q_proj"))


@pytest.mark.parametrize("shape", [(300, 900), (64, 48)])
def test_truncated_svd_is_within_one_percent_of_the_optimal_error(shape: tuple[int, int]) -> None:
    """On what these functions produce (a TIES merge of random low-rank updates: sparse, a flat
    spectrum), the rank-16 error is within 1 % of the dense SVD's."""
    generator = torch.Generator().manual_seed(0)
    updates = [torch.randn(shape[0], 8, generator=generator) @ torch.randn(8, shape[1], generator=generator)
               for _ in range(3)]
    dense = ties(updates, 0.2, "total")
    a, b = truncated_svd(dense, 16, "layer")
    u, s, vh = torch.linalg.svd(dense.double(), full_matrices=False)
    optimal = float(s[16:].norm() / s.norm())
    error = float((dense.double() - b.double() @ a.double()).norm() / dense.double().norm())
    assert error <= optimal * 1.01, (error, optimal)


def test_written_adapter_loads_in_peft_and_gives_base_plus_oracle(adapters: Path, tmp_path: Path) -> None:
    """The logits of PEFT's model with our output equal the base with the oracle's ΔW added: PEFT's
    ties on the dense ΔW, truncated to rank 4 by a dense SVD."""
    from peft import PeftModel

    deltas = input_deltas(adapters)
    out = run(tmp_path, 'output svd(ties(0.6*a, 0.4*b, density=0.5), rank=4) -> "out"\n', adapters)
    model = PeftModel.from_pretrained(base_model(), out).eval()
    oracle = base_model().eval()
    with torch.no_grad():
        for key in deltas["a"]:
            merged = merge_utils.ties(torch.stack([0.6 * deltas["a"][key], 0.4 * deltas["b"][key]]), torch.ones(2),
                                      density=0.5, majority_sign_method="total")
            u, s, vh = torch.linalg.svd(merged.double(), full_matrices=False)
            oracle.get_submodule(key).weight += ((u[:, :4] * s[:4]) @ vh[:4]).float()
    ids = torch.randint(1, 64, (2, 7), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.allclose(model(input_ids=ids).logits, oracle(input_ids=ids).logits, atol=1e-4)


def test_every_front_end_takes_the_functions(adapters: Path, tmp_path: Path) -> None:
    """eval, the REPL, a config block and the API: one expression, the same bytes."""
    import subprocess
    import sys

    import pemlang

    expression = 'svd(ties(0.5*a, 0.5*b, density=0.3, sign="frequency"), rank=4)'
    a, b = adapters / INPUTS["a"], adapters / INPUTS["b"]
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        assert main(["eval", "--mode", "exact", "--input", f"a={a}", "--input", f"b={b}", "--out",
                     str(tmp_path / "eval"), "--device", "cpu", expression]) == 0, err.getvalue()
    config = tmp_path / "merge.yaml"
    config.write_text(f"mode: exact\ninputs:\n  a: {a}\n  b: {b}\nexpression: '{expression}'\noutput: config\n",
                      encoding="utf-8")
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        assert main(["run", str(config), "--device", "cpu"]) == 0, err.getvalue()
    pemlang.compile(expression, mode="exact", inputs={"a": a, "b": b}, device="cpu").save(tmp_path / "api")
    script = f'mode exact\ninput a = "{a}"\ninput b = "{b}"\n:type ties(a, b, density=0.3)\n' \
             f'x = {expression}\n:save x {tmp_path / "repl"}\n'
    result = subprocess.run([sys.executable, "-m", "pemlang.cli", "repl"], input=script, capture_output=True,
                            text=True, cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "dense ΔW per layer (written only through svd(…, rank=R), or merged inside core(…)/knots(…))" in result.stdout
    files = [(tmp_path / d / "adapter_model.safetensors") for d in ("eval", "config", "api", "repl")]
    weights = [load_file(str(f)) for f in files]
    for other in weights[1:]:
        assert other.keys() == weights[0].keys()
        assert all(torch.equal(other[k], weights[0][k]) for k in other)


def test_readme_ties_snippet_runs_as_printed(example_root: Path) -> None:
    """The README's TIES block, as printed, from the repository root after the set-up command."""
    from readme_blocks import REPO, destinations, program_block, run_block

    block = program_block("### TIES, DARE and pruning, on ΔW")
    run_block(block, example_root, "ties_snippet.pem")
    for name in ("ties", "dare_ties", "pruned"):
        assert (example_root / "examples" / "out" / name / "adapter_model.safetensors").exists()
    # the README then says to run examples/ties_merge.pem: it writes elsewhere (no E018 without --force)
    theirs = destinations((REPO / "examples" / "ties_merge.pem").read_text(encoding="utf-8"), "examples")
    ours = destinations(block)
    assert theirs and ours and not theirs & ours, theirs & ours


def test_plan_shows_each_dense_node_and_its_memory_per_layer(adapters: Path, tmp_path: Path) -> None:
    """`pemlang plan` (header-only) names each function node and the memory of its result at the
    largest layer: fp32 out × in."""
    text = "mode exact\n" + "".join(f'input {n} = "{adapters / d}"\n' for n, d in INPUTS.items()) + \
        'output svd(ties(0.5*a, prune(b, density=0.5), density=0.2), rank=4) -> "out"\n'
    path = tmp_path / "p.pem"
    path.write_text(text, encoding="utf-8")
    out = io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(io.StringIO()):
        assert main(["plan", str(path)]) == 0
    shapes = load_file(str(adapters / INPUTS["a"] / "adapter_model.safetensors"))
    largest = max(shapes[k].shape[0] * shapes[k.replace("lora_B", "lora_A")].shape[1] * 4
                  for k in shapes if k.endswith("lora_B.weight"))
    text = " ".join(out.getvalue().split())
    assert "prune#1 = prune(b, density=0.5): dense ΔW per layer (density=0.5)" in text, text
    assert "ties#2 = ties(" in text and "sign=total" in text
    assert text.count(f"{largest / 1024:.1f} KiB for the largest layer") == 2, text
