"""Peak RSS of `pemlang eval` against the output's size: does memory stay flat as adapters grow?

    python benchmarks/memory.py [--size tinyllama|7b|70b-slice] [--device cpu|cuda] [--multiples 1,4,16]
                                [--layers L] [--mode exact|paper|svd]

Synthesizes three adapters of the size's shape (benchmarks/common.py) with L, 4L, 16L transformer
layers (L: the size's layer count, or --layers), runs `pemlang eval` on `0.5*a + 0.3*b - 0.2*c` (exact
mode by default: the largest output, the inputs' size) in a child process per point, and records its peak
RSS (the kernel's high-water mark) next to the torch baseline, the peak RSS of
`python -c "import torch, safetensors.torch"`.

Per point it reports the check

    peak ≤ baseline + 64 MiB + 2 × largest layer

where "largest layer" is the largest LoRA layer (one module's lora_A + lora_B, as pemlang counts layers)
summed over the inputs: the bytes one output layer is computed from. 2× that is what a writer that
streams layer by layer holds at once (one layer's inputs and its output). PASS/FAIL is a report, not an
assertion. Results: memory-SIZE.md and .png in
$PEMLANG_BENCH_RESULTS (see common.py).
"""

from __future__ import annotations

import argparse
import json
import shutil
import struct
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

SLACK = 64 * common.MiB


def layer_bytes(directory: Path) -> dict[str, int]:
    """Bytes per LoRA layer (module prefix: its lora_A + lora_B), from the safetensors header."""
    with open(directory / "adapter_model.safetensors", "rb") as f:
        header = json.loads(f.read(struct.unpack("<Q", f.read(8))[0]))
    sizes: dict[str, int] = {}
    for key, value in header.items():
        if key == "__metadata__":
            continue
        prefix = key.split(".lora_")[0]
        start, end = value["data_offsets"]
        sizes[prefix] = sizes.get(prefix, 0) + end - start
    return sizes


def largest_layer(inputs: dict[str, Path]) -> int:
    total: dict[str, int] = {}
    for directory in inputs.values():
        for prefix, size in layer_bytes(directory).items():
            total[prefix] = total.get(prefix, 0) + size
    return max(total.values())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", choices=list(common.SIZES), default="tinyllama")
    parser.add_argument("--device", default="cpu", help="cpu or cuda (cuda without a device: skipped, exit 0)")
    parser.add_argument("--multiples", default="1,4,16", help="layer multiples of L, comma-separated")
    parser.add_argument("--layers", type=int, help="L (default: the size's layer count)")
    parser.add_argument("--mode", choices=["exact", "paper", "svd"], default="exact")
    args = parser.parse_args()
    common.require_bench_extra()
    common.cuda_or_exit(args.device)

    shape = common.SIZES[args.size]
    base_layers = args.layers or shape.layers
    multiples = [int(m) for m in args.multiples.split(",")]
    baseline = common.baseline_rss()
    expression = f"svd({common.EXPRESSION}, rank={shape.rank})" if args.mode == "svd" else common.EXPRESSION
    print(f"{args.size}: L={base_layers}, multiples {multiples}, `{expression}` ({args.mode}); "
          f"baseline (import torch, safetensors.torch) {common.mib(baseline)} MiB", flush=True)
    import psutil

    points: list[dict] = []  # type: ignore[type-arg]
    skipped = []
    for multiple in multiples:
        s = shape.with_layers(base_layers * multiple)
        if points:  # a point whose peak, extrapolated from the last one, would not fit in memory is skipped
            last = points[-1]
            projected = baseline + (last["peak"] - baseline) * s.layers / last["layers"]
            if projected > 0.8 * psutil.virtual_memory().available:
                skipped.append(f"{multiple}L = {s.layers} layers skipped: projected peak {projected / 2**30:.1f} GiB "
                               f"(from {last['multiple']}L), {psutil.virtual_memory().available / 2**30:.1f} GiB available")
                print("  " + skipped[-1], flush=True)
                continue
        inputs = common.adapters(s)
        out = common.CACHE / s.key / "memory-out"
        command = [*common.pemlang_cli(), "eval", *[f"--input={n}={p}" for n, p in inputs.items()], "--out", str(out),
                   "--mode", "paper" if args.mode == "paper" else "exact", "--device", args.device, "--force",
                   "--", expression]
        measured = common.measure(command)
        output = common.lora_bytes(out)
        shutil.rmtree(out, ignore_errors=True)
        input_bytes = sum(common.lora_bytes(p) for p in inputs.values())
        largest = largest_layer(inputs)
        bound = baseline + SLACK + 2 * largest
        points.append({"multiple": multiple, "layers": s.layers, "input": input_bytes, "output": output,
                       "peak": measured.peak_rss, "largest": largest, "bound": bound, "wall": measured.wall_s})
        print(f"  {multiple:3d}L = {s.layers:4d} layers: output {common.mib(output)} MiB, peak {common.mib(measured.peak_rss)}"
              f" MiB, bound {common.mib(bound)} MiB: {'PASS' if measured.peak_rss <= bound else 'FAIL'}", flush=True)

    rows = [[f"{p['multiple']}L = {p['layers']}", p["layers"] * 7, common.mib(p["input"]), common.mib(p["output"]),
             f"{p['wall']:.1f}", common.mib(p["peak"]), common.mib(p["peak"] - baseline),
             f"{p['largest'] / common.MiB:.2f}", common.mib(p["bound"]), "PASS" if p["peak"] <= p["bound"] else "FAIL"]
            for p in points]
    table = common.markdown_table(["transformer layers", "LoRA layers", "inputs MiB", "output MiB", "wall s", "peak RSS MiB",
                                   "peak − baseline MiB", "largest layer MiB", "bound MiB", "check"], rows)
    slope = ""
    if len(points) >= 2:
        first, last = points[0], points[-1]
        per = (last["peak"] - first["peak"]) / max(last["output"] - first["output"], 1)
        slope = (f"Peak RSS grows by {per:.2f} MiB per MiB of output between {first['multiple']}L and "
                 f"{last['multiple']}L (0 for a writer whose memory does not depend on the output's size).")
    text = "\n\n".join(x for x in [
        f"# memory: {args.size}",
        common.environment_line(args.device),
        f"`pemlang eval` ({args.mode} mode, `{expression}`), 3 inputs of the {args.size} shape (7 modules per "
        f"transformer layer, r={shape.rank}), L={base_layers}. Baseline: peak RSS of "
        f"`python -c \"import torch, safetensors.torch\"` = {common.mib(baseline)} MiB. "
        "Check: peak ≤ baseline + 64 MiB + 2 × largest layer (one module's A+B, summed over the inputs).",
        table,
        "\n".join(f"- {line}" for line in skipped),
        slope,
    ] if x)
    md = common.write_results(f"memory-{args.size}", text)
    plt = common.pyplot()
    fig, ax = plt.subplots(figsize=(7, 4))
    xs = [p["output"] / common.MiB for p in points]
    ax.plot(xs, [p["peak"] / common.MiB for p in points], "o-", label="pemlang eval peak RSS")
    ax.plot(xs, [p["bound"] / common.MiB for p in points], "s--", label="bound: baseline + 64 MiB + 2× largest layer")
    ax.axhline(baseline / common.MiB, color="grey", linestyle=":", label="baseline: import torch, safetensors")
    for p, x in zip(points, xs, strict=True):
        ax.annotate(f"{p['multiple']}L", (x, p["peak"] / common.MiB), textcoords="offset points", xytext=(4, 4))
    ax.set_xlabel("output size (MiB)")
    ax.set_ylabel("peak RSS (MiB)")
    ax.set_title(f"memory, {args.size} ({args.mode} mode)")
    ax.legend()
    common.save_figure(fig, md.with_suffix(".png"))
    print()
    print(text)
    print(f"\nwrote {md} and {md.with_suffix('.png')}")


if __name__ == "__main__":
    main()
