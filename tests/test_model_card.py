"""Every output directory has a README.md model card in the Hub's convention, parsed back with
huggingface_hub's own ModelCard: base_model, library_name peft, tags, the program, each input with
its sha256, the params and a loading snippet."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

import pemlang


def test_the_card_of_a_run(adapters: Path, tmp_path: Path) -> None:
    from huggingface_hub import ModelCard

    program_text = (f'input a = "{adapters / "llama_r8"}"\ninput b = "{adapters / "llama_r8_b"}"\nparam lam = 0.25\n'
                    f'mix = lam*a + (1 - lam)*b   # a comment with ``` fences | and a pipe\n'
                    f'output mix -> "{tmp_path / "mix"}"\n')
    [written] = pemlang.compile(text=program_text).save()
    card = ModelCard.load(written / "README.md")
    assert card.data.base_model == "tiny-org/tiny-llama"
    assert card.data.library_name == "peft" and card.data.tags == ["pemlang", "lora", "merge"]
    text = card.text
    assert "lam*a + (1 - lam)*b" in text and "`lam = 0.25`" in text
    for name in ("llama_r8", "llama_r8_b"):
        digest = hashlib.sha256((adapters / name / "adapter_model.safetensors").read_bytes()).hexdigest()
        assert digest in text
    assert "````" in text  # the program holds a ``` run: its fence is longer
    assert "PeftModel.from_pretrained(base, " in text and "AutoModelForCausalLM" in text
    # Deterministic: the same program and inputs give the same card.
    [again] = pemlang.compile(text=program_text.replace(str(tmp_path / "mix"), str(tmp_path / "mix2"))).save()
    assert (again / "README.md").read_text() == (written / "README.md").read_text().replace("mix\"", "mix2\"")


def test_the_card_of_a_classifier_and_of_ia3(adapters: Path, tmp_path: Path) -> None:
    from huggingface_hub import ModelCard

    [cls] = pemlang.compile("0.5*a + 0.5*b", inputs={"a": adapters / "llama_cls", "b": adapters / "llama_cls_b"}).save(
        tmp_path / "cls")
    assert "AutoModelForSequenceClassification" in ModelCard.load(cls / "README.md").text
    [ia3] = pemlang.compile("a + b", inputs={"a": adapters / "llama_ia3", "b": adapters / "llama_ia3_b"}).save(
        tmp_path / "ia3")
    assert ModelCard.load(ia3 / "README.md").data.tags == ["pemlang", "ia3", "merge"]


@pytest.mark.parametrize("recorded", [None])
def test_no_base_no_base_model_field(adapters: Path, tmp_path: Path, recorded: None) -> None:
    from huggingface_hub import ModelCard

    [out] = pemlang.compile("a", inputs={"a": adapters / "llama_no_base"}).save(tmp_path / "o")
    card = ModelCard.load(out / "README.md")
    assert card.data.base_model is recorded and "BASE_MODEL" in card.text
