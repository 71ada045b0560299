"""What `svd` keeps and what it drops: the share of ‖ΔW‖² each svd call did not keep (run's summary,
the metadata, the model card, the API) against a dense fp64 SVD of the ΔW PEFT computes from the
input files; `svd(x, energy=e)` choosing per layer the smallest rank that keeps a share ≥ e (written
with rank_pattern, loaded by PEFT with ΔW equal to the dense truncation); `max_rank`; `--max-rank`,
a config's `max_rank` and the API's `max_rank=` refusing outputs above it (E034); rank=R above the
argument's rank (W007); and hostile options."""

from __future__ import annotations

import contextlib
import io
import json
import struct
import warnings
from pathlib import Path

import pytest
import torch
from peft_factory import base_model
from safetensors.torch import load_file
from test_merges import INPUTS, PREFIX, input_deltas

import pemlang
from pemlang.cli import main

# -- oracles: PEFT's ΔW, a dense fp64 SVD ------------------------------------------------------------


@pytest.fixture(scope="module")
def deltas(adapters: Path) -> dict[str, dict[str, torch.Tensor]]:
    """ΔW = s·B·A per input and layer, as PEFT itself computes it (get_delta_weight), in fp64 (PEFT's
    fp32, widened exactly)."""
    return {name: {k: d.double() for k, d in layers.items()} for name, layers in input_deltas(adapters).items()}


def spectrum(delta: torch.Tensor) -> torch.Tensor:
    return torch.linalg.svdvals(delta.double())


def dropped(delta: torch.Tensor, rank: int) -> float:
    """The share of ‖ΔW‖²_F that the best rank-`rank` approximation does not keep."""
    s = spectrum(delta)
    return float((s[rank:] ** 2).sum() / (s**2).sum())


def energy_rank(delta: torch.Tensor, energy: float) -> int:
    """The smallest rank whose best approximation keeps a share ≥ energy of ‖ΔW‖²_F (to fp64's
    rounding: a rank-16 ΔW of a 32×32 layer has 16 singular values of ~1e-16 that keep nothing)."""
    squares = spectrum(delta) ** 2
    total = float(squares.sum())
    kept = 0.0
    for rank, square in enumerate(squares.tolist(), 1):
        kept += square
        if kept >= energy * total * (1 - 1e-12):
            return rank
    return len(squares)


def truncation(delta: torch.Tensor, rank: int) -> torch.Tensor:
    u, s, vh = torch.linalg.svd(delta.double(), full_matrices=False)
    return (u[:, :rank] * s[:rank]) @ vh[:rank]


def percent(share: float) -> str:
    """How the summary and the card write a share (three significant digits)."""
    return f"{100 * share:.3g}%"


# -- helpers ---------------------------------------------------------------------------------------


def program(adapters: Path, body: str) -> str:
    return "mode exact\n" + "".join(f'input {n} = "{adapters / d}"\n' for n, d in INPUTS.items()) + body


def cli(*args: str) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            status = main(list(args))
        except SystemExit as exc:  # argparse's misuse (exit 2)
            status = int(exc.code or 0)
    return status, out.getvalue(), err.getvalue()


def metadata_of(path: Path) -> dict[str, str]:
    raw = (path / "adapter_model.safetensors").read_bytes()
    (length,) = struct.unpack("<Q", raw[:8])
    return json.loads(raw[8 : 8 + length])["__metadata__"]


def written_deltas(out: Path) -> dict[str, torch.Tensor]:
    tensors = load_file(str(out / "adapter_model.safetensors"))
    keys = sorted(k[len(PREFIX):-len(".lora_A.weight")] for k in tensors if k.endswith(".lora_A.weight"))
    return {k: tensors[f"{PREFIX}{k}.lora_B.weight"].double() @ tensors[f"{PREFIX}{k}.lora_A.weight"].double()
            for k in keys}


def written_ranks(out: Path) -> dict[str, int]:
    tensors = load_file(str(out / "adapter_model.safetensors"))
    return {k[len(PREFIX):-len(".lora_A.weight")]: t.shape[0] for k, t in tensors.items()
            if k.endswith(".lora_A.weight")}


def close(x: float, y: float) -> bool:
    return abs(x - y) <= 1e-4 * abs(y) + 1e-9


# -- what svd dropped --------------------------------------------------------------------------------


def test_dropped_share_is_the_dense_svd_oracle(adapters: Path, tmp_path: Path,
                                               deltas: dict[str, dict[str, torch.Tensor]]) -> None:
    """Low-rank, dense and nested svd calls: the summary line of `pemlang run`, the metadata and the
    model card report the largest and mean share of ‖ΔW‖² dropped over the layers, as a dense SVD
    of PEFT's ΔW gives them."""
    from huggingface_hub import ModelCard

    text = program(adapters, 'output svd(a + 0.5*b - c, rank=5) -> "out/low"\n'
                             'output svd(prune(a - b, density=1), rank=3) -> "out/dense"\n'
                             'output svd(svd(a, rank=6) + b, rank=4) -> "out/nested"\n')
    path = tmp_path / "p.pem"
    path.write_text(text, encoding="utf-8")
    status, out, err = cli("run", str(path), "--device", "cpu")
    assert status == 0, err
    layers = sorted(deltas["a"])
    a, b, c = deltas["a"], deltas["b"], deltas["c"]
    expected = {
        "low": [("svd(a + 0.5*b - c, rank=5)", [dropped(a[k] + 0.5 * b[k] - c[k], 5) for k in layers])],
        "dense": [("svd(prune(a - b, density=1), rank=3)", [dropped(a[k] - b[k], 3) for k in layers])],
        "nested": [("svd(a, rank=6)", [dropped(a[k], 6) for k in layers]),
                   ("svd(svd(a, rank=6) + b, rank=4)", [dropped(truncation(a[k], 6) + b[k], 4) for k in layers])],
    }
    for name, calls in expected.items():
        recorded = json.loads(metadata_of(tmp_path / "out" / name)["pemlang.svd_dropped"])
        assert [item["call"] for item in recorded] == [call for call, _ in calls]
        card = ModelCard.load(tmp_path / "out" / name / "README.md").text
        line = next(line for line in out.splitlines() if line.startswith("wrote ") and f"out/{name}:" in line)
        for item, (call, shares) in zip(recorded, calls, strict=True):
            largest, mean = max(shares), sum(shares) / len(shares)
            assert 0 < largest < 1
            assert item["layers"] == len(layers)
            assert close(item["largest"], largest) and close(item["mean"], mean), (name, item, largest, mean)
            said = f"dropped {percent(largest)} of ‖ΔW‖² at most, {percent(mean)} on average over 8 layers"
            assert f"{call} {said}" in line, line
            assert said in card
    assert "What `svd` dropped" in ModelCard.load(tmp_path / "out" / "low" / "README.md").text


def test_svd_that_keeps_everything_says_it_dropped_nothing(adapters: Path, tmp_path: Path) -> None:
    """rank=R at or above the argument's rank drops nothing; outputs without svd record no field."""
    [kept, plain] = pemlang.compile(text=program(adapters, 'output svd(a + b, rank=16) -> "kept"\n'
                                                           'output a + b -> "plain"\n'), base_dir=tmp_path).save(
        device="cpu")
    report = json.loads(metadata_of(kept)["pemlang.svd_dropped"])
    assert report[0]["largest"] < 1e-12 and report[0]["mean"] < 1e-12
    assert "pemlang.svd_dropped" not in metadata_of(plain)
    assert "dropped nothing" in (kept / "README.md").read_text(encoding="utf-8")


# -- energy=e: ranks chosen from the data -------------------------------------------------------------


@pytest.mark.parametrize("energy", [0.5, 0.9, 0.99, 1.0])
def test_energy_picks_the_smallest_rank_and_peft_loads_it(adapters: Path, tmp_path: Path, energy: float,
                                                          deltas: dict[str, dict[str, torch.Tensor]]) -> None:
    """Per layer the smallest rank whose share of ‖ΔW‖² is ≥ e; written with rank_pattern; PEFT loads
    it (no warning) and its ΔW is the dense truncation to that rank."""
    from peft import PeftModel

    compiled = pemlang.compile("svd(a + b, energy=e)", mode="exact", params={"e": energy},
                               inputs={n: adapters / INPUTS[n] for n in "ab"})
    [out] = compiled.save(tmp_path / "out", device="cpu")
    merged = {k: deltas["a"][k] + deltas["b"][k] for k in deltas["a"]}
    ranks = {k: energy_rank(delta, energy) for k, delta in merged.items()}
    assert written_ranks(out) == ranks
    assert len(set(ranks.values())) > 1 or energy == 1.0  # the layers' ranks differ: rank_pattern is used
    config = json.loads((out / "adapter_config.json").read_text(encoding="utf-8"))
    for key, rank in ranks.items():
        pattern = config["rank_pattern"].get(key.replace(".", "\\."), config["r"])
        assert pattern == rank and config["alpha_pattern"].get(key.replace(".", "\\."), config["lora_alpha"]) == rank
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model = PeftModel.from_pretrained(base_model(), out)
    assert not [w for w in caught if "peft" in str(w.filename).lower()], [str(w.message) for w in caught]
    for key, delta in merged.items():
        loaded = model.base_model.model.get_submodule(key).get_delta_weight("default").double()
        assert torch.allclose(loaded, truncation(delta, ranks[key]), atol=1e-5), key
    [reported] = compiled.dropped["svd(a + b, energy=e)"]
    assert isinstance(reported, pemlang.Dropped) and reported.call == "svd(a + b, energy=e)" and reported.layers == 8
    shares = [dropped(delta, ranks[k]) for k, delta in merged.items()]
    assert all(1 - share >= energy - 1e-12 for share in shares)
    assert close(reported.largest, max(shares)) and close(reported.mean, sum(shares) / len(shares))


def test_max_rank_caps_either_form(adapters: Path, tmp_path: Path,
                                   deltas: dict[str, dict[str, torch.Tensor]]) -> None:
    merged = {k: deltas["a"][k] + deltas["b"][k] for k in deltas["a"]}
    text = program(adapters, 'output svd(a + b, energy=0.99, max_rank=6) -> "energy"\n'
                             'output svd(a + b, rank=10, max_rank=6) -> "rank"\n'
                             'output svd(prune(a + b, density=1), energy=0.9) -> "dense"\n')
    energy, rank, dense = pemlang.compile(text=text, base_dir=tmp_path).save(device="cpu")
    assert written_ranks(energy) == {k: min(energy_rank(d, 0.99), 6) for k, d in merged.items()}
    assert set(written_ranks(rank).values()) == {6}
    assert written_ranks(dense) == {k: energy_rank(d, 0.9) for k, d in merged.items()}  # prune(x, density=1) = x
    for key, delta in written_deltas(dense).items():
        assert torch.allclose(delta, truncation(merged[key], energy_rank(merged[key], 0.9)), atol=1e-5)


def test_energy_outputs_stream_to_the_canonical_file(adapters: Path, tmp_path: Path) -> None:
    """An output whose ranks the data chose is laid out at the end: the same bytes as written from
    memory (the REPL's and the sweep's route), nested and summed with other terms, no spill left."""
    from safetensors.torch import save

    text = program(adapters, 'output svd(svd(a, energy=0.8) + b, rank=10) + 0.5*c -> "x"\n'
                             'output svd(a - c, energy=0.7) -> "y"\n')
    compiled = pemlang.compile(text=text, base_dir=tmp_path, dtype="float16")
    written = compiled.save(device="cpu")
    for path, tensors in zip(written, compiled.evaluate(device="cpu").values(), strict=True):
        assert sorted(p.name for p in path.iterdir()) == ["README.md", "adapter_config.json",
                                                          "adapter_model.safetensors"]
        raw = save(dict(sorted(tensors.items())), metadata=metadata_of(path))  # safetensors' own writer
        (length,) = struct.unpack("<Q", raw[:8])
        header = json.dumps(json.loads(raw[8 : 8 + length]), sort_keys=True, separators=(",", ":")).encode()
        header += b" " * (-len(header) % 8)
        assert (path / "adapter_model.safetensors").read_bytes() == struct.pack("<Q", len(header)) + header + \
            raw[8 + length :]
        config = json.loads((path / "adapter_config.json").read_text(encoding="utf-8"))
        ranks = {k[len(PREFIX):-len(".lora_A.weight")]: t.shape[0] for k, t in tensors.items()
                 if k.endswith(".lora_A.weight")}
        assert {k: config["rank_pattern"].get(k.replace(".", "\\."), config["r"]) for k in ranks} == ranks


def test_randomised_range_finder_reports_and_picks_on_large_layers() -> None:
    """Layers too large for an exact SVD: the dropped share reported is what the factors drop, within
    2 % of the optimum; energy=e keeps at least e with a rank at most 2 above the smallest."""
    from pemlang.backend.dense import truncated_svd_dropped

    generator = torch.Generator().manual_seed(3)
    u = torch.linalg.qr(torch.randn(400, 60, generator=generator, dtype=torch.float64))[0]
    v = torch.linalg.qr(torch.randn(600, 60, generator=generator, dtype=torch.float64))[0]
    delta = ((u * torch.logspace(0, -2, 60, dtype=torch.float64)) @ v.T).float()
    total = float(delta.double().square().sum())
    a, b, share = truncated_svd_dropped(delta, 12, "layer")
    actual = float((delta.double() - b.double() @ a.double()).square().sum()) / total
    assert abs(share - actual) <= 1e-4 * actual and actual <= 1.02 * dropped(delta, 12)
    for energy in (0.9, 0.99):
        a, b, share = truncated_svd_dropped(delta, 200, "layer", energy=energy)
        kept = 1 - float((delta.double() - b.double() @ a.double()).square().sum()) / total
        assert kept >= energy - 1e-5 and abs((1 - kept) - share) <= 1e-4
        assert energy_rank(delta, energy) <= a.shape[0] <= energy_rank(delta, energy) + 2


# -- --max-rank, config max_rank, the API's max_rank= -------------------------------------------------


def test_max_rank_refuses_an_output_above_it_with_the_svd_form(adapters: Path, tmp_path: Path) -> None:
    path = tmp_path / "p.pem"
    path.write_text(program(adapters, 'output a + b -> "out/sum"\noutput svd(a + b, energy=0.9) -> "out/e"\n'
                                      'output svd(a + c, rank=12) -> "out/r"\n'), encoding="utf-8")
    status, _, err = cli("run", str(path), "--device", "cpu", "--max-rank", "8")
    assert status == 1 and "Traceback" not in err
    assert "error[E034]: output `a + b` has rank 16, above --max-rank 8" in err
    assert "output a + b -> \"out/sum\"\n  |        ^^^^^" in err  # at the output expression
    assert "hint: svd(a + b, rank=8): the best rank-8 approximation per layer" in err
    assert "error[E034]: output `svd(a + b, energy=0.9)` may reach rank 16, above --max-rank 8" in err
    assert "hint: svd(a + b, energy=0.9, max_rank=8)" in err
    assert "hint: svd(a + c, rank=8)" in err
    assert not (tmp_path / "out").exists()  # refused before anything is computed
    # The forms the hints show are accepted, as is every output at or below the limit.
    path.write_text(program(adapters, 'output svd(a + b, rank=8) -> "out/sum"\n'
                                      'output svd(a + b, energy=0.9, max_rank=8) -> "out/e"\noutput a -> "out/a"\n'),
                    encoding="utf-8")
    status, out, err = cli("run", str(path), "--device", "cpu", "--max-rank", "8")
    assert status == 0, err
    assert max(written_ranks(tmp_path / "out" / "e").values()) <= 8
    status, _, err = cli("run", str(path), "--device", "cpu", "--max-rank", "16", "--force")
    assert status == 0, err
    status, _, err = cli("eval", "--mode", "exact", "--input", f"a={adapters / 'llama_r8'}", "--input",
                         f"b={adapters / 'llama_r8_b'}", "--out", str(tmp_path / "ev"), "--max-rank", "12", "a - b")
    assert status == 1 and "output `a - b` has rank 16, above --max-rank 12" in err and "<expression>:1:1" in err


def test_config_max_rank_and_the_api(adapters: Path, tmp_path: Path) -> None:
    config = tmp_path / "merge.yaml"
    config.write_text(f"mode: exact\nmax_rank: 12\ninputs:\n  a: {adapters / 'llama_r8'}\n  b: {adapters / 'llama_r8_b'}\n"
                      "outputs:\n  - expression: a + b\n    path: out/sum\n  - expression: svd(a + b, rank=12)\n"
                      "    path: out/r12\n", encoding="utf-8")
    status, _, err = cli("check", str(config))
    assert status == 1 and "above the config's max_rank 12" in err and f"{config.name}:7:17" in err
    assert err.count("error[E034]") == 1
    status, _, err = cli("run", str(config), "--device", "cpu", "--max-rank", "16")  # the command line wins
    assert status == 0, err
    with pytest.raises(pemlang.CompileError, match="E034"):
        pemlang.from_config(config)
    assert pemlang.from_config(config, max_rank=16).max_rank == 16
    with pytest.raises(pemlang.CompileError) as refused:
        pemlang.compile("a + b", mode="exact", inputs={n: adapters / INPUTS[n] for n in "ab"}, max_rank=8)
    assert "above the rank limit 8" in str(refused.value) and "svd(a + b, rank=8)" in str(refused.value)
    assert pemlang.compile("svd(a + b, rank=8)", mode="exact", inputs={n: adapters / INPUTS[n] for n in "ab"},
                           max_rank=8).max_rank == 8
    for bad in (0, -1, True, 2.5, "8"):
        with pytest.raises(ValueError, match="max_rank"):
            pemlang.compile("a", inputs={"a": adapters / "llama_r8"}, max_rank=bad)  # type: ignore[arg-type]


# -- rank above the argument's rank; hostile options --------------------------------------------------


def test_rank_above_the_arguments_rank_says_so(adapters: Path, tmp_path: Path) -> None:
    path = tmp_path / "p.pem"
    path.write_text(program(adapters, 'output svd(a, rank=1000) -> "out/big"\noutput svd(a + b, rank=12) -> "out/ok"\n'),
                    encoding="utf-8")
    status, _, err = cli("check", str(path))
    assert status == 0
    assert err.count("warning[W007]") == 1 and "`rank=1000` is above the rank of svd's argument (at most 8" in err
    status, out, _ = cli("plan", str(path))
    assert status == 0 and "truncated to rank 1000" not in out and "kept whole at rank 8" in out
    assert "truncated to rank 12" in out


HOSTILE = [
    ("svd(a, energy=0)", "svd() `energy` must be a number in (0, 1]"),
    ("svd(a, energy=1.5)", "svd() `energy` must be a number in (0, 1]"),
    ("svd(a, energy=0/0)", "error[E015]"),
    ("svd(a, energy=nan)", "error[E002]: unknown name `nan`"),
    ('svd(a, energy="0.9")', "svd() `energy` must be a number in (0, 1]"),
    ("svd(a, rank=4, max_rank=0)", "svd() `max_rank` must be a whole number ≥ 1"),
    ("svd(a, energy=0.9, max_rank=2.5)", "svd() `max_rank` must be a whole number ≥ 1"),
    ("svd(a, rank=4, energy=0.9)", "svd() takes `rank=` or `energy=`, not both"),
    ("svd(a)", "svd() needs `rank=` or `energy=`"),
    ("svd(a, max_rank=4)", "svd() needs `rank=` or `energy=`"),
]


@pytest.mark.parametrize(("expression", "said"), HOSTILE)
def test_hostile_svd_options_are_diagnostics(adapters: Path, tmp_path: Path, expression: str, said: str) -> None:
    path = tmp_path / "p.pem"
    path.write_text(program(adapters, f'output {expression} -> "out/x"\n'), encoding="utf-8")
    status, _, err = cli("check", str(path))
    assert status == 1 and said in err and "Traceback" not in err and "internal error" not in err, err


def test_a_huge_max_rank_caps_nothing(adapters: Path, tmp_path: Path) -> None:
    [out] = pemlang.compile("svd(a + b, energy=0.9, max_rank=1e30)", mode="exact",
                            inputs={n: adapters / INPUTS[n] for n in "ab"}).save(tmp_path / "o", device="cpu")
    [same] = pemlang.compile("svd(a + b, energy=0.9)", mode="exact",
                             inputs={n: adapters / INPUTS[n] for n in "ab"}).save(tmp_path / "p", device="cpu")
    assert written_ranks(out) == written_ranks(same)


@pytest.mark.parametrize("value", ["-1", "0", "abc", "1.5", "1e30"])
def test_max_rank_option_misuse(adapters: Path, tmp_path: Path, value: str) -> None:
    path = tmp_path / "p.pem"
    path.write_text(program(adapters, 'output a -> "out/x"\n'), encoding="utf-8")
    status, _, err = cli("run", str(path), "--max-rank", value)
    assert status == 2 and "--max-rank" in err and "expected a positive whole number" in err


@pytest.mark.parametrize("value", ['"x"', "true", "[]", "0"])
def test_config_max_rank_must_be_a_whole_number(adapters: Path, tmp_path: Path, value: str) -> None:
    config = tmp_path / "c.yaml"
    config.write_text(f"mode: exact\nmax_rank: {value}\ninputs:\n  a: {adapters / 'llama_r8'}\nexpression: a\n"
                      "output: out/a\n", encoding="utf-8")
    status, _, err = cli("check", str(config))
    assert status == 1 and "error[E025]" in err and "max_rank" in err and "c.yaml:2:11" in err, err


def test_param_energy_set_to_nan_is_refused(adapters: Path, tmp_path: Path) -> None:
    path = tmp_path / "p.pem"
    path.write_text(program(adapters, 'param e = 0.9\noutput svd(a, energy=e) -> "out/x"\n'), encoding="utf-8")
    status, _, err = cli("check", str(path), "--set", "e=nan")
    assert status == 1 and "error[E017]" in err
    status, _, err = cli("check", str(path), "--set", "e=2")
    assert status == 1 and "`energy` must be a number in (0, 1]" in err and "e = 2" in err


def test_sweep_points_record_their_own_ranks_and_drops(adapters: Path, tmp_path: Path,
                                                       deltas: dict[str, dict[str, torch.Tensor]]) -> None:
    """`run --sweep` writes each point from memory: its ranks, rank_pattern and dropped shares are its own."""
    path = tmp_path / "sw.pem"
    path.write_text(program(adapters, 'param e = 0.9\noutput svd(a + b, energy=e) -> "out/sw"\n'), encoding="utf-8")
    status, _, err = cli("run", str(path), "--sweep", "e=0.5,0.9", "--device", "cpu", "--max-rank", "8")
    assert status == 1 and "error[E034]" in err and "above the rank limit 8" in err
    status, _, err = cli("run", str(path), "--sweep", "e=0.5,0.9", "--device", "cpu", "--max-rank", "16")
    assert status == 0, err
    merged = {k: deltas["a"][k] + deltas["b"][k] for k in deltas["a"]}
    for energy in (0.5, 0.9):
        out = tmp_path / "out" / f"sw.e={energy:.1f}"
        ranks = {k: energy_rank(delta, energy) for k, delta in merged.items()}
        assert written_ranks(out) == ranks
        config = json.loads((out / "adapter_config.json").read_text(encoding="utf-8"))
        assert {k: config["rank_pattern"].get(k.replace(".", "\\."), config["r"]) for k in ranks} == ranks
        [item] = json.loads(metadata_of(out)["pemlang.svd_dropped"])
        assert close(item["largest"], max(dropped(delta, ranks[k]) for k, delta in merged.items()))
