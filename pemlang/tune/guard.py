"""What an objective must leave as it found it: the resident model that the next trial updates in
place. Each trial writes only the adapter's tensors, so anything else an objective changes (the
adapter merged into the base, unloaded, deleted, disabled, another adapter made active, the base
weights themselves changed) would silently carry over into every later trial: a study frozen at
one point that still reports a "best". Taken once after the adapter is installed, checked after
every objective call."""

from __future__ import annotations

from typing import Any

from ..diagnostics import error
from .errors import TuneError

SAMPLES = 64  # elements sampled from each base weight under an adapter layer
ROUNDING = 16  # merge then unmerge restores a weight to within a few units of rounding of its largest element


class ModelGuard:
    """The adapter layers of `model` (where they sit; which adapters are active, merged or disabled)
    and a fingerprint of the base weights under them: a few sampled elements of each, with what
    rounding may move them by. `name` is the adapter being tuned."""

    def __init__(self, model: Any, name: str):
        import torch
        from peft.tuners.tuners_utils import BaseTunerLayer

        self.name = name
        self.layers: list[tuple[str, Any, str, Any]] = []  # (qualified name, parent, attribute, layer)
        for parent_name, parent in model.named_modules():
            for attribute, child in parent.named_children():
                if isinstance(child, BaseTunerLayer):
                    self.layers.append((f"{parent_name}.{attribute}".lstrip("."), parent, attribute, child))
        self.flags = [_flags(layer) for _, _, _, layer in self.layers]  # as installed (a model may come merged)
        # (layer name, its base layer, the base weight, sampled indices, dtype, device)
        self.weights: list[tuple[str, Any, Any, Any, Any, Any]] = []
        samples, tolerances = [], []
        with torch.no_grad():
            for qualified, _, _, layer in self.layers:
                base = layer.get_base_layer()
                weight = getattr(base, "weight", None)
                if not isinstance(weight, torch.Tensor) or weight.numel() == 0 or weight.device.type == "meta":
                    continue  # nothing to sample (an offloaded weight is not resident)
                count = min(SAMPLES, weight.numel())  # evenly spread, in integers (exact for any size)
                index = torch.arange(count, device=weight.device) * (weight.numel() - 1) // max(count - 1, 1)
                sample = weight.detach().reshape(-1)[index].to(torch.float64).cpu()
                self.weights.append((qualified, base, weight, index, weight.dtype, weight.device))
                samples.append(sample)
                eps = torch.finfo(weight.dtype).eps if weight.dtype.is_floating_point else 0.0
                tolerances.append(torch.full_like(sample, ROUNDING * eps * float(sample.abs().max())))
        self.samples = torch.cat(samples) if samples else torch.zeros(0, dtype=torch.float64)
        self.tolerances = torch.cat(tolerances) if tolerances else torch.zeros(0, dtype=torch.float64)

    def changed_weights(self) -> str | None:
        """How the base weights differ from when the guard was made, or None."""
        import torch

        for qualified, base, weight, _, dtype, device in self.weights:
            if getattr(base, "weight", None) is not weight:
                return f"replaced the base model's weights ({qualified})"
            if (weight.dtype, weight.device) != (dtype, device):
                return (f"cast or moved the base model's weights ({qualified}: {_dtype(dtype)} on {device}, "
                        f"now {_dtype(weight.dtype)} on {weight.device})")
        if not self.weights:
            return None
        with torch.no_grad():
            now = torch.cat([weight.detach().reshape(-1)[index].to(torch.float64).cpu()
                             for _, _, weight, index, _, _ in self.weights])
        moved = ((now - self.samples).abs() > self.tolerances) | (torch.isfinite(self.samples) & ~torch.isfinite(now))
        if not bool(moved.any()):
            return None
        position = int(moved.nonzero()[0, 0])
        for qualified, _, _, index, _, _ in self.weights:
            if position < index.numel():
                return f"changed the base model's weights ({qualified})"
            position -= index.numel()
        return "changed the base model's weights"

    def problem(self, model: Any) -> str | None:
        """What the objective did to `model` that the next trial cannot undo, or None."""
        config = getattr(model, "peft_config", None)
        if config is not None and self.name not in config:
            return "deleted the adapter being tuned (delete_adapter)"
        if any(getattr(parent, attribute, None) is not layer for _, parent, attribute, layer in self.layers):
            changed = self.changed_weights()
            if changed is not None and changed.startswith("changed"):
                return "merged the adapter into the base model's weights and unloaded it (merge_and_unload)"
            return "unloaded the adapter being tuned (unload)"
        now = [_flags(layer) for _, _, _, layer in self.layers]
        for (active, _, _), (before, _, _) in zip(now, self.flags, strict=True):
            if active != before:
                shown = ", ".join(repr(a) for a in active) or "none"
                return f"made another adapter active ({shown}) (set_adapter)"
        if any(merged != before for (_, merged, _), (_, before, _) in zip(now, self.flags, strict=True)):
            return "merged the adapter into the base model's weights (merge_adapter)"
        if any(disabled != before for (_, _, disabled), (_, _, before) in zip(now, self.flags, strict=True)):
            return "disabled the adapter layers (disable_adapter_layers)"
        return self.changed_weights()

    def check(self, model: Any) -> None:
        """E031 naming what the objective did, when the model is not as the guard found it."""
        problem = self.problem(model)
        if problem is not None:
            raise TuneError([error("E031", f"the objective {problem}",
                                   notes=["each trial writes only the adapter's tensors into the model: every later "
                                          "trial would have scored this changed model"],
                                   hints=["an objective scores the model it is given; it must leave it as it found it "
                                          "(no merge_adapter without unmerge_adapter, no unload, delete_adapter, "
                                          "set_adapter or change to the base weights)"])])


def _dtype(dtype: Any) -> str:
    return str(dtype).removeprefix("torch.")


def _flags(layer: Any) -> tuple[tuple[str, ...], tuple[str, ...], bool]:
    """A tuner layer's active adapters, merged adapters and whether its adapters are disabled."""
    return (tuple(getattr(layer, "active_adapters", ())), tuple(getattr(layer, "merged_adapters", ())),
            bool(getattr(layer, "disable_adapters", False)))
