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


def test_load_into_a_path_loads_the_base_as_tune_does(adapters: Path, tmp_path: Path) -> None:
    """A path is the base model's directory: loaded with transformers, then the output put in; the
    result is the model `load_into` gives for the loaded model itself."""
    from peft_factory import base_model

    base_model().save_pretrained(tmp_path / "base")
    program = pemlang.compile("0.5*a + 0.5*b", inputs={"a": adapters / "llama_r8", "b": adapters / "llama_r8_b"},
                              device="cpu")
    from_path = program.load_into(str(tmp_path / "base"))
    from_model = program.load_into(base_model())
    ids = torch.arange(1, 17).reshape(2, 8)
    with torch.no_grad():
        assert torch.equal(from_path(input_ids=ids).logits, from_model(input_ids=ids).logits)
        assert not torch.allclose(from_path(input_ids=ids).logits, base_model()(input_ids=ids).logits)
    assert from_path.active_adapter == "pemlang"
    with pytest.raises(FileNotFoundError, match="no such directory: nowhere"):
        program.load_into("nowhere")
    with pytest.raises(FileNotFoundError, match="no config.json"):
        program.load_into(adapters / "llama_r8")  # an adapter, not a model


def test_load_into_a_model_of_another_width_names_the_layer_and_shapes(adapters: Path) -> None:
    from peft import PeftModel
    from peft_factory import base_model

    program = pemlang.compile("a", inputs={"a": adapters / "llama_r8"}, device="cpu")
    wide = base_model(hidden=48)
    with pytest.raises(pemlang.CompileError) as caught:
        program.load_into(wide)
    [diagnostic] = caught.value.diagnostics
    assert diagnostic.code == "E009"
    # the A of k_proj (first in key order) is r×hidden: 8×32 in the output, 8×48 in the model
    assert diagnostic.message == ("the model does not fit this output: model.layers.0.self_attn.k_proj.lora_A.weight "
                                  "is 8×32 in the output, 8×48 in the model")
    assert "tiny-org/tiny-llama" in " ".join(diagnostic.hints)
    assert "size mismatch" not in str(caught.value)
    assert not any("lora" in name for name, _ in wide.named_modules())  # the model is left as it was given
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        other = PeftModel.from_pretrained(base_model(hidden=48), adapters / "llama_wide_no_base", adapter_name="w")
    with pytest.raises(pemlang.CompileError):
        program.load_into(other)
    assert list(other.peft_config) == ["w"] and other.active_adapter == "w"
