"""λ sweep vs N separate runs, measured side by side in one process.

    python benchmarks/sweep.py [--hidden 2048] [--layers 16] [--rank 16] [--points 11]

Makes three LoRA adapters in PEFT's format (q/k/v/o of a Llama-like model, written with
safetensors as PEFT writes them) and a domain-transfer program with a param λ, then times:

  A. N separate `pemlang run FILE --set λ=v` processes, one per value (what a shell loop does);
  B. one `pemlang run FILE --sweep λ=0:1:step` process;
  C. N separate in-process `pemlang.compile(...).save(...)` calls;
  D. one in-process `pemlang.compile(...)` and a `sweep`, saving each point.

and prints the ratios A/B and C/D. The sweep parses, checks and reads its inputs once.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import save_file


def make_adapter(directory: Path, seed: int, hidden: int, layers: int, rank: int) -> None:
    generator = torch.Generator().manual_seed(seed)
    tensors = {}
    for layer in range(layers):
        for module in ("q_proj", "k_proj", "v_proj", "o_proj"):
            key = f"base_model.model.model.layers.{layer}.self_attn.{module}"
            tensors[f"{key}.lora_A.weight"] = torch.randn(rank, hidden, generator=generator) / hidden**0.5
            tensors[f"{key}.lora_B.weight"] = torch.randn(hidden, rank, generator=generator) * 0.01
    directory.mkdir(parents=True)
    save_file(tensors, str(directory / "adapter_model.safetensors"), metadata={"format": "pt"})
    config = {"peft_type": "LORA", "r": rank, "lora_alpha": 2 * rank, "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj"],
              "base_model_name_or_path": "bench/llama", "revision": None, "task_type": "CAUSAL_LM", "bias": "none",
              "fan_in_fan_out": False, "use_rslora": False, "use_dora": False, "modules_to_save": None,
              "rank_pattern": {}, "alpha_pattern": {}, "inference_mode": True}
    (directory / "adapter_config.json").write_text(json.dumps(config))


PROGRAM = """input cls = "adapters/cls"
input lm_a = "adapters/lm_a"
input lm_b = "adapters/lm_b"
param lam = 0.5
output lam*cls + (1 - lam)*(lm_b - lm_a) -> "out/transfer"
"""


def timed(action) -> float:  # type: ignore[no-untyped-def]
    start = time.perf_counter()
    action()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hidden", type=int, default=2048)
    parser.add_argument("--layers", type=int, default=16)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--points", type=int, default=11)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()

    import pemlang

    root = Path(tempfile.mkdtemp(prefix="pemlang-sweep-bench-"))
    try:
        for seed, name in enumerate(("cls", "lm_a", "lm_b")):
            make_adapter(root / "adapters" / name, seed, args.hidden, args.layers, args.rank)
        (root / "bench.pem").write_text(PROGRAM)
        size = sum(f.stat().st_size for f in (root / "adapters").rglob("*.safetensors"))
        step = 1 / (args.points - 1)
        values = [round(i * step, 12) for i in range(args.points)]
        cli = [sys.executable, "-m", "pemlang.cli"]
        print(f"3 inputs, {args.layers * 4} layers each, {args.hidden}x{args.hidden}, rank {args.rank}: "
              f"{size / 2**20:.1f} MiB read; {args.points} values of lam; device {args.device}")

        def separate_processes() -> None:
            for v in values:
                subprocess.run([*cli, "run", str(root / "bench.pem"), "--set", f"lam={v}", "--force",
                                "--device", args.device], check=True, capture_output=True)

        def one_sweep_process() -> None:
            subprocess.run([*cli, "run", str(root / "bench.pem"), "--sweep", f"lam=0:1:{step!r}", "--force",
                            "--device", args.device], check=True, capture_output=True)

        def separate_calls() -> None:
            for v in values:
                pemlang.load(root / "bench.pem", device=args.device).save(lam=v, force=True)

        def one_sweep_call() -> None:
            program = pemlang.load(root / "bench.pem", device=args.device)
            for _ in program.sweep(lam=values, save=True, force=True):
                pass

        a = timed(separate_processes)
        b = timed(one_sweep_process)
        c = timed(separate_calls)
        d = timed(one_sweep_call)
        print(f"A  {args.points} separate `pemlang run --set` processes: {a:8.2f} s")
        print(f"B  one `pemlang run --sweep` process:            {b:8.2f} s")
        print(f"C  {args.points} separate compile+save calls:        {c:8.2f} s")
        print(f"D  one compile, sweep + save per point:           {d:8.2f} s")
        print(f"ratio A/B (processes): {a / b:.2f}x   ratio C/D (in process): {c / d:.2f}x")
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
