"""Merging into the base model: `pemlang eval --into` vs the PEFT route vs a plain copy of the base.

    python benchmarks/into_base.py [--size tinyllama|7b|70b-slice|smoke] [--layers L] [--repeat 3]
                                   [--settle 3] [--skip-peft] [--keep-fixtures]

One synthetic LoRA adapter `a` in PEFT's format (benchmarks/common.py: q/k/v/o/gate/up/down of every
layer, fp32) and a random bf16 LlamaForCausalLM of the size's shape (common.base_model, saved by
`save_pretrained`: one file at tinyllama and the 7b slice) are merged into a full model three ways, each
in its own child process, so wall time (Python start-up and imports included) and peak RSS (wait4's
high-water mark) are the whole process's:

  pemlang   `pemlang eval --mode exact --input a=ADAPTER --into BASE --out DIR -- a`
  PEFT      LlamaForCausalLM.from_pretrained(BASE, bf16), PeftModel.from_pretrained(model, ADAPTER),
            merge_and_unload(), save_pretrained(DIR): what a PEFT user runs
  copy      a small Python loop that reads the base directory's files in 16 MiB chunks, writes them
            to DIR and fsyncs each (and DIR): the bytes a merged model has to move, nothing computed

The base's files are read once before the first route, so every route reads them from the page cache.
Each route writes into a new directory: the one of its previous run is removed, the file system synced
and the machine left idle `--settle` seconds (default 3; see `fresh`) before the timed run; each such
run is followed at once by one with no idle time before it (", no idle before it"), which on this
machine lets the copy write into the memory its previous output just freed. pemlang and the copy
alternate round by round, each round in the other order; then pemlang runs once more with `--force` over
its own output, to show what replacing a model costs (the old one is deleted inside the run). `--size
7b` is a 7B-shaped slice: the 7B's layer shape and vocabulary with `--layers` layers (default 4);
tinyllama and 70b-slice use their own layer counts; `--size smoke` is a tiny shape for checking the
script. pemlang and copy are run `--repeat` times (median wall, every run's wall, largest peak RSS),
PEFT once.

Reported, whatever they show: PEFT's wall over pemlang's (target ≥ 3×); pemlang's throughput as a
fraction of the copy's (the copy's wall over pemlang's, target ≥ 0.5), settled and with no idle time;
pemlang's peak RSS above the baseline, a bare `python -c "import torch, safetensors.torch"`, against 64
MiB + 2 × the largest base tensor (target: within it). At `--size smoke` the checks are printed but mean
nothing (a 4 MiB base: start-up is all there is) and say so. As a sanity check the largest changed
tensor of pemlang's output is compared with PEFT's (which adds its bf16-cast ΔW in bf16, so a few units
in the last place apart). Results: into_base-SIZE.md and .png in $PEMLANG_BENCH_RESULTS (see common.py).
The base and adapter this run generated are deleted at the end unless --keep-fixtures (ones already in
the cache are left)."""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import struct
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

SLACK = 64 * common.MiB
SLICE_LAYERS = {"7b": 4}  # sizes measured as a slice: their shape, fewer layers

# The copy route, as a child: read each file of SOURCE in 16 MiB chunks, write it to TARGET, fsync.
_COPY = """
import os, sys
source, target = sys.argv[1], sys.argv[2]
os.mkdir(target)
chunk = bytearray(16 << 20)
view = memoryview(chunk)
for name in sorted(os.listdir(source)):
    if name.startswith("."):
        continue
    with open(os.path.join(source, name), "rb", buffering=0) as f, \\
            open(os.path.join(target, name), "wb", buffering=0) as g:
        while True:
            n = f.readinto(chunk)
            if not n:
                break
            done = 0
            while done < n:
                done += g.write(view[done:n])
        os.fsync(g.fileno())
fd = os.open(target, os.O_RDONLY)
os.fsync(fd)
os.close(fd)
"""


def weight_files(directory: Path) -> list[Path]:
    return sorted(directory.glob("*.safetensors"))


def header(path: Path) -> dict:  # type: ignore[type-arg]
    with open(path, "rb") as f:
        return json.loads(f.read(struct.unpack("<Q", f.read(8))[0]))


def largest_tensor(directory: Path) -> tuple[str, int]:
    """The base's largest tensor: its name and bytes, from the safetensors headers."""
    sizes = {name: info["data_offsets"][1] - info["data_offsets"][0]
             for path in weight_files(directory) for name, info in header(path).items() if name != "__metadata__"}
    name = max(sizes, key=lambda n: sizes[n])
    return name, sizes[name]


def directory_bytes(directory: Path) -> int:
    return sum(p.stat().st_size for p in directory.rglob("*") if p.is_file() and not p.name.startswith("."))


def warm_page_cache(directory: Path) -> None:
    for path in sorted(directory.iterdir()):
        if path.is_file():
            with open(path, "rb", buffering=0) as f:
                while f.read(16 * common.MiB):
                    pass


# -- the PEFT route, run as a child: `into_base.py --worker ...` -------------------------------------


def peft_worker(args: argparse.Namespace) -> None:
    clock = common.Phases()
    phases, mark = clock.seconds, clock.mark

    import torch  # noqa: F401 - timed with the other imports
    import transformers  # noqa: F401 - timed with the other imports (load_bf16_llama uses it)
    from peft import PeftModel

    mark("import")
    model = common.load_bf16_llama(args.base)
    mark("load base")
    model = PeftModel.from_pretrained(model, args.adapter)
    mark("load adapter")
    model = model.merge_and_unload()
    mark("merge_and_unload")
    model.save_pretrained(args.out)
    mark("save_pretrained")
    Path(args.json).write_text(json.dumps({"phases": phases}))


# -- the parent ------------------------------------------------------------------------------------


SETTLE = 3.0  # seconds idle before each timed run (--settle)
HOT = ", no idle before it"  # the name of a route's runs that start right after its previous output was removed


def fresh(path: Path, settle: float) -> None:
    """Start a route with no destination and the machine settled, outside the timed run: its old
    output removed, the file system synced (no route pays for another's deletion or write-back), then
    `settle` seconds idle. The idle time matters on virtual machines that hand freed memory back to
    their host (Firecracker's free page reporting, after about 2 s): a run that starts right after
    2 GiB were freed writes into pages still mapped, and one that starts later has to fault each
    page back in (here a plain copy of TinyLlama took 1.6 s in the first case and 7 s in the
    second). Settled, every route starts as a merge on a quiet machine does."""
    shutil.rmtree(path, ignore_errors=True)
    os.sync()
    time.sleep(settle)


def run_pemlang(adapter: Path, base: Path, out: Path, settle: float, *, replace: bool = False) -> common.Measured:
    """pemlang into a new directory; with `replace`, over its own previous output (--force: the old
    model is swapped out and deleted inside the timed run)."""
    if not replace:
        fresh(out, settle)
    command = [*common.pemlang_cli(), "eval", "--mode", "exact", f"--input=a={adapter}", "--into", str(base),
               "--out", str(out), "--device", "cpu", *(["--force"] if replace else []), "--", "a"]
    return common.measure(command)


def run_copy(base: Path, out: Path, settle: float) -> common.Measured:
    fresh(out, settle)
    return common.measure([sys.executable, "-c", _COPY, str(base), str(out)])


def run_peft(adapter: Path, base: Path, out: Path, settle: float) -> tuple[common.Measured, dict]:  # type: ignore[type-arg]
    fresh(out, settle)
    report = out.with_suffix(".json")
    measured = common.measure([sys.executable, __file__, "--worker", "--base", str(base), "--adapter", str(adapter),
                               "--out", str(out), "--json", str(report)])
    result = json.loads(report.read_text())
    report.unlink()
    return measured, result


def compare(ours: Path, peft: Path, name: str) -> str:
    """How far pemlang's `name` is from PEFT's (bf16 units in the last place, relative to the value)."""
    import torch
    from safetensors import safe_open

    def load(directory: Path):  # type: ignore[no-untyped-def]
        for path in weight_files(directory):
            with safe_open(str(path), "pt") as f:
                if name in set(f.keys()):
                    return f.get_tensor(name)
        raise KeyError(f"{name} is not in {directory}")

    a, b = load(ours).to(torch.float64), load(peft).to(torch.float64)
    ulp = torch.finfo(torch.bfloat16).eps * b.abs().clamp_min(torch.finfo(torch.bfloat16).tiny)
    far = float(((a - b).abs() / ulp).max())
    same = float((a == b).to(torch.float64).mean())
    return f"`{name}`: {same:.1%} of elements identical, at most {far:.1f} bf16 ulps apart"


def changed_tensor(directory: Path) -> str:
    """The largest tensor the adapter changes (a LoRA target: gate/up/down or q/k/v/o)."""
    sizes = {name: info["data_offsets"][1] - info["data_offsets"][0]
             for path in weight_files(directory) for name, info in header(path).items()
             if name != "__metadata__" and name.rsplit(".", 2)[-2] in common.TARGETS}
    return max(sizes, key=lambda n: sizes[n])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", choices=[*common.SIZES, "smoke"], default="tinyllama")
    parser.add_argument("--device", default="cpu", help="cpu only: the merge streams from disk (cuda: skipped)")
    parser.add_argument("--layers", type=int, help="layers of the base (default: the size's, 4 for 7b)")
    parser.add_argument("--repeat", type=int, default=3, help="runs of pemlang and of the copy (median wall, max RSS)")
    parser.add_argument("--settle", type=float, default=SETTLE,
                        help="seconds idle before each timed run, after its old output is removed and synced")
    parser.add_argument("--skip-peft", action="store_true", help="pemlang and the copy only")
    parser.add_argument("--keep-fixtures", action="store_true",
                        help="keep the base model and adapter generated by this run in the cache")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    for hidden in ("--base", "--adapter", "--out", "--json"):
        parser.add_argument(hidden, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        peft_worker(args)
        return
    common.require_bench_extra("transformers", "peft")
    if args.device != "cpu":
        print(f"into_base.py measures the CPU route only: --device {args.device} skipped")
        return

    full = common.SMOKE if args.size == "smoke" else common.SIZES[args.size]
    default_layers = SLICE_LAYERS.get(args.size, full.layers)
    shape = full.with_layers(args.layers or default_layers)
    label = args.size if shape.layers == full.layers else f"{args.size} slice ({shape.layers} of {full.layers} layers)"
    stem = f"into_base-{args.size}" + ("" if shape.layers == default_layers else f"-L{shape.layers}")
    fixtures = [common.CACHE / shape.key / "base", common.CACHE / shape.key / "adapters" / "a"]
    made = [p for p in fixtures if not (p / ".complete").exists()]
    out = common.CACHE / shape.key / "into-out"
    try:
        measure(args, shape, label, stem, fixtures[0], out)
    finally:
        shutil.rmtree(out, ignore_errors=True)
        if not args.keep_fixtures:
            for path in made:
                shutil.rmtree(path, ignore_errors=True)
                for parent in path.parents:  # the directories made for it, where now empty
                    if parent == common.CACHE or not parent.is_dir() or any(parent.iterdir()):
                        break
                    parent.rmdir()
            if made:
                print(f"removed the fixtures this run generated in {common.CACHE / shape.key} (--keep-fixtures keeps them)")


def measure(args: argparse.Namespace, shape: common.Shape, label: str, stem: str, base_dir: Path, out: Path) -> None:
    adapter = common.adapters(shape, names=("a",))["a"]
    base = common.base_model(shape)
    assert base == base_dir
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    base_size = directory_bytes(base)
    shards = len(weight_files(base))
    biggest_name, biggest = largest_tensor(base)
    bound_above = SLACK + 2 * biggest
    bare = common.measure([sys.executable, "-c", "import torch, safetensors.torch"])
    baseline = bare.peak_rss
    warm_page_cache(base)
    print(f"{label}: {shape.layers} layers, hidden {shape.hidden}, intermediate {shape.intermediate}, "
          f"kv {shape.kv_dim}, vocab {shape.vocab}; bf16 base {base_size / 2**30:.2f} GiB in {shards} file(s), "
          f"largest tensor {biggest_name} {common.mib(biggest)} MiB; adapter r={shape.rank}, "
          f"{common.lora_bytes(adapter) / common.MiB:.0f} MiB fp32; baseline {common.mib(baseline)} MiB", flush=True)

    # copy and pemlang alternate, round after round, each round in the other order than the last. Each
    # settled run is followed at once by a run of the same route with no idle time before it (HOT):
    # the copy then writes into the memory its previous output just freed, as it could on a machine
    # that never hands memory back to a host.
    settle = max(0.0, args.settle)
    routes = {"copy": lambda idle: run_copy(base, out / "copy", idle),
              "pemlang": lambda idle: run_pemlang(adapter, base, out / "pemlang", idle)}
    runs: dict[str, list[common.Measured]] = {name: [] for route in routes for name in (route, route + HOT)}
    for round_number in range(args.repeat):
        for route in (list(routes) if round_number % 2 == 0 else list(reversed(routes))):
            for name, idle in ((route, settle), (route + HOT, 0.0)):
                runs[name].append(routes[route](idle))
                last = runs[name][-1]
                print(f"  {name:28s} {last.wall_s:8.2f} s  {common.mib(last.peak_rss)} MiB", flush=True)
    results: dict[str, dict] = {}  # type: ignore[type-arg]
    for name, measured in runs.items():
        results[name] = {"wall": statistics.median(r.wall_s for r in measured), "rss": max(r.peak_rss for r in measured),
                         "out": directory_bytes(out / name.removesuffix(HOT)), "runs": [r.wall_s for r in measured]}
    shutil.rmtree(out / "copy", ignore_errors=True)
    os.sync()
    time.sleep(settle)
    replaced = run_pemlang(adapter, base, out / "pemlang", settle, replace=True)
    print(f"  pemlang --force over its output {replaced.wall_s:8.2f} s", flush=True)
    agreement = ""
    if not args.skip_peft:
        measured, report = run_peft(adapter, base, out / "peft", settle)
        results["PEFT"] = {"wall": measured.wall_s, "rss": measured.peak_rss, "out": directory_bytes(out / "peft"),
                           "phases": report["phases"]}
        phases = ", ".join(f"{k} {v:.1f}" for k, v in report["phases"].items())
        print(f"  PEFT     {measured.wall_s:8.2f} s  {common.mib(measured.peak_rss)} MiB  ({phases})", flush=True)
        agreement = compare(out / "pemlang", out / "peft", changed_tensor(base))
        shutil.rmtree(out / "peft", ignore_errors=True)
    shutil.rmtree(out / "pemlang", ignore_errors=True)

    pem = results["pemlang"]
    rows = []
    for name, r in results.items():
        each = " ".join(f"{w:.2f}" for w in r.get("runs", [r["wall"]]))
        rows.append([name, f"{r['wall']:.2f}", each, f"{base_size / r['wall'] / common.MiB:,.0f}", common.mib(r["rss"]),
                     common.mib(r["rss"] - baseline), common.mib(r["out"]), f"{r['wall'] / pem['wall']:.2f}"])
    rows.append(["pemlang `--force`, over its previous output", f"{replaced.wall_s:.2f}", f"{replaced.wall_s:.2f}",
                 f"{base_size / replaced.wall_s / common.MiB:,.0f}", common.mib(replaced.peak_rss),
                 common.mib(replaced.peak_rss - baseline), common.mib(pem["out"]), f"{replaced.wall_s / pem['wall']:.2f}"])
    rows.append(["(baseline: `import torch, safetensors.torch`)", f"{bare.wall_s:.2f}", f"{bare.wall_s:.2f}", "",
                 common.mib(baseline), "0", "", f"{bare.wall_s / pem['wall']:.2f}"])
    table = common.markdown_table(["route", "wall s", "each run s", "base MiB/s", "peak RSS MiB", "peak − baseline MiB",
                                   "written MiB", "wall / pemlang's"], rows)
    above = pem["rss"] - baseline
    checks = []
    if "PEFT" in results:
        ratio = results["PEFT"]["wall"] / pem["wall"]
        checks.append(["speed vs the PEFT route (PEFT wall / pemlang wall)", f"{ratio:.2f}×", "≥ 3×",
                       "PASS" if ratio >= 3 else "FAIL"])
    fraction = results["copy"]["wall"] / pem["wall"]
    checks.append(["throughput vs a plain copy, both started on a settled machine (copy wall / pemlang wall)",
                   f"{fraction:.2f}", "≥ 0.5", "PASS" if fraction >= 0.5 else "FAIL"])
    hot = results["copy" + HOT]["wall"] / results["pemlang" + HOT]["wall"]
    checks.append(["throughput vs a plain copy, both started with no idle time (into memory just freed)",
                   f"{hot:.2f}", "≥ 0.5", "PASS" if hot >= 0.5 else "FAIL"])
    checks.append(["peak RSS above the baseline", f"{common.mib(above)} MiB",
                   f"≤ 64 MiB + 2 × {common.mib(biggest)} MiB = {common.mib(bound_above)} MiB",
                   "PASS" if above <= bound_above else "FAIL"])
    if args.size == "smoke":  # a check of the script, not of pemlang: no verdicts
        checks = [[*row[:3], "(smoke size: not meaningful)"] for row in checks]
    check_table = common.markdown_table(["check", "measured", "target", ""], checks)
    notes = []
    if "PEFT" in results:
        notes.append("PEFT phases (s): " + ", ".join(f"{k} {v:.1f}" for k, v in results["PEFT"]["phases"].items())
                     + ".")
        notes.append(f"pemlang's output against PEFT's, {agreement} (PEFT adds ΔW cast to bf16 in bf16; pemlang adds "
                     "in fp32 and casts once).")
    notes.append("Wall includes each child's Python start-up and imports (pemlang and PEFT import torch; the copy "
                 "does not). pemlang copies the tensors it leaves alone with copy_file_range (in the kernel); the "
                 "copy route reads and writes every byte through user space.")
    text = "\n\n".join([
        f"# into base: {label}",
        common.environment_line("cpu"),
        f"`pemlang eval --mode exact --input a=ADAPTER --into BASE --out DIR -- a` vs PEFT (load the bf16 base, "
        "`PeftModel.from_pretrained`, `merge_and_unload`, `save_pretrained`) vs a plain copy of the base's files "
        f"(read, write, fsync). Base: random bf16 LlamaForCausalLM, {shape.layers} layers, hidden {shape.hidden}, "
        f"intermediate {shape.intermediate}, kv {shape.kv_dim}, vocab {shape.vocab}: "
        f"{base_size / common.MiB:,.0f} MiB in {shards} safetensors file(s), largest tensor `{biggest_name}` "
        f"({common.mib(biggest)} MiB). Adapter: r={shape.rank} on q/k/v/o/gate/up/down, "
        f"{common.lora_bytes(adapter) / common.MiB:.0f} MiB fp32. Each route is one child process, the base in the "
        f"page cache, writing into a new directory (the previous run's removed, the file system synced "
        f"and the machine left idle {settle:g} s first); pemlang and copy alternate, median of {args.repeat} "
        "(peak RSS: the largest). Baseline: peak RSS of "
        f"`python -c \"import torch, safetensors.torch\"` = {common.mib(baseline)} MiB.",
        table,
        check_table,
        "\n".join(f"- {line}" for line in notes),
    ])
    md = common.write_results(stem, text)
    plot(results, baseline, label, md.with_suffix(".png"))
    print()
    print(text)
    print(f"\nwrote {md} and {md.with_suffix('.png')}")


def plot(results: dict, baseline: int, label: str, path: Path) -> None:  # type: ignore[type-arg]
    plt = common.pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    names = list(results)
    colors = {"copy": "C2", "copy" + HOT: "C2", "pemlang": "C0", "pemlang" + HOT: "C0", "PEFT": "C1"}
    labels = [n.replace(HOT, "\n(no idle)") for n in names]
    axes[0].bar(labels, [results[n]["wall"] for n in names], color=[colors[n] for n in names])
    axes[0].set_title("wall (s), whole process")
    axes[1].bar(labels, [results[n]["rss"] / common.MiB for n in names], color=[colors[n] for n in names])
    axes[1].axhline(baseline / common.MiB, color="grey", linestyle=":", label="import torch, safetensors")
    axes[1].set_title("peak RSS (MiB)")
    axes[1].legend()
    fig.suptitle(f"merging into the base, {label}")
    common.save_figure(fig, path)


if __name__ == "__main__":
    main()
