"""Merging in a shared basis ("Adapters that do not share a basis" in the README): pemlang's `core(…)`
and `knots(…)` against the dense reference.

    python benchmarks/align.py [--size tinyllama|7b|70b-slice|smoke] [--device cpu|cuda] [--methods core,knots]
                               [--routes pemlang,reference] [--reference-sample-layers 1] [--layers L]
                               [--flat-layers N]

Inputs: three LoRA adapters a, b, c of the size's shape (benchmarks/common.py, PEFT format), trained
"separately": made with `independent=True`, so each has its own A and B from its own seed and no
shared initialisation (their ΔW do not share a basis, the case these methods are for). For each method
M in --methods, both routes run in their own child process, timed whole-process (Python start-up,
imports, reading the inputs), with their peak RSS (the kernel's high-water mark, from wait4):

  pemlang    `pemlang eval --mode exact --input a=… --input b=… --input c=… --out DIR --
             "M(ties(0.5*a, 0.3*b, 0.2*c, density=0.2))"`: per layer from the factors, no dense ΔW.
  reference  the papers' dense recipe, in fp64 torch, in a child of this script (`--worker`): the
             three adapters loaded whole (as the papers' code holds its models), then per module
             knots: ΔW_i = s_i B_i A_i dense, one SVD of [ΔW_1 … ΔW_n] (d × n·k),
                    U Σ [V_1ᵀ … V_nᵀ] with σ ≤ 1e-5·σ_max dropped; TIES on the task parts Σ V_iᵀ;
                    ΔW = U · TIES(ΣV).
             core:  as Core Space's task_merger.py (get_core_matrices): U_B_ref = left singular
                    vectors of [B_1 … B_n], V_A_ref = right singular vectors of [A_1; …; A_n]; per input
                    the SVDs of A_i and B_i, M_i = Σ_B V_Bᵀ U_A Σ_A aligned as (U_B_refᵀ U_B) M_i
                    (V_Aᵀ V_A_ref) (times s_i); TIES on the M_i; ΔW = U_B_ref · TIES(M) · V_A_refᵀ.

The TIES in the reference is pemlang's (README, "TIES, DARE and pruning"), written out here (weights inside the arguments, the
⌈d·n⌉ largest magnitudes kept per argument, the first by flat index among equal ones, sign of the
sum elected, mean of the agreeing non-zeros): what pemlang is specified to compute, so the accuracy
check compares the alignment computations, not definitional variants (the papers' own TIES keeps
|x| ≥ the k-th value, k from int(), and gives a zero vote the majority sign).

The dense SVDs take minutes per layer on a CPU (over an hour for all of TinyLlama's knots), so the
reference computes only --reference-sample-layers layers (spread from the first to the last) and its
time is scaled to all layers: measured wall + Σ sampled per-layer compute × (layers / sampled − 1),
as ties.py does for PEFT's SVDs; the table marks it. Its peak RSS is as measured (one module at a time
beside the loaded inputs). The sampled layers' dense results are saved for the accuracy check; that
time is left out of its wall.

Accuracy, per sampled layer: the relative Frobenius difference between pemlang's written adapter
(ΔW = scaling·B·A, scaling 1) and the reference's dense ΔW, over the layer's seven modules (and the
largest single module). Where both compute the same thing it is fp32 rounding (about 1e-6); TIES's
trim can still differ on entries whose magnitudes are within rounding of the cut.

Flat in layers: pemlang's peak RSS at L and at --flat-layers N layers (default 4L; 0 skips), per method,
next to the `import torch, safetensors.torch` baseline.

`--size smoke` is a tiny shape (2 layers, hidden 256) for checking the script itself in seconds.
Results: align-SIZE.md and .png in $PEMLANG_BENCH_RESULTS (see common.py).
"""

from __future__ import annotations

import argparse
import json
import math
import re
import shutil
import statistics
import sys
import time
from decimal import Decimal
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402

WEIGHTS = {"a": 0.5, "b": 0.3, "c": 0.2}
DENSITY = 0.2
METHODS = ("core", "knots")
ROUTES = ("pemlang", "reference")
DROP = 1e-5  # knots: singular values at most DROP·σ_max are dropped (as pemlang's knots)
LAYER = re.compile(r"\.layers\.(\d+)\.")


def expression(method: str) -> str:
    args = ", ".join(f"{w}*{n}" for n, w in WEIGHTS.items())
    return f"{method}(ties({args}, density={DENSITY}))"


def spread(count: int, layers: int) -> list[int]:
    """`count` layers spread evenly from the first to the last."""
    count = max(1, min(count, layers))
    return sorted({round(i * (layers - 1) / max(count - 1, 1)) for i in range(count)})


# -- the dense reference, in fp64 ------------------------------------------------------------------


def keep_count(density: float, numel: int) -> int:
    """⌈d·n⌉ with d as written (0.2 of 100 keeps 20, as in pemlang)."""
    return min(numel, math.ceil(Decimal(repr(float(density))) * numel))


def ties(xs: list, density: float):  # type: ignore[no-untyped-def]
    """pemlang's TIES ("total" sign) on same-shape tensors: each trimmed to its ⌈d·n⌉ largest
    magnitudes (the first by flat index among equal ones), the sign of the sum elected per entry,
    the mean of the non-zero trimmed values of that sign."""
    import torch

    keep = keep_count(density, xs[0].numel())
    trimmed = []
    for x in xs:
        flat = x.reshape(-1)
        if keep < flat.numel():
            order = torch.argsort(flat.abs(), descending=True, stable=True)
            mask = torch.zeros_like(flat, dtype=torch.bool)
            mask[order[:keep]] = True
            flat = flat * mask
        trimmed.append(flat)
    stacked = torch.stack(trimmed)
    elected = torch.sign(stacked.sum(dim=0))
    agree = (stacked * elected) > 0
    merged = (stacked * agree).sum(dim=0) / agree.sum(dim=0).clamp(min=1)
    return merged.reshape(xs[0].shape)


def knots_reference(a: list, b: list, scalings: list[float], weights: list[float]):  # type: ignore[no-untyped-def]
    """KnOTS on dense ΔW: the SVD of the concatenated updates, TIES on the task parts Σ V_iᵀ."""
    import torch

    deltas = [s * (bi @ ai) for ai, bi, s in zip(a, b, scalings, strict=True)]
    u, sigma, vh = torch.linalg.svd(torch.cat(deltas, dim=1), full_matrices=False)
    kept = sigma > DROP * sigma[0]
    u, sigma, vh = u[:, kept], sigma[kept], vh[kept]
    k = a[0].shape[1]
    parts = [w * (sigma[:, None] * vh[:, i * k:(i + 1) * k]) for i, w in enumerate(weights)]
    return u @ ties(parts, DENSITY)


def core_reference(a: list, b: list, scalings: list[float], weights: list[float]):  # type: ignore[no-untyped-def]
    """Core Space as its task_merger.py computes it: reference bases from the stacked factors, each
    input's core matrix from the SVDs of its own A and B, rotated into those bases."""
    import torch

    vh_a_ref = torch.linalg.svd(torch.cat(a, dim=0), full_matrices=False)[2]  # (R × k)
    u_b_ref = torch.linalg.svd(torch.cat(b, dim=1), full_matrices=False)[0]  # (d × R)
    cores = []
    for ai, bi, s, w in zip(a, b, scalings, weights, strict=True):
        u_a, s_a, vh_a = torch.linalg.svd(ai, full_matrices=False)
        u_b, s_b, vh_b = torch.linalg.svd(bi, full_matrices=False)
        middle = (s_b[:, None] * (vh_b @ u_a)) * s_a[None, :]  # Σ_B V_Bᵀ U_A Σ_A (r × r)
        cores.append(w * s * ((u_b_ref.T @ u_b) @ middle @ (vh_a @ vh_a_ref.T)))
    return u_b_ref @ ties(cores, DENSITY) @ vh_a_ref


def scaling(config: dict, prefix: str) -> float:  # type: ignore[type-arg]
    rank = common._pattern(config.get("rank_pattern") or {}, prefix, config["r"])
    alpha = common._pattern(config.get("alpha_pattern") or {}, prefix, config["lora_alpha"])
    return alpha / (rank**0.5 if config.get("use_rslora") else rank)


def reference_worker(args: argparse.Namespace) -> None:
    """The dense route, as a child: load the inputs whole, then per module of the sampled layers the
    method's dense computation in fp64; each result saved (fp32) for the accuracy check, untimed."""
    start = time.perf_counter()
    import torch
    from safetensors.torch import load_file, save_file

    if int(args.threads) > 0:
        torch.set_num_threads(int(args.threads))
    imported = time.perf_counter() - start
    inputs = {name: Path(path) for name, path in json.loads(args.inputs).items()}
    names = list(WEIGHTS)
    tensors = {n: load_file(str(inputs[n] / "adapter_model.safetensors")) for n in names}
    configs = {n: json.loads((inputs[n] / "adapter_config.json").read_text()) for n in names}
    loaded = time.perf_counter() - start - imported
    compute = {"knots": knots_reference, "core": core_reference}[args.method]
    device = torch.device(args.device)
    sample = {int(x) for x in args.sample_layers.split(",")}
    prefixes = sorted({key.split(".lora_")[0] for key in tensors[names[0]] if ".lora_A." in key})
    save = Path(args.save)
    save.mkdir(parents=True, exist_ok=True)
    # the linear-algebra libraries load on first use: once per process, counted in its wall but not in
    # the per-layer time that is scaled to all layers
    torch.linalg.svd(torch.eye(2, dtype=torch.float64, device=device))
    times: dict[int, float] = {}
    saving = 0.0
    for prefix in prefixes:
        found = LAYER.search(prefix)
        layer = int(found.group(1)) if found else -1
        if layer not in sample:
            continue
        t = time.perf_counter()
        a = [tensors[n][f"{prefix}.lora_A.weight"].to(device, torch.float64) for n in names]
        b = [tensors[n][f"{prefix}.lora_B.weight"].to(device, torch.float64) for n in names]
        delta = compute(a, b, [scaling(configs[n], prefix) for n in names], [WEIGHTS[n] for n in names])
        if device.type == "cuda":
            torch.cuda.synchronize()
        times[layer] = times.get(layer, 0.0) + time.perf_counter() - t
        t = time.perf_counter()
        save_file({"delta": delta.to("cpu", torch.float32).contiguous()}, str(save / f"{prefix}.safetensors"))
        saving += time.perf_counter() - t
        del a, b, delta
    Path(args.json).write_text(json.dumps({"import": imported, "load": loaded, "layer_times": times,
                                           "save": saving}))


def run_reference(method: str, inputs: dict[str, Path], save: Path, sample: list[int], device: str,
                  threads: int | None) -> tuple[common.Measured, dict]:  # type: ignore[type-arg]
    report = save.with_suffix(".json")
    command = [sys.executable, __file__, "--worker", "--method", method, "--device", device, "--threads", str(threads or 0),
               "--inputs", json.dumps({n: str(p) for n, p in inputs.items()}),
               "--sample-layers", ",".join(map(str, sample)), "--save", str(save), "--json", str(report)]
    return common.measure(command), json.loads(report.read_text())


# -- pemlang ---------------------------------------------------------------------------------------


def run_pemlang(method: str, inputs: dict[str, Path], out: Path, device: str, repeat: int) -> dict:  # type: ignore[type-arg]
    command = [*common.pemlang_cli(), "eval", *[f"--input={n}={p}" for n, p in inputs.items()], "--out", str(out),
               "--mode", "exact", "--device", device, "--force", "--", expression(method)]
    runs = [common.measure(command) for _ in range(repeat)]
    return {"wall": statistics.median(r.wall_s for r in runs), "rss": max(r.peak_rss for r in runs)}


# -- accuracy --------------------------------------------------------------------------------------


def accuracy(shape: common.Shape, ours: Path, reference: Path, layer: int) -> tuple[float, float, str]:
    """Relative Frobenius difference over a layer's modules, and the largest single module's."""
    import torch
    from safetensors.torch import load_file

    prefixes = [common.module_prefix(layer, m, p) for m, (p, _, _) in common.module_shapes(shape).items()]
    got = common.delta_weights(ours, prefixes)
    num = den = 0.0
    worst, where = 0.0, ""
    for prefix in prefixes:
        want = load_file(str(reference / f"{prefix}.safetensors"))["delta"].double()
        diff, norm = float(torch.linalg.norm(got[prefix] - want)), float(torch.linalg.norm(want))
        num, den = num + diff**2, den + norm**2
        if diff / norm >= worst:
            worst, where = diff / norm, prefix.split(".")[-1]
    return (num / den) ** 0.5, worst, where


# -- the parent ------------------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", choices=[*common.SIZES, "smoke"], default="tinyllama")
    parser.add_argument("--device", default="cpu", help="cpu or cuda (cuda without a device: skipped, exit 0)")
    parser.add_argument("--methods", default=",".join(METHODS), help="comma-separated subset of " + ", ".join(METHODS))
    parser.add_argument("--routes", default=",".join(ROUTES),
                        help="comma-separated subset of " + ", ".join(ROUTES) + " (accuracy needs both)")
    parser.add_argument("--reference-sample-layers", type=int, default=1,
                        help="layers the dense reference really computes; its time is scaled to all layers")
    parser.add_argument("--reference-threads", type=int,
                        help="torch threads of the reference (default: torch's own; on a loaded machine OpenMP "
                             "makes small SVDs far slower with more threads than free cores)")
    parser.add_argument("--layers", type=int, help="L, the layer count (default: the size's)")
    parser.add_argument("--flat-layers", type=int,
                        help="second layer count for pemlang's flat-memory check (default 4L; 0 skips)")
    parser.add_argument("--repeat", type=int, default=1, help="runs of each pemlang route (median wall, max RSS)")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    for hidden in ("--method", "--inputs", "--sample-layers", "--save", "--json", "--threads"):
        parser.add_argument(hidden, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        reference_worker(args)
        return
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    routes = [r.strip() for r in args.routes.split(",") if r.strip()]
    if not methods or set(methods) - set(METHODS):
        parser.error(f"--methods: choose from {', '.join(METHODS)}")
    if not routes or set(routes) - set(ROUTES):
        parser.error(f"--routes: choose from {', '.join(ROUTES)}")
    common.require_bench_extra()
    common.cuda_or_exit(args.device)

    size = common.SMOKE if args.size == "smoke" else common.SIZES[args.size]
    shape = size.with_layers(args.layers or size.layers)
    flat_layers = 4 * shape.layers if args.flat_layers is None else args.flat_layers
    inputs = common.adapters(shape, independent=True)
    out = common.CACHE / shape.key / "out-align"
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    sample = spread(args.reference_sample_layers, shape.layers)
    input_mib = sum(common.lora_bytes(p) for p in inputs.values()) / common.MiB
    print(f"{shape.name}: {shape.layers} layers x 7 modules, r={shape.rank}, 3 independent inputs "
          f"({input_mib:,.1f} MiB fp32); reference on layer(s) {', '.join(map(str, sample))}", flush=True)

    results: dict[str, dict] = {}  # type: ignore[type-arg]
    for method in methods:
        if "pemlang" in routes:
            results[f"{method} pemlang"] = run_pemlang(method, inputs, out / f"pemlang-{method}", args.device,
                                                       args.repeat)
            r = results[f"{method} pemlang"]
            print(f"  {expression(method)}  {r['wall']:8.1f} s  {common.mib(r['rss'])} MiB", flush=True)
        if "reference" in routes:
            measured, report = run_reference(method, inputs, out / f"reference-{method}", sample, args.device,
                                             args.reference_threads)
            sampled = sum(report["layer_times"].values())
            wall = measured.wall_s - report["save"] + sampled * (shape.layers / len(sample) - 1)
            results[f"{method} reference"] = {"wall": wall, "rss": measured.peak_rss, "sampled": sampled,
                                              "measured": measured.wall_s - report["save"], "load": report["load"]}
            print(f"  {method} dense reference {wall:8.1f} s  {common.mib(measured.peak_rss)} MiB  "
                  f"(measured {measured.wall_s - report['save']:.1f} s, {len(sample)} layer(s) {sampled:.1f} s, scaled)",
                  flush=True)

    acc_rows = []
    if "pemlang" in routes and "reference" in routes:
        for layer in sample:
            row: list[object] = [layer]
            for method in methods:
                total, worst, where = accuracy(shape, out / f"pemlang-{method}", out / f"reference-{method}", layer)
                row += [f"{total:.1e}", f"{worst:.1e} ({where})"]
            acc_rows.append(row)

    flat: list[dict] = []  # type: ignore[type-arg]
    baseline = 0
    if "pemlang" in routes and flat_layers:
        baseline = common.baseline_rss()
        other = shape.with_layers(flat_layers)
        other_inputs = common.adapters(other, independent=True)
        for method in methods:
            points = [(shape.layers, results[f"{method} pemlang"])]
            measured = run_pemlang(method, other_inputs, out / f"flat-{method}", args.device, 1)
            points.append((flat_layers, measured))
            shutil.rmtree(out / f"flat-{method}", ignore_errors=True)
            for layers, r in sorted(points, key=lambda p: p[0]):
                flat.append({"method": method, "layers": layers, "wall": r["wall"], "rss": r["rss"]})
            print(f"  {method} at {flat_layers} layers: {common.mib(measured['rss'])} MiB", flush=True)

    text = report_text(args, shape, methods, results, sample, acc_rows, flat, baseline, input_mib)
    md = common.write_results(f"align-{args.size}", text, args.device)
    plot(methods, results, flat, baseline, shape, md.with_suffix(".png"))
    print()
    print(text)
    print(f"\nwrote {md} and {md.with_suffix('.png')}")
    shutil.rmtree(out, ignore_errors=True)


def report_text(args: argparse.Namespace, shape: common.Shape, methods: list[str], results: dict,  # type: ignore[type-arg]
                sample: list[int], acc_rows: list, flat: list, baseline: int, input_mib: float) -> str:  # type: ignore[type-arg]
    rows = []
    for method in methods:
        ours, theirs = results.get(f"{method} pemlang"), results.get(f"{method} reference")
        if ours:
            rows.append([method, f"pemlang `{expression(method)}`", f"{ours['wall']:.1f}", "", common.mib(ours["rss"])])
        if theirs:
            ratio = f"{theirs['wall'] / ours['wall']:.1f}x" if ours else "n/a"
            star = " *" if len(sample) < shape.layers else ""
            rows.append([method, "dense fp64 reference", f"{theirs['wall']:.1f}{star}", ratio, common.mib(theirs["rss"])])
    table = common.markdown_table(["method", "route", "wall s", "reference / pemlang", "peak RSS MiB"], rows)
    scaled = [f"{m}: measured {results[f'{m} reference']['measured']:.1f} s of which {len(sample)} layer(s) "
              f"{results[f'{m} reference']['sampled']:.1f} s" for m in methods if f"{m} reference" in results]
    parts = [
        f"# align: {args.size}",
        common.environment_line(args.device),
        f"3 LoRA inputs trained separately (independent seeds, no shared initialisation), {shape.layers} layers x 7 "
        f"modules, hidden {shape.hidden}, intermediate {shape.intermediate}, kv {shape.kv_dim}, r={shape.rank}, "
        f"{input_mib / 3:,.1f} MiB fp32 each. Each route is one child process: wall includes Python start-up, "
        "imports and reading the inputs; peak RSS is the child's high-water mark. The reference is the papers' "
        "dense recipe in fp64 (KnOTS: SVD of the concatenated dense ΔW; Core Space: task_merger.py's core "
        "matrices), with pemlang's TIES (the README's: weights inside, ⌈d·n⌉ entries kept, equal magnitudes by position)."
        + (f" The reference ran with {args.reference_threads} torch thread(s)." if args.reference_threads else ""),
        table,
    ]
    if scaled and len(sample) < shape.layers:
        parts.append(f"\\* scaled: the dense reference computed layer(s) {', '.join(map(str, sample))} only, its "
                     f"per-layer time scaled to {shape.layers} layers ({'; '.join(scaled)}); peak RSS as measured.")
    if acc_rows:
        header = ["layer"]
        for method in methods:
            header += [f"{method}: pemlang vs reference", f"{method}: largest module"]
        parts += ["Accuracy: relative Frobenius difference between pemlang's written adapter and the dense "
                  "reference's ΔW, over the layer's 7 modules, and the largest single module's:",
                  common.markdown_table(header, acc_rows)]
    if flat:
        parts += [f"Flat in layers: pemlang's peak RSS at {flat[0]['layers']} and {flat[-1]['layers']} layers "
                  f"(baseline `import torch, safetensors.torch`: {common.mib(baseline)} MiB):",
                  common.markdown_table(["method", "layers", "LoRA layers", "wall s", "peak RSS MiB"],
                                        [[p["method"], p["layers"], 7 * p["layers"], f"{p['wall']:.1f}",
                                          common.mib(p["rss"])] for p in flat])]
    return "\n\n".join(parts)


def plot(methods: list[str], results: dict, flat: list, baseline: int, shape: common.Shape,  # type: ignore[type-arg]
         path: Path) -> None:
    plt = common.pyplot()
    panels = 3 if flat else 2
    fig, axes = plt.subplots(1, panels, figsize=(5 * panels, 4))
    x = list(range(len(methods)))
    for ax, key, title, scale in ((axes[0], "wall", "wall (s), log scale", 1), (axes[1], "rss", "peak RSS (MiB)", common.MiB)):
        for offset, route, label in ((-0.2, "pemlang", "pemlang"), (0.2, "reference", "dense fp64 reference*")):
            values = [results.get(f"{m} {route}", {}).get(key, 0) / scale for m in methods]
            if any(values):
                ax.bar([i + offset for i in x], values, 0.4, label=label)
        ax.set_xticks(x, methods)
        if key == "wall":
            ax.set_yscale("log")
        ax.set_title(title)
        ax.legend()
    if flat:
        for method in methods:
            points = [p for p in flat if p["method"] == method]
            axes[2].plot([p["layers"] for p in points], [p["rss"] / common.MiB for p in points], "o-", label=method)
        if baseline:
            axes[2].axhline(baseline / common.MiB, color="grey", linestyle=":", label="import torch, safetensors")
        axes[2].set_xlabel("transformer layers")
        axes[2].set_ylim(0, 1.25 * max(p["rss"] for p in flat) / common.MiB)
        axes[2].set_title("pemlang peak RSS (MiB) vs layers")
        axes[2].legend()
    fig.suptitle(f"core / knots, {shape.name} (* reference time scaled from sampled layers)")
    common.save_figure(fig, path)


if __name__ == "__main__":
    main()
