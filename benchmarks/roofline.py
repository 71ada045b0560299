"""How close pemlang's exact mode gets to a plain copy of the same bytes.

    python benchmarks/roofline.py [--size tinyllama|7b|70b-slice] [--device cpu|cuda] [--repeat 3]

In one process, after importing pemlang and torch, on the three synthetic adapters of
benchmarks/common.py and `0.5*a + 0.3*b - 0.2*c` in exact mode (the output is the three inputs'
factors concatenated and scaled, so its size is the inputs' size):

  pemlang cold   `pemlang.compile(...).save(DIR)` on a fresh program: read inputs, compute, write
  copy           read the inputs' files, write the output's number of bytes to a file, fsync
                 (pemlang fsyncs its output file and directory)
  pemlang warm   `save` again on the same program: its inputs are kept in memory, so compute + write
  write          write the output's number of bytes, fsync
  evaluate warm  `evaluate` on the same program: compute only, nothing written

and prints pemlang/copy throughput (copy time / pemlang time: 1.0 means pemlang runs at the speed of
a copy): cold vs copy, warm vs write. Each is the best of --repeat runs. The inputs are in the page
cache for both (they were just generated or read); the output's file is written on the same file
system (the fixture cache). Results: roofline-SIZE.md and .png in
$PEMLANG_BENCH_RESULTS (see common.py).
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

CHUNK = 16 * common.MiB


def copy_bytes(sources: list[Path], target: Path, size: int, read: bool) -> None:
    """Read the sources (when `read`), then write `size` bytes to `target` and fsync it."""
    buffer = bytearray()
    if read:
        for source in sources:
            with open(source, "rb") as f:
                buffer += f.read()
    chunk = bytes(buffer[:CHUNK]) if len(buffer) >= CHUNK else bytes(CHUNK)
    with open(target, "wb") as f:
        left = size
        while left > 0:
            n = min(left, CHUNK)
            f.write(chunk[:n] if n < CHUNK else chunk)
            left -= n
        f.flush()
        os.fsync(f.fileno())
    target.unlink()


MEDIANS: dict[str, float] = {}


def best(name: str, action, repeat: int) -> float:  # type: ignore[no-untyped-def]
    """The best of `repeat` runs (the median is kept in MEDIANS: other jobs on the machine add noise)."""
    import statistics

    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        action()
        times.append(time.perf_counter() - start)
    MEDIANS[name] = statistics.median(times)
    return min(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", choices=list(common.SIZES), default="tinyllama")
    parser.add_argument("--device", default="cpu", help="cpu or cuda (cuda without a device: skipped, exit 0)")
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()
    common.require_bench_extra()
    common.cuda_or_exit(args.device)

    import torch  # noqa: F401  (imported first, as in the brief: not timed)

    import pemlang

    shape = common.SIZES[args.size]
    inputs = common.adapters(shape)
    files = [p / "adapter_model.safetensors" for p in inputs.values()]
    input_bytes = sum(f.stat().st_size for f in files)
    work = common.CACHE / shape.key / "roofline"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    out = work / "exact"

    def compile_program():  # type: ignore[no-untyped-def]
        return pemlang.compile(common.EXPRESSION, inputs={n: str(p) for n, p in inputs.items()}, mode="exact",
                               device=args.device)

    def cold() -> None:
        compile_program().save(out, force=True)

    cold_s = best("cold", cold, args.repeat)
    output_bytes = (out / "adapter_model.safetensors").stat().st_size
    program = compile_program()
    program.save(out, force=True)  # reads the inputs into the program's tensor cache
    warm_s = best("warm", lambda: program.save(out, force=True), args.repeat)
    evaluate_s = best("evaluate", lambda: program.evaluate(), args.repeat)
    copy_s = best("copy", lambda: copy_bytes(files, work / "copy.bin", output_bytes, read=True), args.repeat)
    write_s = best("write", lambda: copy_bytes(files, work / "copy.bin", output_bytes, read=False), args.repeat)
    shutil.rmtree(work, ignore_errors=True)

    def row(what: str, name: str, seconds: float, nbytes: int, reference: float) -> list[str]:
        return [what, f"{seconds:.2f}", f"{MEDIANS[name]:.2f}", f"{nbytes / seconds / common.MiB:,.0f}",
                f"{reference / seconds:.2f}"]

    moved = input_bytes + output_bytes
    rows = [
        row("copy: read inputs + write output + fsync", "copy", copy_s, moved, copy_s),
        row("pemlang cold: compile + save", "cold", cold_s, moved, copy_s),
        row("write output + fsync", "write", write_s, output_bytes, write_s),
        row("pemlang warm: save (inputs in memory)", "warm", warm_s, output_bytes, write_s),
        row("pemlang warm: evaluate (no write)", "evaluate", evaluate_s, output_bytes, write_s),
    ]
    table = common.markdown_table(["what", "best s", "median s", "MiB/s (best)", "fraction of copy/write throughput"], rows)
    text = "\n\n".join([
        f"# roofline: {args.size}",
        common.environment_line(args.device),
        f"exact mode, `{common.EXPRESSION}`: {input_bytes / common.MiB:.0f} MiB read (3 inputs, page cache), "
        f"{output_bytes / common.MiB:.0f} MiB written; best of {args.repeat}. MiB/s counts bytes read + written "
        "for the cold rows, bytes written for the warm ones; the fraction is the copy's (or write's) time over "
        "pemlang's.",
        table,
        f"**pemlang/copy throughput: {copy_s / cold_s:.2f} cold, {write_s / warm_s:.2f} warm (vs write only).**",
    ])
    md = common.write_results(f"roofline-{args.size}", text)
    plt = common.pyplot()
    fig, ax = plt.subplots(figsize=(8, 3.5))
    labels = ["copy", "pemlang cold", "write", "pemlang warm save", "pemlang evaluate"]
    seconds = [copy_s, cold_s, write_s, warm_s, evaluate_s]
    ax.barh(labels[::-1], seconds[::-1], color=["C2", "C1", "C2", "C0", "C0"][::-1])
    ax.set_xlabel(f"seconds (best of {args.repeat})")
    ax.set_title(f"roofline, {args.size}: {input_bytes / common.MiB:.0f} MiB in, {output_bytes / common.MiB:.0f} MiB out")
    common.save_figure(fig, md.with_suffix(".png"))
    print(text)
    print(f"\nwrote {md} and {md.with_suffix('.png')}")


if __name__ == "__main__":
    main()
