"""`pemlang tune` and `Program.tune`: the search finds a known optimum (in-process and on Ray), a
killed tuning resumes without repeating a trial, the built-in objectives equal a hand computation,
and every bad option or input is a diagnostic.

The known optimum: the target is the logits of the base model plus the program's adapter at
λ* = 0.3 on fixed inputs, and the objective is the mean squared error to them, so the loss is 0 at
λ* and grows away from it."""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

import pemlang
from pemlang.cli import main
from pemlang.tune import TuneError, parse_range, read_records
from tests.peft_factory import base_model

pytest.importorskip("optuna")
REPO = Path(__file__).resolve().parent.parent
LAMBDA_STAR = 0.3
PROGRAM = """\
input a = "{a}"
input b = "{b}"
param lam = 0.5
mix = lam*a + (1 - lam)*b
output mix -> "{out}"
"""


@pytest.fixture(scope="module")
def setup(adapters: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A program over two fixture adapters, the base saved as a directory, and the target logits."""
    root = tmp_path_factory.mktemp("tune")
    base = root / "base"
    base_model("llama").save_pretrained(base)
    program = root / "mix.pem"
    program.write_text(PROGRAM.format(a=adapters / "llama_r8", b=adapters / "llama_r8_b", out=root / "out" / "mix"))
    inputs = torch.randint(0, 64, (4, 12), generator=torch.Generator().manual_seed(0))
    model = pemlang.load(program).load_into(base_model("llama"), lam=LAMBDA_STAR)
    with torch.no_grad():
        target = model(input_ids=inputs).logits
    torch.save({"inputs": inputs, "target": target}, root / "target.pt")
    (root / "tune_objectives.py").write_text(textwrap.dedent("""\
        import os, signal, torch
        from pathlib import Path

        _cache = {}

        def mse(model, params):
            if "t" not in _cache:
                _cache["t"] = torch.load(os.environ["PEMLANG_TEST_TARGET"])
            t = _cache["t"]
            return torch.mean((model(input_ids=t["inputs"]).logits - t["target"]) ** 2).item()

        def mse_then_die(model, params):
            # counts calls in a file; the call after PEMLANG_TEST_KILL_AFTER kills this process
            counter = Path(os.environ["PEMLANG_TEST_COUNTER"])
            calls = int(counter.read_text()) if counter.exists() else 0
            counter.write_text(str(calls + 1))
            if calls == int(os.environ["PEMLANG_TEST_KILL_AFTER"]):
                os.kill(os.getpid(), getattr(signal, os.environ.get("PEMLANG_TEST_SIGNAL", "SIGKILL")))
            return mse(model, params)

        def fails_at_half(model, params):
            if params["lam"] == 0.5:
                raise ValueError("no good at a half")
            return mse(model, params)

        def not_a_number(model, params):
            return "high"

        def nan(model, params):
            return float("nan")

        def exits(model, params):
            raise SystemExit(3)

        def unloads(model, params):
            model.unload()
            return mse(model, params)

        def deletes(model, params):
            model.delete_adapter("pemlang")
            return 1.0

        def merges(model, params):
            model.merge_adapter()  # every later trial would score these merged weights
            return mse(model, params)

        def merges_and_unmerges(model, params):
            model.merge_adapter()
            value = mse(model, params)
            model.unmerge_adapter()  # the base weights back, to within rounding
            return value

        def merges_and_unloads(model, params):
            value = mse(model, params)
            model.merge_and_unload()
            return value

        def switches(model, params):
            model.add_adapter("other", model.peft_config["pemlang"])
            model.set_adapter("other")
            return mse(model, params)

        def disables(model, params):
            model.base_model.disable_adapter_layers()
            return mse(model, params)

        def scales_the_base(model, params):
            value = mse(model, params)
            layer = next(m for m in model.modules() if hasattr(m, "base_layer"))
            layer.get_base_layer().weight.data.mul_(1.01)
            return value

        class Unusual(BaseException):
            pass

        def raises_a_base_exception(model, params):
            if params["lam"] == 0.5:
                raise Unusual("not an Exception")
            return mse(model, params)

        def scores_without_the_adapter(model, params):
            with model.disable_adapter():  # restored on leaving: nothing to undo
                return mse(model, params)
        """))
    return {"root": root, "base": base, "program": program, "target": root / "target.pt", "out": root / "out" / "mix"}


def _mse(setup: dict[str, Path]):  # type: ignore[no-untyped-def]
    saved = torch.load(setup["target"])

    def mse(model, params):  # type: ignore[no-untyped-def]
        return torch.mean((model(input_ids=saved["inputs"]).logits - saved["target"]) ** 2).item()

    return mse


def _env(setup: dict[str, Path], **extra: str) -> dict[str, str]:
    env = {**os.environ, "PEMLANG_TEST_TARGET": str(setup["target"]), "PYTHONPATH": str(REPO), **extra}
    env.pop("RAY_ADDRESS", None)
    return env


def _cli(setup: dict[str, Path], *args: str, env: dict[str, str] | None = None,
         timeout: float = 300) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "pemlang.cli", "tune", *args], cwd=setup["root"], text=True,
                          capture_output=True, env=env or _env(setup), timeout=timeout)


# -- finding the optimum ---------------------------------------------------------------------------


def test_grid_finds_the_optimum_in_process(setup: dict[str, Path], tmp_path: Path) -> None:
    program = pemlang.load(setup["program"])
    result = program.tune(setup["base"], {"lam": (0, 1, 0.1)}, objective=_mse(setup), save=tmp_path / "best")
    assert len(result.trials) == 11 and all(t["state"] == "complete" for t in result.trials)
    assert sorted(t["params"]["lam"] for t in result.trials) == [i / 10 for i in range(11)]
    assert result.best_params == {"lam": LAMBDA_STAR}
    assert result.best_value == pytest.approx(0, abs=1e-10)
    # The loss really is the MSE to the target: larger away from λ*, symmetric in |λ - λ*| to first order.
    values = {round(t["params"]["lam"], 1): t["value"] for t in result.trials}
    assert values[0.2] > 0 and values[0.4] > 0 and values[1.0] > values[0.6] > values[0.4]
    # The best point is written, loads in PEFT and equals `run` at λ*; its provenance says how it was chosen.
    from safetensors import safe_open
    from safetensors.torch import load_file

    reference = program.evaluate(lam=LAMBDA_STAR)["mix"]
    written = load_file(tmp_path / "best" / "adapter_model.safetensors")
    assert written.keys() == reference.keys()
    assert all(torch.equal(written[k], reference[k]) for k in written)
    with safe_open(tmp_path / "best" / "adapter_model.safetensors", "pt") as f:
        meta = f.metadata()
    tuned = json.loads(meta["pemlang.tune"])
    assert tuned["params"] == {"lam": LAMBDA_STAR} and tuned["direction"] == "minimize" and tuned["trials"] == 11
    assert json.loads(meta["pemlang.params"]) == {"lam": LAMBDA_STAR}


def test_tpe_finds_the_optimum_within_two_hundredths(setup: dict[str, Path]) -> None:
    program = pemlang.load(setup["program"])
    result = program.tune(setup["base"], {"lam": "0:1"}, objective=_mse(setup), trials=40, seed=7, save=False)
    assert result.best_params is not None
    assert abs(result.best_params["lam"] - LAMBDA_STAR) <= 0.02
    # seeded: the same trials again
    again = program.tune(setup["base"], {"lam": "0:1"}, objective=_mse(setup), trials=5, seed=7, save=False)
    assert [t["params"] for t in again.trials] == [t["params"] for t in result.trials[:5]]


def test_cli_grid_prints_the_table_best_and_plot(setup: dict[str, Path]) -> None:
    done = _cli(setup, str(setup["program"]), "--base", str(setup["base"]), "--objective", "tune_objectives:mse",
                "--param", "lam=0:1:0.1", "--study", "cli.db", "--save-best", "cli_best")
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert lines[0].split() == ["trial", "lam", "value", "seconds"]
    assert len(_rows(done.stdout)) == 11
    assert "best: lam=0.3" in done.stdout
    assert (setup["root"] / "cli.png").stat().st_size > 1000 and "plot: cli.png" in done.stdout
    assert (setup["root"] / "cli_best" / "adapter_model.safetensors").exists()
    shown = _cli(setup, "--show", "cli.db")
    assert shown.returncode == 0, shown.stderr
    assert "best: lam=0.3" in shown.stdout and len(_rows(shown.stdout)) == 11


def _rows(stdout: str) -> list[list[str]]:
    """The table's rows: trial number, param, value, seconds."""
    return [cells for line in stdout.splitlines() if len(cells := line.split()) == 4 and cells[0].isdigit()]


def test_ray_finds_the_optimum_on_a_local_instance(setup: dict[str, Path]) -> None:
    pytest.importorskip("ray")
    # Ray's memory monitor kills workers when the whole machine is above 95 % (other jobs on a CI host)
    env = _env(setup, RAY_memory_monitor_refresh_ms="0")
    done = _cli(setup, str(setup["program"]), "--base", str(setup["base"]), "--objective", "tune_objectives:mse",
                "--param", "lam=0:1:0.1", "--study", "ray.db", "--no-save", "--ray", env=env, timeout=420)
    assert done.returncode == 0, done.stderr + done.stdout
    assert "best: lam=0.3" in done.stdout
    rows = _rows(done.stdout)
    assert sorted(float(r[1]) for r in rows) == [i / 10 for i in range(11)]  # each grid point once


def test_ray_tpe_from_the_api_on_ray_init(setup: dict[str, Path], monkeypatch: pytest.MonkeyPatch) -> None:
    """`program.tune(ray=True)` on a Ray the caller started (`ray.init(num_cpus=2)`): TPE with a seed
    finds λ* within 0.02, the objective a closure shipped to the workers."""
    ray = pytest.importorskip("ray")
    monkeypatch.setenv("RAY_memory_monitor_refresh_ms", "0")
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        program = pemlang.load(setup["program"])
        seen: list[dict[str, object]] = []
        result = program.tune(str(setup["base"]), {"lam": (0, 1)}, objective=_mse(setup), trials=40, seed=7,
                              save=False, ray=True, on_trial=seen.append)
    finally:
        ray.shutdown()
    assert len(seen) == 40 and sum(t["state"] == "complete" for t in result.trials) == 40
    assert result.best_params is not None and abs(result.best_params["lam"] - LAMBDA_STAR) <= 0.02


# -- resuming ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("how", ["SIGKILL", "SIGTERM"])
def test_a_killed_tuning_resumes_without_repeating(setup: dict[str, Path], tmp_path: Path, how: str) -> None:
    study = tmp_path / "resume.db"
    env = _env(setup, PEMLANG_TEST_COUNTER=str(tmp_path / "calls"), PEMLANG_TEST_KILL_AFTER="4",
               PEMLANG_TEST_SIGNAL=how)
    args = [str(setup["program"]), "--base", str(setup["base"]), "--objective", "tune_objectives:mse_then_die",
            "--param", "lam=0:1:0.1", "--study", str(study), "--no-save"]
    first = _cli(setup, *args, env=env)
    assert first.returncode == (-9 if how == "SIGKILL" else 130), first.stderr
    assert len(_rows(first.stdout)) == 4
    second = _cli(setup, *args, env={**env, "PEMLANG_TEST_KILL_AFTER": "-1"})
    assert second.returncode == 0, second.stderr
    assert "resuming" in second.stderr and "4 of 11 trials done" in second.stderr
    import optuna

    trials = optuna.load_study(study_name="pemlang", storage=f"sqlite:///{study}").trials
    complete = [t.params["lam"] for t in trials if t.state.name == "COMPLETE"]
    assert sorted(complete) == [i / 10 for i in range(11)]  # the total is N, no point twice
    assert sum(t.state.name == "FAIL" and t.user_attrs.get("interrupted") for t in trials) == 1
    assert "best: lam=0.3" in second.stdout


def test_a_study_of_another_tuning_is_refused(setup: dict[str, Path], tmp_path: Path) -> None:
    program = pemlang.load(setup["program"])
    program.tune(setup["base"], {"lam": (0, 1, 0.5)}, objective=_mse(setup), study=tmp_path / "s.db", save=False)
    with pytest.raises(pemlang.CompileError) as caught:
        program.tune(setup["base"], {"lam": (0, 1, 0.25)}, objective=_mse(setup), study=tmp_path / "s.db", save=False)
    assert caught.value.diagnostics[0].code == "E033" and "space" in str(caught.value)
    (tmp_path / "notes.db").write_text("my notes, not a database")
    with pytest.raises(pemlang.CompileError) as caught:
        program.tune(setup["base"], {"lam": (0, 1, 0.5)}, objective=_mse(setup), study=tmp_path / "notes.db", save=False)
    assert caught.value.diagnostics[0].code == "E033"
    assert (tmp_path / "notes.db").read_text() == "my notes, not a database"


# -- the built-in objectives equal a hand computation -------------------------------------------


def _hand_loss(model, tokenizer, records) -> float:  # type: ignore[no-untyped-def]
    """Σ over records of −log p(output token | everything before it), / number of output tokens."""
    total, count = 0.0, 0
    for record in records:
        prompt = tokenizer(record["input"])["input_ids"]
        answer = tokenizer(record["output"], add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        ids = torch.tensor([prompt + answer])
        with torch.no_grad():
            logprobs = torch.log_softmax(model(input_ids=ids).logits[0].double(), -1)
        for t in range(len(prompt), len(prompt) + len(answer)):
            total -= float(logprobs[t - 1, ids[0, t]])
            count += 1
    return total / count


def test_the_jsonl_loss_is_the_causal_lm_loss_of_the_outputs(example_root: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    examples = example_root / "examples"
    program = pemlang.load(examples / "detoxify.pem")
    result = program.tune(examples / "adapters" / "base", {"λ": (0.3, 0.5, 0.2)}, data=examples / "tune_data.jsonl",
                          save=False, batch_size=5)
    records = [json.loads(line) for line in (examples / "tune_data.jsonl").read_text().splitlines() if line.strip()]
    tokenizer = AutoTokenizer.from_pretrained(examples / "adapters" / "base")
    for trial in result.trials:
        model = program.load_into(AutoModelForCausalLM.from_pretrained(examples / "adapters" / "base"), trial["params"])
        assert trial["value"] == pytest.approx(_hand_loss(model.eval(), tokenizer, records), rel=1e-5)
    assert result.direction == "minimize" and result.objective.startswith("loss on ")


def test_accuracy_for_a_classifier_head(example_root: Path, tmp_path: Path) -> None:
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    examples = example_root / "examples"
    data = tmp_path / "cls.jsonl"
    texts = ["great shoes", "awful service", "fine", "never again", "love it", "meh", "ok then", "broken box"]
    data.write_text("".join(json.dumps({"input": t, "output": i % 2}) + "\n" for i, t in enumerate(texts)))
    program = pemlang.compile("λ*cls", inputs={"cls": examples / "adapters" / "amazon_cls"}, params={"λ": 1.0},
                              heads="from cls")
    result = program.tune(examples / "adapters" / "base", {"λ": (0, 2, 1)}, data=data, save=False, batch_size=3)
    assert result.direction == "maximize" and result.objective.startswith("accuracy on ")
    tokenizer = AutoTokenizer.from_pretrained(examples / "adapters" / "base")
    for trial in result.trials:
        base = AutoModelForSequenceClassification.from_pretrained(examples / "adapters" / "base")
        model = program.load_into(base, trial["params"]).eval()
        right = 0
        for i, text in enumerate(texts):
            with torch.no_grad():
                logits = model(input_ids=torch.tensor([tokenizer(text)["input_ids"]])).logits
            right += int(logits.argmax(-1).item() == i % 2)
        assert trial["value"] == pytest.approx(right / len(texts))


def test_readme_tune_command(example_root: Path) -> None:
    """The README's command on a clean clone; run again it resumes (nothing left to do) and rewrites
    its own best point; `inspect` shows how that was chosen; another study's output is refused."""
    shutil_rm(example_root / "examples" / "out" / "detoxified")  # as on a clean clone (other tests write it)
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    command = [sys.executable, "-m", "pemlang.cli", "tune", "examples/detoxify.pem", "--base", "examples/adapters/base",
               "--data", "examples/tune_data.jsonl", "--param", "λ=0:1:0.1"]
    done = subprocess.run(command, cwd=example_root, text=True, capture_output=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "best: λ=" in done.stdout and "plot: examples/detoxify.tune.png" in done.stdout
    assert (example_root / "examples" / "out" / "detoxified" / "adapter_model.safetensors").exists()
    again = subprocess.run(command, cwd=example_root, text=True, capture_output=True, env=env, timeout=300)
    assert again.returncode == 0, again.stderr
    assert "11 of 11 trials done" in again.stderr and not _rows(again.stdout)
    best = done.stdout.split("best: ")[1].split()[0]
    assert f"best: {best}" in again.stdout
    shown = subprocess.run([sys.executable, "-m", "pemlang.cli", "inspect", "examples/out/detoxified"], cwd=example_root,
                           text=True, capture_output=True, env=env)
    assert "made by pemlang" in shown.stdout and "tuned" in shown.stdout and "minimize loss on" in shown.stdout
    other = subprocess.run([*command, "--study", "other.db"], cwd=example_root, text=True, capture_output=True, env=env)
    assert other.returncode == 1 and "error[E018]" in other.stderr and "--save-best DIR" in other.stderr
    assert not (example_root / "other.db").exists()  # refused before the study was made
    shutil_rm(example_root / "examples" / "out" / "detoxified")


def shutil_rm(path: Path) -> None:
    import shutil

    shutil.rmtree(path, ignore_errors=True)


# -- diagnostics -------------------------------------------------------------------------------------


@pytest.mark.parametrize("text, message", [
    ("lam", "expected NAME=LO:HI[:STEP]"),
    ("lam=1:0", "is empty"),
    ("lam=0:0", "is empty"),
    ("lam=0:nan", "not a finite number"),
    ("lam=0:inf", "not a finite number"),
    ("lam=0:1e999", "not a finite number"),
    ("lam=0:x", "'x' is not a number"),
    ("lam=0:1:0", "the step must be above 0"),
    ("lam=0:1:-0.1", "the step must be above 0"),
    ("lam=0:1:0.3", "does not divide"),
    ("lam=0:1:1e-9", "more than the limit"),
    ("lam=0:1:2:3", "expected LO:HI or LO:HI:STEP"),
    ("1x=0:1", "is not a param name"),
])
def test_bad_ranges(text: str, message: str) -> None:
    with pytest.raises(TuneError) as caught:
        parse_range(text)
    diagnostic = caught.value.diagnostics[0]
    assert diagnostic.code == "E029" and message in diagnostic.message
    assert diagnostic.span is not None and diagnostic.source is not None


def test_ranges_as_written() -> None:
    assert parse_range("λ=0:1:0.1").grid == [0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0]
    assert parse_range(" lam = -1:1 ").step is None


@pytest.mark.parametrize("content, message", [
    ("", "has no records"),
    ("\n\n", "has no records"),
    ('{"input": "a", "output": "b"\n', "not JSON"),
    ('["a", "b"]\n', "is a JSON object, not list"),
    ('{"output": "b"}\n', 'no "input"'),
    ('{"input": 3, "output": "b"}\n', '"input" must be text'),
    ('{"input": "a"}\n', 'no "output"'),
    ('{"input": "a", "output": true}\n', '"output" must be text'),
    ('{"input": "a", "output": null}\n', '"output" must be text'),
    ("[" * 100_000 + "\n", "nested too deeply"),
])
def test_bad_data_files(tmp_path: Path, content: str, message: str) -> None:
    path = tmp_path / "data.jsonl"
    path.write_text(content)
    with pytest.raises(TuneError) as caught:
        read_records(path)
    assert caught.value.diagnostics[0].code == "E030" and message in caught.value.diagnostics[0].message


def test_data_file_not_utf8_or_missing(tmp_path: Path) -> None:
    (tmp_path / "bin.jsonl").write_bytes(b'{"input": "\xff"}\n')
    for name, message in (("bin.jsonl", "not UTF-8"), ("missing.jsonl", "cannot read")):
        with pytest.raises(TuneError) as caught:
            read_records(tmp_path / name)
        assert message in caught.value.diagnostics[0].message


def _capped() -> None:  # a memory cap for a child that must not read a stream whole
    import resource

    resource.setrlimit(resource.RLIMIT_AS, (3 << 30, 3 << 30))


@pytest.mark.parametrize("kind", ["device", "sparse"])
def test_data_is_read_as_a_stream_with_a_byte_limit(setup: dict[str, Path], tmp_path: Path, kind: str) -> None:
    """`--data /dev/zero` was read whole (the kernel's OOM killer, or `internal error: MemoryError`
    under a cap): a device is refused, and a regular file is read only up to the limit."""
    if kind == "device":
        data, message = "/dev/zero", "is not a regular file: it is a device"
    else:
        data, message = str(tmp_path / "huge.jsonl"), "is larger than 256 MiB"
        with open(data, "wb") as f:
            f.truncate(4 << 30)  # 4 GiB of zeros, sparse: more than the cap
    done = subprocess.run([sys.executable, "-m", "pemlang.cli", "tune", str(setup["program"]), "--base",
                           str(setup["base"]), "--data", data, "--param", "lam=0:1:0.5", "--no-save"],
                          cwd=setup["root"], text=True, capture_output=True, env=_env(setup), timeout=120,
                          preexec_fn=_capped)
    assert done.returncode == 1 and "error[E030]" in done.stderr and message in done.stderr, done.stderr


def test_a_fifo_as_data_is_refused_without_waiting(tmp_path: Path) -> None:
    """A FIFO is refused as it is opened (reading one waited for a writer forever), and so is a directory."""
    fifo = tmp_path / "d.jsonl"
    os.mkfifo(fifo)
    probe = ("from pemlang.tune import TuneError, read_records\n"
             "try:\n    read_records({!r})\nexcept TuneError as exc:\n    print(exc.diagnostics[0].message)\n")
    for path, kind in ((fifo, "a pipe (FIFO)"), (tmp_path, "a directory")):
        done = subprocess.run([sys.executable, "-c", probe.format(str(path))], text=True, capture_output=True,
                              env={**os.environ, "PYTHONPATH": str(REPO)}, timeout=60)
        assert done.stdout.strip() == f"the data file {path} is not a regular file: it is {kind}", done.stderr


def test_data_records_and_digest_as_streamed(tmp_path: Path) -> None:
    """Streaming reads the same records, and hashes the same bytes (a study made before still resumes)."""
    import hashlib

    from pemlang.tune import DataObjective

    path = tmp_path / "d.jsonl"
    path.write_bytes(b'{"input": "a", "output": "b"}\n\n  \n{"input": "\xc3\xa9", "output": 3}\r\n'
                     b'{"input": "c", "output": "d"}')
    data = DataObjective.read(path)
    assert data.digest == hashlib.sha256(path.read_bytes()).hexdigest()
    assert [(r.input, r.output, r.line) for r in data.records] == [("a", "b", 1), ("é", 3, 4), ("c", "d", 5)]
    path.write_bytes(b'\xef\xbb\xbf{"input": "a", "output": "b"}\n')  # a byte-order mark (Windows tools): read
    data = DataObjective.read(path)
    assert [(r.input, r.output) for r in data.records] == [("a", "b")]
    assert data.digest == hashlib.sha256(path.read_bytes()).hexdigest()
    path.write_text('{"input": "a",\n "output": "b"}\n')
    with pytest.raises(TuneError) as caught:
        read_records(path)
    assert "one JSON document, not JSON lines" in caught.value.diagnostics[0].message


def test_bad_data_line_is_located(tmp_path: Path, capsys: pytest.CaptureFixture[str], setup: dict[str, Path]) -> None:
    data = tmp_path / "d.jsonl"
    data.write_text('{"input": "a", "output": "b"}\n{"input": "a", "output": 3.5}\n')
    code = main(["tune", str(setup["program"]), "--base", str(setup["base"]), "--data", str(data),
                 "--param", "lam=0:1:0.5", "--no-save"])
    err = capsys.readouterr().err
    assert code == 1 and "error[E030]" in err and "d.jsonl:2:1" in err


@pytest.mark.parametrize("args, code, message", [
    (["--param", "lamb=0:1:0.5"], "E029", "did you mean `lam`?"),
    (["--param", "lam=0:1:0.5", "--param", "lam=0:1"], "E029", "two ranges"),
    (["--param", "lam=0:1", "--sampler", "grid"], "E029", "a grid needs a step"),
    (["--param", "lam=0:1", "--sampler", "cmaes"], "E029", "two or more params"),
    (["--param", "lam=0:1:0.5", "--output", "other"], "E029", "no output 'other'"),
])
def test_option_diagnostics(setup: dict[str, Path], capsys: pytest.CaptureFixture[str], args: list[str], code: str,
                            message: str) -> None:
    status = main(["tune", str(setup["program"]), "--base", str(setup["base"]), "--objective", "math:sqrt",
                   "--no-save", *args])
    err = capsys.readouterr().err
    assert status == 1 and f"error[{code}]" in err and message in err, err


@pytest.mark.parametrize("spec, message", [
    ("no_such_module_xyz:f", "cannot import no_such_module_xyz: ModuleNotFoundError"),
    ("tune_objectives:missing", "has no function 'missing'"),
    ("tune_objectives", "expects MODULE:FUNCTION"),
    ("math:pi", "is not a function"),
    ("nowhere.py:f", "no such file"),
])
def test_objective_import_errors(setup: dict[str, Path], spec: str, message: str) -> None:
    done = _cli(setup, str(setup["program"]), "--base", str(setup["base"]), "--objective", spec,
                "--param", "lam=0:1:0.5", "--no-save")
    assert done.returncode == 1 and "error[E031]" in done.stderr and message in done.stderr, done.stderr
    assert "Traceback" not in done.stderr


def test_failing_trials_are_reported_and_the_study_goes_on(setup: dict[str, Path], tmp_path: Path) -> None:
    args = [str(setup["program"]), "--base", str(setup["base"]), "--param", "lam=0:1:0.25", "--no-save"]
    done = _cli(setup, *args, "--objective", "tune_objectives:fails_at_half", "--study", str(tmp_path / "a.db"))
    assert done.returncode == 0, done.stderr
    assert "failed at lam=0.5: the objective raised ValueError: no good at a half" in done.stderr
    assert "4 trials complete, 1 failed" in done.stdout and "best: lam=0.25" in done.stdout
    stopped = _cli(setup, *args, "--objective", "tune_objectives:fails_at_half", "--fail-fast", "--study",
                   str(tmp_path / "b.db"), "--sampler", "grid", "--seed", "3")
    assert stopped.returncode == 1 and "error[E031]" in stopped.stderr and "lam=0.5" in stopped.stderr
    assert stopped.stderr.count("no good at a half") == 1  # said once, by the diagnostic
    for objective, message in (("not_a_number", "returned str 'high', not a number"),
                               ("nan", "returned nan, not a finite number")):
        bad = _cli(setup, *args, "--objective", f"tune_objectives:{objective}", "--study", str(tmp_path / f"{objective}.db"))
        assert bad.returncode == 1 and message in bad.stderr and "no trial completed" in bad.stderr


def test_usage_errors(setup: dict[str, Path], capsys: pytest.CaptureFixture[str]) -> None:
    common = ["tune", str(setup["program"]), "--base", str(setup["base"]), "--param", "lam=0:1:0.5"]
    for args in ([*common], [*common, "--data", "x.jsonl", "--objective", "m:f"], ["tune", "--param", "lam=0:1"],
                 [*common, "--objective", "m:f", "--set", "lam=0.2"], ["tune", str(setup["program"]), "--objective", "m:f",
                                                                      "--param", "lam=0:1"],
                 [*common, "--objective", "m:f", "--no-save", "--save-best", "d"]):
        assert main(args) == 2, args
    capsys.readouterr()
    assert main(["tune", "--show", str(setup["root"] / "no.db")]) == 1
    assert "no such study" in capsys.readouterr().err


@pytest.mark.parametrize("seed", ["1e309", "4294967296", "-1", "9" * 5000, "x"],
                         ids=["1e309", "2**32", "-1", "5000-digits", "x"])
def test_a_seed_the_samplers_cannot_take_is_misuse(setup: dict[str, Path], capsys: pytest.CaptureFixture[str],
                                                   seed: str) -> None:
    with pytest.raises(SystemExit) as exited:
        main(["tune", str(setup["program"]), "--base", str(setup["base"]), "--objective", "math:fabs",
              "--param", "lam=0:1:0.5", "--no-save", "--seed", seed])
    err = capsys.readouterr().err
    assert exited.value.code == 2 and "expected a whole number from 0 to 4294967295" in err, err
    assert len(err) < 1000


@pytest.mark.parametrize("seed, shown", [(1e309, "inf"), (10**5000, "an int of 16610 bits"), (-1, "-1"),
                                         (2**32, "4294967296"), (0.5, "0.5"), (True, "True")],
                         ids=["1e309", "5000-digits", "-1", "2**32", "0.5", "True"])
def test_a_seed_the_samplers_cannot_take_in_the_api(setup: dict[str, Path], seed: object, shown: str) -> None:
    """seed=1e309 raised OverflowError, more than 4,300 digits ValueError from int-to-text conversion:
    now one message, before the base model is loaded."""
    program = pemlang.load(setup["program"])
    with pytest.raises(ValueError) as caught:
        program.tune(setup["base"], {"lam": (0, 1, 0.5)}, objective=lambda model, params: 0.0, seed=seed, save=False)
    assert str(caught.value) == f"seed must be a whole number from 0 to 4294967295, not {shown}"


def test_show_into_a_closed_pipe_is_quiet(setup: dict[str, Path]) -> None:
    program = pemlang.load(setup["program"])
    program.tune(setup["base"], {"lam": (0, 1, 0.1)}, objective=_mse(setup), study=setup["root"] / "pipe.db", save=False)
    reader, writer = os.pipe()
    os.close(reader)  # nobody reads: every write to stdout fails with EPIPE
    done = subprocess.run([sys.executable, "-m", "pemlang.cli", "tune", "--show", "pipe.db"], stdout=writer,
                          stderr=subprocess.PIPE, cwd=setup["root"], text=True, env=_env(setup))
    os.close(writer)
    assert done.returncode == 0 and done.stderr == ""


def test_a_base_that_cannot_be_loaded(setup: dict[str, Path], capsys: pytest.CaptureFixture[str]) -> None:
    status = main(["tune", str(setup["program"]), "--base", str(setup["root"] / "missing"), "--objective", "math:fabs",
                   "--param", "lam=0:1:0.5", "--no-save"])
    err = capsys.readouterr().err
    assert status == 1 and "error[E032]" in err and "no such directory" in err


def test_an_existing_output_is_refused_before_any_trial(setup: dict[str, Path], tmp_path: Path) -> None:
    (tmp_path / "taken").mkdir()
    done = _cli(setup, str(setup["program"]), "--base", str(setup["base"]), "--objective", "tune_objectives:mse",
                "--param", "lam=0:1:0.5", "--save-best", str(tmp_path / "taken"), "--study", str(tmp_path / "t.db"))
    assert done.returncode == 1 and "error[E018]" in done.stderr and "trial" not in done.stdout


def test_missing_ray_is_a_clear_message(setup: dict[str, Path], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` fails as if it were not installed
    program = pemlang.load(setup["program"])
    with pytest.raises(pemlang.CompileError) as caught:
        program.tune(setup["base"], {"lam": (0, 1, 0.5)}, objective=_mse(setup), ray=True, save=False)
    assert caught.value.diagnostics[0].code == "E031" and "pip install 'pemlang[ray]'" in str(caught.value)


def test_a_point_the_checker_refuses_is_a_failed_trial(setup: dict[str, Path], adapters: Path) -> None:
    program = pemlang.compile("a / lam", inputs={"a": adapters / "llama_r8"}, params={"lam": 1.0})
    result = program.tune(setup["base"], {"lam": (0, 1, 0.5)}, objective=_mse(setup), save=False)
    failed = [t for t in result.trials if t["state"] == "fail"]
    assert [t["params"] for t in failed] == [{"lam": 0.0}] and "zero" in failed[0]["error"]
    assert not math.isnan(result.best_value or math.nan)


# -- hostile input: what a tuning reads is never written; studies are never mixed or taken over -------


def _md5(path: Path) -> str:
    import hashlib

    return hashlib.md5(path.read_bytes()).hexdigest()


def _tree(path: Path) -> dict[str, str]:
    return {str(p.relative_to(path)): _md5(p) for p in sorted(path.rglob("*")) if p.is_file()}


def test_save_best_never_replaces_what_the_tuning_reads(example_root: Path, tmp_path: Path) -> None:
    examples = example_root / "examples"
    work = tmp_path / "w"
    work.mkdir()
    (work / "data").mkdir()
    data = work / "data" / "tune.jsonl"
    data.write_text((examples / "tune_data.jsonl").read_text())
    (work / "objs").mkdir()
    (work / "objs" / "obj.py").write_text("def f(model, params):\n    return 1.0\n")
    common = ["--param", "λ=0:1:0.5", "--force"]
    cases = [
        ["--data", str(data), "--save-best", str(examples / "adapters" / "base"), "--study", str(work / "a.db")],
        ["--data", str(data), "--save-best", str(work / "data"), "--study", str(work / "b.db")],
        ["--data", str(data), "--save-best", str(work / "st"), "--study", str(work / "st" / "s.db")],
        ["--objective", f"{work / 'objs' / 'obj.py'}:f", "--save-best", str(work / "objs"), "--study",
         str(work / "c.db")],
        ["--data", str(data), "--save-best", str(examples), "--study", str(work / "d.db")],
    ]
    (work / "st").mkdir()
    before = {p: _tree(p) for p in (examples / "adapters" / "base", work / "data", work / "objs")}
    for case in cases:
        done = subprocess.run([sys.executable, "-m", "pemlang.cli", "tune", str(examples / "detoxify.pem"), "--base",
                               str(examples / "adapters" / "base"), *common, *case], text=True, capture_output=True,
                              env={**os.environ, "PYTHONPATH": str(REPO)}, timeout=300)
        assert done.returncode == 1 and "error[E018]" in done.stderr, (case, done.stderr)
    assert {p: _tree(p) for p in before} == before


def test_the_plot_never_replaces_the_study_or_an_input(setup: dict[str, Path], example_root: Path, tmp_path: Path) -> None:
    program = pemlang.load(setup["program"])
    result = program.tune(setup["base"], {"lam": (0, 1, 0.5)}, objective=_mse(setup), study=tmp_path / "p.png", save=False)
    assert result.plot is None and "the study" in (result.plot_note or "")
    assert (tmp_path / "p.png").read_bytes()[:6] == b"SQLite"
    examples = example_root / "examples"
    data = tmp_path / "data.png"
    data.write_text((examples / "tune_data.jsonl").read_text())
    kept = _md5(data)
    result = pemlang.load(examples / "detoxify.pem").tune(examples / "adapters" / "base", {"λ": (0, 1, 0.5)}, data=data,
                                                         study=tmp_path / "data.db", save=False)
    assert result.plot is None and _md5(data) == kept
    (tmp_path / "dir.png").mkdir()
    result = program.tune(setup["base"], {"lam": (0, 1, 0.5)}, objective=_mse(setup), study=tmp_path / "dir.db", save=False)
    assert result.plot is None and "not a file" in (result.plot_note or "") and result.best_params is not None


def test_foreign_databases_are_never_written(setup: dict[str, Path], tmp_path: Path) -> None:
    import sqlite3

    import optuna

    foreign = tmp_path / "app.db"
    with sqlite3.connect(foreign) as db:
        db.execute("create table users (name text)")
    other = tmp_path / "optuna.db"
    optuna.create_study(study_name="theirs", storage=f"sqlite:///{other}")
    empty = tmp_path / "empty.db"
    empty.write_bytes(b"")
    sums = {p: _md5(p) for p in (foreign, other, empty)}
    program = pemlang.load(setup["program"])
    for path, message in ((foreign, "another application's database"), (other, "holds other Optuna studies")):
        with pytest.raises(pemlang.CompileError) as caught:
            program.tune(setup["base"], {"lam": (0, 1, 0.5)}, objective=_mse(setup), study=path, save=False)
        assert caught.value.diagnostics[0].code == "E033" and message in str(caught.value)
    for path in (foreign, other, empty):
        assert main(["tune", "--show", str(path)]) == 1
    assert {p: _md5(p) for p in sums} == sums


def test_a_study_is_not_resumed_over_other_settings_or_inputs(setup: dict[str, Path], adapters: Path,
                                                               tmp_path: Path) -> None:
    import shutil

    shutil.copytree(adapters / "llama_r8", tmp_path / "a")
    text = PROGRAM.format(a=tmp_path / "a", b=adapters / "llama_r8_b", out=tmp_path / "out").replace(
        "param lam = 0.5", "param lam = 0.5\nparam mu = 1").replace("mix = lam*a", "mix = mu*lam*a")
    (tmp_path / "p.pem").write_text(text)
    study = tmp_path / "s.db"

    def tune(**fixed: float) -> object:
        return pemlang.load(tmp_path / "p.pem", params=fixed or None).tune(
            setup["base"], {"lam": (0, 1, 0.5)}, objective=_mse(setup), study=study, save=False, trials=1)

    tune()
    with pytest.raises(pemlang.CompileError) as caught:
        tune(mu=2.0)
    assert "params differs" in str(caught.value)
    shutil.copy(adapters / "llama_r8_c" / "adapter_model.safetensors", tmp_path / "a" / "adapter_model.safetensors")
    with pytest.raises(pemlang.CompileError) as caught:
        tune()
    assert "inputs differs" in str(caught.value)


def test_a_study_in_use_is_refused(setup: dict[str, Path], tmp_path: Path) -> None:
    import fcntl

    study = tmp_path / "busy.db"
    with study.open("ab") as held:
        fcntl.flock(held.fileno(), fcntl.LOCK_EX)
        done = _cli(setup, str(setup["program"]), "--base", str(setup["base"]), "--objective", "tune_objectives:mse",
                    "--param", "lam=0:1:0.5", "--study", str(study), "--no-save")
    assert done.returncode == 1 and "being tuned by another pemlang process" in done.stderr


def test_a_failed_start_does_not_pin_the_study(setup: dict[str, Path], tmp_path: Path) -> None:
    args = ["--objective", "tune_objectives:mse", "--param", "lam=0:1:0.5", "--study", str(tmp_path / "f.db"),
            "--no-save"]
    wrong = _cli(setup, str(setup["program"]), "--base", str(setup["root"]), *args)  # not a model directory
    assert wrong.returncode == 1 and "error[E032]" in wrong.stderr
    right = _cli(setup, str(setup["program"]), "--base", str(setup["base"]), *args)
    assert right.returncode == 0, right.stderr


@pytest.mark.parametrize("param, message", [
    ("lam=0:1:1E-999999999999", "far too small"),
    ("lam=-1e308:1e308", "wider than a float"),
])
def test_absurd_ranges(param: str, message: str) -> None:
    with pytest.raises(TuneError) as caught:
        parse_range(param)
    assert message in caught.value.diagnostics[0].message


def test_the_whole_grid_is_capped(setup: dict[str, Path], capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    (tmp_path / "g.pem").write_text(setup["program"].read_text().replace("param lam = 0.5", "param lam = 0.5\nparam mu = 1")
                                    .replace("mix = lam*a", "mix = mu*lam*a"))
    status = main(["tune", str(tmp_path / "g.pem"), "--base", str(setup["base"]), "--objective", "math:fabs",
                   "--param", "lam=0:1:0.01", "--param", "mu=0:1:0.01", "--no-save"])
    assert status == 1 and "the grid has 10,201 points, more than the limit of 1,000" in capsys.readouterr().err


@pytest.mark.parametrize("line, message", [
    ('{"input": "\\ud800", "output": "b"}', "not valid Unicode"),
    ('{"input": "a", "output": ' + "9" * 5000 + "}", "not a record: a number has more than 4,300 digits"),
])
def test_hostile_records(tmp_path: Path, line: str, message: str) -> None:
    (tmp_path / "d.jsonl").write_text(line + "\n")
    with pytest.raises(TuneError) as caught:
        read_records(tmp_path / "d.jsonl")
    assert caught.value.diagnostics[0].code == "E030" and message in caught.value.diagnostics[0].message


@pytest.mark.parametrize("objective, status, message", [
    ("exits", 1, "the objective called sys.exit(3)"),
    ("unloads", 1, "error[E031]: the objective unloaded the adapter being tuned"),
    ("deletes", 1, "error[E031]: the objective deleted the adapter being tuned"),
    ("merges", 1, "error[E031]: the objective merged the adapter into the base model's weights (merge_adapter)"),
    ("merges_and_unloads", 1, "error[E031]: the objective merged the adapter into the base model's weights and "
                              "unloaded it"),
    ("switches", 1, "error[E031]: the objective made another adapter active ('other')"),
    ("disables", 1, "error[E031]: the objective disabled the adapter layers"),
    ("scales_the_base", 1, "error[E031]: the objective changed the base model's weights"),
])
def test_objectives_that_misbehave(setup: dict[str, Path], tmp_path: Path, objective: str, status: int,
                                   message: str) -> None:
    """Whatever the objective did to the model that the next trial's in-place update cannot undo
    stops the tuning at that trial, named: no later trial scores a frozen or foreign model, and no
    "best" point is reported or written."""
    done = _cli(setup, str(setup["program"]), "--base", str(setup["base"]), "--objective", f"tune_objectives:{objective}",
                "--param", "lam=0:1:0.5", "--study", str(tmp_path / "o.db"), "--save-best", str(tmp_path / "best"))
    assert done.returncode == status and message in done.stderr, done.stderr
    assert "internal error" not in done.stderr and "Traceback" not in done.stderr
    assert "best:" not in done.stdout and not (tmp_path / "best").exists()
    if objective != "exits":
        assert len(_rows(done.stdout)) == 0  # stopped at the trial that did it
        assert "an objective scores the model it is given" in done.stderr


def test_an_objective_raising_a_base_exception_fails_its_trial(setup: dict[str, Path], tmp_path: Path) -> None:
    done = _cli(setup, str(setup["program"]), "--base", str(setup["base"]), "--objective",
                "tune_objectives:raises_a_base_exception", "--param", "lam=0:1:0.5", "--study", str(tmp_path / "b.db"),
                "--no-save")
    assert done.returncode == 0, done.stderr
    assert "trial" in done.stderr and "failed at lam=0.5: the objective raised Unusual: not an Exception" in done.stderr
    assert "2 trials complete, 1 failed" in done.stdout and "Traceback" not in done.stderr


def test_an_objective_that_merges_and_unmerges_is_fine(setup: dict[str, Path], monkeypatch: pytest.MonkeyPatch) -> None:
    """merge_adapter then unmerge_adapter leaves the base weights as they were (to within rounding):
    the study goes on and finds λ*, as the plain objective does."""
    monkeypatch.chdir(setup["root"])
    monkeypatch.setenv("PEMLANG_TEST_TARGET", str(setup["target"]))
    result = pemlang.load(setup["program"]).tune(setup["base"], {"lam": (0, 1, 0.1)},
                                                  objective="tune_objectives:merges_and_unmerges", save=False)
    assert sum(t["state"] == "complete" for t in result.trials) == 11
    assert result.best_params == {"lam": LAMBDA_STAR} and result.tied == []


def test_a_tied_best_value_is_said(setup: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """An objective that scores the model with the adapter disabled gives every trial the base
    model's value: the best is a tie, and the result says with which trials."""
    base = base_model("llama").eval()
    saved = torch.load(setup["target"])
    with torch.no_grad():
        expected = torch.mean((base(input_ids=saved["inputs"]).logits - saved["target"]) ** 2).item()
    done = _cli(setup, str(setup["program"]), "--base", str(setup["base"]), "--objective",
                "tune_objectives:scores_without_the_adapter", "--param", "lam=0:1:0.5", "--study",
                str(tmp_path / "t.db"), "--no-save")
    assert done.returncode == 0, done.stderr
    assert [float(r[2]) for r in _rows(done.stdout)] == pytest.approx([expected] * 3, rel=1e-5)
    assert "  value = " in done.stdout and "(trial 0, minimized)" in done.stdout  # the earliest of the tie
    assert "tied: trials 1, 2 reach the same value as trial 0" in done.stdout
    shown = _cli(setup, "--show", str(tmp_path / "t.db"))
    assert shown.returncode == 0 and "tied: trials 1, 2 reach the same value as trial 0" in shown.stdout
    monkeypatch.chdir(setup["root"])
    monkeypatch.setenv("PEMLANG_TEST_TARGET", str(setup["target"]))
    result = pemlang.load(setup["program"]).tune(setup["base"], {"lam": (0, 1, 0.5)},
                                                  objective="tune_objectives:scores_without_the_adapter", save=False)
    assert result.best_number == 0 and result.tied == [1, 2]
    assert result.best_value == pytest.approx(expected, rel=1e-5)


def test_a_base_that_is_an_adapter(setup: dict[str, Path], adapters: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["tune", str(setup["program"]), "--base", str(adapters / "llama_r8"), "--objective", "math:fabs",
                 "--param", "lam=0:1:0.5", "--no-save"]) == 1
    assert "is a PEFT adapter, not a base model" in capsys.readouterr().err


def test_an_unreachable_ray_address(setup: dict[str, Path]) -> None:
    pytest.importorskip("ray")
    done = _cli(setup, str(setup["program"]), "--base", str(setup["base"]), "--objective", "tune_objectives:mse",
                "--param", "lam=0:1:0.5", "--no-save", "--ray", "127.0.0.1:1", timeout=120)
    assert done.returncode == 1 and "cannot reach a Ray cluster at 127.0.0.1:1" in done.stderr


# -- a study changed under the tuning: diagnostics naming the study (and the trial) ---------------


@pytest.mark.parametrize("how", ["deleted", "locked"])
def test_a_study_deleted_or_locked_mid_run(setup: dict[str, Path], tmp_path: Path, how: str) -> None:
    """The study deleted by another process while trials run, or locked by one for longer than
    SQLite waits (5 s): E033 saying which, not Optuna's StorageInternalError."""
    import sqlite3

    study = tmp_path / "s.db"
    mse = _mse(setup)
    held: list[sqlite3.Connection] = []

    def objective(model, params):  # type: ignore[no-untyped-def]
        if how == "deleted" and study.exists():
            study.unlink()
        if how == "locked" and not held:
            held.append(sqlite3.connect(study, timeout=0, isolation_level=None))
            held[0].execute("begin exclusive")  # held until the tuning has given up
        return mse(model, params)

    try:
        with pytest.raises(pemlang.CompileError) as caught:
            pemlang.load(setup["program"]).tune(setup["base"], {"lam": (0, 1, 0.5)}, objective=objective, study=study,
                                                save=False)
    finally:
        for db in held:
            db.close()
    diagnostic = caught.value.diagnostics[0]
    expected = {"deleted": f"the study {study} was deleted or moved while the tuning ran",
                "locked": f"the study {study} was locked by another process for more than 5 s"}[how]
    assert diagnostic.code == "E033" and diagnostic.message == expected
    assert diagnostic.hints and "rerun" in diagnostic.hints[0]


@pytest.mark.parametrize("sql, damage", [
    ("update trial_values set value = 'high' where trial_id = 2", "trial 1 has the value 'high', not a finite number"),
    ("update trial_values set value = NULL where trial_id = 2", "trial 1 has the value NULL, not a finite number"),
    ("update trial_values set value = 9e999 - 9e999 where trial_id = 2", "trial 1 has the value NULL, not a finite number"),
    ("update trial_values set value = -9e999 where trial_id = 2", "trial 1 has the value -inf, not a finite number"),
    ("update trial_values set value_type = 'INF_NEG' where trial_id = 2", "trial 1 has the value INF_NEG, not a finite"),
    ("delete from trial_values where trial_id = 2", "trial 1 is complete but has no value"),
    ("update trial_params set param_value = 'x' where trial_id = 2", "trial 1 has the param lam = 'x', not a finite"),
    ("update trials set state = 'WEIRD' where trial_id = 2", "trial 1 has an unknown state 'WEIRD'"),
    # a point never scored, put beside another point's value (from an attack: it was saved as the best)
    ("update trial_params set param_value = 7.5 where trial_id = 2", "trial 1 has the param lam = 7.5, outside its "
                                                                      "range 0:1"),
    ("update trial_params set distribution_json = '{}' where trial_id = 2", "trial 1 has a param lam whose range is "
                                                                           "not one Optuna wrote"),
])
def test_tampered_study_values(setup: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str], sql: str,
                               damage: str) -> None:
    """Values Optuna and pemlang never write, put into the study file by hand: `--show` and a
    resumed tuning name the study and the trial (no internal error, no Python text)."""
    import shutil
    import sqlite3

    made = tmp_path / "made.db"
    program = pemlang.load(setup["program"])
    program.tune(setup["base"], {"lam": (0, 1, 0.5)}, objective=_mse(setup), study=made, save=False, trials=2)
    study = tmp_path / "tampered.db"
    shutil.copy(made, study)
    with contextlib.closing(sqlite3.connect(study)) as db, db:
        db.execute(sql)
    assert main(["tune", "--show", str(study)]) == 1
    err = capsys.readouterr().err
    assert f"error[E033]: {study}: {damage}" in err and "the study was changed outside pemlang" in err, err
    assert "internal error" not in err and "Error:" not in err
    with pytest.raises(pemlang.CompileError) as caught:
        program.tune(setup["base"], {"lam": (0, 1, 0.5)}, objective=_mse(setup), study=study, save=False)
    assert caught.value.diagnostics[0].code == "E033" and damage in caught.value.diagnostics[0].message


# -- a base model that does not fit, a tokenizer that is missing: said whole, at the right option ----


def test_a_base_of_another_width_names_the_layer_and_both_shapes(setup: dict[str, Path], adapters: Path, tmp_path: Path,
                                                                 capsys: pytest.CaptureFixture[str]) -> None:
    from safetensors import safe_open

    wide = tmp_path / "wide"
    base_model("llama", hidden=64).save_pretrained(wide)
    key = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"
    with safe_open(adapters / "llama_r8" / "adapter_model.safetensors", "pt") as f:
        rank, width = f.get_slice(key).get_shape()
    recorded = json.loads((adapters / "llama_r8" / "adapter_config.json").read_text())["base_model_name_or_path"]
    status = main(["tune", str(setup["program"]), "--base", str(wide), "--objective", "math:fabs", "--param",
                   "lam=0:1:0.5", "--no-save", "--study", str(tmp_path / "w.db")])
    err = capsys.readouterr().err
    assert status == 1
    assert re.search(rf"error\[E009\]: the model does not fit this output: model\.layers\.0\.self_attn\.\w+_proj"
                     rf"\.lora_A\.weight is {rank}×{width} in the output, {rank}×64 in the model\n --> --base:1:1", err), err
    assert f"they record {recorded}" in err
    assert "Error(s) in loading" not in err and "torch.Size" not in err


def test_a_missing_tokenizer_is_pointed_at_where_it_was_looked_for(setup: dict[str, Path], example_root: Path,
                                                                    tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """The base saved without its tokenizer: the message is whole and points at --base (no
    --tokenizer was given); a --tokenizer directory without one is pointed at."""
    data = example_root / "examples" / "tune_data.jsonl"
    common = ["tune", str(setup["program"]), "--data", str(data), "--param", "lam=0:1:0.5", "--no-save"]
    assert main([*common, "--base", str(setup["base"]), "--study", str(tmp_path / "a.db")]) == 1
    err = capsys.readouterr().err
    assert f"error[E032]: the base model directory {setup['base']} has no tokenizer (no tokenizer.json or " \
           "tokenizer_config.json)\n --> --base:1:1" in err, err
    assert "--tokenizer:" not in err
    empty = tmp_path / "tok"
    empty.mkdir()
    assert main([*common, "--base", str(setup["base"]), "--tokenizer", str(empty), "--study", str(tmp_path / "b.db")]) == 1
    err = capsys.readouterr().err
    assert f"error[E032]: the tokenizer directory {empty} has no tokenizer" in err and " --> --tokenizer:1:1" in err



def test_an_objective_that_merges_on_ray(setup: dict[str, Path], tmp_path: Path) -> None:
    """On Ray too, the objective that merged the adapter stops the tuning with E031 naming it (not a
    worker that "could not start")."""
    pytest.importorskip("ray")
    env = _env(setup, RAY_memory_monitor_refresh_ms="0")
    done = _cli(setup, str(setup["program"]), "--base", str(setup["base"]), "--objective", "tune_objectives:merges",
                "--param", "lam=0:1:0.5", "--study", str(tmp_path / "r.db"), "--no-save", "--ray", env=env, timeout=420)
    assert done.returncode == 1, done.stderr + done.stdout
    assert "error[E031]: the objective merged the adapter into the base model's weights (merge_adapter)" in done.stderr
    assert "could not start" not in done.stderr and "best:" not in done.stdout


def test_the_guard_samples_weights_of_any_size() -> None:
    """A base weight of 16,777,220 elements (a 7B model's MLP weights are larger): sampled indices
    computed in float32 would round past its end; the guard's stay inside and see a change."""
    from peft import LoraConfig, get_peft_model

    from pemlang.tune.guard import ModelGuard

    class Wide(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.proj = torch.nn.Linear(4_194_305, 4, bias=False)  # 4 × 4,194,305 = 16,777,220 elements

    model = get_peft_model(Wide(), LoraConfig(r=1, target_modules=["proj"]), adapter_name="pemlang")
    guard = ModelGuard(model, "pemlang")
    assert guard.problem(model) is None
    model.base_model.model.proj.base_layer.weight.data[-1, -1] += 1.0  # the last element: sampled
    assert guard.problem(model) == "changed the base model's weights (base_model.model.proj)"


def test_a_tokenizer_that_cannot_load_is_said_whole(setup: dict[str, Path], example_root: Path, tmp_path: Path,
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    """transformers' own reason, over several lines, is given whole on one line (it was cut at its
    first line, "… from one of:")."""
    from transformers import AutoTokenizer

    broken = tmp_path / "tok"
    broken.mkdir()
    (broken / "tokenizer_config.json").write_text("{}")
    with pytest.raises(Exception) as raised:  # noqa: B017 - whatever transformers raises: its text is the oracle
        AutoTokenizer.from_pretrained(str(broken))
    reason = " ".join(str(raised.value).split())
    assert len(reason) <= 400  # said whole, not clipped
    status = main(["tune", str(setup["program"]), "--base", str(setup["base"]), "--tokenizer", str(broken), "--data",
                   str(example_root / "examples" / "tune_data.jsonl"), "--param", "lam=0:1:0.5", "--no-save",
                   "--study", str(tmp_path / "t.db")])
    err = capsys.readouterr().err
    assert status == 1
    first_error = next(line for line in err.splitlines() if line.startswith("error"))  # after the paper-mode warning
    assert first_error == f"error[E032]: cannot load a tokenizer from {str(broken)!r}: {reason}", err


def test_a_mistyped_base_is_said_before_the_study_is_compared(setup: dict[str, Path], tmp_path: Path,
                                                              capsys: pytest.CaptureFixture[str]) -> None:
    """From a new-user trial: a typo in --base on a resumed study was E033 "a study of a different
    tuning (base differs)", whose hint suggested deleting the study; and a new study file was left
    behind by a tuning that never started."""
    study = tmp_path / "s.db"
    pemlang.load(setup["program"]).tune(setup["base"], {"lam": (0, 1, 0.5)}, objective=_mse(setup), study=study,
                                        save=False, trials=2)
    assert study.is_file()
    common = ["tune", str(setup["program"]), "--objective", "math:fabs", "--param", "lam=0:1:0.5", "--no-save",
              "--study", str(study)]
    typo = str(setup["base"]) + "_typo"
    assert main([*common, "--base", typo]) == 1
    err = capsys.readouterr().err
    assert f"error[E032]: no such directory: {typo}" in err and "E033" not in err, err
    fresh = tmp_path / "fresh.db"
    assert main([*common[:-1], str(fresh), "--base", typo]) == 1
    assert not fresh.exists()


def test_show_of_a_file_that_is_not_a_study_reads_only(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    notes = tmp_path / "notes.md"
    notes.write_text("# notes\n")
    assert main(["tune", "--show", str(notes)]) == 1
    err = capsys.readouterr().err
    assert f"error[E033]: {notes} is not a study (not an SQLite file)\n" in err and "overwrite" not in err, err
    assert "--show takes a study file a tuning wrote" in err and notes.read_text() == "# notes\n"
