"""core, knots, tsv, iso (merging adapters that do not share a basis) against the oracles in
align_oracles.py: the formulas on dense fp64 matrices, and the papers' reference computations; their
laws; the blocked and threaded kernels inside a space; what the checker refuses; hostile inputs.

Inputs are real PEFT adapters made with different seeds (llama_r8, _b, _c; llama_r4 of another rank;
GPT-2's fan_in_fan_out c_attn; RoBERTa masked-LM), read here straight from their files."""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from align_oracles import (
    core_coordinates,
    knots_coordinates,
    prune,
    reference_core,
    reference_knots,
    spec_core,
    spec_iso,
    spec_knots,
    spec_tsv,
    ties,
)
from safetensors.torch import load_file, save_file

import pemlang
from pemlang.backend import dense
from pemlang.cli import main

PREFIX = "base_model.model."
Factor = tuple[torch.Tensor, torch.Tensor, float]
LLAMA = {"a": "llama_r8", "b": "llama_r8_b", "c": "llama_r4"}


def factors(directory: Path) -> dict[str, Factor]:
    """(A, B, s) per layer, from adapter_config.json and the safetensors file, as PEFT defines them."""
    config = json.loads((directory / "adapter_config.json").read_text())
    tensors = load_file(str(directory / "adapter_model.safetensors"))
    r, alpha = config["r"], config["lora_alpha"]
    scaling = alpha / (r ** 0.5) if config.get("use_rslora") else alpha / r
    out = {}
    for key in tensors:
        if key.endswith(".lora_A.weight"):
            layer = key[len(PREFIX):-len(".lora_A.weight")]
            out[layer] = (tensors[key].double(), tensors[f"{PREFIX}{layer}.lora_B.weight"].double(), scaling)
    return out


def deltas(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """B·A per layer of an output (written with scaling 1)."""
    return {k[len(PREFIX):-len(".lora_A.weight")]: tensors[k.replace("lora_A", "lora_B")].double() @ v.double()
            for k, v in tensors.items() if k.endswith(".lora_A.weight")}


def evaluate(expression: str, inputs: dict[str, Path], **options: object) -> dict[str, torch.Tensor]:
    program = pemlang.compile(expression, mode="exact", inputs={n: str(p) for n, p in inputs.items()}, **options)
    (result,) = program.evaluate(device="cpu").values()
    return result


def relative(got: torch.Tensor, want: torch.Tensor) -> float:
    return float((got - want).norm() / max(float(want.norm()), 1e-30))


def check(expression: str, inputs: dict[str, Path], oracle: Callable[[list[Factor], str], torch.Tensor],
          tolerance: float = 2e-6) -> dict[str, torch.Tensor]:
    """pemlang's result per layer against the oracle given every input's factors at that layer."""
    got = deltas(evaluate(expression, inputs))
    read = {name: factors(path) for name, path in inputs.items()}
    assert got
    for layer, value in got.items():
        want = oracle([read[n][layer] for n in inputs], layer)
        assert relative(value, want) < tolerance, (expression, layer, relative(value, want))
    return got


@pytest.fixture(scope="module")
def llama(adapters: Path) -> dict[str, Path]:
    return {n: adapters / d for n, d in LLAMA.items()}


def exact_sum(fs: list[Factor], weights: tuple[float, ...]) -> torch.Tensor:
    return sum(w * s * b @ a for w, (a, b, s) in zip(weights, fs, strict=True))  # type: ignore[return-value]


# -- the formulas ----------------------------------------------------------------------------------

E_CASES = {
    "0.5*a + 0.3*b - 0.2*c": lambda ms: 0.5 * ms[0] + 0.3 * ms[1] - 0.2 * ms[2],
    "ties(0.5*a, 0.3*b, 0.2*c, density=0.2)": lambda ms: ties([0.5 * ms[0], 0.3 * ms[1], 0.2 * ms[2]], 0.2),
    'ties(a, b, c, density=0.5, sign="frequency")': lambda ms: ties(ms, 0.5, "frequency"),
    "prune(a - b, density=0.3) + 0.5*c": lambda ms: prune(ms[0] - ms[1], 0.3) + 0.5 * ms[2],
    "ties(prune(a, density=0.5), b, c, density=1)": lambda ms: ties([prune(ms[0], 0.5), ms[1], ms[2]], 1.0),
}


@pytest.mark.parametrize("space", ["core", "knots"])
@pytest.mark.parametrize("inner", list(E_CASES))
def test_spaces_are_the_formulas(space: str, inner: str, llama: dict[str, Path]) -> None:
    e = E_CASES[inner]
    oracle = spec_core if space == "core" else spec_knots
    check(f"{space}({inner})", llama, lambda fs, layer: oracle(fs, e))


def test_dare_inside_a_space_draws_its_mask_over_the_aligned_entries(llama: dict[str, Path]) -> None:
    """The mask: uniform numbers from a CPU generator seeded by (seed, layer key), kept where ≥ p, over
    the aligned matrix's shape in row order, the kept entries scaled by 1/(1 − p)."""

    def mask(seed: int, layer: str, shape: torch.Size) -> torch.Tensor:
        digest = hashlib.sha256(f"{seed}\0{layer}".encode()).digest()
        generator = torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") & (2**63 - 1))
        return torch.rand(tuple(shape), generator=generator) >= 0.4

    for space, coordinates in (("core", lambda fs: core_coordinates(fs)[1]), ("knots", lambda fs: knots_coordinates(fs)[1])):
        oracle = spec_core if space == "core" else spec_knots

        def dared(fs: list[Factor], layer: str, coordinates=coordinates, oracle=oracle) -> torch.Tensor:  # type: ignore[no-untyped-def]
            shape = coordinates(fs)[0].shape
            kept = mask(7, layer, shape).double()
            return oracle(fs, lambda ms: (ms[0] + ms[1]) * kept / 0.6 + ms[2])

        check(f"{space}(dare(a + b, p=0.4, seed=7) + c)", llama, dared, tolerance=1e-5)


def test_core_and_knots_equal_the_papers_reference_code(llama: dict[str, Path]) -> None:
    """Core Space's task_merger.py works on raw B·A (no LoRA scaling) and so its core matrices are
    the SPEC's divided by s_i: given s_i·M_i, its merge is ours. KnOTS's own merger (SVDMerger)
    merges Σ·V_iᵀ, as here (the scaled form of reference_knots)."""
    read = {n: factors(p) for n, p in llama.items()}
    for space in ("core", "knots"):
        got = deltas(evaluate(f"{space}(ties(0.5*a, 0.3*b, 0.2*c, density=0.2))", llama))
        for layer, value in got.items():
            fs = [read[n][layer] for n in llama]
            weights = [0.5, 0.3, 0.2]
            if space == "core":
                weights = [w * s for w, (_, _, s) in zip((0.5, 0.3, 0.2), fs, strict=True)]
                want = reference_core([(a, b) for a, b, _ in fs],
                                      lambda ms, weights=weights: ties([w * m for w, m in zip(weights, ms, strict=True)], 0.2))
            else:
                want = reference_knots([s * b @ a for a, b, s in fs],
                                       lambda vs, weights=weights: ties([w * v for w, v in zip(weights, vs, strict=True)], 0.2),
                                       scaled=True, dtype=torch.float64)
            assert relative(value, want) < 2e-6, (space, layer)


@pytest.mark.parametrize("keep", [1.0, 0.5, 0.3])
def test_tsv_is_the_formula(keep: float, llama: dict[str, Path]) -> None:
    check(f"tsv(a, b, c, keep={keep})", llama, lambda fs, layer: spec_tsv(fs, keep))
    # a weighted, stacked argument: its rank is the stacked one
    check(f"tsv(0.5*a + b, -c, keep={keep})", llama, lambda fs, layer: spec_tsv(
        [(exact_sum(fs[:2], (0.5, 1)), 16), (-fs[2][2] * fs[2][1] @ fs[2][0], 4)], keep))


def test_iso_is_the_formula(llama: dict[str, Path]) -> None:
    check("iso(a + b)", llama, lambda fs, layer: spec_iso(exact_sum(fs[:2], (1, 1))))
    check("0.25*iso(a - 0.5*c)", llama, lambda fs, layer: 0.25 * spec_iso(exact_sum([fs[0], fs[2]], (1, -0.5))))
    check("iso(core(ties(a, b, density=0.3)))", llama,
          lambda fs, layer: spec_iso(spec_core(fs[:2], lambda ms: ties(ms, 0.3))))


@pytest.mark.parametrize("architecture", ["gpt2", "roberta"])
def test_other_architectures(architecture: str, adapters: Path) -> None:
    inputs = ({"a": adapters / "gpt2_r8", "b": adapters / "gpt2_no_base"} if architecture == "gpt2"
              else {"a": adapters / "roberta_lm", "b": adapters / "roberta_lm_b"})
    check("core(ties(a, b, density=0.4))", inputs, lambda fs, layer: spec_core(fs, lambda ms: ties(ms, 0.4)))
    check("knots(prune(a, density=0.5) - b)", inputs,
          lambda fs, layer: spec_knots(fs, lambda ms: prune(ms[0], 0.5) - ms[1]))
    check("tsv(a, b)", inputs, lambda fs, layer: spec_tsv(fs))


# -- laws ------------------------------------------------------------------------------------------


def test_laws(llama: dict[str, Path]) -> None:
    exact = deltas(evaluate("0.5*a + 0.3*b - 0.2*c", llama))
    for expression in ("core(0.5*a + 0.3*b - 0.2*c)", "knots(0.5*a + 0.3*b - 0.2*c)"):
        got = deltas(evaluate(expression, llama))
        assert all(relative(got[k], exact[k]) < 1e-6 for k in exact), expression  # linear E is lossless
    a = deltas(evaluate("a", llama))
    for expression in ("tsv(a)", "tsv(a, keep=1)"):
        got = deltas(evaluate(expression, llama))
        assert all(relative(got[k], a[k]) < 1e-6 for k in a)
    iso = deltas(evaluate("iso(a + c)", llama))
    scaled = deltas(evaluate("iso(3.5*a + 3.5*c)", llama))
    assert all(relative(scaled[k], 3.5 * iso[k]) < 1e-6 for k in iso)


def test_results_do_not_depend_on_singular_vector_signs(llama: dict[str, Path]) -> None:
    """Another valid SVD (random signs on the singular vectors) gives the oracle the same result,
    and pemlang's equals it."""
    for seed in (1, 2):
        check("core(ties(a, b, c, density=0.3))", llama,
              lambda fs, layer, seed=seed: spec_core(fs, lambda ms: ties(ms, 0.3), flip=seed))
        check("knots(prune(a, density=0.3) + b)", {"a": llama["a"], "b": llama["b"]},
              lambda fs, layer, seed=seed: spec_knots(fs, lambda ms: prune(ms[0], 0.3) + ms[1], flip=seed))
        check("tsv(a, b, keep=0.5)", llama, lambda fs, layer, seed=seed: spec_tsv(fs[:2], 0.5, flip=seed))


def wide_inputs(root: Path, count: int = 3, rank: int = 24, shape: tuple[int, int] = (48, 600)) -> dict[str, Path]:
    """Adapters whose aligned matrices span many blocks once BLOCK is small: llama_r8's config with
    one layer of the given shape, factors from different seeds."""
    inputs = {}
    for number in range(count):
        directory = root / f"wide{number}"
        directory.mkdir(parents=True)
        generator = torch.Generator().manual_seed(100 + number)
        layer = "model.layers.0.mlp.down_proj"
        save_file({f"{PREFIX}{layer}.lora_A.weight": torch.randn((rank, shape[1]), generator=generator),
                   f"{PREFIX}{layer}.lora_B.weight": torch.randn((shape[0], rank), generator=generator)},
                  str(directory / "adapter_model.safetensors"))
        config = {"peft_type": "LORA", "r": rank, "lora_alpha": rank, "target_modules": ["down_proj"],
                  "base_model_name_or_path": "tiny-org/wide", "task_type": "CAUSAL_LM", "fan_in_fan_out": False}
        (directory / "adapter_config.json").write_text(json.dumps(config))
        inputs["abc"[number]] = directory
    return inputs


def test_blocked_and_threaded_kernels_give_the_same_bytes_and_the_formula(tmp_path: Path,
                                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """With blocks of 64 entries (and prune's sampled bracket from 256), the element-wise kernels run
    over many blocks on several threads inside the space: the bytes are those of one thread, and
    the result is the formula."""
    inputs = wide_inputs(tmp_path)
    monkeypatch.setattr(dense, "BLOCK", 64)
    monkeypatch.setattr(dense, "SAMPLED", 256)
    results = []
    previous = torch.get_num_threads()
    try:
        for count in (1, 2, 3):
            torch.set_num_threads(count)
            for space in ("core", "knots"):
                tensors = evaluate(f"{space}(ties(0.5*a, 0.3*b, 0.2*c, density=0.2))", inputs)
                results.append((count, space, tensors))
    finally:
        torch.set_num_threads(previous)
    for count, space, tensors in results:
        first = next(t for c, s, t in results if s == space)
        assert all(torch.equal(tensors[k], first[k]) for k in first), (space, count)
    read = {n: factors(p) for n, p in inputs.items()}
    for _, space, tensors in results[:2]:
        oracle = spec_core if space == "core" else spec_knots
        for layer, value in deltas(tensors).items():
            want = oracle([read[n][layer] for n in inputs],
                          lambda ms: ties([0.5 * ms[0], 0.3 * ms[1], 0.2 * ms[2]], 0.2))
            assert relative(value, want) < 2e-6, space


# -- files: PEFT loads what is written ---------------------------------------------------------------


def test_written_adapter_loads_in_peft_with_the_formulas_update(llama: dict[str, Path], tmp_path: Path) -> None:
    from peft import PeftModel
    from peft_factory import base_model

    program = tmp_path / "align.pem"
    program.write_text("mode exact\n" + "".join(f'input {n} = "{p}"\n' for n, p in llama.items())
                       + 'output knots(ties(a, b, c, density=0.3)) -> "out"\n', encoding="utf-8")
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        assert main(["run", str(program), "--device", "cpu"]) == 0
    config = json.loads((tmp_path / "out" / "adapter_config.json").read_text())
    # R = 8 + 8 + 4 on the 32×32 layers, capped at 16 where a side is 16 (k_proj, v_proj)
    assert {config["r"], *config["rank_pattern"].values()} == {16, 20}
    assert config["alpha_pattern"] == config["rank_pattern"]
    model = PeftModel.from_pretrained(base_model(), tmp_path / "out")
    read = {n: factors(p) for n, p in llama.items()}
    layers = {n[len(PREFIX):]: m for n, m in model.named_modules() if hasattr(m, "lora_A")}
    for layer, module in layers.items():
        want = spec_knots([read[n][layer] for n in llama], lambda ms: ties(ms, 0.3))
        assert relative(module.get_delta_weight("default").double(), want) < 2e-6, layer


# -- hostile inputs --------------------------------------------------------------------------------


def zero_adapter(adapters: Path, tmp_path: Path) -> Path:
    """llama_r8 with B = 0 (PEFT's initial state: an adapter that was never trained)."""
    target = tmp_path / "zero"
    shutil.copytree(adapters / "llama_r8", target)
    tensors = load_file(str(target / "adapter_model.safetensors"))
    save_file({k: torch.zeros_like(v) if "lora_B" in k else v for k, v in tensors.items()},
              str(target / "adapter_model.safetensors"))
    return target


def test_rank_deficient_stacks_give_finite_formulas(adapters: Path, tmp_path: Path, llama: dict[str, Path]) -> None:
    zero = zero_adapter(adapters, tmp_path)
    same = {"a": llama["a"], "b": llama["a"]}  # one adapter under two names: [B B] has rank 8, not 16
    check("core(ties(a, b, density=0.3))", same, lambda fs, layer: spec_core(fs, lambda ms: ties(ms, 0.3)))
    check("knots(ties(a, b, density=0.3))", same, lambda fs, layer: spec_knots(fs, lambda ms: ties(ms, 0.3)))
    check("core(a + b)", same, lambda fs, layer: exact_sum(fs, (1, 1)))
    both = {"z": zero, "a": llama["a"]}
    check("core(ties(z, a, density=0.3))", both, lambda fs, layer: spec_core(fs, lambda ms: ties(ms, 0.3)))
    check("knots(z + a)", both, lambda fs, layer: exact_sum(fs, (1, 1)))
    # a zero argument's singular vectors are arbitrary: dropped (σ = 0), they do not bend a's
    check("tsv(z, a)", both, lambda fs, layer: exact_sum(fs[1:], (1,)))
    alone = {"z": zero}
    for expression in ("core(ties(z, z, density=0.5))", "knots(prune(z, density=0.5))", "iso(z)", "tsv(z, z)",
                       "iso(core(z))"):
        tensors = evaluate(expression, alone)
        assert all(bool(torch.isfinite(t).all()) and not t.any() for t in tensors.values()), expression


def test_one_input_and_fifty(llama: dict[str, Path]) -> None:
    check("core(prune(a, density=0.5))", {"a": llama["a"]}, lambda fs, layer: spec_core(fs, lambda ms: prune(ms[0], 0.5)))
    many = {f"x{i}": llama["abc"[i % 3]] for i in range(50)}  # R = 50·(8 or 4) > every side: capped at min(d, k)
    expression = "core(ties(" + ", ".join(f"{0.02 * (1 + i % 5):g}*x{i}" for i in range(50)) + ", density=0.2))"
    tensors = evaluate(expression, many)
    ranks = {t.shape[0] for k, t in tensors.items() if k.endswith("lora_A.weight")}
    assert ranks <= {16, 32}
    read = {n: factors(p) for n, p in many.items()}
    for layer, value in deltas(tensors).items():
        fs = [read[n][layer] for n in many]
        want = spec_core(fs, lambda ms: ties([0.02 * (1 + i % 5) * m for i, m in enumerate(ms)], 0.2))
        assert relative(value, want) < 1e-5, layer


def test_every_coefficient_zero_inside_a_space_is_a_zero_adapter(llama: dict[str, Path]) -> None:
    """core(a - a): the space keeps a's rank, its value is 0 (lowering once looked for a non-zero
    term to take the dtype from and crashed)."""
    for expression in ("core(a - a)", "core(0*a)", "knots(0*a + 0*b)", "core(ties(a, -a, density=0.5))",
                       "knots(prune(a - a, density=0.5))"):
        tensors = evaluate(expression, {n: llama[n] for n in "ab" if n in expression})
        assert tensors and all(bool(torch.isfinite(t).all()) and not t.any() for t in tensors.values()), expression


def test_tsv_of_dependent_singular_vectors_adds_no_direction(llama: dict[str, Path]) -> None:
    """Arguments whose singular vectors coincide stack into a U of dependent columns, whose polar
    factor P·Qᵀ is unique only over its non-zero singular values: the rest were arbitrary vectors
    that put directions none of the arguments has into the result (tsv(a, a) was a + something
    orthogonal to it, as large as a)."""
    read = {n: factors(llama[n]) for n in "ab"}
    for expression, weights in (("tsv(a, a)", 1.0), ("tsv(a, 0.5*a)", 0.75), ("tsv(a, -a)", 0.0)):
        got = deltas(evaluate(expression, {"a": llama["a"]}))
        for layer, value in got.items():
            a, b, s = read["a"][layer]
            error, scale = float((value - weights * s * b @ a).norm()), float((s * b @ a).norm())
            assert error < 2e-6 * scale, (expression, layer, error / scale)
    check("tsv(a, a, b)", {"a": llama["a"], "b": llama["b"]},
          lambda fs, layer: spec_tsv([fs[0], fs[0], fs[1]]))


def test_tsv_of_more_components_than_a_layer_has_is_written_at_the_layers_rank(llama: dict[str, Path]) -> None:
    """60 arguments of rank 8 (or 4) stack 480 singular vectors in 16- and 32-row layers: the result
    has rank min(d, k) at most and is written with that many, not 480; it is still the formula."""
    many = {f"x{i}": llama["abc"[i % 3]] for i in range(60)}
    weights = [(1 + i % 7) / 7 for i in range(60)]
    expression = "tsv(" + ", ".join(f"{w!r}*x{i}" for i, w in enumerate(weights)) + ")"
    tensors = evaluate(expression, many)
    read = {n: factors(p) for n, p in many.items()}
    for key, value in tensors.items():
        if key.endswith("lora_A.weight"):
            assert value.shape[0] == min(value.shape[1], tensors[key.replace("lora_A", "lora_B")].shape[0]), key
    for layer, value in deltas(tensors).items():
        fs = [(a, b, w * s) for w, (a, b, s) in zip(weights, (read[n][layer] for n in many), strict=True)]
        assert relative(value, spec_tsv(fs)) < 2e-6, layer


def test_the_plan_says_a_merge_inside_a_space_acts_on_its_coordinates(llama: dict[str, Path], tmp_path: Path) -> None:
    """ties inside core acts on R×R coordinates: the plan once called it a dense ΔW per layer with
    the memory of one, which is what core avoids. Shared with an svd outside, it is both."""
    path = tmp_path / "p.pem"
    path.write_text(f'mode exact\ninput a = "{llama["a"]}"\ninput b = "{llama["b"]}"\nt = ties(a, b, density=0.2)\n'
                    'output core(prune(t, density=0.5)) -> "o1"\noutput knots(dare(b, p=0.3)) -> "o2"\n'
                    'output svd(t, rank=2) -> "o3"\n', encoding="utf-8")
    out = io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(io.StringIO()):
        assert main(["plan", str(path)]) == 0
    text = " ".join(out.getvalue().split())
    assert "prune#2 = prune(t, density=0.5): per layer on the aligned coordinates of core#3 (density=0.5), " \
           "not on a dense ΔW" in text, text
    assert "dare#4 = dare(b, p=0.3): per layer on the aligned coordinates of knots#5" in text, text
    assert "ties#1 = ties(a, b, density=0.2): dense ΔW per layer" in text, text


@pytest.mark.parametrize("pair", [("llama_cls", "llama_cls_b"), ("roberta_cls", "roberta_cls_b")])
def test_heads_follow_the_coefficients_inside_a_space(pair: tuple[str, str], adapters: Path) -> None:
    """Heads (modules_to_save: full tensors no function acts on) mix as E's coefficients say: a convex
    mix as written, ties as the mean of its arguments; their LoRA layers are still the formula."""
    inputs = {"x": adapters / pair[0], "y": adapters / pair[1]}
    stored = {n: load_file(str(p / "adapter_model.safetensors")) for n, p in inputs.items()}
    heads = [k for k in stored["x"] if "lora_" not in k]
    assert heads
    for expression, wx, wy in (("core(0.3*x + 0.7*y)", 0.3, 0.7), ("knots(0.3*x + 0.7*y)", 0.3, 0.7),
                               ("core(ties(x, y, density=0.3))", 0.5, 0.5), ("iso(0.25*x + 0.75*y)", 0.25, 0.75)):
        tensors = evaluate(expression, inputs)
        assert sorted(k for k in tensors if "lora_" not in k) == sorted(heads), expression
        for key in heads:
            want = wx * stored["x"][key].double() + wy * stored["y"][key].double()
            assert relative(tensors[key].double(), want) < 1e-6, (expression, key)
    check("core(ties(x, y, density=0.3))", inputs, lambda fs, layer: spec_core(fs, lambda ms: ties(ms, 0.3)))
    with pytest.raises(pemlang.CompileError) as caught:
        evaluate("tsv(x, y)", inputs)  # a sum: coefficients 1 and 1 are no convex mix
    assert "E022" in str(caught.value)


def test_non_finite_factors_are_e014(adapters: Path, llama: dict[str, Path]) -> None:
    for expression in ("core(a + n)", "knots(ties(a, n, density=0.5))", "tsv(a, n)", "iso(n)"):
        with pytest.raises(pemlang.CompileError) as caught:
            evaluate(expression, {"a": llama["a"], "n": adapters / "llama_nan"})
        assert "E014" in str(caught.value), expression


# -- what the checker refuses ------------------------------------------------------------------------


@pytest.mark.parametrize(("expression", "mode", "message"), [
    ("core(knots(a + b))", "exact", "knots() inside core(): one basis per merge"),
    ("knots(core(a) + b)", "exact", "core() inside knots(): one basis per merge"),
    ("core(svd(a, rank=2) + b)", "exact", "core() aligns inputs"),
    ("knots(tsv(a, b))", "exact", "knots() aligns inputs"),
    ("iso(ties(a, b, density=0.2))", "exact", "iso() needs a low-rank argument"),
    ("tsv(a, prune(b, density=0.5))", "exact", "tsv() needs a low-rank argument"),
    ("core(a + b)", "paper", "core() needs `mode exact`"),
    ("core(i)", "exact", "core() applies to LoRA modules"),
    ("tsv(a, b, keep=0)", "exact", "`keep` must be a number in (0, 1]"),
    ("tsv(a, b, keep=1.5)", "exact", "`keep` must be a number in (0, 1]"),
    ("core(a, b)", "exact", "core() takes one module, 2 given"),
    ("iso(a, keep=0.5)", "exact", "iso() has no argument `keep`"),
    ("core(a + b) + ties(a, b, density=0.2)", "exact", "this output is a dense weight update"),
])
def test_refused_with_a_diagnostic(expression: str, mode: str, message: str, adapters: Path) -> None:
    inputs = {"a": str(adapters / "llama_r8"), "b": str(adapters / "llama_r8_b"), "i": str(adapters / "llama_ia3")}
    used = {n: p for n, p in inputs.items() if n in expression.replace("iso", "").replace("keep", "")}
    with pytest.raises(pemlang.CompileError) as caught:
        pemlang.compile(expression, mode=mode, inputs=used)  # type: ignore[arg-type]
    assert message in str(caught.value)


# -- everywhere the language goes -------------------------------------------------------------------


def test_a_density_inside_core_sweeps_and_each_point_is_the_formula(llama: dict[str, Path]) -> None:
    program = pemlang.compile("core(ties(a, b, density=d))", mode="exact", params={"d": 0.5},
                              inputs={"a": str(llama["a"]), "b": str(llama["b"])})
    read = {n: factors(llama[n]) for n in "ab"}
    seen = 0
    for point in program.sweep(d=[0.2, 0.6]):
        (tensors,) = point.tensors.values()
        density = point.params["d"]
        for layer, value in deltas(tensors).items():
            want = spec_core([read["a"][layer], read["b"][layer]], lambda ms, density=density: ties(ms, density))
            assert relative(value, want) < 2e-6
        seen += 1
    assert seen == 2


def test_in_a_config_file(llama: dict[str, Path], tmp_path: Path) -> None:
    config = tmp_path / "train.yaml"
    config.write_text(
        "mode: exact\ninputs:\n" + "".join(f"  {n}: {p}\n" for n, p in llama.items())
        + 'outputs:\n  - expression: "knots(ties(a, b, c, density=0.3))"\n    path: out\n',
        encoding="utf-8")
    err = io.StringIO()
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(err):
        status = main(["run", str(config), "--device", "cpu"])
    assert status == 0, err.getvalue()
    read = {n: factors(p) for n, p in llama.items()}
    for layer, value in deltas(load_file(str(tmp_path / "out" / "adapter_model.safetensors"))).items():
        want = spec_knots([read[n][layer] for n in llama], lambda ms: ties(ms, 0.3))
        assert relative(value, want) < 2e-6


def test_a_weight_inside_core_ties_tunes(llama: dict[str, Path], tmp_path: Path) -> None:
    """`tune` searches a weight inside core(ties(…)): the grid finds the point whose merged model
    gave the target logits (and its loss there is zero)."""
    from peft_factory import base_model

    base = tmp_path / "base"
    base_model("llama").save_pretrained(base)
    program = pemlang.compile("core(ties(w*a, (1 - w)*b, density=0.5))", mode="exact", params={"w": 0.5},
                              inputs={"a": str(llama["a"]), "b": str(llama["b"])})
    tokens = torch.randint(0, 64, (3, 10), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        target = program.load_into(base_model("llama"), w=0.3)(input_ids=tokens).logits

    def mse(model, params) -> float:  # type: ignore[no-untyped-def]
        return float(torch.mean((model(input_ids=tokens).logits - target) ** 2))

    result = program.tune(base, {"w": (0, 1, 0.1)}, objective=mse, save=False)
    assert result.best_params == {"w": pytest.approx(0.3)}
    assert result.best_value == pytest.approx(0, abs=1e-10)
    assert len({round(t["value"], 12) for t in result.trials}) > 5  # the weight changes the merge


def test_the_repl_types_a_space(llama: dict[str, Path]) -> None:
    from pemlang import repl

    script = (f'mode exact\ninput a = "{llama["a"]}"\ninput c = "{llama["c"]}"\n'
              ":type core(ties(a, c, density=0.2))\n:type knots(a - c)\n:type iso(tsv(a, c, keep=0.5))\n")
    out = io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(out), \
            pytest.MonkeyPatch.context() as patch:
        patch.setattr("sys.stdin", io.StringIO(script))
        assert repl.run(None, device="cpu") == 0
    text = out.getvalue()
    assert "core(ties(a, c, density=0.2)) : LoRA module" in text and "low-rank, rank 12, core space of a, c" in text
    assert "knots(a - c) : LoRA module" in text and "rank 12, knots space of a, c" in text
    assert "iso(tsv(a, c, keep=0.5)) : LoRA module" in text and "rank 6" in text


def test_readme_align_snippet_runs_as_printed(example_root: Path) -> None:
    """The README's block in "Adapters that do not share a basis", as printed, from the repository
    root after the set-up command; and examples/align_merge.pem writes elsewhere."""
    from readme_blocks import REPO, destinations, program_block, run_block

    block = program_block("## Adapters that do not share a basis")
    run_block(block, example_root, "align_snippet.pem")
    outputs = destinations(block)
    assert len(outputs) == 4
    for directory in outputs:
        assert (example_root / directory / "adapter_model.safetensors").exists()
    theirs = destinations((REPO / "examples" / "align_merge.pem").read_text(encoding="utf-8"), "examples")
    assert theirs and not theirs & outputs
