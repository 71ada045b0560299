"""The streaming writer: outputs laid out from the plan and written layer by layer are byte-for-byte
the files the in-memory writer made (safetensors' own `save`, header re-serialised with sorted
keys), input hashes come from the one read of each input, and a layer shared by several outputs
is read once."""

from __future__ import annotations

import hashlib
import json
import struct
from pathlib import Path

import pytest
from safetensors.torch import save

import pemlang
from pemlang.backend import torch_backend
from pemlang.writer import layout


def previous_writer(tensors: dict, meta: dict[str, str]) -> bytes:
    """The writer before streaming, as it was: safetensors' `save`, then the header re-serialised
    with sorted keys and padded to 8 bytes (the data section unchanged)."""
    raw = save(dict(sorted(tensors.items())), metadata=meta)
    (length,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8 : 8 + length])
    text = json.dumps(header, sort_keys=True, separators=(",", ":")).encode("utf-8")
    text += b" " * (-len(text) % 8)
    return struct.pack("<Q", len(text)) + text + raw[8 + length :]


def metadata_of(path: Path) -> dict[str, str]:
    raw = path.read_bytes()
    (length,) = struct.unpack("<Q", raw[:8])
    return json.loads(raw[8 : 8 + length])["__metadata__"]


PROGRAMS = {  # case: (mode line, outputs, inputs used)
    "paper": ("", 'output 0.5*a + 0.3*b - 0.2*c -> "out/x"', "a b c"),
    "exact": ("mode exact\n", 'output 0.5*a + 0.3*b - 0.2*c -> "out/x"', "a b c"),
    "exact_fp16": ("mode exact\n", 'output 0.7*a - 0.3*b -> "out/x"', "a b"),
    "svd": ("mode exact\n", 'output svd(a + b - c, rank=5) + 0.5*c -> "out/x"', "a b c"),
    "ranks_and_patterns": ("mode exact\n", 'output r4 + pat - 0.5*a -> "out/x"', "a r4 pat"),
    "bf16_input": ("mode exact\n", 'output 0.5*bf + 0.5*a -> "out/x"', "a bf"),
    "two_outputs": ("mode exact\n", 'output a + b -> "out/x"\noutput a - 0.5*c -> "out/y"', "a b c"),
    "ia3": ("", 'output 0.5*ia + 0.5*ib -> "out/x"', "ia ib"),
    "heads": ("", 'output 0.5*cls + 0.5*cls_b -> "out/x"', "cls cls_b"),
    "roberta_heads": ("", 'output 0.5*rc + 0.5*rc_b -> "out/x"', "rc rc_b"),
    "bert_mlm_heads": ("", 'output 0.6*bm + 0.4*bm_b -> "out/x"', "bm bm_b"),
}
INPUTS = {"a": "llama_r8", "b": "llama_r8_b", "c": "llama_r8_c", "r4": "llama_r4", "pat": "llama_pattern",
          "bf": "llama_bf16", "ia": "llama_ia3", "ib": "llama_ia3_b", "cls": "llama_cls", "cls_b": "llama_cls_b",
          "rc": "roberta_cls", "rc_b": "roberta_cls_b", "bm": "bert_mlm", "bm_b": "bert_mlm_b"}


def program_text(adapters: Path, case: str) -> str:
    mode, outputs, used = PROGRAMS[case]
    lines = [f'input {name} = "{adapters / INPUTS[name]}"' for name in used.split()]
    return mode + "\n".join(lines) + "\n" + outputs + "\n"


@pytest.mark.parametrize("case", sorted(PROGRAMS))
def test_streamed_files_are_the_previous_writers_bytes(adapters: Path, tmp_path: Path, case: str) -> None:
    text = program_text(adapters, case)
    dtype = "float16" if case == "exact_fp16" else None
    program = pemlang.compile(text=text, base_dir=tmp_path, dtype=dtype)
    written = program.save(device="cpu")
    evaluated = program.evaluate(device="cpu")  # the in-memory route, independently
    assert len(written) == len(evaluated)
    for path, tensors in zip(written, evaluated.values(), strict=True):
        weights = path / "adapter_model.safetensors"
        expected = previous_writer(tensors, metadata_of(weights))
        assert weights.read_bytes() == expected, case


def test_recorded_hashes_are_the_inputs_sha256(adapters: Path, tmp_path: Path) -> None:
    program = pemlang.compile(text=program_text(adapters, "svd"), base_dir=tmp_path)
    (path,) = program.save(device="cpu")
    recorded = json.loads(metadata_of(path / "adapter_model.safetensors")["pemlang.inputs"])
    assert {item["name"] for item in recorded} == {"a", "b", "c"}
    for item in recorded:
        file = adapters / INPUTS[item["name"]] / "adapter_model.safetensors"
        assert item["sha256"] == hashlib.sha256(file.read_bytes()).hexdigest()


def test_a_layer_needed_by_several_outputs_is_read_once(adapters: Path, tmp_path: Path,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """Three outputs over the same inputs: every byte of every input file is read exactly once
    (tensors as they are needed, the rest while hashing), never once per output."""
    read: dict[str, int] = {}
    real = torch_backend._HashingReader._pread_into

    def counting(self, view: memoryview, begin: int) -> None:  # type: ignore[no-untyped-def]
        read[self.path.parent.name] = read.get(self.path.parent.name, 0) + len(view)
        real(self, view, begin)

    monkeypatch.setattr(torch_backend._HashingReader, "_pread_into", counting)
    text = program_text(adapters, "exact").replace(
        'output 0.5*a + 0.3*b - 0.2*c -> "out/x"',
        'output 0.5*a + 0.3*b - 0.2*c -> "out/x"\noutput a - b -> "out/y"\noutput svd(b + c, rank=4) -> "out/z"')
    pemlang.compile(text=text, base_dir=tmp_path).save(device="cpu")
    sizes = {INPUTS[n]: (adapters / INPUTS[n] / "adapter_model.safetensors").stat().st_size for n in "abc"}
    assert read == sizes


def test_layout_is_safetensors_own(tmp_path: Path) -> None:
    """Mixed dtypes: safetensors puts wider dtypes first, then names in order; the layout agrees."""
    import torch

    tensors = {"z": torch.ones(3, dtype=torch.float16), "a": torch.ones(2, 2), "m": torch.ones(5, dtype=torch.bfloat16),
               "b": torch.ones(1, dtype=torch.float64), "k": torch.ones(2, 3, dtype=torch.float16)}
    meta = {"format": "pt", "λ": "0.5"}
    planned = layout({k: ({torch.float16: "F16", torch.float32: "F32", torch.bfloat16: "BF16",
                           torch.float64: "F64"}[v.dtype], tuple(v.shape)) for k, v in tensors.items()}, meta)
    expected = previous_writer(tensors, meta)
    assert planned.size == len(expected)
    assert expected[: len(planned.header)] == planned.header
    for key, (begin, end) in planned.offsets.items():
        assert expected[begin:end] == tensors[key].contiguous().view(torch.uint8).numpy().tobytes()
