"""The ways to ask for a model merged into its base (SPEC §5.2) besides `output … into` and
`eval --into`: the API's `save(into=…)`, `into:` in configs, the REPL's `:save … --into`; what
`check` and `plan` show for it; `inspect` on a merged model; `--max-shard-size`; Hub bases.

The oracle is the one of test_into_base.py: PEFT's `merge_and_unload()` on the base in fp32, then
cast to the base's dtype."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from peft_factory import lora, save_base
from safetensors import safe_open
from safetensors.torch import load_file
from test_into_base import assert_matches, peft_merged, state

import pemlang
from pemlang.cli import main
from pemlang.diagnostics import CompileError


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("surface")
    save_base(root / "llama")
    save_base(root / "llama_sharded", max_shard_size="20KB")
    lora(root / "a", 1)
    lora(root / "b", 2, r=4, alpha=8, use_rslora=True)
    return root


# -- the API ---------------------------------------------------------------------------------------


def test_api_save_into_equals_peft_merge(models: Path, tmp_path: Path) -> None:
    program = pemlang.compile("a", inputs={"a": models / "a"}, device="cpu")
    assert program.save(tmp_path / "m", into=models / "llama") == [(tmp_path / "m").resolve()]
    assert_matches(state(tmp_path / "m"), peft_merged(models / "llama", models / "a"), state(models / "llama"))
    meta = json.loads((tmp_path / "m" / "config.json").read_text())
    assert meta == json.loads((models / "llama" / "config.json").read_text())
    assert not (tmp_path / "m" / "adapter_config.json").exists()


def test_api_save_into_a_file_program_and_params(models: Path, tmp_path: Path) -> None:
    """A program file's one output, its directory replaced, at a param value; equals PEFT merging
    the adapter the same program writes."""
    text = f'mode exact\nparam lam = 1\ninput a = "{models / "a"}"\ninput b = "{models / "b"}"\noutput lam*a + b -> "x"\n'
    program = pemlang.compile(text=text, base_dir=tmp_path, device="cpu")
    program.save(tmp_path / "adapter", lam=0.25)
    program.save(tmp_path / "m", into=str(models / "llama_sharded"), lam=0.25)
    assert not (tmp_path / "x").exists()
    assert (tmp_path / "m" / "model.safetensors.index.json").exists()
    assert_matches(state(tmp_path / "m"), peft_merged(models / "llama_sharded", tmp_path / "adapter"),
                   state(models / "llama_sharded"), ulps=4)


def test_api_save_into_hostile_arguments(models: Path, tmp_path: Path) -> None:
    program = pemlang.compile("a", inputs={"a": models / "a"}, device="cpu")
    with pytest.raises(TypeError, match="into must be"):
        program.save(tmp_path / "m", into=3)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="pass directory="):
        program.save(into=models / "llama")
    with pytest.raises(CompileError) as missing:
        program.save(tmp_path / "m", into=tmp_path / "nowhere")
    assert missing.value.diagnostics[0].code == "E035"
    with pytest.raises(CompileError) as over:  # DIR inside BASE: refused even with force
        program.save(models / "llama" / "sub", into=models / "llama", force=True)
    assert over.value.diagnostics[0].code == "E018"
    with pytest.raises(CompileError) as on_input:  # BASE is an input
        program.save(tmp_path / "m", into=models / "a")
    assert on_input.value.diagnostics[0].code == "E035"
    two = pemlang.compile(text=f'input a = "{models / "a"}"\noutput a -> "x"\noutput 2*a -> "y"\n',
                          base_dir=tmp_path, device="cpu")
    with pytest.raises(ValueError, match="exactly one output"):
        two.save(into=models / "llama")
    assert not (tmp_path / "m").exists() and not (models / "llama" / "sub").exists()


def test_api_save_into_wider_base_is_e009(models: Path, tmp_path: Path) -> None:
    save_base(tmp_path / "wide", hidden=48)
    program = pemlang.compile("a", inputs={"a": models / "a"}, device="cpu")
    with pytest.raises(CompileError) as caught:
        program.save(tmp_path / "m", into=tmp_path / "wide")
    assert caught.value.diagnostics[0].code == "E009"
    assert not (tmp_path / "m").exists()


def test_api_sweep_refuses_into(models: Path, tmp_path: Path) -> None:
    text = f'param lam = 1\ninput a = "{models / "a"}"\noutput lam*a into "{models / "llama"}" -> "m"\n'
    program = pemlang.compile(text=text, base_dir=tmp_path, device="cpu")
    with pytest.raises(CompileError) as caught:
        list(program.sweep(lam=[0.5, 1.0], save=True))
    assert caught.value.diagnostics[0].code == "E024" and "sweep" in caught.value.diagnostics[0].message
    assert not list(tmp_path.glob("m*"))
    assert torch.is_tensor(next(iter(program.evaluate(lam=0.5)["lam*a"].values())))


# -- configs ---------------------------------------------------------------------------------------


def _run_config(tmp: Path, name: str, text: str, capsys: pytest.CaptureFixture[str], *extra: str) -> tuple[int, str]:
    config = tmp / name
    config.write_text(text, encoding="utf-8")
    status = main(["run", str(config), "--device", "cpu", *extra])
    return status, capsys.readouterr().err


@pytest.mark.parametrize("style", ["expression", "outputs", "toml"])
def test_config_into_equals_peft_merge(models: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                       style: str) -> None:
    if style == "expression":
        name, text = "c.yaml", f"merge:\n  inputs: {{a: {models / 'a'}}}\n  expression: a\n  output: m\n" \
                               f"  into: {models / 'llama'}\n"
    elif style == "outputs":
        name, text = "c.yaml", (f"inputs: {{a: {models / 'a'}}}\noutputs:\n  - expression: a\n    path: m\n"
                                f"    into: {models / 'llama'}\n  - expression: 2*a\n    path: adapter\n")
    else:
        name, text = "c.toml", f'expression = "a"\noutput = "m"\ninto = "{models / "llama"}"\n[inputs]\na = "{models / "a"}"\n'
    status, err = _run_config(tmp_path, name, text, capsys, *(["--key", "merge"] if style == "expression" else []))
    assert status == 0, err
    assert_matches(state(tmp_path / "m"), peft_merged(models / "llama", models / "a"), state(models / "llama"))
    if style == "outputs":
        assert (tmp_path / "adapter" / "adapter_config.json").exists()


@pytest.mark.parametrize(("text", "code", "line", "message"), [
    ("inputs: {{a: {a}}}\nexpression: a\noutput: m\ninto: nowhere\n", "E035", 4, "base model directory not found"),
    ("inputs: {{a: {a}}}\nexpression: a\noutput: m\ninto: 3\n", "E025", 4, "string"),
    ("inputs: {{a: {a}}}\nexpression: a\noutput: m\ninto: ''\n", "E025", 4, "at least 1 character"),
    ("inputs: {{a: {a}}}\nexpression: a\ninto: {llama}\n", "E025", 3, "`into` goes with `expression` and `output`"),
    ("inputs: {{a: {a}}}\noutputs:\n  - expression: a\n    path: m\n    into: [x]\n", "E025", 5, "string"),
    ("inputs: {{a: {a}}}\noutputs:\n  - expression: a\n    path: {llama}/sub\n    into: {llama}\n", "E018", 4,
     "overwrite the base model"),
    ("inputs: {{a: {a}}}\noutputs:\n  - expression: a\n    path: m\n    into: {a}\n", "E035", 5, "no config.json"),
])
def test_config_into_errors_point_at_the_line(models: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                              text: str, code: str, line: int, message: str) -> None:
    status, err = _run_config(tmp_path, "c.yaml", text.format(a=models / "a", llama=models / "llama"), capsys)
    assert status == 1 and f"error[{code}]" in err and f"c.yaml:{line}:" in err and message in err, err
    assert not (tmp_path / "m").exists() and not (models / "llama" / "sub").exists()


def test_config_into_through_the_api(models: Path, tmp_path: Path) -> None:
    program = pemlang.from_config({"inputs": {"a": str(models / "a")}, "expression": "a", "output": "m",
                                   "into": str(models / "llama")}, base_dir=tmp_path, device="cpu")
    program.save()
    assert_matches(state(tmp_path / "m"), peft_merged(models / "llama", models / "a"), state(models / "llama"))


# -- the REPL --------------------------------------------------------------------------------------


def test_repl_save_into_and_output_into(models: Path, tmp_path: Path) -> None:
    from test_repl import piped

    llama = models / "llama"
    script = "\n".join([
        f'input a = "{models / "a"}"',
        f":save a m --into {llama}",
        f':save 2*a m2 --into "{llama}"',
        f'output a into "{llama}" -> "m3"',
        ":save a m4 --into",  # no base
        f":save a m4 --into {llama} --into {llama}",  # twice
        ":save a m4 --into nowhere",
        f":save a {llama}/sub --into {llama} --force",  # DIR inside BASE, even with --force
        ":save a m4 --into=nowhere2 --force",
        ":help",
    ]) + "\n"
    result = piped(script, cwd=tmp_path)
    out = result.stdout
    assert result.returncode == 1, out  # the refused entries
    assert out.count("wrote ") == 3 and "merged into" in out, out
    assert "option `--into` of :save needs a base model directory" in out
    assert "option `--into` of :save is given twice" in out
    assert "error[E035]: base model directory not found" in out
    assert "error[E018]: output would overwrite the base model" in out
    assert out.count("error[E035]: base model directory not found") == 2 and "nowhere2" in out
    assert ":save EXPR DIR [--into BASE] [--force]" in out
    assert not (tmp_path / "m4").exists() and not (llama / "sub").exists()
    oracle = peft_merged(llama, models / "a")
    assert_matches(state(tmp_path / "m"), oracle, state(llama))
    assert_matches(state(tmp_path / "m3"), oracle, state(llama))
    twice = state(tmp_path / "m2")
    assert any(not torch.equal(twice[k], oracle[k]) for k in oracle)


# -- check and plan --------------------------------------------------------------------------------


def test_check_and_plan_show_what_will_be_written_without_torch(models: Path, tmp_path: Path) -> None:
    import subprocess
    import sys

    program = tmp_path / "p.pem"
    program.write_text(f'input a = "{models / "a"}"\noutput a into "{models / "llama_sharded"}" -> "m"\n', encoding="utf-8")
    script = ("import sys; from pemlang.cli import main; status = main(['check', sys.argv[1]]); "
              "assert 'torch' not in sys.modules, 'check imported torch'; sys.exit(status)")
    repo = Path(__file__).resolve().parent.parent
    result = subprocess.run([sys.executable, "-c", script, str(program)], capture_output=True, text=True,
                            env={"PYTHONPATH": str(repo), "PATH": "/usr/bin:/bin"})
    assert result.returncode == 0, result.stderr
    shards = sorted((models / "llama_sharded").glob("*.safetensors"))
    count = sum(len(load_file(s)) for s in shards)
    lines = result.stdout
    assert f"writes {len(shards)} weight files (as the base is)" in lines and f"8 of {count} tensors change" in lines
    for shard in shards:
        changed = sum(1 for k in load_file(shard) if "self_attn" in k)
        assert f"{shard.name}: " in lines and f"{changed} of {len(load_file(shard))} tensors change" in lines
    assert "changes: model.layers.[0-1].self_attn.k_proj.weight" in lines
    assert main(["plan", str(program)]) == 0
    assert not (tmp_path / "m").exists()


def test_plan_shows_the_changed_tensors(models: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    program = tmp_path / "p.pem"
    program.write_text(f'input a = "{models / "a"}"\noutput a into "{models / "llama"}" -> "m"\n', encoding="utf-8")
    assert main(["plan", str(program)]) == 0
    out = " ".join(capsys.readouterr().out.split())
    assert "merged into" in out and "writes 1 weight file (as the base is)" in out
    assert "model.safetensors:" in out and "changes: model.layers.[0-1].self_attn.k_proj.weight" in out


# -- --max-shard-size ------------------------------------------------------------------------------


def _index_holds(directory: Path) -> dict[str, str]:
    index = json.loads((directory / "model.safetensors.index.json").read_text())
    for name, file in index["weight_map"].items():
        assert name in load_file(directory / file), (name, file)
    sizes = sum(t.numel() * t.element_size() for t in state(directory).values())
    assert index["metadata"]["total_size"] == sizes
    return index["weight_map"]


def test_max_shard_size_reshards_with_a_new_index(models: Path, tmp_path: Path) -> None:
    base = models / "llama"
    assert main(["eval", "--input", f"a={models / 'a'}", "--out", str(tmp_path / "m"), "--into", str(base),
                 "--max-shard-size", "20KB", "--", "a"]) == 0
    weight_map = _index_holds(tmp_path / "m")
    files = sorted(p.name for p in (tmp_path / "m").glob("*.safetensors"))
    assert len(files) > 1 and sorted(set(weight_map.values())) == files
    assert all(f.startswith("model-") and f.endswith(f"-of-{len(files):05d}.safetensors") for f in files)
    for f in files:  # each at most 20 KB unless it holds one larger tensor
        tensors = load_file(tmp_path / "m" / f)
        assert len(tensors) == 1 or sum(t.numel() * t.element_size() for t in tensors.values()) <= 20_000
        with safe_open(str(tmp_path / "m" / f), "pt") as opened:
            assert opened.metadata()["format"] == "pt" and "pemlang.into" in opened.metadata()
    assert_matches(state(tmp_path / "m"), peft_merged(base, models / "a"), state(base))
    from test_into_base import _load

    _load(tmp_path / "m", "llama", "lm")  # transformers loads the resharded model


def test_max_shard_size_joins_a_sharded_base(models: Path, tmp_path: Path) -> None:
    """A sharded base written at 1GB: one model.safetensors, and no index (the base's names other files)."""
    base = models / "llama_sharded"
    program = pemlang.compile("a", inputs={"a": models / "a"}, device="cpu")
    program.save(tmp_path / "m", into=base, max_shard_size="1GB")
    assert sorted(p.name for p in (tmp_path / "m").iterdir()) == ["README.md", "config.json", "generation_config.json",
                                                                  "model.safetensors"]
    assert_matches(state(tmp_path / "m"), peft_merged(base, models / "a"), state(base))


@pytest.mark.parametrize("size", ["0", "-1", "1e30", "abc", "", "0.1", "99999999999999999999TB", "5 parsecs"])
def test_max_shard_size_hostile_values_are_misuse(models: Path, tmp_path: Path, size: str,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exited:
        main(["eval", "--input", f"a={models / 'a'}", "--out", str(tmp_path / "m"), "--into", str(models / "llama"),
              f"--max-shard-size={size}", "--", "a"])
    assert exited.value.code == 2 and "--max-shard-size" in capsys.readouterr().err
    assert not (tmp_path / "m").exists()


def test_max_shard_size_needs_a_full_model(models: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["eval", "--input", f"a={models / 'a'}", "--out", str(tmp_path / "m"), "--max-shard-size", "2GB",
                 "--", "a"]) == 2
    assert "full model" in capsys.readouterr().err
    program = tmp_path / "p.pem"
    program.write_text(f'param lam = 1\ninput a = "{models / "a"}"\noutput lam*a into "{models / "llama"}" -> "m"\n')
    assert main(["run", str(program), "--sweep", "lam=0.5,1", "--max-shard-size", "2GB"]) == 2
    api = pemlang.compile("a", inputs={"a": models / "a"}, device="cpu")
    for bad in (0, -5, True, 1.5, "abc", "1e30"):
        with pytest.raises(ValueError):
            api.save(tmp_path / "m", into=models / "llama", max_shard_size=bad)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="full model"):
        api.save(tmp_path / "m", max_shard_size="1GB")
    assert not (tmp_path / "m").exists() and not list(tmp_path.glob("m.*"))


# -- inspect ---------------------------------------------------------------------------------------


def test_inspect_shows_a_merged_models_provenance(models: Path, tmp_path: Path,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    import hashlib

    from safetensors.torch import save_file

    assert main(["eval", "--mode", "exact", "--input", f"a={models / 'a'}", "--out", str(tmp_path / "m"),
                 "--into", str(models / "llama_sharded"), "--", "0.5*a"]) == 0
    capsys.readouterr()
    assert main(["inspect", str(tmp_path / "m")]) == 0
    out = capsys.readouterr().out
    sha = hashlib.sha256((models / "a" / "adapter_model.safetensors").read_bytes()).hexdigest()
    assert "made by pemlang" in out and "0.5*a" in out and "exact" in out and sha[:16] in out
    assert str(models / "llama_sharded") in out and "tiny-org/tiny-llama" in out and "LlamaForCausalLM" in out
    assert "every one of the" in out
    shard = sorted((tmp_path / "m").glob("*.safetensors"))[2]  # one shard replaced: said, not hidden
    with safe_open(str(shard), "pt") as opened:
        meta = {**opened.metadata(), "pemlang.expression": "a"}
    save_file(load_file(shard), shard, metadata=meta)
    assert main(["inspect", str(tmp_path / "m")]) == 0
    assert "disagree on pemlang.expression" in capsys.readouterr().out
    assert main(["inspect", str(models / "llama")]) == 0
    assert "not merged by pemlang" in capsys.readouterr().out
    shard.write_bytes(shard.read_bytes()[:100])  # a damaged model: a diagnostic, not a traceback
    assert main(["inspect", str(tmp_path / "m")]) == 1
    err = capsys.readouterr().err
    assert "error[E035]" in err and "Traceback" not in err


# -- bases on the Hub ------------------------------------------------------------------------------


@pytest.fixture()
def hub_cache(models: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A Hugging Face cache (offline) holding the sharded Llama as tiny-org/tiny-llama at commit c…c."""
    from huggingface_hub import constants
    from test_hub import cache_repo

    cache = tmp_path / "hf-cache"
    base = models / "llama_sharded"
    cache_repo(cache, "tiny-org/tiny-llama", "c" * 40, {p.name: p for p in base.iterdir()}, refs=("main", "v1"))
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return cache


@pytest.mark.parametrize("written", ["hf://tiny-org/tiny-llama", "hf://tiny-org/tiny-llama@v1",
                                     f"hf://tiny-org/tiny-llama@{'c' * 40}"])
def test_a_hub_base_through_the_cache(models: Path, tmp_path: Path, hub_cache: Path, written: str,
                                      capsys: pytest.CaptureFixture[str]) -> None:
    program = tmp_path / "p.pem"
    program.write_text(f'input a = "{models / "a"}"\noutput a into "{written}" -> "m"\n', encoding="utf-8")
    assert main(["check", str(program)]) == 0
    assert "W008" not in capsys.readouterr().err  # the inputs record tiny-org/tiny-llama: the same model
    assert main(["run", str(program), "--device", "cpu"]) == 0
    base = models / "llama_sharded"
    assert_matches(state(tmp_path / "m"), peft_merged(base, models / "a"), state(base))
    with safe_open(str(sorted((tmp_path / "m").glob("*.safetensors"))[0]), "pt") as opened:
        meta = opened.metadata()
    assert meta["pemlang.into"] == f"hf://tiny-org/tiny-llama@{'c' * 40}"
    assert meta["pemlang.base_model"] == f"tiny-org/tiny-llama@{'c' * 40}"
    assert "base_model: tiny-org/tiny-llama" in (tmp_path / "m" / "README.md").read_text()


def test_hub_bases_that_cannot_be_used(models: Path, tmp_path: Path, hub_cache: Path,
                                       capsys: pytest.CaptureFixture[str]) -> None:
    from test_hub import cache_repo

    cache_repo(hub_cache, "tiny-org/pickled", "d" * 40, {"config.json": models / "llama" / "config.json",
                                                         "pytorch_model.bin": models / "llama" / "config.json"})
    cache_repo(hub_cache, "tiny-org/torn", "e" * 40, {"config.json": models / "llama_sharded" / "config.json",
                                                      "model.safetensors.index.json":
                                                          models / "llama_sharded" / "model.safetensors.index.json"})
    for written, code, message in (("hf://tiny-org/absent", "E035", "not in the Hugging Face cache"),
                                   ("hf://tiny-org/tiny-llama@v9", "E035", "not in the Hugging Face cache"),
                                   ("hf://not a repo", "E035", "is not a Hub id"),
                                   ("hf://tiny-org/pickled", "E023", "weights are pickled"),
                                   ("hf://tiny-org/torn", "E035", "is missing")):
        program = tmp_path / "p.pem"
        program.write_text(f'input a = "{models / "a"}"\noutput a into "{written}" -> "m"\n', encoding="utf-8")
        assert main(["run", str(program), "--device", "cpu"]) == 1, written
        err = capsys.readouterr().err
        assert f"error[{code}]" in err and message in err and "Traceback" not in err, (written, err)
    assert not (tmp_path / "m").exists()


def test_only_config_tokenizer_and_weight_files_are_fetched() -> None:
    from huggingface_hub.utils import filter_repo_objects

    from pemlang.hub import MODEL_FILES

    repo = ["config.json", "generation_config.json", "model.safetensors.index.json", "model-00001-of-00002.safetensors",
            "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model", "README.md",
            "pytorch_model.bin", "pytorch_model-00001-of-00002.bin", "flax_model.msgpack", "tf_model.h5",
            "model.gguf", "onnx/model.onnx", "original/consolidated.00.pth", ".gitattributes"]
    kept = sorted(filter_repo_objects(repo, allow_patterns=list(MODEL_FILES)))
    assert kept == sorted(["config.json", "generation_config.json", "model.safetensors.index.json",
                           "model-00001-of-00002.safetensors", "tokenizer.json", "tokenizer_config.json",
                           "special_tokens_map.json", "tokenizer.model"])
