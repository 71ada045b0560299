"""Make the small PEFT adapters the example programs use (no download: a tiny Llama built from a
config, adapters made by PEFT's own get_peft_model + save_pretrained).

    python examples/make_adapters.py            # writes examples/adapters/

Weights are random but seeded, so every machine makes the same files. `init_lora_weights=False`
gives LoRA B matrices that are not zero (as after training). The paper trains θ1, θ2 from one
initialisation, so the paper's LoRA adapters here share their initial A (seed) and then diverge a
little; `separate_a` and `separate_b` are initialised separately (as adapters trained by different
people are), for the merges that align them first (align_merge.pem).
"""

from __future__ import annotations

import argparse
import os
import shutil
import warnings
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing is fetched: PEFT's save must not try the hub

BASE_NAME = "pemlang-examples/tiny-llama"


def tiny_llama_config():  # type: ignore[no-untyped-def]
    from transformers import LlamaConfig

    return LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                       pad_token_id=0, num_labels=2)


def base_model(task: str = "lm"):  # type: ignore[no-untyped-def]
    """The tiny base model (seeded: the same weights every time)."""
    import torch
    from transformers import LlamaForCausalLM, LlamaForSequenceClassification

    torch.manual_seed(1234)
    cls = LlamaForCausalLM if task == "lm" else LlamaForSequenceClassification
    model = cls(tiny_llama_config()).eval()
    model.name_or_path = BASE_NAME  # get_peft_model records it as base_model_name_or_path
    return model


def tokenizer():  # type: ignore[no-untyped-def]
    """A character-level tokenizer for the tiny model (printable ASCII, one id per character; ids
    below the model's vocabulary of 128), so that `pemlang tune --data` has text to score."""
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "<s>", "</s>", "<unk>"]
    vocab = {token: i for i, token in enumerate(specials + [chr(c) for c in range(32, 127)])}
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    core.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=core, pad_token="<pad>", bos_token="<s>", eos_token="</s>",
                                   unk_token="<unk>")


def make_lora(out: Path, seed: int, *, task: str = "lm", r: int = 8, alpha: int = 16,
              drift: float = 0.02, shared_init: int = 0, **extra) -> None:  # type: ignore[no-untyped-def]
    """A LoRA adapter on q/k/v/o whose A starts from `shared_init` and drifts by `drift`."""
    import torch
    from peft import LoraConfig, get_peft_model

    model = base_model(task)
    config = LoraConfig(r=r, lora_alpha=alpha, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"],
                        init_lora_weights=False, modules_to_save=["score"] if task == "cls" else None,
                        task_type="SEQ_CLS" if task == "cls" else "CAUSAL_LM", **extra)
    torch.manual_seed(shared_init)
    peft_model = get_peft_model(model, config)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_A" in name:
                param.add_(drift * torch.randn(param.shape, generator=generator))
            elif "lora_B" in name or "modules_to_save" in name:
                param.copy_(0.05 * torch.randn(param.shape, generator=generator))
    peft_model.save_pretrained(out)


def make_ia3(out: Path, seed: int) -> None:
    import torch
    from peft import IA3Config, get_peft_model

    config = IA3Config(target_modules=["k_proj", "v_proj", "down_proj"], feedforward_modules=["down_proj"],
                       task_type="CAUSAL_LM")
    peft_model = get_peft_model(base_model("lm"), config)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "ia3_l" in name:
                param.copy_(1 + 0.1 * torch.randn(param.shape, generator=generator))
    peft_model.save_pretrained(out)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=str(Path(__file__).parent / "adapters"))
    args = parser.parse_args(argv)
    out = Path(args.out)
    if out.exists():
        shutil.rmtree(out)
    warnings.filterwarnings("ignore")
    from transformers.utils import logging

    logging.disable_progress_bar()
    # §4.1 distribution generalisation: one task, two disjoint halves of the training data.
    make_lora(out / "theta1", seed=1)
    make_lora(out / "theta2", seed=2)
    # §4.2 multitasking: two tasks.
    make_lora(out / "task_a", seed=3)
    make_lora(out / "task_b", seed=4)
    # §4.3 unlearning, §4.5 detoxifying: a model fine-tuned on toxic text, and a capable one.
    make_lora(out / "toxic", seed=5)
    make_lora(out / "instruct", seed=6)
    # §4.4 domain transfer: a classifier on one domain, language models on both domains.
    make_lora(out / "amazon_cls", seed=7, task="cls")
    make_lora(out / "amazon_lm", seed=8)
    make_lora(out / "yelp_lm", seed=9)
    # (IA)3 modules, for the same operators on the other kind of PEM.
    make_ia3(out / "ia3_theta1", seed=10)
    make_ia3(out / "ia3_theta2", seed=11)
    # Beyond the paper: two adapters initialised separately, from their own seeds (as most adapters
    # on the Hub are), so their A matrices share no basis (align_merge.pem).
    make_lora(out / "separate_a", seed=12, shared_init=12)
    make_lora(out / "separate_b", seed=13, shared_init=13)
    # A model to load the results onto (and tune on: with its tokenizer).
    base_model("lm").save_pretrained(out / "base")
    tokenizer().save_pretrained(out / "base")
    print(f"wrote {len(list(out.iterdir()))} directories under {out}")


if __name__ == "__main__":
    main()
