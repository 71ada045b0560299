"""The built-in objective's scorer: causal-LM loss of the output tokens, or a classifier's accuracy,
its records tokenised once per worker."""

from __future__ import annotations

from typing import Any

from ..diagnostics import Diagnostic, error
from .errors import TuneError
from .objectives import DataObjective


class DataScorer:
    """The built-in objective, its records tokenised once per worker."""

    def __init__(self, data: DataObjective, tokenizer: Any, model: Any, classifier: bool, device: Any):
        self.classifier = classifier
        self.device = device
        self.batch_size = data.batch_size
        self.pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        limit = getattr(model.config, "max_position_embeddings", None) or 1 << 30
        problems: list[Diagnostic] = []
        self.examples: list[tuple[list[int], int | None]] = []  # (ids, label) or (ids, first scored position)
        for record in data.records:
            where = f"{data.path}:{record.line}"
            ids = list(tokenizer(record.input, add_special_tokens=True)["input_ids"])
            if classifier:
                label = _label(record.output, model.config)
                if label is None:
                    problems.append(error("E030", f"{where}: {record.output!r} is not a label of the classifier",
                                          notes=[f"labels: {', '.join(map(str, _labels(model.config)))}"]))
                    continue
                self.examples.append((ids, label))
            else:
                if not isinstance(record.output, str):
                    problems.append(error("E030", f"{where}: \"output\" must be text for a language model"))
                    continue
                out = list(tokenizer(record.output, add_special_tokens=False)["input_ids"])
                if tokenizer.eos_token_id is not None:
                    out.append(tokenizer.eos_token_id)
                start = max(len(ids), 1)  # the first token has nothing to be predicted from
                ids = ids + out
                if len(ids) <= start:
                    problems.append(error("E030", f"{where}: the output has no tokens to score"))
                    continue
                self.examples.append((ids, start))
            if len(ids) > limit:
                problems.append(error("E030", f"{where}: the record is {len(ids)} tokens, more than the model's "
                                      f"{limit}", hints=["shorten the record"]))
        if problems:
            raise TuneError(problems[:20])
        self.examples.sort(key=lambda e: len(e[0]))  # similar lengths share a batch: less padding

    def __call__(self, model: Any, params: dict[str, float]) -> float:
        import torch

        total = torch.zeros((), dtype=torch.float64)
        count = 0
        correct = 0
        for first in range(0, len(self.examples), self.batch_size):
            batch = self.examples[first:first + self.batch_size]
            width = max(len(ids) for ids, _ in batch)
            input_ids = torch.full((len(batch), width), self.pad, dtype=torch.long)
            mask = torch.zeros((len(batch), width), dtype=torch.long)
            for row, (ids, _) in enumerate(batch):
                input_ids[row, :len(ids)] = torch.tensor(ids)
                mask[row, :len(ids)] = 1
            logits = model(input_ids=input_ids.to(self.device), attention_mask=mask.to(self.device)).logits
            if self.classifier:
                labels = torch.tensor([label for _, label in batch])
                correct += int((logits.argmax(-1).cpu() == labels).sum())
                count += len(batch)
                continue
            labels = torch.full((len(batch), width), -100, dtype=torch.long)
            for row, (ids, start) in enumerate(batch):
                labels[row, start:len(ids)] = torch.tensor(ids[start:])  # type: ignore[misc]
            shifted = labels[:, 1:].to(self.device)
            loss = torch.nn.functional.cross_entropy(logits[:, :-1].float().reshape(-1, logits.shape[-1]),
                                                     shifted.reshape(-1), ignore_index=-100, reduction="sum")
            total += loss.double().cpu()
            count += int((shifted != -100).sum())
        return correct / count if self.classifier else float(total) / count


def _labels(config: Any) -> list[Any]:
    id2label = getattr(config, "id2label", None) or {}
    return [id2label.get(i, i) for i in range(getattr(config, "num_labels", len(id2label)))]


def _label(output: str | int, config: Any) -> int | None:
    labels = _labels(config)
    if isinstance(output, int):
        return output if 0 <= output < len(labels) else None
    label2id = getattr(config, "label2id", None) or {}
    if output in label2id:
        return int(label2id[output])
    if output.isascii() and output.isdigit() and len(output) < 19:
        return int(output) if int(output) < len(labels) else None
    return None
