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


def test_the_card_quotes_paths_as_text(adapters: Path, tmp_path: Path) -> None:
    """What the card quotes (here an input path holding a CR, HTML, Markdown and an escape) stays
    one table cell and renders as the text it is: checked on the HTML of a CommonMark renderer
    with tables and raw HTML on, as the Hub renders cards."""
    import html
    import re
    import shutil

    from markdown_it import MarkdownIt

    name = "in\r<b>bold</b>|pipe `tick` *star* [link](javascript:alert(1)) &amp; \\ \x1b[31m"
    shutil.copytree(adapters / "llama_r8", tmp_path / name)
    [out] = pemlang.compile("2*a", inputs={"a": tmp_path / name}).save(tmp_path / "out")
    card = (out / "README.md").read_text(encoding="utf-8")
    assert "\r" not in card and "\x1b" not in card
    rendered = MarkdownIt("commonmark").enable("table").render(card)
    [table] = re.findall(r"<table>.*?</table>", rendered, flags=re.S)
    rows = re.findall(r"<tr>(.*?)</tr>", table, flags=re.S)
    assert len(rows) == 2  # the header and the one input
    cells = re.findall(r"<td>(.*?)</td>", rows[1], flags=re.S)
    assert len(cells) == 3 and cells[0] == "a"
    assert "<" not in cells[1]  # no element: no bold, link, emphasis or code made of the path
    assert html.unescape(cells[1]) == str(tmp_path / name).replace("\r", "\\r").replace("\x1b", "\\x1b")
