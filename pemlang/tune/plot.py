"""The plot beside the study: the objective against the params, written atomically, never over a
file pemlang did not make."""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path

from .results import TuneResult, objective_label


def plot(result: TuneResult, path: Path, space_names: Sequence[str]) -> Path | None:
    """Objective against the param (one), a heat map (two), or against the trial (more). Written
    atomically; None when no trial completed."""
    points = [t for t in result.trials if t["state"] == "complete"]
    if not points:
        return None
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    label = objective_label(result.objective)
    figure, axes = plt.subplots(figsize=(6, 4), dpi=110)
    names = [n for n in space_names if all(n in t["params"] for t in points)]
    best = result.best_params or {}
    if len(names) == 1:
        name = names[0]
        ordered = sorted(points, key=lambda t: t["params"][name])
        axes.plot([t["params"][name] for t in ordered], [float(t["value"]) for t in ordered], marker="o")
        if best:
            axes.plot([best[name]], [float(result.best_value or 0.0)], marker="*", markersize=16, color="tab:red",
                      label=f"best {name}={best[name]:g}")
            axes.legend()
        axes.set_xlabel(name)
        axes.set_ylabel(label)
    elif len(names) == 2:
        x, y = names
        shown = axes.scatter([t["params"][x] for t in points], [t["params"][y] for t in points],
                             c=[t["value"] for t in points], cmap="viridis", s=120, marker="s")
        figure.colorbar(shown, ax=axes, label=label)
        if best:
            axes.plot([best[x]], [best[y]], marker="*", markersize=16, color="tab:red", linestyle="none")
        axes.set_xlabel(x)
        axes.set_ylabel(y)
    else:
        axes.plot([t["number"] for t in points], [float(t["value"]) for t in points], marker="o", linestyle="none")
        axes.set_xlabel("trial")
        axes.set_ylabel(label)
    axes.set_title(f"pemlang tune: {result.direction} {label}")
    figure.tight_layout()
    staging = path.with_name(f".{path.name}.{os.getpid()}.tmp.png")
    try:
        figure.savefig(staging)
        os.replace(staging, path)
    finally:
        plt.close(figure)
        staging.unlink(missing_ok=True)
    return path


PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def plot_beside(result: TuneResult, study: Path, names: Sequence[str],
                protected: Mapping[str, Path] | None = None) -> tuple[Path | None, str | None]:
    """The plot beside the study (`F.db` → `F.png`): (path, None), or (None, why not). Never
    written over the study, an input, or a file that is not a PNG already."""
    target = study.with_suffix(".png")
    if same_file(target, study) or any(same_file(target, p) for p in (protected or {}).values()):
        return None, f"plot not written: {target} is the study or an input"
    if target.exists() or target.is_symlink():
        if not target.is_file():
            return None, f"plot not written: {target} is not a file"
        try:
            with target.open("rb") as f:
                if f.read(8) != PNG_MAGIC:
                    return None, f"plot not written: {target} exists and is not a plot pemlang would replace"
        except OSError as exc:
            return None, f"plot not written: {target}: {exc.strerror or exc}"
    try:
        return plot(result, target, names), None
    except OSError as exc:
        return None, f"plot not written: {target}: {exc.strerror or exc}"


def same_file(a: Path, b: Path) -> bool:
    try:
        if a.exists() and b.exists():
            return a.samefile(b)
        return a.resolve() == b.resolve()
    except OSError:
        return False
