"""Real PEFT adapters for the tests, made by PEFT itself on tiny models built from configs.

Nothing is downloaded: a Llama-style model (q/k/v/o with grouped-query attention) and a
GPT-2-style model (`c_attn`, a Conv1D layer, hence fan_in_fan_out) are built from configs with
seeded weights; adapters are made with get_peft_model and written with save_pretrained.
"""

from __future__ import annotations

import json
import os
import shutil
import struct
import warnings
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing is fetched: PEFT's save must not try the hub

LLAMA_BASE = "tiny-org/tiny-llama"
GPT2_BASE = "tiny-org/tiny-gpt2"
ROBERTA_BASE = "tiny-org/tiny-roberta"
BERT_BASE = "tiny-org/tiny-bert"


def llama_config(hidden: int = 32):  # type: ignore[no-untyped-def]
    from transformers import LlamaConfig

    return LlamaConfig(vocab_size=64, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                       pad_token_id=0, num_labels=3)


def gpt2_config():  # type: ignore[no-untyped-def]
    from transformers import GPT2Config

    return GPT2Config(n_embd=32, n_layer=2, n_head=4, vocab_size=64, n_positions=64,
                      bos_token_id=0, eos_token_id=0)


def encoder_config(arch: str):  # type: ignore[no-untyped-def]
    """A tiny RoBERTa or BERT config (hidden 16, 2 layers, 3 labels)."""
    from transformers import BertConfig, RobertaConfig

    config_class = RobertaConfig if arch == "roberta" else BertConfig
    return config_class(vocab_size=64, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=32, max_position_embeddings=40, num_labels=3)


def base_model(arch: str = "llama", *, task: str = "lm", hidden: int = 32, name: str | None = LLAMA_BASE):  # type: ignore[no-untyped-def]
    """A tiny base model with seeded weights; `name` is what PEFT records as its base.

    `arch` "roberta"/"bert" with `task` "lm" (masked LM) or "cls" (sequence classification): the
    encoder weights are the same for both tasks (one seed), as for a real checkpoint."""
    import torch
    from transformers import (
        BertForMaskedLM,
        BertForSequenceClassification,
        GPT2LMHeadModel,
        LlamaForCausalLM,
        LlamaForSequenceClassification,
        RobertaForMaskedLM,
        RobertaForSequenceClassification,
    )

    torch.manual_seed(0)
    if arch in ("roberta", "bert"):
        classes = {("roberta", "lm"): RobertaForMaskedLM, ("roberta", "cls"): RobertaForSequenceClassification,
                   ("bert", "lm"): BertForMaskedLM, ("bert", "cls"): BertForSequenceClassification}
        model = classes[arch, task](encoder_config(arch))
        encoder = getattr(model, arch)
        torch.manual_seed(1)  # the shared encoder is re-initialised the same way for both tasks
        for param in encoder.parameters():
            torch.nn.init.normal_(param, std=0.2)
    elif arch == "gpt2":
        model = GPT2LMHeadModel(gpt2_config())
    elif task == "cls":
        model = LlamaForSequenceClassification(llama_config(hidden))
    else:
        model = LlamaForCausalLM(llama_config(hidden))
    model.eval()
    if name is not None:
        model.name_or_path = name  # get_peft_model records it as base_model_name_or_path
    return model


def randomize(peft_model, seed: int) -> None:  # type: ignore[no-untyped-def]
    """Give every trainable adapter tensor seeded random values (as after training)."""
    import torch

    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "ia3_l" in name:
                param.copy_(1 + 0.2 * torch.randn(param.shape, generator=generator))
            elif any(k in name for k in ("lora_", "modules_to_save")):
                param.copy_(0.1 * torch.randn(param.shape, generator=generator))


def save(peft_config, out: Path, seed: int, *, arch: str = "llama", task: str = "lm", hidden: int = 32,  # type: ignore[no-untyped-def]
         name: str | None = LLAMA_BASE, dtype=None, safe: bool = True) -> Path:
    from peft import get_peft_model

    model = base_model(arch, task=task, hidden=hidden, name=name)
    if dtype is not None:
        import torch

        model = model.to(getattr(torch, dtype))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # PEFT's notes on offline base names and the like
        # autocast_adapter_dtype=False keeps a bf16 base's adapter in bf16 instead of upcasting it
        peft_model = get_peft_model(model, peft_config, autocast_adapter_dtype=dtype is None)
        randomize(peft_model, seed)
        peft_model.save_pretrained(out, safe_serialization=safe)
    return out


def lora(out: Path, seed: int, *, r: int = 8, alpha: int = 16, targets=("q_proj", "k_proj", "v_proj", "o_proj"),  # type: ignore[no-untyped-def]
         **kwargs) -> Path:
    from peft import LoraConfig

    options = {k: kwargs.pop(k) for k in ("arch", "task", "hidden", "name", "dtype", "safe") if k in kwargs}
    if options.get("task") == "cls":
        kwargs.setdefault("modules_to_save", ["score"])
    return save(LoraConfig(r=r, lora_alpha=alpha, target_modules=list(targets), **kwargs), out, seed, **options)


def build_all(root: Path) -> Path:
    """Every fixture adapter the tests use, under `root` (the golden .pem files name them)."""
    from peft import IA3Config, LoHaConfig

    root.mkdir(parents=True, exist_ok=True)
    lora(root / "llama_r8", 1)
    lora(root / "llama_r8_b", 2)
    lora(root / "llama_r8_c", 3)
    lora(root / "llama_r4", 4, r=4, alpha=8)
    lora(root / "llama_rslora", 5, r=8, alpha=16, use_rslora=True)
    lora(root / "llama_pattern", 6, rank_pattern={"layers.1.self_attn.q_proj": 4}, alpha_pattern={"v_proj": 4})
    lora(root / "llama_qv", 7, targets=("q_proj", "v_proj"))
    lora(root / "llama_other_base", 8, name="someone-else/llama-7b")
    lora(root / "llama_no_base", 9, name=None)
    lora(root / "llama_wide_no_base", 10, hidden=48, name=None)
    lora(root / "llama_cls", 11, task="cls")
    lora(root / "llama_cls_b", 12, task="cls")
    lora(root / "llama_dora", 13, use_dora=True)
    lora(root / "llama_lora_bias", 14, lora_bias=True)
    lora(root / "llama_bf16", 15, dtype="bfloat16")
    lora(root / "llama_pickled", 16, safe=False)
    lora(root / "gpt2_r8", 17, targets=("c_attn",), arch="gpt2", name=GPT2_BASE, fan_in_fan_out=True)
    lora(root / "gpt2_no_base", 18, targets=("c_attn",), arch="gpt2", name=None, fan_in_fan_out=True)
    save(IA3Config(target_modules=["k_proj", "v_proj", "down_proj"], feedforward_modules=["down_proj"]),
         root / "llama_ia3", 19)
    save(IA3Config(target_modules=["k_proj", "v_proj", "down_proj"], feedforward_modules=["down_proj"]),
         root / "llama_ia3_b", 20)
    save(LoHaConfig(r=4, target_modules=["q_proj", "v_proj"]), root / "llama_loha", 21)
    encoders(root)
    _corrupt_copies(root)
    bases(root)
    return root


def save_base(out: Path, arch: str = "llama", *, task: str = "lm", dtype: str | None = None,
              max_shard_size: str | None = None, **config_changes) -> Path:  # type: ignore[no-untyped-def]
    """A base model directory as transformers writes it (config.json, safetensors weights; sharded
    with an index when `max_shard_size` is given), the same seeded weights the adapters were made on."""
    import torch

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = base_model(arch, task=task, **({"hidden": config_changes.pop("hidden")} if "hidden" in config_changes
                                                 else {}))
        for key, value in config_changes.items():
            setattr(model.config, key, value)
        if dtype is not None:
            model = model.to(getattr(torch, dtype))
        options = {"max_shard_size": max_shard_size} if max_shard_size else {}
        model.save_pretrained(out, **options)
    return out


def bases(root: Path) -> None:
    """Base model directories for `output x into "BASE" -> "DIR"`: the Llama the adapters were made on,
    a wider one, one that ties lm_head to its embeddings (with an adapter on lm_head), one whose
    config records another name, a quantized one (its config says so), a pickled one."""
    save_base(root / "base_llama")
    save_base(root / "base_llama_wide", hidden=48)
    save_base(root / "base_llama_tied", tie_word_embeddings=True)
    with warnings.catch_warnings():  # a LoRA on lm_head, saved without the base's lm_head weight
        warnings.simplefilter("ignore")
        from peft import LoraConfig, get_peft_model

        peft_model = get_peft_model(base_model(), LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "lm_head"]))
        randomize(peft_model, 41)
        peft_model.save_pretrained(root / "llama_lm_head", save_embedding_layers=False)
    named = save_base(root / "base_llama_named")
    config = json.loads((named / "config.json").read_text())
    (named / "config.json").write_text(json.dumps({**config, "_name_or_path": "someone-else/llama-7b"}, indent=2))
    quantized = save_base(root / "base_llama_4bit")
    config = json.loads((quantized / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "bitsandbytes", "load_in_4bit": True}
    (quantized / "config.json").write_text(json.dumps(config, indent=2))
    pickled = root / "base_llama_bin"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        import torch

        pickled.mkdir()
        shutil.copy(root / "base_llama" / "config.json", pickled / "config.json")
        torch.save(base_model().state_dict(), pickled / "pytorch_model.bin")


def encoders(root: Path) -> None:
    """RoBERTa and BERT adapters whose heads are sub-trees (PEFT saves every tensor under a
    modules_to_save module): SEQ_CLS with PEFT's default heads (`classifier` → classifier.dense +
    classifier.out_proj), masked-LM adapters without heads, and BERT masked-LM adapters that save
    `cls.predictions.transform` (its dense and LayerNorm)."""
    from peft import LoraConfig

    def encoder_lora(out: Path, seed: int, arch: str, task: str, **kwargs) -> Path:  # type: ignore[no-untyped-def]
        name = ROBERTA_BASE if arch == "roberta" else BERT_BASE
        config = LoraConfig(r=4, lora_alpha=8, target_modules=["query", "value"], **kwargs)
        return save(config, out, seed, arch=arch, task=task, name=name)

    encoder_lora(root / "roberta_cls", 31, "roberta", "cls", task_type="SEQ_CLS")
    encoder_lora(root / "roberta_cls_b", 32, "roberta", "cls", task_type="SEQ_CLS")
    encoder_lora(root / "roberta_lm", 33, "roberta", "lm")
    encoder_lora(root / "roberta_lm_b", 34, "roberta", "lm")
    encoder_lora(root / "bert_mlm", 35, "bert", "lm", modules_to_save=["cls.predictions.transform"])
    encoder_lora(root / "bert_mlm_b", 36, "bert", "lm", modules_to_save=["cls.predictions.transform"])


def _corrupt_copies(root: Path) -> None:
    """Damaged copies of llama_r8: a cut-off header, a cut-off data section, a broken config."""
    weights = (root / "llama_r8" / "adapter_model.safetensors").read_bytes()
    (header_len,) = struct.unpack("<Q", weights[:8])

    def copy(name: str) -> Path:
        target = root / name
        shutil.copytree(root / "llama_r8", target)
        return target

    (copy("bad_header") / "adapter_model.safetensors").write_bytes(weights[: 8 + header_len // 2])
    (copy("cut_data") / "adapter_model.safetensors").write_bytes(weights[: 8 + header_len + 100])
    (copy("bad_config") / "adapter_config.json").write_text('{"peft_type": "LORA", "r": 8,,}')
    no_weights = copy("no_weights")
    (no_weights / "adapter_model.safetensors").unlink()
    json_garbage = copy("header_not_json")
    fake = b"{not json" + b" " * 7
    (json_garbage / "adapter_model.safetensors").write_bytes(struct.pack("<Q", len(fake)) + fake)
    json.loads((root / "llama_r8" / "adapter_config.json").read_text())  # the original stays valid
    # A diverged adapter: one NaN in a B matrix, written with safetensors like the rest.
    from safetensors.torch import load_file, save_file

    nan = copy("llama_nan")
    state = load_file(str(nan / "adapter_model.safetensors"))
    state["base_model.model.model.layers.1.self_attn.v_proj.lora_B.weight"][0, 0] = float("nan")
    save_file(state, str(nan / "adapter_model.safetensors"), metadata={"format": "pt"})
