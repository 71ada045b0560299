"""`Program.load_into`: the README's API snippet loads its result into a model without PEFT's
"base_model_name_or_path was renamed" warning, while written outputs record the base as the inputs did."""

from __future__ import annotations

import contextlib
import io
import json
import re
import warnings
from pathlib import Path

import pytest
import torch

import pemlang

README = Path(__file__).resolve().parent.parent / "README.md"


def test_readme_api_snippet_does_not_warn(example_root: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    [snippet] = [s for s in re.findall(r"```python\n(.*?)```", README.read_text(encoding="utf-8"), flags=re.S)
                 if "load_into" in s]
    monkeypatch.chdir(example_root)
    with warnings.catch_warnings(record=True) as caught, contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("always")
        exec(compile(snippet, "README.md", "exec"), {})  # noqa: S102
    assert [f"{w.category.__name__}: {w.message}" for w in caught] == []
    inputs = json.loads((example_root / "examples/adapters/instruct/adapter_config.json").read_text())
    written = json.loads((example_root / "examples/out/detoxified/adapter_config.json").read_text())
    assert written["base_model_name_or_path"] == inputs["base_model_name_or_path"] == "pemlang-examples/tiny-llama"


def test_load_into_records_the_model_it_was_loaded_into(example_root: Path) -> None:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base_dir = example_root / "examples" / "adapters" / "base"
    program = pemlang.load(example_root / "examples" / "detoxify.pem", device="cpu")
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*base_model_name_or_path.*")
        model = program.load_into(AutoModelForCausalLM.from_pretrained(base_dir), λ=0.3)
        again = program.load_into(model, λ=0.6, adapter_name="second")  # into a PeftModel: add_adapter
        anonymous = AutoModelForCausalLM.from_config(AutoModelForCausalLM.from_pretrained(base_dir).config)
        program.load_into(anonymous, λ=0.3)  # a model built from a config has no name_or_path
    assert isinstance(again, PeftModel) and again.active_adapter == "second"
    # PEFT records the model it wraps, as get_peft_model does for any model
    assert model.peft_config["pemlang"].base_model_name_or_path == str(base_dir)
    layer = model.base_model.model.model.layers[0].self_attn.q_proj
    assert not torch.allclose(layer.get_delta_weight("pemlang"), layer.get_delta_weight("second"))
