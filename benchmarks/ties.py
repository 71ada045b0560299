"""TIES on ΔW: pemlang's `svd(ties(…), rank=R)` against PEFT's `ties_svd`, side by side in one run.

    python benchmarks/ties.py [--size tinyllama|7b|70b-slice] [--device cpu|cuda] [--svd-sample-layers 1]

The same three PEFT-format inputs as end_to_end.py. pemlang: `pemlang eval --mode exact --
"svd(ties(0.5*a, 0.3*b, 0.2*c, density=0.2), rank=R)"` (no base model; per layer the TIES merge,
computed by blocks of rows from the inputs' factors, and a randomised range finder). PEFT: load the base, the three adapters,
`add_weighted_adapter(combination_type="ties_svd", density=0.2, svd_rank=R)`, save. PEFT's route takes
a full dense SVD per layer, so it runs for a sample of layers and its SVD time is scaled to all
layers (as in end_to_end.py); its peak RSS is measured.

Accuracy, per sampled module, relative Frobenius error against the exact rank-R truncation (fp64
dense SVD) of each tool's own merged ΔW, divided by that truncation's own error: 1.00 is optimal.
The two merges differ by definition (PEFT elects the sign on unweighted trimmed updates and weights
after; pemlang elects on the weighted ones, and keeps ⌈d·n⌉ entries, PEFT ⌊d·n⌋).
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402
import end_to_end  # noqa: E402

WEIGHTS = {"a": 0.5, "b": 0.3, "c": 0.2}
DENSITY = 0.2


def expression(rank: int) -> str:
    args = ", ".join(f"{w}*{n}" for n, w in WEIGHTS.items())
    return f"svd(ties({args}, density={DENSITY}), rank={rank})"


def ties_oracle(deltas: list, density: float):  # type: ignore[no-untyped-def]
    """TIES on weighted ΔW as pemlang defines it, written out with PEFT's own routine: unit weights over the
    weighted updates (its weights multiply after the sign election)."""
    import torch
    from peft.utils import merge_utils

    return merge_utils.ties(torch.stack(deltas), torch.ones(len(deltas), dtype=deltas[0].dtype), density=density,
                            majority_sign_method="total")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", choices=list(common.SIZES), default="tinyllama")
    parser.add_argument("--device", default="cpu", help="cpu or cuda (cuda without a device: skipped, exit 0)")
    parser.add_argument("--svd-sample-layers", type=int, default=1,
                        help="layers PEFT's ties_svd really computes; its time is scaled to all layers")
    parser.add_argument("--repeat", type=int, default=1, help="runs of the pemlang route (median wall, max RSS)")
    args = parser.parse_args()
    common.require_bench_extra("transformers", "peft")
    common.cuda_or_exit(args.device)
    import torch
    from peft.utils import merge_utils

    shape, note = end_to_end.feasible_shape(common.SIZES[args.size])
    if note:
        print(note)
    inputs = common.adapters(shape)
    base = common.base_model(shape)
    out = common.CACHE / shape.key / "out-ties"
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    sample = [0] if args.svd_sample_layers <= 1 else sorted(
        {round(i * (shape.layers - 1) / (args.svd_sample_layers - 1)) for i in range(args.svd_sample_layers)})
    print(f"{shape.name}: {shape.layers} layers x 7 modules, r={shape.rank}; {expression(shape.rank)}", flush=True)

    runs = []
    for _ in range(args.repeat):
        command = [*common.pemlang_cli(), "eval", *[f"--input={n}={p}" for n, p in inputs.items()],
                   "--out", str(out / "pemlang"), "--mode", "exact", "--device", args.device, "--force", "--",
                   expression(shape.rank)]
        runs.append(common.measure(command))
    ours = {"wall": statistics.median(r.wall_s for r in runs), "rss": max(r.peak_rss for r in runs)}
    print(f"  pemlang svd(ties)  {ours['wall']:8.1f} s  {common.mib(ours['rss'])} MiB", flush=True)
    measured, report = end_to_end.run_peft("ties_svd", inputs, base, out / "peft", shape.rank, args.device, sample,
                                           weights=WEIGHTS, density=DENSITY)
    sampled = sum(report["svd_times"])
    theirs = {"wall": measured.wall_s + sampled * (shape.layers / len(sample) - 1), "rss": measured.peak_rss,
              "measured": measured.wall_s, "sampled": sampled}
    print(f"  PEFT ties_svd      {theirs['wall']:8.1f} s  {common.mib(theirs['rss'])} MiB  "
          f"(measured {measured.wall_s:.1f} s, SVDs of {len(sample)} layer(s) {sampled:.1f} s, scaled)", flush=True)

    # accuracy on the sampled layers: each tool against the optimum of its own merge
    rows = []
    modules = [common.module_prefix(layer, m, parent) for layer in sample
               for m, (parent, _, _) in common.module_shapes(shape).items()]
    deltas = {n: common.delta_weights(p, modules) for n, p in inputs.items()}
    ours_delta = common.delta_weights(out / "pemlang", modules)
    theirs_delta = common.delta_weights(out / "peft" / "merged", modules)
    for module in modules:
        weighted = [WEIGHTS[n] * deltas[n][module] for n in WEIGHTS]
        spec = ties_oracle(weighted, DENSITY)
        optimum = common.truncated_svd(spec, shape.rank)
        floor = common.relative_error(optimum, spec)
        unweighted = torch.stack([deltas[n][module] for n in WEIGHTS])
        peft_merge = merge_utils.ties(unweighted, torch.tensor(list(WEIGHTS.values()), dtype=unweighted.dtype),
                                      density=DENSITY, majority_sign_method="total")
        peft_floor = common.relative_error(common.truncated_svd(peft_merge, shape.rank), peft_merge)
        rows.append([module.split("model.layers.")[-1], f"{common.relative_error(ours_delta[module], spec) / floor:.4f}",
                     f"{common.relative_error(theirs_delta[module].double(), peft_merge) / peft_floor:.4f}",
                     f"{floor:.4f}"])
    ratio = theirs["wall"] / ours["wall"]
    text = "\n\n".join([
        f"# TIES: {shape.name}",
        common.environment_line(args.device),
        f"`{expression(shape.rank)}` on 3 inputs ({shape.layers} layers x 7 modules, r={shape.rank}) against PEFT "
        f"`add_weighted_adapter(combination_type=\"ties_svd\", density={DENSITY}, svd_rank={shape.rank})` "
        f"(weights {list(WEIGHTS.values())}), each in its own child process." + (f" {note}" if note else ""),
        common.markdown_table(["route", "wall s", "peak RSS MiB"], [
            ["pemlang svd(ties(…))", f"{ours['wall']:.1f}", common.mib(ours["rss"])],
            ["PEFT ties_svd", f"{theirs['wall']:.1f} *", common.mib(theirs["rss"])]]),
        f"\\* scaled: PEFT's ties_svd computed for layer(s) {', '.join(map(str, sample))} "
        f"({sampled:.1f} s of SVDs), scaled to {shape.layers} layers; measured wall {measured.wall_s:.1f} s.",
        f"**PEFT ties_svd / pemlang: {ratio:.1f}x wall, {theirs['rss'] / ours['rss']:.1f}x peak RSS.**",
        "Error of the written rank-R adapter against the exact rank-R truncation of each tool's own merge, "
        "as a multiple of the optimum (1.0000 = optimal):",
        common.markdown_table(["module", "pemlang / optimum", "PEFT / optimum", "optimum (relative)"], rows)])
    path = common.write_results(f"ties-{shape.name}", text, args.device)
    plt = common.pyplot()
    fig, ax = plt.subplots(figsize=(6, 3))
    ax.barh(["pemlang svd(ties)", "PEFT ties_svd (scaled)"], [ours["wall"], theirs["wall"]], color=["C0", "C1"])
    ax.set_xscale("log")
    ax.set_xlabel("wall seconds (log)")
    ax.set_title(f"TIES + rank-{shape.rank} SVD, {shape.name}: {ratio:.1f}x")
    common.save_figure(fig, path.with_suffix(".png"), dpi=120)
    print(f"wrote {path} and {path.with_suffix('.png')}")
    print(json.dumps({"ratio": ratio}))


if __name__ == "__main__":
    main()
