"""Every example program runs on adapters made by examples/make_adapters.py, and the domain
transfer result loads in PEFT and equals the paper's formula."""

from __future__ import annotations

import contextlib
import io
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from pemlang.cli import main

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
PROGRAMS = sorted(p.name for p in EXAMPLES.glob("*.pem"))


@pytest.fixture(scope="module")
def workdir(example_root: Path) -> Path:
    return example_root / "examples"


@pytest.mark.parametrize("program", PROGRAMS)
def test_example_runs(workdir: Path, program: str) -> None:
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        status = main(["run", str(workdir / program), "--device", "cpu", "--force"])
    assert status == 0, err.getvalue()
    assert "warning" not in err.getvalue(), err.getvalue()


def test_domain_transfer_is_the_formula_and_loads(workdir: Path) -> None:
    with contextlib.redirect_stderr(io.StringIO()), contextlib.redirect_stdout(io.StringIO()):
        assert main(["run", str(workdir / "domain_transfer.pem"), "--device", "cpu", "--force",
                     "--set", "λ=0.3"]) == 0
    out = load_file(str(workdir / "out" / "yelp_cls" / "adapter_model.safetensors"))
    cls, ylm, alm = (load_file(str(workdir / "adapters" / n / "adapter_model.safetensors"))
                     for n in ("amazon_cls", "yelp_lm", "amazon_lm"))
    lam = 0.3
    for key in cls:
        if key.endswith("lora_A.weight"):  # A = λ·A_cls + (1−λ)·A_yelp + (1−λ)·A_amazon
            expected = lam * cls[key] + (1 - lam) * ylm[key] + (1 - lam) * alm[key]
        elif key.endswith("lora_B.weight"):  # B = λ·B_cls + (1−λ)·B_yelp − (1−λ)·B_amazon (equal scalings)
            expected = lam * cls[key] + (1 - lam) * ylm[key] - (1 - lam) * alm[key]
        else:  # heads from amazon_cls
            expected = cls[key]
        assert torch.allclose(out[key], expected, atol=1e-6), key
    from peft import PeftModel
    from transformers import LlamaForSequenceClassification

    base = LlamaForSequenceClassification.from_pretrained(workdir / "adapters" / "base", num_labels=2)
    model = PeftModel.from_pretrained(base, workdir / "out" / "yelp_cls")
    assert torch.equal(model.base_model.model.score.modules_to_save["default"].weight, cls["base_model.model.score.weight"])


def test_the_readmes_merge_into_the_base_runs_as_printed(example_root: Path) -> None:
    """The README's "Merging into the base model" block is examples/into_base.pem, and `pemlang run`
    of it from the repository root prints the line the README shows; transformers loads the model."""
    import os
    import re

    from readme_blocks import REPO, program_block
    from transformers import AutoModelForCausalLM

    block = program_block("## Merging into the base model")
    program = (EXAMPLES / "into_base.pem").read_text(encoding="utf-8")
    assert [line[4:] for line in block.splitlines()] == [line for line in program.splitlines()
                                                         if line and not line.startswith("#")]
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    shown = re.search(r"\n    \$ pemlang run examples/into_base.pem\n    (wrote .*)\n", readme)
    assert shown is not None
    out = io.StringIO()
    cwd = os.getcwd()
    os.chdir(example_root)
    try:
        with contextlib.redirect_stderr(io.StringIO()), contextlib.redirect_stdout(out):
            assert main(["run", "examples/into_base.pem", "--device", "cpu", "--force"]) == 0
    finally:
        os.chdir(cwd)
    assert out.getvalue().splitlines()[0] == shown.group(1)
    model = AutoModelForCausalLM.from_pretrained(str(example_root / "examples" / "out" / "merged_model"))
    assert type(model).__name__ == "LlamaForCausalLM"
