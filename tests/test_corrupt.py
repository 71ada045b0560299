"""Damaged adapters: every one is a diagnostic (E011/E012/E013 when read, E014 when run), never an
internal error (exit 70) or a traceback, in `pemlang check`, `pemlang inspect` and `pemlang run`.

The damaged copies are generated from a real PEFT adapter (tests/peft_factory.py `llama_r8`):
headers cut at many points, absurd length prefixes, headers that are not JSON or not an object,
deep nesting, wrong dtypes, shapes and offsets, junk appended, data cut off, metadata that is not a
flat string map, missing or disagreeing LoRA factors, every config field with a wrong type or a
value out of range (integers too long to parse, scalings lora_alpha/r that are not normal float32
numbers), hostile regexes, and non-finite tensors.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import struct
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from pemlang.adapters import MAX_HEADER_BYTES
from pemlang.cli import main

WEIGHTS = "adapter_model.safetensors"
CONFIG = "adapter_config.json"
Q0 = "base_model.model.model.layers.0.self_attn.q_proj"


@dataclass(frozen=True)
class Case:
    """A damage applied to a copy of the adapter, and the codes a reader may answer with."""

    name: str
    damage: Callable[[Path], None]
    codes: frozenset[str] = frozenset({"E013"})
    at_run: bool = False  # only `run` reads tensor data (E014): check and inspect succeed


# -- damaging a safetensors file ---------------------------------------------------------------------


def split(weights: bytes) -> tuple[dict[str, Any], bytes]:
    (length,) = struct.unpack("<Q", weights[:8])
    return json.loads(weights[8 : 8 + length]), weights[8 + length :]


def assemble(header: Any, data: bytes, *, raw: bytes | None = None) -> bytes:
    text = raw if raw is not None else json.dumps(header).encode("utf-8")
    return struct.pack("<Q", len(text)) + text + data


def on_weights(change: Callable[[bytes], bytes]) -> Callable[[Path], None]:
    def damage(directory: Path) -> None:
        path = directory / WEIGHTS
        path.write_bytes(change(path.read_bytes()))
    return damage


def on_header(change: Callable[[dict[str, Any], bytes], tuple[Any, bytes]]) -> Callable[[Path], None]:
    def rewrite(weights: bytes) -> bytes:
        header, data = split(weights)
        new_header, new_data = change(header, data)
        return assemble(new_header, new_data)
    return on_weights(rewrite)


def on_entry(key: str, change: Callable[[dict[str, Any]], Any]) -> Callable[[Path], None]:
    def edit(header: dict[str, Any], data: bytes) -> tuple[Any, bytes]:
        header[key] = change(header[key])
        return header, data
    return on_header(edit)


def setting(entry: dict[str, Any], field: str, value: Any) -> dict[str, Any]:
    return {**entry, field: value}


def first_and_last(header: dict[str, Any]) -> tuple[str, str]:
    ordered = sorted((k for k in header if k != "__metadata__"), key=lambda k: header[k]["data_offsets"][0])
    return ordered[0], ordered[-1]


def swap_offsets(header: dict[str, Any], data: bytes) -> tuple[Any, bytes]:
    first, last = first_and_last(header)
    a, b = header[first]["data_offsets"], header[last]["data_offsets"]
    header[first]["data_offsets"], header[last]["data_offsets"] = [b[1], b[0]], a
    return header, data


def overlap(header: dict[str, Any], data: bytes) -> tuple[Any, bytes]:
    """Two same-sized tensors at the same offsets, the data section shortened to match."""
    first, _ = first_and_last(header)
    size = header[first]["data_offsets"][1]
    same = next(k for k in header if k not in ("__metadata__", first)
                and header[k]["data_offsets"][1] - header[k]["data_offsets"][0] == size)
    moved = header[same]["data_offsets"][0]
    for entry in header.values():
        if isinstance(entry, dict) and "data_offsets" in entry and entry["data_offsets"][0] > moved:
            entry["data_offsets"] = [entry["data_offsets"][0] - size, entry["data_offsets"][1] - size]
    header[same]["data_offsets"] = [0, size]
    return header, data[:-size]


def gap(header: dict[str, Any], data: bytes) -> tuple[Any, bytes]:
    """The last tensor moved 4 bytes on, the data section grown by 4: 4 bytes belong to no tensor."""
    _, last = first_and_last(header)
    begin, end = header[last]["data_offsets"]
    header[last]["data_offsets"] = [begin + 4, end + 4]
    return header, data[:begin] + b"\0" * 4 + data[begin:]


def shift_all(by: int) -> Callable[[dict[str, Any], bytes], tuple[Any, bytes]]:
    def change(header: dict[str, Any], data: bytes) -> tuple[Any, bytes]:
        for entry in header.values():
            if isinstance(entry, dict) and "data_offsets" in entry:
                begin, end = entry["data_offsets"]
                entry["data_offsets"] = [begin + by, end + by]
        return header, data
    return change


def resave(change: Callable[[dict[str, Any]], None]) -> Callable[[Path], None]:
    """Load the tensors, change the dict, save with safetensors itself (a well-formed file)."""
    def damage(directory: Path) -> None:
        from safetensors.torch import load_file, save_file

        state = load_file(str(directory / WEIGHTS))
        change(state)
        save_file(state, str(directory / WEIGHTS), metadata={"format": "pt"})
    return damage


def only_unknown_tensor(state: dict[str, Any]) -> None:
    kept = state.pop(next(iter(state)))
    state.clear()
    state["something.else"] = kept


def set_value(key: str, value: float) -> Callable[[dict[str, Any]], None]:
    def change(state: dict[str, Any]) -> None:
        state[key][0, 0] = value
    return change


# -- damaging adapter_config.json --------------------------------------------------------------------


def on_config_text(text: str | bytes) -> Callable[[Path], None]:
    def damage(directory: Path) -> None:
        path = directory / CONFIG
        path.write_bytes(text if isinstance(text, bytes) else text.encode("utf-8"))
    return damage


def config_field(field: str, value: Any) -> Callable[[Path], None]:
    def damage(directory: Path) -> None:
        path = directory / CONFIG
        config = json.loads(path.read_text())
        config[field] = value
        path.write_text(json.dumps(config, allow_nan=True))  # NaN and Infinity as Python's json writes them
    return damage


def config_raw_field(field: str, raw: str) -> Callable[[Path], None]:
    """Set a field to a JSON text written as is (numbers Python's json cannot write)."""
    def damage(directory: Path) -> None:
        path = directory / CONFIG
        config = json.loads(path.read_text())
        config[field] = "@@raw@@"
        path.write_text(json.dumps(config).replace('"@@raw@@"', raw))
    return damage


def config_fields(**values: Any) -> Callable[[Path], None]:
    """Several fields at once; a value of None removes the field."""
    def damage(directory: Path) -> None:
        path = directory / CONFIG
        config = json.loads(path.read_text())
        for field, value in values.items():
            config.pop(field) if value is None else config.__setitem__(field, value)
        path.write_text(json.dumps(config))
    return damage


def remove(name: str) -> Callable[[Path], None]:
    def damage(directory: Path) -> None:
        target = directory / name if name else directory
        shutil.rmtree(target) if target.is_dir() else target.unlink()
    return damage


def replace_by(name: str, kind: str) -> Callable[[Path], None]:
    """A file of the adapter replaced by something that is not a regular file."""
    def damage(directory: Path) -> None:
        target = directory / name
        target.unlink()
        if kind == "fifo":
            os.mkfifo(target)
        elif kind == "directory":
            target.mkdir()
        elif kind == "dangling":
            target.symlink_to(directory / "nothing here")
        else:
            target.symlink_to(kind)
    return damage


def replace_dir_by_file(directory: Path) -> None:
    shutil.rmtree(directory)
    directory.write_text("not a directory")


def build_cases(header_length: int, file_length: int) -> list[Case]:
    cases: list[Case] = []

    def add(name: str, damage: Callable[[Path], None], *codes: str, at_run: bool = False) -> None:
        cases.append(Case(name, damage, frozenset(codes or {"E013"}), at_run))

    # The file cut inside the length prefix, at many points of the header, and in the data.
    for cut in (0, 1, 4, 7):
        add(f"prefix_cut_{cut}", on_weights(lambda w, cut=cut: w[:cut]))
    for fraction in (0.0, 0.01, 0.05, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.99):
        at = 8 + int(fraction * header_length)
        add(f"header_cut_{fraction}", on_weights(lambda w, at=at: w[:at]))
    add("header_cut_last_byte", on_weights(lambda w: w[: 8 + header_length - 1]))
    data_length = file_length - 8 - header_length
    for fraction in (0.0, 0.25, 0.5, 0.99):
        at = 8 + header_length + int(fraction * data_length)
        add(f"data_cut_{fraction}", on_weights(lambda w, at=at: w[:at]))
    # Length prefixes: zero, absurd, past the end of the file.
    for name, length in (("zero", 0), ("absurd", 2**63), ("max", 2**64 - 1), ("over_size", file_length),
                         ("one_past", file_length - 7), ("over_limit", MAX_HEADER_BYTES + 1)):
        add(f"length_{name}", on_weights(lambda w, length=length: struct.pack("<Q", length) + w[8:]))
    add("length_short_by_one", on_weights(lambda w: struct.pack("<Q", header_length - 1) + w[8:]))
    add("length_long_by_one", on_weights(lambda w: struct.pack("<Q", header_length + 1) + w[8:]))
    # Not JSON, not an object, too deep.
    for name, raw in (("garbage", b"\x00\x01\x02 not json"), ("latin1", b'{"\xe9": 1}'), ("open", b'{"a":'),
                      ("trailing", b'{} {}'), ("nan", b'{"a": NaN}'), ("empty", b"")):
        add(f"header_{name}", on_weights(lambda w, raw=raw: assemble(None, b"", raw=raw)))
    for name, raw in (("list", b"[]"), ("number", b"1"), ("string", b'"x"'), ("null", b"null"), ("true", b"true")):
        add(f"header_is_{name}", on_weights(lambda w, raw=raw: assemble(None, b"", raw=raw)))
    for name, raw in (("brackets", b"[" * 100_000), ("objects", b'{"a":' * 50_000),
                      ("closed", b"[" * 20_000 + b"]" * 20_000),
                      ("in_entry", b'{"x": {"dtype": "F32", "shape": ' + b"[" * 30_000 + b"]" * 30_000 + b"}}")):
        add(f"deep_{name}", on_weights(lambda w, raw=raw: assemble(None, b"", raw=raw)))
    # Entries: dtypes, shapes, offsets, the entry itself.
    key_a = f"{Q0}.lora_A.weight"
    for name, dtype in (("unknown", "F99"), ("lower", "f32"), ("number", 4), ("null", None), ("list", ["F32"])):
        add(f"dtype_{name}", on_entry(key_a, lambda e, d=dtype: setting(e, "dtype", d)))
    add("dtype_size_mismatch", on_entry(key_a, lambda e: setting(e, "dtype", "F16")))
    for name, shape in (("negative", [-8, 32]), ("float", [8.0, 32]), ("string", ["8", 32]), ("huge", [10**30, 32]),
                        ("nested", [[8], 32]), ("bool", [True, 32]), ("not_list", 256), ("null", None),
                        ("wrong_numel", [8, 31]), ("big_negative", [-(2**70), 1])):
        add(f"shape_{name}", on_entry(key_a, lambda e, s=shape: setting(e, "shape", s)))
    add("shape_three_d", on_entry(key_a, lambda e: setting(e, "shape", [8, 32, 1])), "E013", "E011")
    for name, offsets in (("negative", [-1, 1023]), ("float", [0.0, 1024.0]), ("three", [0, 1024, 2048]),
                          ("one", [0]), ("string", ["0", "1024"]), ("null", None), ("huge", [0, 10**40]),
                          ("bool", [False, True]), ("reversed_one", [1024, 0])):
        add(f"offsets_{name}", on_entry(key_a, lambda e, o=offsets: setting(e, "data_offsets", o)))
    add("offsets_swapped", on_header(swap_offsets))
    add("offsets_overlapping", on_header(overlap))
    add("offsets_gap", on_header(gap))
    add("offsets_shifted_out", on_header(shift_all(4)))
    add("offsets_past_end", on_header(shift_all(10**6)))
    add("entry_missing_dtype", on_entry(key_a, lambda e: {k: v for k, v in e.items() if k != "dtype"}))
    add("entry_missing_offsets", on_entry(key_a, lambda e: {k: v for k, v in e.items() if k != "data_offsets"}))
    add("entry_extra_field", on_entry(key_a, lambda e: {**e, "extra": 1}))
    add("entry_is_list", on_entry(key_a, lambda e: [e["dtype"], e["shape"], e["data_offsets"]]))
    add("entry_is_string", on_entry(key_a, lambda e: "F32"))
    add("junk_appended", on_weights(lambda w: w + b"junk"))
    add("junk_one_byte", on_weights(lambda w: w + b"\0"))
    # Metadata.
    for name, meta in (("nested", {"format": {"a": "pt"}}), ("number", {"format": 5}), ("list", ["pt"]),
                       ("string", "pt"), ("null_value", {"format": None}), ("bool", True)):
        add(f"metadata_{name}", on_header(lambda h, d, m=meta: ({**h, "__metadata__": m}, d)))
    # LoRA factors.
    add("missing_lora_A", resave(lambda s: s.pop(f"{Q0}.lora_A.weight")))
    add("missing_lora_B", resave(lambda s: s.pop(f"{Q0}.lora_B.weight")))
    add("ranks_disagree", resave(lambda s: s.update({f"{Q0}.lora_A.weight": s[f"{Q0}.lora_A.weight"][:4].clone()})))
    add("no_adapter_tensors", resave(only_unknown_tensor), "E013", "E011")
    # Non-finite tensors: read only at run time.
    add("nan_in_A", resave(set_value(f"{Q0}.lora_A.weight", math.nan)), "E014", at_run=True)
    add("inf_in_B", resave(set_value(f"{Q0}.lora_B.weight", math.inf)), "E014", at_run=True)
    add("neg_inf_in_B", resave(set_value(f"{Q0}.lora_B.weight", -math.inf)), "E014", at_run=True)
    # adapter_config.json: the file.
    for name, text in (("not_json", "{not json"), ("empty", ""), ("list", "[]"), ("string", '"LORA"'),
                       ("number", "8"), ("null", "null"), ("latin1", b'{"peft_type": "LOR\xc1"}'),
                       ("deep", "[" * 100_000), ("deep_object", '{"a":' * 50_000)):
        add(f"config_{name}", on_config_text(text))
    # adapter_config.json: every field the reader uses.
    bad_numbers = (("string", "8"), ("zero", 0), ("negative", -8), ("nan", math.nan), ("inf", math.inf),
                   ("bool", True), ("list", [8]), ("null", None))
    for name, value in (*bad_numbers, ("fraction", 8.5)):
        add(f"r_{name}", config_field("r", value))
    for name, value in bad_numbers:
        add(f"lora_alpha_{name}", config_field("lora_alpha", value))
    # Numbers out of range: too long to parse, beyond float, a scaling that is not a normal float32.
    add("r_too_many_digits", config_raw_field("r", "9" * 5000))
    add("lora_alpha_too_many_digits", config_raw_field("lora_alpha", "1" * 4301))
    add("rank_pattern_too_many_digits", config_raw_field("rank_pattern", '{"q_proj": ' + "8" * 5000 + "}"))
    add("unused_field_too_many_digits", config_raw_field("something_else", "[" + "7" * 5000 + "]"))
    add("lora_alpha_float_literal_overflow", config_raw_field("lora_alpha", "1e999"))
    for name, value in (("huge", 10**400), ("beyond_rank_limit", 2**31 + 1), ("beyond_int64", 2**64)):
        add(f"r_{name}", config_field("r", value))
    for name, value in (("beyond_float", 10**400), ("subnormal", 5e-324), ("tiny", 1e-40),
                        ("scaling_subnormal", 8e-38), ("scaling_overflow", 1e308), ("huge_int", 10**39 * 8)):
        add(f"lora_alpha_{name}", config_field("lora_alpha", value))
    add("lora_alpha_tiny_rslora", config_fields(lora_alpha=3e-38, use_rslora=True))
    add("lora_alpha_tiny_without_r", config_fields(lora_alpha=5e-324, r=None))
    for name, value in (("beyond_float", 10**400), ("subnormal", 5e-324), ("scaling_overflow", 1e308)):
        add(f"alpha_pattern_{name}", config_field("alpha_pattern", {"q_proj": value}))
    for name, value in (("huge", 10**100), ("beyond_rank_limit", 2**31 + 1)):
        add(f"rank_pattern_{name}", config_field("rank_pattern", {"q_proj": value}))
    add("rank_pattern_scaling_subnormal", config_fields(lora_alpha=1e-37, rank_pattern={"q_proj": 2**31}))
    add("alpha_pattern_subnormal_without_r", config_fields(alpha_pattern={"q_proj": 5e-324}, r=None))
    for field in ("rank_pattern", "alpha_pattern"):
        for name, value in (("list", ["q_proj"]), ("string", "q_proj"), ("value_string", {"q_proj": "4"}),
                            ("value_zero", {"q_proj": 0}), ("value_negative", {"q_proj": -4}),
                            ("value_nan", {"q_proj": math.nan}), ("value_inf", {"q_proj": math.inf}),
                            ("value_bool", {"q_proj": True}), ("value_null", {"q_proj": None}),
                            ("invalid_regex", {"q_proj(": 8}), ("invalid_class", {"[z-a]": 8}),
                            ("catastrophic", {"(a+)+$": 8}), ("catastrophic_star", {"(.*)*x": 8}),
                            ("catastrophic_branch", {"(x|x)+y": 8}), ("backreference", {r"(a)\1": 8})):
            add(f"{field}_{name}", config_field(field, value))
    for name, value in (("string", "score"), ("number", 5), ("list_of_numbers", [1]), ("object", {"a": 1}),
                        ("nested", [["score"]])):
        add(f"modules_to_save_{name}", config_field("modules_to_save", value))
    for name, value in (("number", 5), ("list_of_numbers", [1, 2]), ("object", {"q_proj": 1}), ("bool", True)):
        add(f"target_modules_{name}", config_field("target_modules", value))
    for name, value in (("list", ["LlamaForCausalLM"]), ("string", "LlamaForCausalLM"), ("number", 1),
                        ("class_number", {"base_model_class": 5})):
        add(f"auto_mapping_{name}", config_field("auto_mapping", value))
    for field in ("base_model_name_or_path", "revision", "task_type"):
        for name, value in (("number", 5), ("list", ["x"]), ("object", {"a": "b"}), ("bool", False)):
            add(f"{field}_{name}", config_field(field, value))
    for field in ("use_rslora", "fan_in_fan_out"):
        for name, value in (("string", "yes"), ("number", 1), ("list", [True])):
            add(f"{field}_{name}", config_field(field, value))
    for name, value in (("lower", "lora"), ("title", "Lora"), ("number", 5), ("list", ["LORA"]), ("null", None),
                        ("spaced", " LORA")):
        add(f"peft_type_{name}", config_field("peft_type", value), "E013", "E011")
    # Missing files and directories.
    add("directory_missing", remove(""), "E012")
    add("config_missing", remove(CONFIG), "E012")
    add("weights_missing", remove(WEIGHTS), "E012")
    add("directory_is_a_file", replace_dir_by_file, "E012")
    add("config_oversized", on_config_text(b'{"peft_type": "LORA", "pad": "' + b"x" * (16 * 2**20) + b'"}'))
    # Not regular files: a FIFO (never opened: reading one waits for a writer), devices, directories.
    for name in (WEIGHTS, CONFIG):
        for kind, label in (("fifo", "fifo"), ("directory", "directory"), ("/dev/zero", "dev_zero"),
                            ("/dev/null", "dev_null"), ("dangling", "dangling_link")):
            add(f"{name.split('.')[0]}_{label}", replace_by(name, kind), "E012")
    return cases


@pytest.fixture(scope="module")
def damaged(adapters: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Case, Path]]:
    original = adapters / "llama_r8"
    raw = (original / WEIGHTS).read_bytes()
    (header_length,) = struct.unpack("<Q", raw[:8])
    root = tmp_path_factory.mktemp("damaged")
    built = {}
    for case in build_cases(header_length, len(raw)):
        target = root / case.name
        shutil.copytree(original, target)
        case.damage(target)
        built[case.name] = (case, target)
    return built


CASE_NAMES = [c.name for c in build_cases(1000, 5000)]


def test_there_are_enough_cases() -> None:
    assert len(CASE_NAMES) >= 130 and len(set(CASE_NAMES)) == len(CASE_NAMES)


def command(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str]:
    started = time.perf_counter()
    status = main(list(args))
    elapsed = time.perf_counter() - started
    captured = capsys.readouterr()
    assert elapsed < 5, f"pemlang {args[0]} took {elapsed:.1f} s"
    return status, captured.err + captured.out


def assert_diagnosed(status: int, err: str, codes: frozenset[str], what: str) -> None:
    assert status == 1, f"{what}: exit {status}\n{err}"
    assert "Traceback" not in err and "internal error" not in err, f"{what}:\n{err}"
    assert any(f"error[{code}]" in err for code in codes), f"{what}: expected {sorted(codes)}\n{err}"


@pytest.mark.parametrize("name", CASE_NAMES)
def test_damaged_adapter_is_a_diagnostic(name: str, damaged: dict[str, tuple[Case, Path]], tmp_path: Path,
                                         capsys: pytest.CaptureFixture[str]) -> None:
    case, directory = damaged[name]
    program = tmp_path / "program.pem"
    program.write_text(f'input a = "{directory}"\noutput 0.5*a -> "{tmp_path / "out"}"\n', encoding="utf-8")
    check_status, check_err = command(capsys, "check", str(program))
    inspect_status, inspect_err = command(capsys, "inspect", str(directory))
    run_status, run_err = command(capsys, "run", str(program), "--device", "cpu")
    if case.at_run:
        assert check_status == 0, check_err
        assert inspect_status == 0, inspect_err
    else:
        assert_diagnosed(check_status, check_err, case.codes, "check")
        if "E011" in case.codes and inspect_status == 0:  # inspect shows what is unsupported, exit 0
            assert "not composable by pemlang" in inspect_err
        else:
            assert_diagnosed(inspect_status, inspect_err, case.codes, "inspect")
    assert_diagnosed(run_status, run_err, case.codes, "run")
    assert not (tmp_path / "out").exists()
