"""The CUDA paths against the CPU: the same programs run on both devices give the same adapters
(the streamed writer with page-locked reads and event-guarded copies, the in-memory evaluation
with its tensor cache, the dense kernels on a whole layer at once). Skipped without a CUDA device."""

from __future__ import annotations

import contextlib
import io
import re
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from pemlang.backend.dense import Rows, dare, prune, ties, truncated_svd
from pemlang.check import check_source
from pemlang.cli import main
from pemlang.run import execute
from pemlang.source import Source

pytestmark = [pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")]

PROGRAMS = {
    "paper": ("paper", "0.5*a + 0.5*(b - c)"),
    "exact": ("exact", "0.7*a - 0.2*r4 + 0.1*b"),
    "svd": ("exact", "svd(a + b + c, rank=4)"),
    "ties": ("exact", 'svd(ties(0.5*a, 0.3*b, 0.2*c, density=0.4, sign="frequency"), rank=8)'),
    "prune": ("exact", "svd(prune(a - 0.5*b, density=0.3), rank=8)"),
    "dare": ("exact", "svd(dare(a, p=0.6, seed=3) + 0.5*b, rank=8)"),
    "ia3": ("paper", "0.5*i + 0.5*j"),
    "core": ("exact", "core(ties(0.5*a, 0.3*b, 0.2*r4, density=0.3))"),
    "knots": ("exact", "knots(dare(a, p=0.3, seed=1) + prune(b - c, density=0.4))"),
    "tsv_iso": ("exact", "0.5*iso(tsv(a, r4, keep=0.5) + b)"),
}


def program_text(adapters: Path, mode: str, expression: str, out: Path) -> str:
    names = {"a": "llama_r8", "b": "llama_r8_b", "c": "llama_r8_c", "r4": "llama_r4", "i": "llama_ia3",
             "j": "llama_ia3_b"}
    used = [n for n in names if n in re.findall(r"[a-z][a-z0-9]*", expression)]
    return (f"mode {mode}\n" + "".join(f'input {n} = "{adapters / names[n]}"\n' for n in used)
            + f'output {expression} -> "{out}"\n')


def run_cli(path: Path, device: str) -> None:
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        status = main(["run", str(path), "--device", device, "--force"])
    assert status == 0, err.getvalue()


def delta(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """ΔW per LoRA layer (B·A), or the tensor itself ((IA)3 vectors, heads)."""
    out = {}
    for key, value in tensors.items():
        if key.endswith("lora_A.weight"):
            out[key] = tensors[key.replace("lora_A", "lora_B")].double() @ value.double()
        elif "lora_B" not in key:
            out[key] = value.double()
    return out


@pytest.mark.parametrize("name", list(PROGRAMS))
def test_run_on_cuda_writes_what_the_cpu_writes(adapters: Path, tmp_path: Path, name: str) -> None:
    mode, expression = PROGRAMS[name]
    written = {}
    for device in ("cpu", "cuda"):
        path = tmp_path / f"{device}.pem"
        path.write_text(program_text(adapters, mode, expression, tmp_path / device), encoding="utf-8")
        run_cli(path, device)
        written[device] = delta(load_file(str(tmp_path / device / "adapter_model.safetensors")))
    assert written["cpu"].keys() == written["cuda"].keys()
    for key, value in written["cpu"].items():
        assert torch.allclose(written["cuda"][key], value, atol=1e-5, rtol=1e-4), key


def test_evaluate_with_a_cache_on_cuda(adapters: Path) -> None:
    """The in-memory path (a sweep's or the REPL's) keeps inputs on the device between runs."""
    from pemlang.backend.torch_backend import TensorCache

    text = program_text(adapters, "exact", "0.3*a + 0.7*b", adapters / "../never")
    program = check_source(Source(text))
    cache = TensorCache()
    on_gpu = [execute(program, device="cuda", cache=cache).tensors[0] for _ in range(2)]
    (on_cpu,) = execute(program, device="cpu").tensors
    for tensors in on_gpu:
        assert all(t.device.type == "cpu" for t in tensors.values())
        for key, value in on_cpu.items():
            assert torch.allclose(tensors[key], value, atol=1e-6), key


def test_dense_kernels_on_a_whole_layer_match_the_cpu_blocks() -> None:
    """On the GPU a layer is one block; the CPU splits it into many and samples the threshold: the
    thresholds and the merged values agree."""
    generator = torch.Generator().manual_seed(0)
    factors = [(torch.randn(1500, 8, generator=generator), torch.randn(8, 900, generator=generator) / 30)
               for _ in range(3)]

    def rows(device: str) -> list[Rows]:
        return [Rows((1500, 900), torch.device(device), (b.to(device), a.to(device))) for b, a in factors]

    cpu, gpu = rows("cpu"), rows("cuda")
    for density in (0.2, 0.5):
        merged = ties(cpu, density, "total")
        assert torch.allclose(ties(gpu, density, "total").cpu(), merged, atol=1e-6, rtol=1e-4)
        pruned = prune(cpu[0], density)
        on_gpu = prune(gpu[0], density).cpu()
        # the kept sets agree up to entries within rounding of the threshold
        assert int((on_gpu != 0).ne(pruned != 0).sum()) <= 2
    dropped = dare(cpu[0], 0.5, 7, "layer")
    assert torch.equal(dare(gpu[0], 0.5, 7, "layer").cpu() == 0, dropped == 0)  # the mask comes from the CPU
    a, b = truncated_svd(merged.cuda(), 16, "layer")
    a_cpu, b_cpu = truncated_svd(merged, 16, "layer")
    assert torch.allclose((b @ a).cpu(), b_cpu @ a_cpu, atol=1e-5, rtol=1e-3)


def test_tune_on_cuda_finds_what_the_cpu_finds(adapters: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """`tune --device cuda`: the resident model is on the GPU, every trial's value equals the CPU's
    at the same point, both find λ* and write the same best adapter."""
    pytest.importorskip("optuna")
    import json
    import textwrap

    import optuna

    import pemlang
    from tests.peft_factory import base_model

    base = tmp_path / "base"
    base_model("llama").save_pretrained(base)
    program = tmp_path / "mix.pem"
    program.write_text(f'input a = "{adapters / "llama_r8"}"\ninput b = "{adapters / "llama_r8_b"}"\n'
                       f'param lam = 0.5\noutput lam*a + (1 - lam)*b -> "{tmp_path / "out"}"\n', encoding="utf-8")
    inputs = torch.randint(0, 64, (4, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        target = pemlang.load(program).load_into(base_model("llama"), lam=0.3).eval()(input_ids=inputs).logits
    torch.save({"inputs": inputs, "target": target}, tmp_path / "target.pt")
    (tmp_path / "cuda_objectives.py").write_text(textwrap.dedent(f"""\
        import json, torch

        saved = torch.load({str(tmp_path / "target.pt")!r})

        def mse(model, params):
            device = next(model.parameters()).device
            with open({str(tmp_path / "devices.jsonl")!r}, "a") as f:
                f.write(json.dumps(device.type) + "\\n")
            logits = model(input_ids=saved["inputs"].to(device)).logits
            return torch.mean((logits.double().cpu() - saved["target"].double()) ** 2).item()
        """), encoding="utf-8")
    monkeypatch.chdir(tmp_path)
    values, devices = {}, {}
    for device in ("cpu", "cuda"):
        (tmp_path / "devices.jsonl").write_text("")
        err = io.StringIO()
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
            status = main(["tune", str(program), "--base", str(base), "--objective", "cuda_objectives:mse", "--param",
                           "lam=0:1:0.1", "--device", device, "--study", f"{device}.db", "--save-best", f"best-{device}"])
        assert status == 0, err.getvalue()
        devices[device] = {json.loads(line) for line in (tmp_path / "devices.jsonl").read_text().splitlines()}
        trials = optuna.load_study(study_name="pemlang", storage=f"sqlite:///{tmp_path / f'{device}.db'}").trials
        values[device] = {round(t.params["lam"], 1): t.value for t in trials}
    assert devices == {"cpu": {"cpu"}, "cuda": {"cuda"}}
    assert values["cuda"].keys() == values["cpu"].keys() == {i / 10 for i in range(11)}
    for lam, value in values["cpu"].items():
        assert values["cuda"][lam] == pytest.approx(value, rel=1e-3, abs=1e-7), lam
    assert min(values["cuda"], key=values["cuda"].__getitem__) == min(values["cpu"], key=values["cpu"].__getitem__) == 0.3
    written = {d: delta(load_file(str(tmp_path / f"best-{d}" / "adapter_model.safetensors"))) for d in ("cpu", "cuda")}
    assert written["cpu"].keys() == written["cuda"].keys()
    for key, value in written["cpu"].items():
        assert torch.allclose(written["cuda"][key], value, atol=1e-6, rtol=1e-4), key
