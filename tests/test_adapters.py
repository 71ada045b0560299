"""Signatures read from config + safetensors header, compared with PEFT's own loaded modules."""

from __future__ import annotations

import math
import shutil
import struct
import warnings
from pathlib import Path

import pytest
from peft_factory import base_model

from pemlang.adapters import AdapterError, read_adapter, read_safetensors_header
from pemlang.types import Ia3Layer, LoraLayer


def peft_layers(adapter_dir: Path, **base_kwargs):  # type: ignore[no-untyped-def]
    """{layer key: PEFT's own LoRA module} after PeftModel.from_pretrained (the oracle)."""
    from peft import PeftModel

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = PeftModel.from_pretrained(base_model(**base_kwargs), adapter_dir)
    prefix = "base_model.model."
    return {name[len(prefix):]: module for name, module in model.named_modules()
            if hasattr(module, "lora_A") or hasattr(module, "ia3_l")}


@pytest.mark.parametrize("name", ["llama_r8", "llama_r4", "llama_rslora", "llama_pattern", "llama_qv"])
def test_lora_signature_matches_peft(adapters: Path, name: str) -> None:
    adapter = read_adapter(adapters / name)
    oracle = {k: m for k, m in peft_layers(adapters / name).items() if "default" in m.lora_A}
    assert set(adapter.type.layers) == set(oracle)
    for key, module in oracle.items():
        layer = adapter.type.layers[key]
        assert isinstance(layer, LoraLayer)
        assert layer.rank == module.r["default"]
        assert math.isclose(layer.scaling, module.scaling["default"], rel_tol=1e-12)
        assert (layer.out_features, layer.in_features) == tuple(module.get_base_layer().weight.shape)
        assert layer.dtype == "F32"


def test_rslora_and_patterns_by_the_formula(adapters: Path) -> None:
    rs = read_adapter(adapters / "llama_rslora").type.layers["model.layers.0.self_attn.q_proj"]
    assert isinstance(rs, LoraLayer) and rs.scaling == pytest.approx(16 / math.sqrt(8))
    pattern = read_adapter(adapters / "llama_pattern").type.layers
    q1 = pattern["model.layers.1.self_attn.q_proj"]
    v0 = pattern["model.layers.0.self_attn.v_proj"]
    q0 = pattern["model.layers.0.self_attn.q_proj"]
    assert isinstance(q1, LoraLayer) and (q1.rank, q1.scaling) == (4, 16 / 4)
    assert isinstance(v0, LoraLayer) and (v0.rank, v0.scaling) == (8, 4 / 8)
    assert isinstance(q0, LoraLayer) and (q0.rank, q0.scaling) == (8, 16 / 8)


def test_gpt2_fan_in_fan_out(adapters: Path) -> None:
    layers = read_adapter(adapters / "gpt2_r8").type.layers
    assert set(layers) == {"transformer.h.0.attn.c_attn", "transformer.h.1.attn.c_attn"}
    layer = layers["transformer.h.0.attn.c_attn"]
    assert isinstance(layer, LoraLayer) and layer.fan_in_fan_out
    oracle = peft_layers(adapters / "gpt2_r8", arch="gpt2")["transformer.h.0.attn.c_attn"]
    # Conv1D keeps its weight as (in, out): PEFT transposes ΔW for it.
    assert oracle.fan_in_fan_out and tuple(oracle.get_base_layer().weight.shape) == (32, 96)
    assert (layer.in_features, layer.out_features) == (32, 96)


def test_ia3_signature(adapters: Path) -> None:
    adapter = read_adapter(adapters / "llama_ia3")
    assert adapter.type.kind == "ia3"
    oracle = peft_layers(adapters / "llama_ia3")
    assert set(adapter.type.layers) == set(oracle)
    for key, module in oracle.items():
        layer = adapter.type.layers[key]
        assert isinstance(layer, Ia3Layer)
        assert layer.shape == tuple(module.ia3_l["default"].shape)
        assert layer.feedforward == module.is_feedforward


def test_heads_base_and_dtype(adapters: Path) -> None:
    cls = read_adapter(adapters / "llama_cls")
    assert set(cls.type.heads) == {"score.weight"}
    assert cls.type.heads["score.weight"].shape == (3, 32)
    assert cls.type.base.name == "tiny-org/tiny-llama"
    assert read_adapter(adapters / "llama_no_base").type.base.name is None
    bf16 = read_adapter(adapters / "llama_bf16")
    assert {layer.dtype for layer in bf16.type.layers.values()} == {"BF16"}


@pytest.mark.parametrize(("name", "feature"), [
    ("llama_dora", "DoRA"), ("llama_lora_bias", "LoRA bias")])
def test_unsupported_features_are_named(adapters: Path, name: str, feature: str) -> None:
    assert any(feature in f for f in read_adapter(adapters / name).unsupported)


def test_lora_on_embeddings_is_refused_under_its_own_name(tmp_path: Path) -> None:
    """PEFT saves the embedding itself beside lora_embedding_A/B: that side tensor is part of the
    one feature, not the headline."""
    from peft_factory import lora

    from pemlang.check import check_source
    from pemlang.source import Source

    directory = lora(tmp_path / "emb", 60, targets=("q_proj", "embed_tokens"))
    assert read_adapter(directory).unsupported == ("LoRA on embeddings (lora_embedding_A/B on model.embed_tokens)",)
    result = check_source(Source(f'input e = "{directory}"\noutput e -> "out"\n'), base_dir=tmp_path)
    [error] = [d for d in result.diagnostics if d.is_error]
    assert error.code == "E011" and error.message == "input `e`: LoRA on embeddings is not supported"
    assert error.notes[0] == "LoRA on embeddings (lora_embedding_A/B on model.embed_tokens)"
    assert not any("base_layer" in note for note in error.notes)


def test_other_peft_types_are_refused_by_name(adapters: Path) -> None:
    with pytest.raises(AdapterError) as info:
        read_adapter(adapters / "llama_loha")
    assert info.value.code == "E011" and "LoHa" in info.value.message


def test_signature_never_reads_tensor_data(adapters: Path, tmp_path: Path) -> None:
    """A file cut off right after its header still yields the full signature."""
    original = adapters / "llama_r8" / "adapter_model.safetensors"
    raw = original.read_bytes()
    (header_len,) = struct.unpack("<Q", raw[:8])
    cut = tmp_path / "cut"
    shutil.copytree(adapters / "llama_r8", cut)
    (cut / "adapter_model.safetensors").write_bytes(raw[: 8 + header_len])
    full, headless = read_adapter(adapters / "llama_r8"), read_adapter(cut)
    assert headless.type == full.type
    assert headless.truncated and not full.truncated


def test_header_reader_matches_safetensors(adapters: Path) -> None:
    from safetensors import safe_open

    path = adapters / "llama_r8" / "adapter_model.safetensors"
    tensors, _, _, _ = read_safetensors_header(path)
    with safe_open(str(path), framework="pt") as f:
        assert set(f.keys()) == set(tensors)
        for key in f.keys():  # noqa: SIM118 (safe_open is not a dict)
            assert tuple(f.get_slice(key).get_shape()) == tensors[key].shape


@pytest.mark.parametrize(("name", "code"), [
    ("bad_header", "E013"), ("header_not_json", "E013"), ("bad_config", "E013"),
    ("no_weights", "E012"), ("does_not_exist", "E012"), ("llama_pickled", "E023")])
def test_damaged_inputs_are_diagnosed(adapters: Path, name: str, code: str) -> None:
    with pytest.raises(AdapterError) as info:
        read_adapter(adapters / name)
    assert info.value.code == code


def test_pickle_is_read_only_when_allowed(adapters: Path) -> None:
    pickled = read_adapter(adapters / "llama_pickled", allow_pickle=True)
    assert pickled.pickled
    assert set(pickled.type.layers) == set(read_adapter(adapters / "llama_r8").type.layers)


@pytest.mark.parametrize("state", ["list", "int_map", "int_keys", "string", "complex"])
def test_pickles_that_are_not_state_dicts_are_e013(adapters: Path, tmp_path: Path, state: str) -> None:
    import torch

    values = {"list": [1, 2, 3], "int_map": {"a": 5}, "int_keys": {1: torch.zeros(2)}, "string": "weights",
              "complex": {"x.lora_A.weight": torch.zeros(2, 2, dtype=torch.complex64)}}
    target = tmp_path / "pickled"
    shutil.copytree(adapters / "llama_pickled", target)
    torch.save(values[state], target / "adapter_model.bin")
    with pytest.raises(AdapterError) as info:
        read_adapter(target, allow_pickle=True)
    assert info.value.code == "E013"


def test_hostile_rank_pattern_is_refused_quickly(adapters: Path, tmp_path: Path) -> None:
    import json
    import time

    target = tmp_path / "hostile"
    shutil.copytree(adapters / "llama_r8", target)
    config = json.loads((target / "adapter_config.json").read_text())
    config["rank_pattern"] = {"(a+)+$": 8}
    (target / "adapter_config.json").write_text(json.dumps(config))
    started = time.perf_counter()
    with pytest.raises(AdapterError) as info:
        read_adapter(target)
    assert info.value.code == "E013" and "rank_pattern" in info.value.message
    assert time.perf_counter() - started < 1
    # Ordinary PEFT patterns keep PEFT's meaning (llama_pattern's rank_pattern and alpha_pattern).
    assert read_adapter(adapters / "llama_pattern").type.layers["model.layers.1.self_attn.q_proj"].rank == 4  # type: ignore[union-attr]
