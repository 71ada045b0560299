"""Run every benchmark for one size, each in its own process.

    python benchmarks/run_all.py [--size tinyllama|7b|70b-slice] [--device cpu|cuda]
                                 [--only end_to_end,roofline,memory,ties,align,into_base] [--layers L]
                                 [--out DIR] [--cache DIR] [--keep-fixtures]

end_to_end.py (pemlang vs PEFT), roofline.py (pemlang vs a plain copy), memory.py (peak RSS vs output
size), ties.py (svd(ties(…)) vs PEFT's ties_svd), align.py (core/knots vs the papers' dense fp64
recipe) and into_base.py (merging into the base model vs PEFT's merge_and_unload and a plain copy; at
`--size 7b` a 4-layer slice; CPU only). With `--device cuda` and no CUDA device each says so and is
skipped (exit 0). sweep.py (λ sweeps) and tune.py are separate.

Results (a table and a plot per benchmark) go to --out, by default pemlang-bench/results in the
system's temporary directory: the repository's committed benchmarks/results/ is replaced only when
--out names it. The generated adapters and base models (GBs: tinyllama about 5 GB) go to --cache and
are deleted at the end unless --keep-fixtures (keep them to rerun without regenerating).
On 2 CPU cores, `--size tinyllama` takes about 18 minutes without align.py, which adds the dense
reference's sampled layer (a full fp64 SVD per module) and pemlang runs at 4x the layers.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
SCRIPTS = ("end_to_end", "roofline", "memory", "ties", "align", "into_base")
WORKDIR = Path(tempfile.gettempdir()) / "pemlang-bench"


def directory_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file() and not f.is_symlink())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", choices=["tinyllama", "7b", "70b-slice"], default="tinyllama")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--only", default=",".join(SCRIPTS), help="comma-separated subset of " + ", ".join(SCRIPTS))
    parser.add_argument("--layers", type=int, help="memory.py's L (default: the size's layer count)")
    parser.add_argument("--out", type=Path, default=WORKDIR / "results",
                        help=f"where the tables and plots go (default {WORKDIR / 'results'}; "
                             "benchmarks/results replaces the committed ones)")
    parser.add_argument("--cache", type=Path, default=WORKDIR / "cache",
                        help=f"where the generated adapters and base models go (default {WORKDIR / 'cache'})")
    parser.add_argument("--keep-fixtures", action="store_true",
                        help="keep --cache at the end (to rerun without regenerating); deleted by default")
    args = parser.parse_args(argv)
    chosen = [name.strip() for name in args.only.split(",") if name.strip()]
    unknown = [name for name in chosen if name not in SCRIPTS]
    if unknown:
        parser.error(f"unknown benchmark(s): {', '.join(unknown)}")
    out, cache = args.out.absolute(), args.cache.absolute()
    if cache == out or cache in out.parents or out in cache.parents:
        parser.error("--out and --cache must be separate directories (the cache is deleted at the end)")
    if cache == HERE.parent or cache in HERE.parent.parents or cache == HERE or cache == HERE / "results":
        parser.error(f"--cache {cache} would delete the repository or its results; name a directory of its own")
    env = {**os.environ, "PEMLANG_BENCH_RESULTS": str(out), "PEMLANG_BENCH_CACHE": str(cache)}
    failed = []
    began = time.perf_counter()
    try:
        for name in chosen:
            command = [sys.executable, str(HERE / f"{name}.py"), "--size", args.size, "--device", args.device]
            if name == "memory" and args.layers is not None:
                command += ["--layers", str(args.layers)]
            if name == "into_base" and args.keep_fixtures:
                command.append("--keep-fixtures")
            print(f"=== {name} --size {args.size} --device {args.device}", flush=True)
            start = time.perf_counter()
            code = subprocess.call(command, env=env)
            print(f"=== {name}: exit {code} in {time.perf_counter() - start:.0f} s\n", flush=True)
            if code:
                failed.append(name)
    finally:
        if cache.exists() and not args.keep_fixtures:
            size = directory_bytes(cache)
            shutil.rmtree(cache, ignore_errors=True)
            print(f"removed the fixtures in {cache} ({size / 2**30:.1f} GiB; --keep-fixtures keeps them)")
    print(f"results in {out}; {len(chosen)} benchmark(s) in {(time.perf_counter() - began) / 60:.1f} min")
    if failed:
        print(f"failed: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
