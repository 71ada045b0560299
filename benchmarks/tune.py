"""`pemlang tune` (in memory) against the shell route, on a 21-point λ grid, side by side in one run.

    python benchmarks/tune.py [--points 21]

Uses the example adapters and base model (`python examples/make_adapters.py` first; this script
makes them when they are missing) and the built-in objective over `examples/tune_data.jsonl`:

  A. the shell route, per λ: `pemlang run examples/detoxify.pem --set λ=v --force` (an adapter on
     disk), then a Python process that loads the base, `PeftModel.from_pretrained` the adapter and
     computes the same loss (what people script today);
  B. one `pemlang tune ... --param λ=0:1:STEP --no-save` process: the base loaded once, each
     trial's adapter written into the loaded PeftModel in place.

Both are timed whole-process (Python start-up and imports included), and the losses of A are
checked equal to B's trial values. Prints trials per minute for each and the ratio B/A; writes
tune.md in $PEMLANG_BENCH_RESULTS (see common.py).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import environment_line, markdown_table, write_results  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
EVALUATE = """
import json, sys, torch, warnings
warnings.filterwarnings("ignore")
from transformers import AutoModelForCausalLM, AutoTokenizer
from transformers.utils import logging
logging.set_verbosity_error(); logging.disable_progress_bar()
from peft import PeftModel
base, adapter, data = sys.argv[1:4]
tokenizer = AutoTokenizer.from_pretrained(base)
model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), adapter).eval()
total, count = 0.0, 0
for line in open(data):
    if not line.strip():
        continue
    record = json.loads(line)
    prompt = tokenizer(record["input"])["input_ids"]
    answer = tokenizer(record["output"], add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    ids = torch.tensor([prompt + answer])
    with torch.no_grad():
        logprobs = torch.log_softmax(model(input_ids=ids).logits[0].double(), -1)
    for t in range(len(prompt), ids.shape[1]):
        total -= float(logprobs[t - 1, ids[0, t]])
        count += 1
print(total / count)
"""


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--points", type=int, default=21)
    args = parser.parse_args(argv)
    if args.points < 2:
        parser.error("--points must be at least 2")
    work = Path(tempfile.mkdtemp(prefix="pemlang-bench-tune-"))
    try:
        examples = work / "examples"
        shutil.copytree(ROOT / "examples", examples, ignore=shutil.ignore_patterns("adapters", "out", "*.tune.*"))
        subprocess.run([sys.executable, str(examples / "make_adapters.py")], check=True, capture_output=True)
        env = {**os.environ, "PYTHONPATH": str(ROOT)}
        base, data = "examples/adapters/base", "examples/tune_data.jsonl"
        step = 1 / (args.points - 1)
        values = [round(i * step, 12) for i in range(args.points)]

        start = time.perf_counter()
        shell: dict[float, float] = {}
        for value in values:
            subprocess.run([sys.executable, "-m", "pemlang.cli", "run", "examples/detoxify.pem", "--set", f"λ={value!r}",
                            "--force"], cwd=work, env=env, check=True, capture_output=True)
            done = subprocess.run([sys.executable, "-c", EVALUATE, base, "examples/out/detoxified", data], cwd=work,
                                  env=env, check=True, capture_output=True, text=True)
            shell[value] = float(done.stdout.strip().splitlines()[-1])
        shell_seconds = time.perf_counter() - start

        start = time.perf_counter()
        subprocess.run([sys.executable, "-m", "pemlang.cli", "tune", "examples/detoxify.pem", "--base", base, "--data",
                        data, "--param", f"λ=0:1:{step!r}", "--no-save", "--study", "bench.db"],
                       cwd=work, env=env, check=True, capture_output=True)
        tune_seconds = time.perf_counter() - start

        import optuna

        optuna.logging.set_verbosity(optuna.logging.ERROR)
        trials = optuna.load_study(study_name="pemlang", storage=f"sqlite:///{work / 'bench.db'}").trials
        tuned = {round(t.params["λ"], 12): t.value for t in trials if t.state.name == "COMPLETE"}
        worst = max(abs(tuned[v] - shell[v]) / abs(shell[v]) for v in values)
        if len(tuned) != len(values) or worst > 1e-5:
            raise SystemExit(f"the two routes disagree: {len(tuned)} trials, worst relative difference {worst:.2e}")
        per_minute = {name: len(values) / seconds * 60 for name, seconds in (("shell", shell_seconds),
                                                                              ("tune", tune_seconds))}
        ratio = per_minute["tune"] / per_minute["shell"]
        table = markdown_table(
            ["route", "wall (s)", "trials / min"],
            [["A. shell: `pemlang run --set` + `PeftModel.from_pretrained` + evaluate, per point",
              f"{shell_seconds:.1f}", f"{per_minute['shell']:.1f}"],
             ["B. `pemlang tune` (in memory)", f"{tune_seconds:.1f}", f"{per_minute['tune']:.1f}"]])
        text = (f"# `pemlang tune` vs the shell route: {len(values)}-point λ grid, tiny Llama\n\n"
                f"{environment_line('cpu')}\n\nCommand: `python benchmarks/tune.py --points {args.points}`\n\n{table}\n\n"
                f"**B/A: {ratio:.1f}× the trials per minute** (target ≥ 5×). Losses agree to "
                f"{worst:.1e} (relative) at every point.\n")
        print(text)
        print(f"wrote {write_results('tune', text)}")
        print(json.dumps({"shell_s": shell_seconds, "tune_s": tune_seconds, "ratio": ratio}))
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
