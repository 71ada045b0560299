"""Heads (modules_to_save) that are whole sub-trees, as PEFT saves them: RoBERTa's SEQ_CLS
`classifier` (dense + out_proj) and a BERT masked-LM `cls.predictions.transform` (dense +
LayerNorm). Outputs are loaded with PEFT and compared, logits for logits, with the base model to
which the expected ΔW and heads were applied by hand (the oracle reads files with safetensors)."""

from __future__ import annotations

import contextlib
import io
import json
import warnings
from pathlib import Path

import pytest
import torch
from peft_factory import BERT_BASE, ROBERTA_BASE, base_model
from safetensors import safe_open
from safetensors.torch import load_file

from pemlang.adapters import read_adapter
from pemlang.cli import main

PREFIX = "base_model.model."
TOKENS = torch.tensor([[1, 5, 9, 13, 2, 40, 7, 3], [1, 22, 18, 63, 4, 4, 11, 2]])


def cli(*args: str) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(out):
        status = main(list(args))
    return status, out.getvalue(), err.getvalue()


def run_program(tmp_path: Path, adapters: Path, body: str) -> Path:
    """Run a program whose inputs are `adapters/NAME` and whose output is `out`; return `out`."""
    program = tmp_path / "program.pem"
    program.write_text(body.replace("ADAPTERS", str(adapters)), encoding="utf-8")
    status, _, err = cli("run", str(program), "--device", "cpu")
    assert status == 0, err
    return tmp_path / "out"


def tensors(adapter_dir: Path) -> dict[str, torch.Tensor]:
    return {k.removeprefix(PREFIX): v.float() for k, v in
            load_file(str(adapter_dir / "adapter_model.safetensors")).items()}


def saved_keys(adapter_dir: Path) -> set[str]:
    with safe_open(str(adapter_dir / "adapter_model.safetensors"), framework="pt") as f:
        return {k.removeprefix(PREFIX) for k in f.keys()}  # noqa: SIM118 (safe_open is not a dict)


def paper_oracle(arch: str, task: str, inputs: dict[Path, float], heads: dict[Path, float]):  # type: ignore[no-untyped-def]
    """The base model with ΔW = s·(Σ beta_i B_i)(Σ alpha_i A_i) added (alpha = beta here, equal
    scalings) and every head tensor set to Σ w_j H_j, written out by hand."""
    name = ROBERTA_BASE if arch == "roberta" else BERT_BASE
    model = base_model(arch, task=task, name=name)
    loaded = {path: tensors(path) for path in {*inputs, *heads}}
    first = next(iter(inputs))
    config = json.loads((first / "adapter_config.json").read_text())
    scaling = config["lora_alpha"] / config["r"]
    params = dict(model.named_parameters())
    with torch.no_grad():
        layers = {k.removesuffix(".lora_A.weight") for k in loaded[first] if k.endswith(".lora_A.weight")}
        for layer in layers:
            a = sum(c * loaded[p][f"{layer}.lora_A.weight"] for p, c in inputs.items())
            b = sum(c * loaded[p][f"{layer}.lora_B.weight"] for p, c in inputs.items())
            params[f"{layer}.weight"] += scaling * (b @ a)
        if heads:
            head_keys = {k for k in loaded[next(iter(heads))] if ".lora_" not in k}
            for key in head_keys:
                params[key].copy_(sum(w * loaded[p][key] for p, w in heads.items()))
    return model


def peft_logits(arch: str, task: str, adapter_dir: Path) -> torch.Tensor:
    from peft import PeftModel

    name = ROBERTA_BASE if arch == "roberta" else BERT_BASE
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = PeftModel.from_pretrained(base_model(arch, task=task, name=name), adapter_dir)
    model.eval()
    with torch.no_grad():
        return model(input_ids=TOKENS).logits


def oracle_logits(model) -> torch.Tensor:  # type: ignore[no-untyped-def]
    model.eval()
    with torch.no_grad():
        return model(input_ids=TOKENS).logits


# -- reading ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(("name", "module", "parts"), [
    ("roberta_cls", "classifier", {"dense", "out_proj"}),
    ("bert_mlm", "cls.predictions.transform", {"dense", "LayerNorm"})])
def test_heads_are_whole_subtrees(adapters: Path, name: str, module: str, parts: set[str]) -> None:
    adapter = read_adapter(adapters / name)
    assert adapter.unsupported == ()
    expected = {k for k in saved_keys(adapters / name) if ".lora_" not in k}
    assert {p.split(".")[-2] for p in expected} == parts  # what PEFT really wrote
    assert set(adapter.type.heads) == expected
    assert {h.module for h in adapter.type.heads.values()} == {module}
    assert adapter.type.head_modules == {module: tuple(sorted(expected))}


def test_inspect_counts_head_modules_and_lists_tensors(adapters: Path) -> None:
    status, out, _ = cli("inspect", str(adapters / "roberta_cls"))
    assert status == 0
    assert "1 head (classifier, 4 tensors)" in " ".join(out.split())
    for key in ("classifier.dense.weight", "classifier.dense.bias", "classifier.out_proj.weight",
                "classifier.out_proj.bias"):
        assert key in out


# -- composing, and loading the result in PEFT ------------------------------------------------------


def test_roberta_classifier_heads_mix_and_load_in_peft(adapters: Path, tmp_path: Path) -> None:
    a, b = adapters / "roberta_cls", adapters / "roberta_cls_b"
    out = run_program(tmp_path, adapters, 'input a = "ADAPTERS/roberta_cls"\ninput b = "ADAPTERS/roberta_cls_b"\n'
                                          'output 0.3*a + 0.7*b -> "out"\n')
    assert saved_keys(out) == saved_keys(a)
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["task_type"] == "SEQ_CLS"
    expected = oracle_logits(paper_oracle("roberta", "cls", {a: 0.3, b: 0.7}, {a: 0.3, b: 0.7}))
    torch.testing.assert_close(peft_logits("roberta", "cls", out), expected, rtol=1e-5, atol=1e-6)


def test_bert_mlm_transform_heads_mix_and_load_in_peft(adapters: Path, tmp_path: Path) -> None:
    a, b = adapters / "bert_mlm", adapters / "bert_mlm_b"
    out = run_program(tmp_path, adapters, 'input a = "ADAPTERS/bert_mlm"\ninput b = "ADAPTERS/bert_mlm_b"\n'
                                          'output 0.5*a + 0.5*b -> "out"\n')
    assert saved_keys(out) == saved_keys(a)
    assert json.loads((out / "adapter_config.json").read_text())["modules_to_save"] == ["cls.predictions.transform"]
    expected = oracle_logits(paper_oracle("bert", "lm", {a: 0.5, b: 0.5}, {a: 0.5, b: 0.5}))
    torch.testing.assert_close(peft_logits("bert", "lm", out), expected, rtol=1e-5, atol=1e-6)


def test_heads_from_takes_the_whole_subtree(adapters: Path, tmp_path: Path) -> None:
    b = adapters / "roberta_cls_b"
    out = run_program(tmp_path, adapters, 'input a = "ADAPTERS/roberta_cls"\ninput b = "ADAPTERS/roberta_cls_b"\n'
                                          'heads from b\noutput a - 0.5*b -> "out"\n')
    heads = {k: v for k, v in tensors(out).items() if ".lora_" not in k}
    original = {k: v for k, v in tensors(b).items() if ".lora_" not in k}
    assert heads.keys() == original.keys() and len(heads) == 4
    for key, value in original.items():
        assert torch.equal(heads[key], value)


# -- the output's config follows the heads' owner ---------------------------------------------------

TRANSFER = ('input rest_lm = "ADAPTERS/roberta_lm_b"\ninput prod_lm = "ADAPTERS/roberta_lm"\n'
            'input prod_cls = "ADAPTERS/roberta_cls"\nparam lam = 0.4\nHEADS\n'
            'output (1-lam)*(rest_lm - prod_lm) + lam*prod_cls -> "out"\n')


def auto_peft_cls(adapter_dir: Path, monkeypatch: pytest.MonkeyPatch):  # type: ignore[no-untyped-def]
    """AutoPeftModelForSequenceClassification.from_pretrained(adapter_dir), with the base model's
    own from_pretrained (a download) replaced by the tiny seeded base of the class PEFT chose."""
    import transformers
    from peft import AutoPeftModelForSequenceClassification

    def local(model_class, task: str):  # type: ignore[no-untyped-def]
        def from_pretrained(*args, **kwargs):  # type: ignore[no-untyped-def]
            return base_model("roberta", task=task, name=ROBERTA_BASE)
        monkeypatch.setattr(model_class, "from_pretrained", from_pretrained)

    local(transformers.AutoModelForSequenceClassification, "cls")
    local(transformers.RobertaForMaskedLM, "lm")  # where a masked-LM auto_mapping would lead
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return AutoPeftModelForSequenceClassification.from_pretrained(str(adapter_dir))


def test_config_follows_heads_from(adapters: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from peft import PeftModelForSequenceClassification
    from transformers import RobertaForSequenceClassification

    out = run_program(tmp_path, adapters, TRANSFER.replace("HEADS", "heads from prod_cls"))
    cls_config = json.loads((adapters / "roberta_cls" / "adapter_config.json").read_text())
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["task_type"] == cls_config["task_type"] == "SEQ_CLS"
    assert config["auto_mapping"] == cls_config["auto_mapping"]
    assert config["modules_to_save"] == cls_config["modules_to_save"]
    loaded_model = auto_peft_cls(out, monkeypatch)
    assert isinstance(loaded_model, PeftModelForSequenceClassification)
    assert isinstance(loaded_model.get_base_model(), RobertaForSequenceClassification)
    # The oracle, paper mode written out: alpha = (0.6, 0.6, 0.4), beta = (0.6, -0.6, 0.4), s = 2.
    lm, lm_b, cls_dir = adapters / "roberta_lm", adapters / "roberta_lm_b", adapters / "roberta_cls"
    model = base_model("roberta", task="cls", name=ROBERTA_BASE)
    loaded = {p: tensors(p) for p in (lm, lm_b, cls_dir)}
    params = dict(model.named_parameters())
    with torch.no_grad():
        for layer in {k.removesuffix(".lora_A.weight") for k in loaded[lm] if k.endswith(".lora_A.weight")}:
            a = 0.6 * loaded[lm_b][f"{layer}.lora_A.weight"] + 0.6 * loaded[lm][f"{layer}.lora_A.weight"] \
                + 0.4 * loaded[cls_dir][f"{layer}.lora_A.weight"]
            b = 0.6 * loaded[lm_b][f"{layer}.lora_B.weight"] - 0.6 * loaded[lm][f"{layer}.lora_B.weight"] \
                + 0.4 * loaded[cls_dir][f"{layer}.lora_B.weight"]
            params[f"{layer}.weight"] += 2.0 * (b @ a)
        for key, value in loaded[cls_dir].items():
            if ".lora_" not in key:
                params[key].copy_(value)
    loaded_model.eval()
    with torch.no_grad():
        actual = loaded_model(input_ids=TOKENS).logits
    torch.testing.assert_close(actual, oracle_logits(model), rtol=1e-5, atol=1e-6)


def test_heads_drop_states_the_task_type(adapters: Path, tmp_path: Path) -> None:
    out = run_program(tmp_path, adapters, TRANSFER.replace("HEADS", "heads drop"))
    config = json.loads((out / "adapter_config.json").read_text())
    lm_config = json.loads((adapters / "roberta_lm_b" / "adapter_config.json").read_text())
    assert config["modules_to_save"] is None
    assert config["task_type"] == lm_config["task_type"]
    assert config["auto_mapping"] == lm_config["auto_mapping"]


def test_inputs_of_different_tasks_warn_w004(adapters: Path, tmp_path: Path) -> None:
    def check(heads: str) -> str:
        program = tmp_path / "program.pem"
        program.write_text(TRANSFER.replace("ADAPTERS", str(adapters)).replace("HEADS", heads), encoding="utf-8")
        status, _, err = cli("check", str(program))
        assert status == 0, err
        return " ".join(err.split())

    dropped = check("heads drop")
    assert "warning[W004]" in dropped
    assert "prod_cls: task type SEQ_CLS" in dropped
    assert "the output takes task type not recorded and architecture RobertaForMaskedLM from `rest_lm`" in dropped
    assert "W004" not in check("heads from prod_cls")  # stated by the program: the output takes prod_cls's
    same = tmp_path / "same.pem"
    same.write_text(f'input a = "{adapters}/roberta_cls"\ninput b = "{adapters}/roberta_cls_b"\n'
                    'output 0.5*a + 0.5*b -> "out2"\n', encoding="utf-8")
    status, _, err = cli("check", str(same))
    assert status == 0 and "W004" not in err


# -- heads under the functions: they follow what each function computes ------------------------------


def _heads_of(adapter_dir: Path) -> dict[str, torch.Tensor]:
    return {k: v for k, v in tensors(adapter_dir).items() if ".lora_" not in k}


@pytest.mark.parametrize(("expression", "weights"), [
    ("svd(ties(a, b, density=0.2), rank=8)", {"a": 0.5, "b": 0.5}),  # ties is the mean of its arguments
    ("svd(ties(0.6*a, 1.4*b, density=0.5, sign=\"frequency\"), rank=8)", {"a": 0.3, "b": 0.7}),
    ("svd(0.5*ties(a, b, density=1) + 0.5*prune(b, density=0.3), rank=8)", {"a": 0.25, "b": 0.75}),
    ("svd(prune(a, density=0.3), rank=8)", {"a": 1.0}),  # keeps x: its heads as they are
    ("svd(dare(a, p=0.5, seed=3), rank=8)", {"a": 1.0}),  # x on average
])
def test_heads_under_functions_follow_what_they_compute(adapters: Path, tmp_path: Path, expression: str,
                                                        weights: dict[str, float]) -> None:
    paths = {"a": adapters / "llama_cls", "b": adapters / "llama_cls_b"}
    out = run_program(tmp_path, adapters, 'mode exact\ninput a = "ADAPTERS/llama_cls"\n'
                      'input b = "ADAPTERS/llama_cls_b"\n' + f'output {expression} -> "out"\n')
    written = _heads_of(out)
    inputs = {name: _heads_of(path) for name, path in paths.items()}
    assert written.keys() == inputs["a"].keys() and written  # the score head, whole
    for key, value in written.items():
        expected = sum(w * inputs[name][key] for name, w in weights.items())
        torch.testing.assert_close(value, expected, rtol=1e-6, atol=1e-7)


def test_heads_under_ties_with_weights_that_do_not_average_to_one(adapters: Path, tmp_path: Path) -> None:
    program = tmp_path / "program.pem"
    program.write_text(f'mode exact\ninput a = "{adapters}/llama_cls"\ninput b = "{adapters}/llama_cls_b"\n'
                       'output svd(ties(0.5*a, 0.5*b, density=0.2), rank=8) -> "out"\n', encoding="utf-8")
    status, _, err = cli("check", str(program))
    assert status == 1
    assert "error[E022]: heads (modules_to_save) mix only as a convex combination" in err
    assert "coefficients: a 0.25, b 0.25 (sum 0.5)" in err
    assert "ties(0.5*a, 0.5*b, density=0.2) is the mean of its arguments: so are their heads" in err


def test_heads_mix_states_the_default_and_is_documented(adapters: Path, tmp_path: Path) -> None:
    """The grammar error for `heads` lists 'mix': it is the default convex mix, said explicitly,
    and the README says so."""
    body = 'input a = "ADAPTERS/roberta_cls"\ninput b = "ADAPTERS/roberta_cls_b"\n{}output 0.3*a + 0.7*b -> "out"\n'
    (tmp_path / "stated").mkdir()
    (tmp_path / "default").mkdir()
    stated = run_program(tmp_path / "stated", adapters, body.format("heads mix\n"))
    default = run_program(tmp_path / "default", adapters, body.format(""))
    assert load_file(str(stated / "adapter_model.safetensors")).keys() == \
        load_file(str(default / "adapter_model.safetensors")).keys()
    assert all(torch.equal(x, y) for x, y in zip(tensors(stated).values(), tensors(default).values(), strict=True))
    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text(encoding="utf-8")
    assert "`heads mix` states the default" in readme
