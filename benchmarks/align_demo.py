"""Adapters that do not share a basis: LoRA adapters trained here from different seeds on two tasks,
merged by each method, every merge's held-out accuracy on both tasks in one table.

    python benchmarks/align_demo.py [--methods NAME,NAME,...] [--pairs 3] [--out DIR] [--work DIR]

Everything is made in code, nothing is downloaded (about 2½ minutes on 2 CPU cores):

1. A base model: a tiny Llama (hidden 64, 2 layers) from a config, pre-trained on a family of
   synthetic rules. A sequence is `<s> RULE x0 … x7 <sep>` (x: symbols from an alphabet of 16) and
   the next token is the answer; rule token R(k, c) asks for (x_k + c) mod 16, for the positions
   k = 0…7 and shifts c = 0…3, except the two pairs the tasks below ask for, which the base never sees.
2. Two tasks, each named by a token the base has never seen: task A asks for (x_2 + 3) mod 16, task B
   for (x_5 + 1) mod 16. An adapter must learn what its token means, a position and a shift the base
   knows only in other combinations. Each task has a training set and a disjoint held-out set.
3. LoRA adapters (PEFT, r=8 on q_proj and v_proj, the answer token's cross-entropy, no head; half of
   each batch replays pre-training so that an adapter changes what its token means and not every
   rule), in `--pairs` pairs: every adapter from its own seed, so its own initial A and data order.
   Saved with save_pretrained.
4. Each method in METHODS is a pemlang expression over a pair (`pemlang.compile(...).save`), loaded
   onto the base with `PeftModel.from_pretrained`, and scored by held-out accuracy (the argmax over
   the whole vocabulary) on each task and on the base's own rules; a cell is the mean over the pairs
   (lowest–highest). A warning a compile gives (W002 in paper mode) is reported under the table.

`--methods` picks rows by name (default: all); a method whose expression this pemlang cannot
compile (a function it does not have) gets its error in the table and the script exits 1 after
writing it. `--work DIR` keeps the base model, the adapters and the merges there and reuses a
base and adapters made by an earlier run (default: a temporary directory, deleted). The table goes
to `--out DIR`, default $PEMLANG_BENCH_RESULTS (see common.py), as align_demo.md.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402

# -- the synthetic task family ----------------------------------------------------------------------

ALPHABET = 16  # symbols x take the values 0…15, token ids SYMBOL0…SYMBOL0+15
POSITIONS = 8  # x0 … x7
SHIFTS = 4  # c = 0…3
PAD, BOS, SEP = 0, 1, 2
RULE0 = 3  # R(k, c) = RULE0 + SHIFTS·k + c: ids 3…34
SYMBOL0 = 48
VOCAB = 64
BASE_NAME = "pemlang-bench/align-demo-llama"


@dataclass(frozen=True)
class Task:
    name: str  # the adapter's input name in the expressions
    token: int  # a token the base never sees
    position: int
    shift: int
    seed: int  # the data's seed (training and held-out sets); pair p's adapter: seed + SEED_STEP·p

    def describe(self) -> str:
        return f"(x{self.position} + {self.shift}) mod {ALPHABET}"


TASKS = (Task("a", token=40, position=2, shift=3, seed=11), Task("b", token=41, position=5, shift=1, seed=22))
RULES = tuple((RULE0 + SHIFTS * k + c, k, c) for k in range(POSITIONS) for c in range(SHIFTS)
              if all((k, c) != (t.position, t.shift) for t in TASKS))

BASE_STEPS, BASE_LR, BASE_BATCH = 500, 3e-3, 128
LORA_RANK, LORA_ALPHA, LORA_TARGETS = 8, 16, ("q_proj", "v_proj")
LORA_STEPS, LORA_LR, LORA_BATCH = 400, 3e-3, 64
TRAIN_SIZE, HELD_OUT_SIZE = 2048, 1024
SEED_STEP = 100  # pair p's adapters start from seeds task.seed + 100·p: their own LoRA init and data order


def sequences(generator, rules, n: int):  # type: ignore[no-untyped-def]
    """n sequences `<s> RULE x0…x7 <sep>` and their answers (token ids), rules drawn uniformly from
    `rules`, a tuple of (rule token, position, shift)."""
    import torch

    x = torch.randint(0, ALPHABET, (n, POSITIONS), generator=generator)
    pick = torch.randint(0, len(rules), (n,), generator=generator)
    token, position, shift = (torch.tensor([r[i] for r in rules])[pick] for i in range(3))
    answer = (x[torch.arange(n), position] + shift) % ALPHABET + SYMBOL0
    ids = torch.cat([torch.full((n, 1), BOS), token[:, None], x + SYMBOL0, torch.full((n, 1), SEP)], dim=1)
    return ids, answer


def splits(task: Task):  # type: ignore[no-untyped-def]
    """The task's training set and a held-out set with no sequence of the training set in it."""
    import torch

    rule = ((task.token, task.position, task.shift),)
    train = sequences(torch.Generator().manual_seed(task.seed * 1000 + 1), rule, TRAIN_SIZE)
    seen = {tuple(row) for row in train[0].tolist()}
    ids, answer = sequences(torch.Generator().manual_seed(task.seed * 1000 + 2), rule, 2 * HELD_OUT_SIZE)
    fresh = torch.tensor([tuple(row) not in seen for row in ids.tolist()])
    return train, (ids[fresh][:HELD_OUT_SIZE], answer[fresh][:HELD_OUT_SIZE])


def answer_loss(model, ids, answer):  # type: ignore[no-untyped-def]
    import torch

    return torch.nn.functional.cross_entropy(model(input_ids=ids, use_cache=False).logits[:, -1], answer)


def accuracy(model, data) -> float:  # type: ignore[no-untyped-def]
    import torch

    ids, answer = data
    with torch.no_grad():
        return float((model(input_ids=ids, use_cache=False).logits[:, -1].argmax(-1) == answer).float().mean())


# -- the base model and the adapters ----------------------------------------------------------------


def llama_config():  # type: ignore[no-untyped-def]
    from transformers import LlamaConfig

    return LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=32,
                       pad_token_id=PAD, bos_token_id=BOS, eos_token_id=SEP, tie_word_embeddings=False)


def make_base(directory: Path) -> float:
    """Pre-train the base on RULES (fresh sequences every step) and save it; returns its accuracy
    on a fresh sample of them."""
    import torch
    from transformers import LlamaForCausalLM

    torch.manual_seed(1234)
    model = LlamaForCausalLM(llama_config())
    optimizer = torch.optim.AdamW(model.parameters(), lr=BASE_LR, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=BASE_LR, total_steps=BASE_STEPS, pct_start=0.1)
    generator = torch.Generator().manual_seed(1)
    model.train()
    for _ in range(BASE_STEPS):
        loss = answer_loss(model, *sequences(generator, RULES, BASE_BATCH))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        schedule.step()
    model.eval()
    score = accuracy(model, sequences(torch.Generator().manual_seed(2), RULES, 2048))
    staging = directory.with_name(directory.name + ".partial")
    shutil.rmtree(staging, ignore_errors=True)
    model.save_pretrained(str(staging))
    (staging / "pretrain.json").write_text(json.dumps({"accuracy": score}))
    shutil.rmtree(directory, ignore_errors=True)
    staging.rename(directory)
    return score


def load_base(directory: Path):  # type: ignore[no-untyped-def]
    from transformers import LlamaForCausalLM

    model = LlamaForCausalLM.from_pretrained(str(directory)).eval()
    model.name_or_path = BASE_NAME  # recorded as base_model_name_or_path in the adapters
    return model


def train_adapter(base: Path, task: Task, pair: int, directory: Path) -> None:
    """A LoRA adapter for the task from its own seed (initial A, data order), saved by PEFT."""
    import torch
    from peft import LoraConfig, get_peft_model

    train, _ = splits(task)
    seed = task.seed + SEED_STEP * pair
    torch.manual_seed(seed)  # PEFT draws A (Kaiming-uniform) from the global generator; B starts at 0
    model = get_peft_model(load_base(base), LoraConfig(r=LORA_RANK, lora_alpha=LORA_ALPHA,
                                                       target_modules=list(LORA_TARGETS), lora_dropout=0.0,
                                                       task_type="CAUSAL_LM"))
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=LORA_LR)
    order = torch.Generator().manual_seed(seed * 1000 + 3)
    # Half of each batch replays pre-training, so that the adapter learns what its token means and
    # leaves the base's rules as they were (trained on its task alone, `a + b` kept neither task here).
    model.train()
    for _ in range(LORA_STEPS):
        pick = torch.randint(0, TRAIN_SIZE, (LORA_BATCH,), generator=order)
        replay = sequences(order, RULES, LORA_BATCH)
        loss = answer_loss(model, torch.cat([train[0][pick], replay[0]]), torch.cat([train[1][pick], replay[1]]))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    staging = directory.with_name(directory.name + ".partial")
    shutil.rmtree(staging, ignore_errors=True)
    model.save_pretrained(str(staging))
    shutil.rmtree(directory, ignore_errors=True)
    staging.rename(directory)


# -- the merges -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Method:
    name: str  # what --methods calls it
    expression: str | None  # over the inputs a and b; None: the base model alone
    mode: str = "exact"
    direct: bool = False  # the trained adapter directory itself, not a pemlang result


METHODS = (
    Method("base", None, mode="-"),
    Method("a", "a", mode="-", direct=True),
    Method("b", "b", mode="-", direct=True),
    Method("half-a", "0.5*a"),
    Method("paper-mean", "0.5*a + 0.5*b", mode="paper"),
    Method("exact-mean", "0.5*a + 0.5*b"),
    Method("exact-sum", "a + b"),
    Method("svd-ties", "svd(ties(a, b, density=0.2), rank=16)"),
    Method("core-mean", "core(0.5*a + 0.5*b)"),
    Method("core-ties", "core(ties(a, b, density=0.2))"),
    Method("knots-ties", "knots(ties(a, b, density=0.2))"),
    Method("svd-ties-x2", "2*svd(ties(a, b, density=0.2), rank=16)"),
    Method("core-ties-x2", "2*core(ties(a, b, density=0.2))"),
    Method("knots-ties-x2", "2*knots(ties(a, b, density=0.2))"),
    Method("tsv", "tsv(a, b)"),
    Method("iso-half", "0.5*iso(a + b)"),
    Method("iso", "iso(a + b)"),
)


def merge(method: Method, adapters: dict[str, Path], directory: Path) -> list[str]:
    """Write the method's merge with pemlang; returns the warnings the compile gave (code: message)."""
    import pemlang

    program = pemlang.compile(method.expression, mode=method.mode, inputs={k: str(v) for k, v in adapters.items()},
                              device="cpu")
    program.save(directory, force=True)
    if method.mode == "paper":
        program.paper_warnings()
    return [f"{d.code}: {d.message}" for d in program.warnings]


def score(base: Path, adapter: Path | None, data: dict[str, tuple]) -> dict[str, float]:  # type: ignore[type-arg]
    """Accuracy on each data set of the base with the adapter loaded by PEFT (the base alone for None)."""
    from peft import PeftModel

    model = load_base(base)
    if adapter is not None:
        model = PeftModel.from_pretrained(model, str(adapter)).eval()
    return {name: accuracy(model, sequences) for name, sequences in data.items()}


def a_cosine(adapters: dict[str, Path]) -> float:
    """The mean over layers of the cosine between the two adapters' A matrices (what W002 measures)."""
    import torch
    from safetensors.torch import load_file

    first, second = (load_file(str(adapters[t.name] / "adapter_model.safetensors")) for t in TASKS)
    cosines = [float(torch.nn.functional.cosine_similarity(first[k].flatten(), second[k].flatten(), dim=0))
               for k in first if k.endswith("lora_A.weight")]
    return sum(cosines) / len(cosines)


def cell(values: list[float]) -> str:
    """The mean over pairs, and their range when there are several."""
    mean = f"{sum(values) / len(values):.3f}"
    return mean if len(values) == 1 else f"{mean} ({min(values):.3f}–{max(values):.3f})"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--methods", help="comma-separated method names (default: all): "
                        + ", ".join(m.name for m in METHODS))
    parser.add_argument("--pairs", type=int, default=3, help="pairs of adapters, each pair from its own seeds "
                        "(default 3)")
    parser.add_argument("--out", help="results directory (default: $PEMLANG_BENCH_RESULTS, see common.py)")
    parser.add_argument("--work", help="keep the base, adapters and merges here, reusing a base and adapters "
                        "made by an earlier run (default: a temporary directory, deleted)")
    args = parser.parse_args(argv)
    if args.pairs < 1:
        parser.error("--pairs must be at least 1")
    common.require_bench_extra("transformers", "peft")
    by_name = {m.name: m for m in METHODS}
    if args.methods:
        names = [n.strip() for n in args.methods.split(",") if n.strip()]
        unknown = [n for n in names if n not in by_name]
        if unknown:
            parser.error(f"unknown method(s) {', '.join(unknown)}; known: {', '.join(by_name)}")
        methods = [by_name[n] for n in names]
    else:
        methods = list(METHODS)
    if args.out:
        common.RESULTS = Path(args.out).absolute()

    warnings.filterwarnings("ignore")
    import torch
    from transformers.utils import logging

    # The matrices are tiny: one thread is as fast as two, and does not stall when other work shares the cores.
    torch.set_num_threads(1)
    logging.set_verbosity_error()
    logging.disable_progress_bar()

    work = Path(args.work).absolute() if args.work else Path(tempfile.mkdtemp(prefix="pemlang-align-demo-"))
    work.mkdir(parents=True, exist_ok=True)
    clock = common.Phases()
    phases, lap = clock.seconds, clock.mark

    try:
        base = work / "base"
        if not base.exists():
            print("pre-training the base model ...", file=sys.stderr, flush=True)
            make_base(base)
        base_accuracy = json.loads((base / "pretrain.json").read_text())["accuracy"]
        lap("base")
        pairs = [{t.name: work / "adapters" / f"pair{pair}" / t.name for t in TASKS} for pair in range(args.pairs)]
        for pair, adapters in enumerate(pairs):
            for task in TASKS:
                if not adapters[task.name].exists():
                    print(f"training adapter {task.name} of pair {pair} (seed {task.seed + SEED_STEP * pair}) ...",
                          file=sys.stderr, flush=True)
                    train_adapter(base, task, pair, adapters[task.name])
        lap("adapters")
        data = {t.name: splits(t)[1] for t in TASKS}
        data["rules"] = sequences(torch.Generator().manual_seed(3), RULES, HELD_OUT_SIZE)  # what the base could do

        rows, notes, failed = [], {}, False
        for method in methods:
            print(f"{method.name} ...", file=sys.stderr, flush=True)
            shown = f"`{method.expression}`" if method.expression else "(no adapter)"
            scores: list[dict[str, float]] = []
            try:
                for pair, adapters in enumerate(pairs if method.expression else pairs[:1]):  # one base
                    if method.expression is None or method.direct:
                        adapter = adapters[method.expression] if method.expression else None
                    else:
                        adapter = work / "merged" / f"pair{pair}" / method.name
                        for warning in merge(method, adapters, adapter):
                            notes.setdefault(f"{method.name}: {warning}", []).append(pair)
                    scores.append(score(base, adapter, data))
            except Exception as exc:  # a CompileError (a function this pemlang lacks): in the table, exit 1
                failed = True
                first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
                rows.append([method.name, shown, method.mode, *("—" for _ in TASKS), f"not run: {first}", "—"])
                continue
            means = [sum(s[t.name] for t in TASKS) / len(TASKS) for s in scores]
            rows.append([method.name, shown, method.mode, *(cell([s[t.name] for s in scores]) for t in TASKS),
                         cell(means), cell([s["rules"] for s in scores])])
        lap("merge + evaluate")
        total = time.perf_counter() - clock.start

        cosines = [a_cosine(adapters) for adapters in pairs]
        header = ["method", "expression", "mode", *(f"task {t.name.upper()}" for t in TASKS), "mean",
                  "pre-training rules"]
        table = common.markdown_table(header, rows)
        tasks = "; ".join(f"{t.name.upper()}: {t.describe()}" for t in TASKS)
        seeds = ", ".join("/".join(str(t.seed + SEED_STEP * pair) for t in TASKS) for pair in range(args.pairs))
        command = "python benchmarks/align_demo.py"
        command += f" --methods {args.methods}" if args.methods else ""
        command += f" --pairs {args.pairs}" if args.pairs != 3 else ""
        text = (
            "# Adapters that do not share a basis: LoRA adapters from different seeds, merged\n\n"
            f"{common.environment_line('cpu')}\n\nCommand: `{command}`\n\n"
            f"Base: a Llama of hidden 64, 2 layers, vocabulary {VOCAB}, pre-trained {BASE_STEPS} steps on "
            f"{len(RULES)} rules `<s> R(k,c) x0…x7 <sep>` → (x_k + c) mod {ALPHABET} "
            f"(accuracy {base_accuracy:.3f} on them). Tasks, each under a token the base never saw and a (k, c) "
            f"pair it was never trained on: {tasks}. Adapters: PEFT LoRA r={LORA_RANK}, alpha={LORA_ALPHA}, "
            f"{'/'.join(LORA_TARGETS)}, {LORA_STEPS} steps on {TRAIN_SIZE} sequences of the task (half of each "
            f"batch replaying pre-training); {args.pairs} pair(s), each adapter from its own seed (A/B: {seeds}), "
            f"the cosine between a pair's A matrices (mean over layers) {min(cosines):.3f} to {max(cosines):.3f}. "
            f"Metric: accuracy of the answer token (argmax over the vocabulary) on {HELD_OUT_SIZE} held-out "
            f"sequences per task (chance {1 / ALPHABET:.3f}); mean: of the two tasks; pre-training rules: on "
            f"{HELD_OUT_SIZE} sequences of the base's own rules, what a merge keeps of the base. "
            + ("Each cell: the mean over the pairs (lowest–highest).\n\n" if args.pairs > 1 else "\n\n")
            + f"{table}\n"
            + ("\nWarnings from the compiles:\n\n"
               + "\n".join(f"- {note} (pairs {', '.join(map(str, found))})" for note, found in notes.items()) + "\n"
               if notes else "")
            + f"\nWall time {total:.0f} s (" + ", ".join(f"{k} {v:.0f} s" for k, v in phases.items()) + ").\n")
        print(text)
        print(f"wrote {common.write_results('align_demo', text)}")
        return 1 if failed else 0
    finally:
        if not args.work:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    sys.exit(main())
