"""`pemlang inspect`: an adapter's type signature as a readable table.

Layers that differ only in their block index (model.layers.0…31.self_attn.q_proj) and agree on
shape, rank, scaling and dtype are shown as one row, so a 7B model's adapter fits a screen.
"""

from __future__ import annotations

import re

from .adapters import Adapter
from .basemodel import BaseModel
from .formatting import compact_indices, human_bytes, visible
from .types import LoraLayer, describe_heads


def _text(value: object, style: str = ""):  # type: ignore[no-untyped-def]
    """What an adapter says (a path, a name, a key), to print as it is: never read as Rich
    markup, control characters made visible."""
    from rich.text import Text

    return Text(visible(str(value)), style=style)


def _format_number(x: float) -> str:
    return f"{x:g}"


def layer_rows(adapter: Adapter) -> list[tuple[str, ...]]:
    """Rows of (layers, shape, rank, alpha, scaling, dtype, size), grouped over block indices."""
    groups: dict[tuple[str, ...], list[tuple[int | None, int]]] = {}
    facts: tuple[str, ...]
    for key, layer in adapter.type.layers.items():
        match = re.search(r"\.(\d+)\.", key)
        pattern = key[: match.start(1)] + "{}" + key[match.end(1):] if match else key
        index = int(match.group(1)) if match else None
        if isinstance(layer, LoraLayer):
            facts = (layer.shape_text + (" (fan_in_fan_out)" if layer.fan_in_fan_out else ""),
                     str(layer.rank), _format_number(layer.alpha),
                     _format_number(layer.scaling) + (" (rsLoRA)" if layer.use_rslora else ""), layer.dtype)
        else:
            facts = (layer.shape_text + (" (feed-forward)" if layer.feedforward else ""), "", "", "",
                     layer.dtype)
        groups.setdefault((pattern, *facts), []).append((index, layer.nbytes))
    rows: list[tuple[str, ...]] = []
    for (pattern, *row_facts), members in groups.items():
        indices = [i for i, _ in members if i is not None]
        name = pattern.format(f"[{compact_indices(indices)}]" if len(indices) > 1 else indices[0]) \
            if "{}" in pattern else pattern
        rows.append((name, *row_facts, human_bytes(sum(n for _, n in members))))
    return rows


def provenance_rows(metadata: dict[str, str]) -> list[tuple[str, str]]:
    """What a pemlang-made adapter records about how it was made (empty for other adapters); a
    field that does not parse is shown as it is."""
    if "pemlang.expression" not in metadata:
        return []
    from .writer import provenance_field as parsed

    rows = [("version", metadata.get("pemlang.version", "?")), ("mode", metadata.get("pemlang.mode", "?")),
            ("expression", metadata.get("pemlang.expression", ""))]
    params = parsed(metadata, "pemlang.params")
    if isinstance(params, dict) and params:
        rows.append(("params", ", ".join(f"{k} = {v}" for k, v in params.items())))
    inputs = parsed(metadata, "pemlang.inputs")
    if isinstance(inputs, list):
        for item in inputs:
            if isinstance(item, dict):
                rows.append((f"input {item.get('name')}", f"{item.get('path')}  sha256 {str(item.get('sha256'))[:16]}…"))
    from .writer import dropped_report

    rows += [("svd", line) for line in dropped_report(metadata)]
    tuned = parsed(metadata, "pemlang.tune")
    if isinstance(tuned, dict):
        rows.append(("tuned", f"{tuned.get('direction')} {tuned.get('objective')}: {tuned.get('value')} "
                     f"at trial {tuned.get('trial')} of {tuned.get('trials')} over {', '.join(tuned.get('space') or [])}"
                     + (f" (study {tuned.get('study')})" if tuned.get("study") else "")))
    return [(label, str(value)) for label, value in rows]


def render_adapter(adapter: Adapter, console=None) -> None:  # type: ignore[no-untyped-def]
    """Print an adapter's signature: summary, layers table, heads, refused features."""
    import sys

    from rich.console import Console
    from rich.table import Table

    console = console or Console(highlight=False, width=None if sys.stdout.isatty() else 160)
    t = adapter.type
    cfg = adapter.config
    kind = "LoRA" if t.kind == "lora" else "(IA)3"
    if t.kind == "lora" and cfg.get("use_rslora"):
        kind += " (rsLoRA)"
    total = sum(layer.nbytes for layer in t.layers.values()) + sum(h.nbytes for h in t.heads.values())
    console.print(_text(adapter.path, "bold"))
    facts = [
        ("kind", kind),
        ("base model", t.base.name or _text("not recorded", "yellow")),
        ("revision", t.base.revision or "-"),
        ("architecture", t.architecture or "-"),
        ("task type", cfg.get("task_type") or "-"),
        ("layers", f"{len(t.layers)} adapted"),
        ("heads", describe_heads(t.head_modules) if t.heads else "none"),
        ("weights", f"{adapter.weights_file.name}, {human_bytes(total)} in {len(adapter.tensors)} tensors"),
        ("saved by", f"PEFT {cfg['peft_version']}" if cfg.get("peft_version") else "-"),
    ]
    if t.kind == "lora":
        facts.insert(5, ("r / lora_alpha", f"{cfg.get('r')} / {cfg.get('lora_alpha')}"
                         + ("  (rank_pattern)" if cfg.get("rank_pattern") else "")
                         + ("  (alpha_pattern)" if cfg.get("alpha_pattern") else "")))
    summary = Table.grid(padding=(0, 2))
    for label, value in facts:
        summary.add_row(_text(label, "dim"), _text(value) if isinstance(value, str) else value)
    console.print(summary)

    table = Table(show_edge=False, header_style="bold")
    table.add_column("layers", no_wrap=True)
    table.add_column("shape (out×in)" if t.kind == "lora" else "vector", justify="right")
    if t.kind == "lora":
        table.add_column("rank", justify="right")
        table.add_column("alpha", justify="right")
        table.add_column("scaling", justify="right")
    table.add_column("dtype")
    table.add_column("size", justify="right")
    for row in layer_rows(adapter):
        name, shape, rank, alpha, scaling, dtype, size = row
        table.add_row(*map(_text, (name, shape, rank, alpha, scaling, dtype, size) if t.kind == "lora"
                           else (name, shape, dtype, size)))
    console.print(table)
    if t.heads:
        heads = Table(show_edge=False, header_style="bold", title="heads (modules_to_save)", title_justify="left")
        heads.add_column("head")
        heads.add_column("tensor")
        heads.add_column("shape", justify="right")
        heads.add_column("dtype")
        heads.add_column("size", justify="right")
        for module, keys in t.head_modules.items():
            for index, key in enumerate(keys):
                head = t.heads[key]
                heads.add_row(*map(_text, (module if index == 0 else "", key, "×".join(map(str, head.shape)),
                                           head.dtype, human_bytes(head.nbytes))))
        console.print(heads)
    made = provenance_rows(adapter.metadata)
    if made:
        grid = Table.grid(padding=(0, 2))
        for label, value in made:
            grid.add_row(_text(label, "dim"), _text(value))
        console.print("[bold]made by pemlang[/bold]")
        console.print(grid)
    if adapter.unsupported:
        console.print(_text("not composable by pemlang:", "bold red") + " " + _text("; ".join(adapter.unsupported)))
    if adapter.truncated:
        console.print(f"[bold red]truncated:[/bold red] the header promises "
                      f"{adapter.data_start + adapter.data_bytes_expected} bytes, the file has {adapter.file_size}")


def is_model_directory(path: object) -> bool:
    """Whether `path` is a model directory (config.json, no adapter_config.json): `inspect` then
    shows the model, and where pemlang merged it, how."""
    from pathlib import Path

    directory = Path(str(path))
    return (directory / "config.json").is_file() and not (directory / "adapter_config.json").exists()


def render_model(base: BaseModel, console=None) -> None:  # type: ignore[no-untyped-def]
    """Print a model directory from its config and weight headers: architecture, weight files,
    tensors, dtypes; for a model pemlang merged (`output x into`), the provenance its weight files
    record — the same in every one of them, or which fields differ."""
    import sys

    from rich.console import Console
    from rich.table import Table

    console = console or Console(highlight=False, width=None if sys.stdout.isatty() else 160)
    console.print(_text(base.path, "bold"))
    tensors = [info for f in base.files for info in f.tensors.values()]
    dtypes: dict[str, int] = {}
    for info in tensors:
        dtypes[info.dtype] = dtypes.get(info.dtype, 0) + 1
    architectures = base.config.get("architectures")
    facts = [
        ("kind", f"a model (config.json and {'pickled' if base.pickled else 'safetensors'} weights)"),
        ("architecture", ", ".join(map(str, architectures)) if isinstance(architectures, list) and architectures
         else str(base.config.get("model_type") or "-")),
        ("recorded name", base.identity.name or "not recorded"),
        ("weights", f"{len(base.files)} file{'s' if len(base.files) != 1 else ''}"
                    + (f" ({base.index})" if base.index else "") + f", {human_bytes(base.nbytes)} in "
                    f"{len(tensors)} tensors"),
        ("dtypes", ", ".join(f"{d} ({n})" for d, n in sorted(dtypes.items())) or "-"),
    ]
    summary = Table.grid(padding=(0, 2))
    for label, value in facts:
        summary.add_row(_text(label, "dim"), _text(value))
    console.print(summary)
    first = base.files[0].metadata if base.files else {}
    if "pemlang.into" not in first:
        console.print(_text("not merged by pemlang: its weight files record no pemlang provenance", "dim"))
        return
    rows = [("merged into", first.get("pemlang.into", "")), ("base model", first.get("pemlang.base_model") or "-"),
            *provenance_rows(first)]
    grid = Table.grid(padding=(0, 2))
    for label, value in rows:
        grid.add_row(_text(label, "dim"), _text(value))
    console.print("[bold]made by pemlang[/bold] (a module merged into its base model)")
    console.print(grid)
    ours = {k: v for k, v in first.items() if k.startswith("pemlang.")}
    differ = sorted({k for f in base.files[1:] for k in set(ours) | {k for k in f.metadata if k.startswith("pemlang.")}
                     if f.metadata.get(k) != ours.get(k)})
    if differ:
        console.print(_text(f"the weight files disagree on {', '.join(differ)}: they were not written together "
                            "(a file replaced since?)", "bold red"))
    elif len(base.files) > 1:
        console.print(_text(f"every one of the {len(base.files)} weight files records the same", "dim"))
