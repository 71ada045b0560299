"""`output EXPR into "BASE" -> "DIR"` (SPEC §5.2): a full model, the module merged into its base.

The oracle is PEFT's own merge: `PeftModel.from_pretrained(base, adapter).merge_and_unload()` on the
base loaded in fp32, then cast to the base's dtype, where the adapter is the input itself or the
adapter pemlang writes for the same expression (`-> DIR` without `into`), so the merge is checked
against PEFT whatever the arithmetic; one case also against the plain fp64 formula W + Σ β·s·B·A.
The written directory is loaded by transformers and its logits compared with PeftModel's."""

from __future__ import annotations

import json
import shutil
import struct
import warnings
from pathlib import Path

import pytest
import torch
from peft_factory import GPT2_BASE, ROBERTA_BASE, encoders, lora, save, save_base
from safetensors import safe_open
from safetensors.torch import load_file

from pemlang.cli import main


def pemlang(*args: str) -> int:
    return main([*args])


def run_program(tmp: Path, text: str, *extra: str) -> int:
    program = tmp / "merge.pem"
    program.write_text(text, encoding="utf-8")
    return main(["run", str(program), "--device", "cpu", *extra])


def state(directory: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a model directory's safetensors files."""
    tensors: dict[str, torch.Tensor] = {}
    for file in sorted(directory.glob("*.safetensors")):
        tensors.update(load_file(file))
    return tensors


def peft_merged(base_dir: Path, adapter: Path, *, arch: str = "llama", task: str = "lm") -> dict[str, torch.Tensor]:
    """PEFT's merge_and_unload of `adapter` into the base loaded in fp32, cast back to the base's dtypes."""
    from peft import PeftModel

    model = _load(base_dir, arch, task, dtype=torch.float32)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        merged = PeftModel.from_pretrained(model, str(adapter)).merge_and_unload()
    stored = state(base_dir)
    return {k: v.to(stored[k].dtype) for k, v in merged.state_dict().items() if k in stored}


def _load(directory: Path, arch: str, task: str, dtype=None):  # type: ignore[no-untyped-def]
    from transformers import (
        AutoModelForCausalLM,
        AutoModelForMaskedLM,
        AutoModelForSequenceClassification,
    )

    loader = {"lm": AutoModelForMaskedLM if arch in ("roberta", "bert") else AutoModelForCausalLM,
              "cls": AutoModelForSequenceClassification}[task]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return loader.from_pretrained(str(directory), **({"dtype": dtype} if dtype is not None else {})).eval()


def assert_matches(ours: dict[str, torch.Tensor], oracle: dict[str, torch.Tensor], base: dict[str, torch.Tensor],
                   *, ulps: int = 0) -> None:
    """Same tensors; each equal to the oracle's within `ulps` units in the last place of its dtype
    (fp32 rounding of two orders of the same sums), and untouched tensors byte for byte the base's."""
    assert set(ours) == set(base)
    changed = 0
    for key, tensor in ours.items():
        assert tensor.dtype == base[key].dtype and tensor.shape == base[key].shape, key
        expected = oracle[key]
        if ulps == 0:
            assert torch.equal(tensor, expected), key
        else:
            spacing = torch.finfo(tensor.dtype).eps * expected.float().abs().clamp_min(1e-3)
            assert bool(((tensor.float() - expected.float()).abs() <= ulps * spacing + 1e-7).all()), key
        if torch.equal(tensor, base[key]):
            continue
        changed += 1
    assert changed > 0


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Bases (fp32, bf16, fp16, sharded; GPT-2, RoBERTa, BERT) and adapters made on them by PEFT."""
    from peft import IA3Config, LoraConfig

    root = tmp_path_factory.mktemp("into")
    save_base(root / "llama")
    save_base(root / "llama_bf16", dtype="bfloat16")
    save_base(root / "llama_fp16", dtype="float16")
    save_base(root / "llama_sharded", max_shard_size="20KB")
    save_base(root / "gpt2", "gpt2")
    save_base(root / "roberta_cls", "roberta", task="cls")
    save_base(root / "roberta_lm", "roberta", task="lm")
    save_base(root / "bert_lm", "bert", task="lm")
    encoders(root / "enc")  # among them bert_mlm: LoRA on query/value, heads cls.predictions.transform (dense, LayerNorm)
    lora(root / "a", 1)
    lora(root / "b", 2, r=4, alpha=8, use_rslora=True)
    lora(root / "mlp", 3, targets=("gate_proj", "down_proj"))
    lora(root / "gpt2_a", 17, targets=("c_attn", "c_proj"), arch="gpt2", name=GPT2_BASE, fan_in_fan_out=True)
    save(IA3Config(target_modules=["k_proj", "v_proj", "down_proj"], feedforward_modules=["down_proj"]),
         root / "ia3", 19)
    save(LoraConfig(r=4, lora_alpha=8, target_modules=["query", "value"], task_type="SEQ_CLS"), root / "roberta_a",
         31, arch="roberta", task="cls", name=ROBERTA_BASE)
    # (IA)3 on layers with biases: PEFT's merge scales the bias of query and value (not feed-forward)
    # along with the weight; output.dense (both the attention's and the MLP's) is feed-forward: weight only
    save(IA3Config(target_modules=["query", "value", "output.dense"], feedforward_modules=["output.dense"]),
         root / "roberta_ia3", 37, arch="roberta", name=ROBERTA_BASE)
    return root


def test_one_adapter_equals_peft_merge_and_unload(models: Path, tmp_path: Path) -> None:
    """Paper mode, one input: exactly PEFT's merge (the same fp32 sums)."""
    assert pemlang("eval", "--input", f"a={models / 'a'}", "--out", str(tmp_path / "m"),
                   "--into", str(models / "llama"), "--", "a") == 0
    assert_matches(state(tmp_path / "m"), peft_merged(models / "llama", models / "a"), state(models / "llama"))


@pytest.mark.parametrize("expression", ["0.5*a + 0.7*b - mlp", "svd(a + b, rank=4)", "core(ties(0.5*a, 0.5*b, density=0.3))",
                                        "svd(a + b, energy=0.9)", "tsv(a, b)"])
def test_exact_mode_expressions_equal_peft_merging_pemlangs_adapter(models: Path, tmp_path: Path, expression: str) -> None:
    """Any expression: the merged model equals PEFT merging the adapter pemlang writes for it."""
    inputs = ["--input", f"a={models / 'a'}", "--input", f"b={models / 'b'}", "--input", f"mlp={models / 'mlp'}"]
    assert pemlang("eval", "--mode", "exact", *inputs, "--out", str(tmp_path / "adapter"), "--", expression) == 0
    assert pemlang("eval", "--mode", "exact", *inputs, "--out", str(tmp_path / "m"), "--into", str(models / "llama"),
                   "--", expression) == 0
    assert_matches(state(tmp_path / "m"), peft_merged(models / "llama", tmp_path / "adapter"), state(models / "llama"),
                   ulps=4)


def test_exact_sum_equals_the_fp64_formula(models: Path, tmp_path: Path) -> None:
    """W + Σ β·s·B·A, written out in fp64 from the adapters' own files (rsLoRA: s = α/√r)."""
    assert run_program(tmp_path, f'mode exact\ninput a = "{models / "a"}"\ninput b = "{models / "b"}"\n'
                       f'output 0.5*a - 2*b into "{models / "llama"}" -> "{tmp_path / "m"}"\n') == 0
    base = state(models / "llama")
    ours = state(tmp_path / "m")
    for key in base:
        expected = base[key].double()
        module = key.removesuffix(".weight")
        for name, beta, scaling in (("a", 0.5, 16 / 8), ("b", -2.0, 8 / 4 ** 0.5)):
            factors = load_file(models / name / "adapter_model.safetensors")
            a_key = f"base_model.model.{module}.lora_A.weight"
            if a_key in factors:
                b_matrix = factors[a_key.replace("lora_A", "lora_B")].double()
                expected = expected + beta * scaling * b_matrix @ factors[a_key].double()
        assert torch.allclose(ours[key].double(), expected, rtol=1e-6, atol=1e-7), key


def test_bf16_base_is_merged_in_fp32_and_cast_once(models: Path, tmp_path: Path) -> None:
    assert pemlang("eval", "--input", f"a={models / 'a'}", "--out", str(tmp_path / "m"),
                   "--into", str(models / "llama_bf16"), "--", "a") == 0
    ours = state(tmp_path / "m")
    assert all(t.dtype == torch.bfloat16 for t in ours.values())
    assert_matches(ours, peft_merged(models / "llama_bf16", models / "a"), state(models / "llama_bf16"))


def test_fp16_base_is_merged_in_fp32_and_cast_once(models: Path, tmp_path: Path) -> None:
    """fp16 as bf16: W + ΔW in fp32, one rounding to fp16, exactly what PEFT's fp32 merge cast gives."""
    assert pemlang("eval", "--input", f"a={models / 'a'}", "--out", str(tmp_path / "m"),
                   "--into", str(models / "llama_fp16"), "--", "a") == 0
    ours = state(tmp_path / "m")
    assert all(t.dtype == torch.float16 for t in ours.values())
    base = state(models / "llama_fp16")
    assert_matches(ours, peft_merged(models / "llama_fp16", models / "a"), base)
    # one rounding, not two: not what adding ΔW rounded to fp16 to W in fp16 gives
    factors = load_file(models / "a" / "adapter_model.safetensors")
    key = "model.layers.0.self_attn.q_proj.weight"
    prefix = "base_model.model.model.layers.0.self_attn.q_proj"
    exact = base[key].double() + 2.0 * factors[f"{prefix}.lora_B.weight"].double() @ factors[f"{prefix}.lora_A.weight"].double()
    assert torch.equal(ours[key], exact.float().half())


def test_sharded_base_keeps_its_shards_and_index(models: Path, tmp_path: Path) -> None:
    base = models / "llama_sharded"
    assert (base / "model.safetensors.index.json").exists()
    assert pemlang("eval", "--input", f"a={models / 'mlp'}", "--out", str(tmp_path / "m"), "--into", str(base),
                   "--", "a") == 0
    shards = sorted(p.name for p in base.glob("*.safetensors"))
    assert len(shards) > 1 and sorted(p.name for p in (tmp_path / "m").glob("*.safetensors")) == shards
    assert (tmp_path / "m" / "model.safetensors.index.json").read_bytes() == (base / "model.safetensors.index.json").read_bytes()
    for name in shards:  # each shard holds the same tensors it held in the base
        with safe_open(str(base / name), "pt") as before, safe_open(str(tmp_path / "m" / name), "pt") as after:
            assert sorted(before.keys()) == sorted(after.keys())
            assert json.loads(after.metadata()["pemlang.inputs"])[0]["name"] == "a"
    assert_matches(state(tmp_path / "m"), peft_merged(base, models / "mlp"), state(base))


def test_untouched_tensors_and_files_are_the_bases_bytes(models: Path, tmp_path: Path) -> None:
    base = models / "llama"
    assert pemlang("eval", "--input", f"a={models / 'a'}", "--out", str(tmp_path / "m"), "--into", str(base),
                   "--", "a") == 0
    for name in ("config.json", "generation_config.json"):
        assert (tmp_path / "m" / name).read_bytes() == (base / name).read_bytes()

    def raw(path: Path) -> tuple[dict, bytes]:
        data = path.read_bytes()
        (length,) = struct.unpack("<Q", data[:8])
        header = json.loads(data[8:8 + length])
        return header, data[8 + length:]

    before, before_data = raw(base / "model.safetensors")
    after, after_data = raw(tmp_path / "m" / "model.safetensors")
    assert {k: v for k, v in after.items() if k != "__metadata__"} == {k: v for k, v in before.items() if k != "__metadata__"}
    changed = [k for k, v in before.items() if k != "__metadata__"
               and before_data[slice(*v["data_offsets"])] != after_data[slice(*after[k]["data_offsets"])]]
    assert sorted(changed) == sorted(f"model.layers.{i}.self_attn.{p}_proj.weight" for i in range(2) for p in "qkvo")
    card = (tmp_path / "m" / "README.md").read_text()
    assert "base_model: tiny-org/tiny-llama" in card and "- merge" in card and "- pemlang" in card
    sha = json.loads(after["__metadata__"]["pemlang.inputs"])[0]["sha256"]
    import hashlib

    assert sha == hashlib.sha256((models / "a" / "adapter_model.safetensors").read_bytes()).hexdigest() and sha in card


def test_gpt2_conv1d_is_transposed_as_peft_does(models: Path, tmp_path: Path) -> None:
    assert pemlang("eval", "--input", f"g={models / 'gpt2_a'}", "--out", str(tmp_path / "m"),
                   "--into", str(models / "gpt2"), "--", "g") == 0
    assert_matches(state(tmp_path / "m"), peft_merged(models / "gpt2", models / "gpt2_a", arch="gpt2"),
                   state(models / "gpt2"))


@pytest.mark.parametrize(("base", "adapter", "arch"), [("llama_bf16", "a", "llama"), ("llama", "mlp", "llama"),
                                                     ("gpt2", "gpt2_a", "gpt2")])
def test_large_tensors_are_merged_in_blocks_of_rows(models: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                    base: str, adapter: str, arch: str) -> None:
    """A LoRA-changed tensor is read, merged and written a block of rows at a time (memory holds
    a block, not the tensor): with blocks of a row or a few (and a last block shorter than the
    others), still PEFT's merge; for a Conv1D the rows are the input features."""
    from pemlang import intobase

    monkeypatch.setattr(intobase, "BLOCK_ELEMENTS", 100)  # blocks of 3 rows of 32 (the last of 2), of 1 row of 64 or 96
    assert pemlang("eval", "--input", f"x={models / adapter}", "--out", str(tmp_path / "m"),
                   "--into", str(models / base), "--", "x") == 0
    assert_matches(state(tmp_path / "m"), peft_merged(models / base, models / adapter, arch=arch),
                   state(models / base), ulps=1)  # a block's B·A is another BLAS call: fp32 rounding


@pytest.mark.parametrize("base", ["llama_bf16", "llama_sharded"])
def test_the_written_model_leaves_the_page_cache_as_it_goes(models: Path, tmp_path: Path,
                                                             monkeypatch: pytest.MonkeyPatch, base: str) -> None:
    """Every FLUSH_BYTES written to a file, the file is put on disk (fdatasync) and dropped from the
    page cache (POSIX_FADV_DONTNEED on that file, never on the base's): with a flush after nearly
    every write, the same bytes as with none, and PEFT's merge."""
    import os

    from pemlang import intobase

    calls: list[tuple[str, str]] = []
    real_sync, real_advise = os.fdatasync, getattr(os, "posix_fadvise", None)

    def fdatasync(fd: int) -> None:
        calls.append(("fdatasync", os.readlink(f"/proc/self/fd/{fd}")))
        real_sync(fd)

    def posix_fadvise(fd: int, offset: int, length: int, advice: int) -> None:
        calls.append((f"fadvise {offset} {length} {advice}", os.readlink(f"/proc/self/fd/{fd}")))
        assert real_advise is not None
        real_advise(fd, offset, length, advice)

    monkeypatch.setattr(intobase, "BLOCK_ELEMENTS", 100)  # many writes to each file (the same blocks both times)
    assert pemlang("eval", "--input", f"x={models / 'a'}", "--out", str(tmp_path / "whole"),
                   "--into", str(models / base), "--", "x") == 0
    assert calls == []  # a tiny model: nothing flushed before the end
    monkeypatch.setattr(os, "fdatasync", fdatasync)
    if real_advise is not None:
        monkeypatch.setattr(os, "posix_fadvise", posix_fadvise)
    monkeypatch.setattr(intobase, "FLUSH_BYTES", 1000)
    assert pemlang("eval", "--input", f"x={models / 'a'}", "--out", str(tmp_path / "m"),
                   "--into", str(models / base), "--", "x") == 0
    weights = sorted(p.name for p in (models / base).glob("*.safetensors"))
    for name in weights:
        assert (tmp_path / "m" / name).read_bytes() == (tmp_path / "whole" / name).read_bytes()
    synced = [path for what, path in calls if what == "fdatasync"]
    assert len(synced) > 10 and {Path(p).name for p in synced} == set(weights)  # every file, many times
    assert all(str(models) not in path for _, path in calls)  # the base is neither synced nor dropped
    if real_advise is not None:
        assert [(w, p) for w, p in calls if w.startswith("fadvise")] == [
            (f"fadvise 0 0 {os.POSIX_FADV_DONTNEED}", p) for p in synced]
    assert_matches(state(tmp_path / "m"), peft_merged(models / base, models / "a"), state(models / base), ulps=1)


def test_long_runs_of_untouched_tensors_are_flushed_as_they_are_copied(models: Path, tmp_path: Path,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """The tensors a module leaves alone are copied a chunk at a time, and each chunk counts towards
    the next flush: a model whose adapter touches a few layers does not fill the page cache with the
    rest before its first flush."""
    import os

    from pemlang import intobase

    calls: list[str] = []
    real_copy, real_sync = os.copy_file_range, os.fdatasync

    def copy_file_range(*args: int) -> int:
        calls.append("copy")
        return real_copy(*args)

    def fdatasync(fd: int) -> None:
        calls.append("sync")
        real_sync(fd)

    monkeypatch.setattr(intobase, "COPY_CHUNK", 1024)
    monkeypatch.setattr(intobase, "FLUSH_BYTES", 1024)  # every full chunk is a flush
    monkeypatch.setattr(os, "copy_file_range", copy_file_range)
    monkeypatch.setattr(os, "fdatasync", fdatasync)
    assert pemlang("eval", "--input", f"x={models / 'mlp'}", "--out", str(tmp_path / "m"),
                   "--into", str(models / "llama"), "--", "x") == 0
    copies = [i for i, c in enumerate(calls) if c == "copy"]
    syncs_while_copying = [i for i, c in enumerate(calls) if c == "sync" and i < copies[-1]]
    assert len(copies) > 20 and len(syncs_while_copying) >= len(copies) // 2, calls
    assert_matches(state(tmp_path / "m"), peft_merged(models / "llama", models / "mlp"), state(models / "llama"))


def test_without_linuxs_calls_the_same_model_is_written(models: Path, tmp_path: Path,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """Where the system lacks copy_file_range, preadv, fdatasync and posix_fadvise (macOS), the
    merge reads and writes through user space, fsyncs, drops nothing: the same bytes."""
    import os

    from pemlang import intobase

    monkeypatch.setattr(intobase, "FLUSH_BYTES", 1000)
    assert pemlang("eval", "--input", f"x={models / 'a'}", "--out", str(tmp_path / "linux"),
                   "--into", str(models / "llama_sharded"), "--", "x") == 0
    for name in ("copy_file_range", "preadv", "fdatasync", "posix_fadvise"):
        monkeypatch.delattr(os, name, raising=False)
    assert pemlang("eval", "--input", f"x={models / 'a'}", "--out", str(tmp_path / "other"),
                   "--into", str(models / "llama_sharded"), "--", "x") == 0
    assert snapshot_bytes(tmp_path / "other") == snapshot_bytes(tmp_path / "linux")


def snapshot_bytes(directory: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(directory.iterdir()) if p.name != "README.md"}


def test_ia3_multiplies_along_peft_axis(models: Path, tmp_path: Path) -> None:
    assert pemlang("eval", "--input", f"v={models / 'ia3'}", "--out", str(tmp_path / "m"),
                   "--into", str(models / "llama"), "--", "v") == 0
    assert_matches(state(tmp_path / "m"), peft_merged(models / "llama", models / "ia3"), state(models / "llama"))


def test_roberta_classifier_heads_replace_the_bases(models: Path, tmp_path: Path) -> None:
    assert pemlang("eval", "--input", f"r={models / 'roberta_a'}", "--out", str(tmp_path / "m"),
                   "--into", str(models / "roberta_cls"), "--", "r") == 0
    ours = state(tmp_path / "m")
    heads = load_file(models / "roberta_a" / "adapter_model.safetensors")
    head_key = next(k for k in heads if "classifier" in k and k.endswith("out_proj.weight"))
    assert torch.equal(ours["classifier.out_proj.weight"], heads[head_key])
    assert_matches(ours, peft_merged(models / "roberta_cls", models / "roberta_a", arch="roberta", task="cls"),
                   state(models / "roberta_cls"))


def test_ia3_scales_the_bias_of_non_feedforward_layers_as_peft_does(models: Path, tmp_path: Path) -> None:
    """RoBERTa's query and value have biases: PEFT's IA3 merge multiplies them by the vector too
    (the layer's output is scaled); a feed-forward layer (output.dense) scales its input, the bias stays."""
    assert pemlang("eval", "--input", f"v={models / 'roberta_ia3'}", "--out", str(tmp_path / "m"),
                   "--into", str(models / "roberta_lm"), "--", "v") == 0
    ours, base = state(tmp_path / "m"), state(models / "roberta_lm")
    assert_matches(ours, peft_merged(models / "roberta_lm", models / "roberta_ia3", arch="roberta"), base)
    vectors = load_file(models / "roberta_ia3" / "adapter_model.safetensors")
    for i in range(2):
        for module in ("attention.self.query", "attention.self.value"):
            layer = f"roberta.encoder.layer.{i}.{module}"
            vector = vectors[f"base_model.model.{layer}.ia3_l"].reshape(-1).double()
            assert torch.allclose(ours[f"{layer}.bias"].double(), base[f"{layer}.bias"].double() * vector)
            assert torch.allclose(ours[f"{layer}.weight"].double(), base[f"{layer}.weight"].double() * vector[:, None])
        for module in ("attention.output.dense", "output.dense"):
            layer = f"roberta.encoder.layer.{i}.{module}"
            vector = vectors[f"base_model.model.{layer}.ia3_l"].reshape(-1).double()
            assert torch.equal(ours[f"{layer}.bias"], base[f"{layer}.bias"])
            assert torch.allclose(ours[f"{layer}.weight"].double(), base[f"{layer}.weight"].double() * vector[None, :])


def test_bert_masked_lm_heads_replace_the_bases(models: Path, tmp_path: Path) -> None:
    """modules_to_save=["cls.predictions.transform"]: its dense and LayerNorm tensors are the adapter's."""
    assert pemlang("eval", "--input", f"b={models / 'enc' / 'bert_mlm'}", "--out", str(tmp_path / "m"),
                   "--into", str(models / "bert_lm"), "--", "b") == 0
    ours, base = state(tmp_path / "m"), state(models / "bert_lm")
    heads = load_file(models / "enc" / "bert_mlm" / "adapter_model.safetensors")
    replaced = [k for k in base if k.startswith("cls.predictions.transform.")]
    assert len(replaced) == 4  # dense.weight, dense.bias, LayerNorm.weight, LayerNorm.bias
    for key in replaced:
        saved = f"base_model.model.{key.replace('transform.', 'transform.modules_to_save.default.', 1)}"
        head = heads.get(saved, heads.get(saved.replace(".modules_to_save.default", "")))
        assert head is not None and torch.equal(ours[key], head), key
        assert not torch.equal(ours[key], base[key]), key
    assert_matches(ours, peft_merged(models / "bert_lm", models / "enc" / "bert_mlm", arch="bert"), base)


@pytest.mark.parametrize(("base", "adapter", "arch", "task"), [
    ("llama", "a", "llama", "lm"), ("gpt2", "gpt2_a", "gpt2", "lm"), ("roberta_cls", "roberta_a", "roberta", "cls"),
    ("llama_bf16", "a", "llama", "lm"), ("llama_fp16", "a", "llama", "lm"), ("bert_lm", "enc/bert_mlm", "bert", "lm"),
    ("roberta_lm", "roberta_ia3", "roberta", "lm")])
def test_transformers_loads_it_and_its_logits_equal_peftmodels(models: Path, tmp_path: Path, base: str,
                                                                 adapter: str, arch: str, task: str) -> None:
    from peft import PeftModel

    assert pemlang("eval", "--input", f"x={models / adapter}", "--out", str(tmp_path / "m"),
                   "--into", str(models / base), "--", "x") == 0
    merged = _load(tmp_path / "m", arch, task)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        reference = PeftModel.from_pretrained(_load(models / base, arch, task), str(models / adapter)).eval()
    tokens = torch.tensor([[1, 5, 9, 13, 17, 21]])
    with torch.no_grad():
        ours, theirs = merged(tokens).logits.float(), reference(tokens).logits.float()
    # bf16, fp16: the merged weights are rounded once to the dtype, PEFT's ΔW never is
    tolerance = {"bf16": 5e-2, "fp16": 5e-3}.get(base.rsplit("_", 1)[-1], 1e-5)
    assert torch.allclose(ours, theirs, atol=tolerance, rtol=tolerance)


# -- refusals and hostile bases ----------------------------------------------------------------------


def _check(tmp: Path, text: str, capsys: pytest.CaptureFixture[str], *extra: str) -> tuple[int, str]:
    program = tmp / "merge.pem"
    program.write_text(text, encoding="utf-8")
    status = main(["run", str(program), "--device", "cpu", *extra])
    return status, capsys.readouterr().err


def test_missing_shard_named_in_the_index(models: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    base = tmp_path / "base"
    shutil.copytree(models / "llama_sharded", base)
    shard = sorted(base.glob("*.safetensors"))[1]
    shard.unlink()
    status, err = _check(tmp_path, f'input a = "{models / "a"}"\noutput a into "base" -> "m"\n', capsys)
    assert status == 1 and "E035" in err and f"weight file {shard.name} is missing" in err
    assert not (tmp_path / "m").exists()


def test_corrupt_shard_header(models: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    base = tmp_path / "base"
    shutil.copytree(models / "llama", base)
    data = (base / "model.safetensors").read_bytes()
    (base / "model.safetensors").write_bytes(data[:8] + b"{not json" + data[17:])
    status, err = _check(tmp_path, f'input a = "{models / "a"}"\noutput a into "base" -> "m"\n', capsys)
    assert status == 1 and "E035" in err and "malformed safetensors header" in err
    assert not (tmp_path / "m").exists()


def test_base_equal_to_dir_is_refused_even_with_force(models: Path, tmp_path: Path,
                                                      capsys: pytest.CaptureFixture[str]) -> None:
    base = tmp_path / "base"
    shutil.copytree(models / "llama", base)
    before = {p.name: p.read_bytes() for p in base.iterdir()}
    status, err = _check(tmp_path, f'input a = "{models / "a"}"\noutput a into "base" -> "base"\n', capsys, "--force")
    assert status == 1 and "E018" in err and "overwrite the base model" in err
    assert {p.name: p.read_bytes() for p in base.iterdir()} == before


def test_extra_tensors_in_the_base_are_copied(models: Path, tmp_path: Path) -> None:
    from safetensors.torch import save_file

    base = tmp_path / "base"
    shutil.copytree(models / "llama", base)
    tensors = load_file(base / "model.safetensors")
    tensors["extra.buffer"] = torch.arange(5, dtype=torch.int64)
    save_file(tensors, base / "model.safetensors", metadata={"format": "pt"})
    assert pemlang("eval", "--input", f"a={models / 'a'}", "--out", str(tmp_path / "m"), "--into", str(base),
                   "--", "a") == 0
    assert torch.equal(state(tmp_path / "m")["extra.buffer"], torch.arange(5))


def test_overflow_in_the_base_dtype_writes_nothing(models: Path, tmp_path: Path,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    """fp16 overflows where fp32 does not: E027, and no output."""
    save_base(tmp_path / "base16", dtype="float16")
    status, err = _check(tmp_path, f'input a = "{models / "a"}"\noutput 1e30*a into "base16" -> "m"\n', capsys)
    assert status == 1 and "E027" in err
    assert not (tmp_path / "m").exists()


def test_the_base_model_is_unchanged(models: Path, tmp_path: Path) -> None:
    base = tmp_path / "base"
    shutil.copytree(models / "llama_sharded", base)
    before = {p.name: p.read_bytes() for p in base.iterdir()}
    assert pemlang("eval", "--input", f"a={models / 'a'}", "--out", str(tmp_path / "m"), "--into", str(base),
                   "--", "a") == 0
    assert pemlang("eval", "--input", f"a={models / 'a'}", "--out", str(tmp_path / "m"), "--into", str(base),
                   "--force", "--", "2*a") == 0
    assert {p.name: p.read_bytes() for p in base.iterdir()} == before
    assert not [p for p in tmp_path.iterdir() if "pemlang-" in p.name]  # no staging left behind


def test_base_model_reads_headers_only_for_check(models: Path, tmp_path: Path) -> None:
    """`check` reads the base's headers: a base whose data section is garbage still checks."""
    base = tmp_path / "base"
    shutil.copytree(models / "llama", base)
    data = (base / "model.safetensors").read_bytes()
    (length,) = struct.unpack("<Q", data[:8])
    (base / "model.safetensors").write_bytes(data[:8 + length] + b"\xff" * (len(data) - 8 - length))
    program = tmp_path / "m.pem"
    program.write_text(f'input a = "{models / "a"}"\noutput a into "base" -> "m"\n', encoding="utf-8")
    assert main(["check", str(program)]) == 0
    assert not (tmp_path / "m").exists()


def test_a_sweep_refuses_into_rather_than_writing_an_adapter(models: Path, tmp_path: Path,
                                                             capsys: pytest.CaptureFixture[str]) -> None:
    """Only `run` and `eval` merge into a base so far: a sweep says so and writes nothing."""
    status, err = _check(tmp_path, f'param lam = 1\ninput a = "{models / "a"}"\n'
                         f'output lam*a into "{models / "llama"}" -> "m"\n', capsys, "--sweep", "lam=0.5,1")
    assert status == 1 and "E024" in err and "`into`" in err
    assert not list(tmp_path.glob("m.*")) and not (tmp_path / "m").exists()


def test_a_rank_limit_does_not_concern_a_merged_model(models: Path, tmp_path: Path) -> None:
    """--max-rank caps adapters for serving stacks; a model merged into its base has no adapter rank."""
    inputs = ["--input", f"a={models / 'a'}", "--input", f"b={models / 'b'}"]
    assert pemlang("eval", "--mode", "exact", *inputs, "--out", str(tmp_path / "m"), "--into", str(models / "llama"),
                   "--max-rank", "1", "--", "a + b") == 0
    assert pemlang("eval", "--mode", "exact", *inputs, "--out", str(tmp_path / "adapter"), "--max-rank", "1",
                   "--", "a + b") == 1  # the same output as an adapter is above it
