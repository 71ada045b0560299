"""Run every benchmark for one size, each in its own process; results land in benchmarks/results/.

    python benchmarks/run_all.py [--size tinyllama|7b|70b-slice] [--device cpu|cuda]
                                 [--only end_to_end,roofline,memory,ties]

end_to_end.py (pemlang vs PEFT), roofline.py (pemlang vs a plain copy), memory.py (peak RSS vs output
size) and ties.py (svd(ties(…)) vs PEFT's ties_svd). With `--device cuda` and no CUDA device each says
so and is skipped (exit 0). sweep.py (λ sweeps) is separate: it takes its own shape options.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
SCRIPTS = ("end_to_end", "roofline", "memory", "ties")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", choices=["tinyllama", "7b", "70b-slice"], default="tinyllama")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--only", default=",".join(SCRIPTS), help="comma-separated subset of " + ", ".join(SCRIPTS))
    args = parser.parse_args()
    chosen = [name.strip() for name in args.only.split(",") if name.strip()]
    unknown = [name for name in chosen if name not in SCRIPTS]
    if unknown:
        parser.error(f"unknown benchmark(s): {', '.join(unknown)}")
    failed = []
    for name in chosen:
        print(f"=== {name} --size {args.size} --device {args.device}", flush=True)
        start = time.perf_counter()
        code = subprocess.call([sys.executable, str(HERE / f"{name}.py"), "--size", args.size, "--device", args.device])
        print(f"=== {name}: exit {code} in {time.perf_counter() - start:.0f} s\n", flush=True)
        if code:
            failed.append(name)
    if failed:
        sys.exit(f"failed: {', '.join(failed)}")


if __name__ == "__main__":
    main()
