"""pemlang vs the PEFT route, end to end, on the same three adapters.

    python benchmarks/end_to_end.py [--size tinyllama|7b|70b-slice] [--device cpu|cuda] [--svd-sample-layers 2]

Three synthetic LoRA adapters a, b, c in PEFT's format (benchmarks/common.py; q/k/v/o/gate/up/down of
every layer) are combined as 0.5*a + 0.3*b - 0.2*c, three ways, each way by both tools:

  exact   `pemlang eval --mode exact`                         vs PEFT add_weighted_adapter "cat"
  paper   `pemlang eval` (paper mode: A and B added)          vs PEFT add_weighted_adapter "linear"
  svd     `pemlang eval --mode exact "svd(EXPR, rank=R)"`     vs PEFT add_weighted_adapter "svd" (rank R)

Every route runs in its own child process (Python start-up and imports included), so wall time and
peak RSS (the kernel's high-water mark, from wait4) are per route. The PEFT route is what a PEFT user
does: load the base model (a random bf16 LlamaForCausalLM of the size's shape, saved once to
the fixture cache as safetensors, so that loading it is what is timed), PeftModel.from_pretrained +
load_adapter for the three adapters, add_weighted_adapter, save_pretrained. pemlang needs no base model.

PEFT's "svd" forms every layer's dense ΔW and takes a full SVD of it (minutes per model on a CPU), so
it runs for a sample of layers only (the others are skipped inside PEFT's per-layer routine) and its
time is scaled to all layers: wall + Σ sampled SVD times × (layers / sampled − 1). Its peak RSS is
measured, not scaled (one layer's SVD at a time). The table marks scaled numbers.

Accuracy of `svd`: on a few layers, the relative Frobenius error of pemlang's ΔW against an fp64 dense
truncated SVD of the exact ΔW (and of PEFT's, for comparison), plus the exact output against the
exact ΔW. Results: end_to_end-SIZE.md and .png in
$PEMLANG_BENCH_RESULTS (see common.py).
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

PAIRS = (("exact", "cat"), ("paper", "linear"), ("svd", "svd"))


def feasible_shape(shape: common.Shape) -> tuple[common.Shape, str]:
    """The largest layer count whose bf16 base model fits this machine's free memory and disk."""
    import psutil

    available = psutil.virtual_memory().available
    free_disk = shutil.disk_usage(common.HERE).free
    adapters_bytes = 3 * 4 * shape.rank * sum(o + i for _, o, i in common.module_shapes(shape).values())

    def fits(layers: int) -> bool:
        s = shape.with_layers(layers)
        memory = 1.3 * common.base_bytes(s) + 3 * adapters_bytes * layers + 2 * 2**30
        base_on_disk = (CACHE_BASE(s) / ".complete").exists()
        disk = 0 if base_on_disk else common.base_bytes(s) + 3 * adapters_bytes * layers
        return memory < 0.85 * available and disk < 0.8 * free_disk

    if fits(shape.layers):
        return shape, ""
    layers = max((n for n in range(1, shape.layers) if fits(n)), default=0)
    if layers == 0:
        sys.exit(f"{shape.name}: not even one layer of the base model fits "
                 f"({available / 2**30:.1f} GiB memory free, {free_disk / 2**30:.1f} GiB disk free)")
    note = (f"**{shape.name} does not fit this machine** ({shape.layers} layers: base model "
            f"{common.base_bytes(shape) / 2**30:.1f} GiB bf16, {available / 2**30:.1f} GiB memory available, "
            f"{free_disk / 2**30:.1f} GiB disk free): measured with the largest feasible, {layers} layers, "
            f"for both tools.")
    return shape.with_layers(layers), note


def CACHE_BASE(shape: common.Shape) -> Path:  # noqa: N802
    return common.CACHE / shape.key / "base"


# -- the PEFT route, run as a child: `end_to_end.py --worker ...` -----------------------------------


def peft_worker(args: argparse.Namespace) -> None:
    clock = common.Phases()
    phases, mark = clock.seconds, clock.mark

    import torch
    import transformers  # noqa: F401 - timed with the other imports (load_bf16_llama uses it)
    from peft import PeftModel
    from peft.tuners.lora import LoraLayer

    mark("import")
    model = common.load_bf16_llama(args.base)
    if args.device != "cpu":
        model.to(args.device)
    mark("load base")
    import psutil

    rss_after_base = psutil.Process().memory_info().rss
    inputs = json.loads(args.inputs)
    names = list(inputs)
    model = PeftModel.from_pretrained(model, inputs[names[0]], adapter_name=names[0])
    for name in names[1:]:
        model.load_adapter(inputs[name], adapter_name=name)
    mark("load adapters")
    svd_times: list[float] = []
    if args.combination.endswith("svd"):  # svd, ties_svd, dare_ties_svd, …: one dense SVD per layer
        sample = {int(x) for x in args.sample_layers.split(",")}
        layer_of = {id(m): int(re.search(r"\.layers\.(\d+)\.", n).group(1))  # type: ignore[union-attr]
                    for n, m in model.named_modules() if isinstance(m, LoraLayer)}
        lora_model = model.base_model
        original = lora_model._svd_generalized_task_arithmetic_weighted_adapter

        def sampled(combination_type, adapters, weights, new_rank, target, target_lora_A, target_lora_B,  # type: ignore[no-untyped-def]
                    *rest, **kw):
            if layer_of[id(target)] not in sample:  # skipped: left as PEFT zeroed it
                return target_lora_A.data, target_lora_B.data
            t = time.perf_counter()
            result = original(combination_type, adapters, weights, new_rank, target, target_lora_A, target_lora_B,
                              *rest, **kw)
            if args.device != "cpu":
                torch.cuda.synchronize()
            svd_times.append(time.perf_counter() - t)
            return result

        lora_model._svd_generalized_task_arithmetic_weighted_adapter = sampled
    weights = json.loads(args.weights)
    extra = {"density": float(args.density)} if args.density else {}
    model.add_weighted_adapter(names, [weights[n] for n in names], "merged", combination_type=args.combination,
                               svd_rank=args.rank if args.combination.endswith("svd") else None, **extra)
    mark("add_weighted_adapter")
    model.save_pretrained(args.out, selected_adapters=["merged"])
    mark("save_pretrained")
    Path(args.json).write_text(json.dumps({"phases": phases, "svd_times": svd_times, "rss_after_base": rss_after_base}))


# -- the parent ------------------------------------------------------------------------------------


def run_pemlang(route: str, inputs: dict[str, Path], out: Path, rank: int, device: str) -> common.Measured:
    expression = f"svd({common.EXPRESSION}, rank={rank})" if route == "svd" else common.EXPRESSION
    mode = "paper" if route == "paper" else "exact"
    command = [*common.pemlang_cli(), "eval", *[f"--input={n}={p}" for n, p in inputs.items()],
               "--out", str(out), "--mode", mode, "--device", device, "--force", "--", expression]
    return common.measure(command)


def run_peft(combination: str, inputs: dict[str, Path], base: Path, out: Path, rank: int, device: str,
             sample_layers: list[int], weights: dict[str, float] | None = None, density: float | None = None
             ) -> tuple[common.Measured, dict]:  # type: ignore[type-arg]
    report = out.with_suffix(".json")
    command = [sys.executable, __file__, "--worker", "--combination", combination, "--base", str(base),
               "--out", str(out), "--inputs", json.dumps({n: str(p) for n, p in inputs.items()}),
               "--weights", json.dumps(weights or common.WEIGHTS), "--rank", str(rank), "--device", device,
               "--sample-layers", ",".join(map(str, sample_layers)), "--json", str(report)]
    if density is not None:
        command += ["--density", str(density)]
    measured = common.measure(command)
    return measured, json.loads(report.read_text())


def _error(x: dict, reference: dict) -> float:  # type: ignore[type-arg]
    """Relative Frobenius error of x against reference, over all their modules together."""
    import torch

    num = sum(float(torch.linalg.norm(x[p] - reference[p]) ** 2) for p in reference)
    den = sum(float(torch.linalg.norm(reference[p]) ** 2) for p in reference)
    return (num / den) ** 0.5


def accuracy(shape: common.Shape, inputs: dict[str, Path], outputs: dict[str, Path], layers: list[int],
             peft_svd_layers: set[int], max_elements: int) -> list[list[object]]:
    """Relative errors per sampled layer (all seven modules, summed squares)."""
    import torch

    rows = []
    for layer in layers:
        prefixes = [common.module_prefix(layer, m, p) for m, (p, o, i) in common.module_shapes(shape).items()
                    if o * i <= max_elements]
        exact: dict[str, torch.Tensor] = {}
        for name, directory in inputs.items():
            for prefix, dw in common.delta_weights(directory, prefixes).items():
                exact[prefix] = exact.get(prefix, 0) + common.WEIGHTS[name] * dw  # type: ignore[operator]
        best = {p: common.truncated_svd(dw, shape.rank) for p, dw in exact.items()}
        got = {route: common.delta_weights(directory, prefixes) for route, directory in outputs.items()
               if route != "PEFT svd" or layer in peft_svd_layers}

        rows.append([f"{layer} ({len(prefixes)} of 7 modules)", f"{_error(got['pemlang exact'], exact):.1e}",
                     f"{_error(got['PEFT cat'], exact):.1e}" if "PEFT cat" in got else "n/a",
                     f"{_error(best, exact):.4f}", f"{_error(got['pemlang svd'], best):.1e}",
                     f"{_error(got['PEFT svd'], best):.1e}" if "PEFT svd" in got
                     else "not run" if "PEFT svd" not in outputs else "not sampled"])
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", choices=list(common.SIZES), default="tinyllama")
    parser.add_argument("--device", default="cpu", help="cpu or cuda (cuda without a device: skipped, exit 0)")
    parser.add_argument("--svd-sample-layers", type=int, default=1,
                        help="layers PEFT's svd really computes; its time is scaled to all layers")
    parser.add_argument("--accuracy-layers", type=int, default=2, help="layers for the svd accuracy check")
    parser.add_argument("--accuracy-max-elements", type=int, default=16 * 2**20,
                        help="modules whose dense ΔW is larger are left out of the accuracy check (fp64 SVD time)")
    parser.add_argument("--repeat", type=int, default=3, help="runs of each pemlang route (median wall, max RSS)")
    parser.add_argument("--no-peft-svd", action="store_true",
                        help="skip PEFT's svd (on 70b-slice one layer's full SVDs take over half an hour on 2 cores)")
    parser.add_argument("--skip-peft", action="store_true", help="pemlang routes only")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    for hidden in ("--combination", "--base", "--out", "--inputs", "--weights", "--sample-layers", "--json",
                   "--density"):
        parser.add_argument(hidden, help=argparse.SUPPRESS)
    parser.add_argument("--rank", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        peft_worker(args)
        return
    common.require_bench_extra("transformers", "peft")
    common.cuda_or_exit(args.device)

    shape, note = feasible_shape(common.SIZES[args.size]) if not args.skip_peft else (common.SIZES[args.size], "")
    if note:
        print(note)
    inputs = common.adapters(shape)
    base = None if args.skip_peft else common.base_model(shape)
    out = common.CACHE / shape.key / "out"
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    spread = lambda k: sorted({round(i * (shape.layers - 1) / max(k - 1, 1)) for i in range(k)})  # noqa: E731
    sample_layers = spread(min(args.svd_sample_layers, shape.layers))
    input_mib = sum(common.lora_bytes(p) for p in inputs.values()) / common.MiB
    print(f"{shape.name}: {shape.layers} layers x 7 modules, hidden {shape.hidden}, intermediate "
          f"{shape.intermediate}, kv {shape.kv_dim}, r={shape.rank}; 3 inputs, {input_mib:.0f} MiB fp32; "
          f"{common.EXPRESSION}; device {args.device}", flush=True)

    results: dict[str, dict] = {}  # type: ignore[type-arg]
    for route, combination in PAIRS:
        runs = [run_pemlang(route, inputs, out / f"pemlang-{route}", shape.rank, args.device) for _ in range(args.repeat)]
        results[f"pemlang {route}"] = {"wall": statistics.median(r.wall_s for r in runs),
                                       "rss": max(r.peak_rss for r in runs), "scaled": False,
                                       "out": common.lora_bytes(out / f"pemlang-{route}"),
                                       "dtypes": common.dtypes(out / f"pemlang-{route}")}
        print(f"  pemlang {route:6s} {results[f'pemlang {route}']['wall']:8.1f} s  "
              f"{common.mib(results[f'pemlang {route}']['rss'])} MiB", flush=True)
        if args.skip_peft or (combination == "svd" and args.no_peft_svd):
            continue
        assert base is not None
        measured, report = run_peft(combination, inputs, base, out / f"peft-{combination}", shape.rank,
                                    args.device, sample_layers)
        wall, scaled = measured.wall_s, False
        if combination == "svd":
            sampled = sum(report["svd_times"])
            wall += sampled * (shape.layers / len(sample_layers) - 1)
            scaled = len(sample_layers) < shape.layers
        results[f"PEFT {combination}"] = {"wall": wall, "rss": measured.peak_rss, "scaled": scaled,
                                          "phases": report["phases"], "measured_wall": measured.wall_s,
                                          "out": common.lora_bytes(out / f"peft-{combination}" / "merged"),
                                          "dtypes": common.dtypes(out / f"peft-{combination}" / "merged")}
        phases = ", ".join(f"{k} {v:.1f}" for k, v in report["phases"].items())
        phases += f"; RSS after loading the base {common.mib(report['rss_after_base'])} MiB"
        results[f"PEFT {combination}"]["rss_after_base"] = report["rss_after_base"]
        print(f"  PEFT {combination:9s} {wall:8.1f} s  {common.mib(measured.peak_rss)} MiB  ({phases})"
              + (f"  [svd of {len(sample_layers)} layers {sampled:.1f} s, scaled to {shape.layers}]" if scaled else ""),
              flush=True)

    outputs = {"pemlang exact": out / "pemlang-exact", "pemlang svd": out / "pemlang-svd"}
    if not args.skip_peft:
        outputs["PEFT cat"] = out / "peft-cat" / "merged"
        if not args.no_peft_svd:
            outputs["PEFT svd"] = out / "peft-svd" / "merged"
    acc_layers = sorted(set(spread(min(args.accuracy_layers, shape.layers))) | set(sample_layers))
    acc_rows = accuracy(shape, inputs, outputs, acc_layers, set(sample_layers), args.accuracy_max_elements)

    rows = []
    for name, r in results.items():
        star = " *" if r["scaled"] else ""
        rows.append([name, f"{r['wall']:.1f}{star}", common.mib(r["rss"]), common.mib(r["out"]), r["dtypes"]])
    table = common.markdown_table(["route", "wall s", "peak RSS MiB", "output MiB", "output dtype"], rows)
    ratio_rows = []
    if not args.skip_peft:
        for route, combination in PAIRS:
            if f"PEFT {combination}" not in results:
                ratio_rows.append([f"PEFT {combination} / pemlang {route}", "not run (--no-peft-svd)", ""])
                continue
            p, q = results[f"PEFT {combination}"], results[f"pemlang {route}"]
            ratio_rows.append([f"PEFT {combination} / pemlang {route}", f"{p['wall'] / q['wall']:.1f}x",
                               f"{p['rss'] / q['rss']:.1f}x"])
    ratios = common.markdown_table(["pair", "wall", "peak RSS"], ratio_rows) if ratio_rows else ""
    acc = common.markdown_table(["layer", "pemlang exact vs exact ΔW", "PEFT cat vs exact ΔW",
                                 f"rank-{shape.rank} optimum vs exact ΔW",
                                 "pemlang svd vs fp64 SVD", "PEFT svd vs fp64 SVD"], acc_rows)
    text = "\n\n".join(x for x in [
        f"# end to end: {args.size}",
        common.environment_line(args.device),
        note,
        f"{shape.layers} layers x 7 modules (q/k/v/o/gate/up/down), hidden {shape.hidden}, intermediate "
        f"{shape.intermediate}, kv {shape.kv_dim}, r={shape.rank}; 3 inputs of {input_mib / 3:.0f} MiB fp32; "
        f"`{common.EXPRESSION}`. PEFT loads a bf16 base model of "
        f"{common.base_bytes(shape) / 2**30:.2f} GiB; pemlang reads only the adapters. Each route is one child "
        "process: wall includes Python start-up and imports; peak RSS is the child's high-water mark.",
        table,
        "\\* scaled: PEFT's svd computed for layers " + ", ".join(map(str, sample_layers))
        + f" only, its SVD time scaled to {shape.layers} layers; peak RSS as measured."
        if any(r["scaled"] for r in results.values()) else "",
        ratios,
        notes(results),
        "svd accuracy (relative Frobenius error over the layer's modules of at most --accuracy-max-elements;"
        " fp64 reference: dense truncated SVD "
        "of the exact ΔW):",
        acc,
    ] if x)
    md = common.write_results(f"end_to_end-{args.size}", text, args.device)
    plot(results, args.size, md.with_suffix(".png"))
    print()
    print(text)
    print(f"\nwrote {md} and {md.with_suffix('.png')}")
    shutil.rmtree(out, ignore_errors=True)


def notes(results: dict) -> str:  # type: ignore[type-arg]
    peft = {name: r for name, r in results.items() if name.startswith("PEFT")}
    if not peft:
        return ""
    lines = [f"- PEFT's base model is loaded from safetensors by mmap: RSS right after loading it was "
             f"{common.mib(max(r['rss_after_base'] for r in peft.values()))} MiB; its weights become resident only "
             "where touched, and merging adapters touches none of them (a process that also runs the model pays "
             "for them)."]
    low = [name for name, r in peft.items() if "BF16" in r["dtypes"]]
    if low:
        lines.append(f"- {', '.join(low)} wrote (some) factors in the base model's dtype, bf16 (PEFT creates the merged "
                     "adapter's weights like the base layer's), hence the smaller output and the error of PEFT cat below; "
                     "pemlang writes the inputs' dtype (F32).")
    return "Notes:\n\n" + "\n".join(lines)


def plot(results: dict, size: str, path: Path) -> None:  # type: ignore[type-arg]
    plt = common.pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    labels = [route for route, _ in PAIRS]
    x = range(len(labels))
    for ax, key, title, scale in ((axes[0], "wall", "wall (s)", 1), (axes[1], "rss", "peak RSS (MiB)", common.MiB)):
        pem = [results[f"pemlang {r}"][key] / scale for r, _ in PAIRS]
        ax.bar([i - 0.2 for i in x], pem, 0.4, label="pemlang")
        if any(f"PEFT {c}" in results for _, c in PAIRS):
            peft = [results[f"PEFT {c}"][key] / scale if f"PEFT {c}" in results else 0 for _, c in PAIRS]
            ax.bar([i + 0.2 for i in x], peft, 0.4, label="PEFT (cat / linear / svd*)")
        ax.set_xticks(list(x), labels)
        if key == "wall":
            ax.set_yscale("log")
        ax.set_title(title + (", log scale" if key == "wall" else ""))
        ax.legend()
    fig.suptitle(f"end to end, {size} (* PEFT svd scaled from sampled layers)")
    common.save_figure(fig, path)


if __name__ == "__main__":
    main()
