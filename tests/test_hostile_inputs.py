"""Hostile inputs named precisely: numbers out of range in adapter_config.json, files that are not
regular files, program and config files too large to be programs, booleans where numbers belong and
duplicate keys in config blocks. Each is a diagnostic naming the file and the field or position."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import pytest

from pemlang.adapters import MAX_RANK, AdapterError, read_adapter

CONFIG = "adapter_config.json"


def damaged_config(adapters: Path, tmp_path: Path, text: str | None = None, **fields: Any) -> Path:
    directory = tmp_path / "adapter"
    shutil.copytree(adapters / "llama_r8", directory)
    path = directory / CONFIG
    if text is None:
        config = json.loads(path.read_text())
        for name, value in fields.items():
            config.pop(name) if value is None else config.__setitem__(name, value)
        text = json.dumps(config)
    path.write_text(text)
    return directory


def refusal(directory: Path) -> AdapterError:
    with pytest.raises(AdapterError) as caught:
        read_adapter(directory)
    assert caught.value.code == "E013"
    return caught.value


@pytest.mark.parametrize(("fields", "field", "words"), [
    ({"lora_alpha": 10**400}, "lora_alpha", "an integer of 401 digits"),
    ({"r": 10**400}, "r", f"from 1 to {MAX_RANK}"),
    ({"r": MAX_RANK + 1}, "r", f"from 1 to {MAX_RANK}"),
    ({"lora_alpha": 5e-324}, "lora_alpha", "below float32's smallest normal number"),
    ({"lora_alpha": 1e308}, "lora_alpha", "beyond float32's range"),
    ({"lora_alpha": 3e-38, "use_rslora": True}, "lora_alpha", "/sqrt(8)"),
    ({"alpha_pattern": {"q_proj": 1e-300}}, "alpha_pattern['q_proj']", "below float32's smallest normal"),
    ({"lora_alpha": 1e-37, "rank_pattern": {"q_proj": 2**31}}, "rank_pattern['q_proj']", "below float32"),
])
def test_out_of_range_numbers_name_the_field(adapters: Path, tmp_path: Path, fields: dict[str, Any], field: str,
                                             words: str) -> None:
    error = refusal(damaged_config(adapters, tmp_path, **fields))
    assert f"`{field}`" in error.message and words in error.message
    assert any(note.endswith(f"{CONFIG}: field {field}") for note in error.notes)


def test_a_layer_scaling_is_checked_when_r_is_not_recorded(adapters: Path, tmp_path: Path) -> None:
    error = refusal(damaged_config(adapters, tmp_path, lora_alpha=5e-324, r=None))
    assert "layer " in error.message and "lora_alpha" in error.message and "rank 8" in error.message
    assert any(note.endswith(f"{CONFIG}: field lora_alpha") for note in error.notes)


def test_integer_too_long_to_parse_names_its_field(adapters: Path, tmp_path: Path) -> None:
    text = (adapters / "llama_r8" / CONFIG).read_text()
    config = json.loads(text)
    config["rank_pattern"] = {"q_proj": "@@"}
    error = refusal(damaged_config(adapters, tmp_path, text=json.dumps(config).replace('"@@"', "9" * 5000)))
    assert "`rank_pattern.q_proj` is an integer of 5000 digits" in error.message


def test_scalings_at_the_edges_of_float32_are_accepted(adapters: Path, tmp_path: Path) -> None:
    adapter = read_adapter(damaged_config(adapters, tmp_path, lora_alpha=8 * 2.0**-126))
    assert {layer.scaling for layer in adapter.type.layers.values()} == {2.0**-126}


@pytest.mark.parametrize("name", [CONFIG, "adapter_model.safetensors"])
@pytest.mark.parametrize("kind", ["fifo", "directory", "/dev/zero", "dangling"])
def test_a_file_that_is_not_regular_is_named(adapters: Path, tmp_path: Path, name: str, kind: str) -> None:
    directory = tmp_path / "adapter"
    shutil.copytree(adapters / "llama_r8", directory)
    target = directory / name
    target.unlink()
    if kind == "fifo":
        os.mkfifo(target)  # opened for reading, this would wait for a writer forever
    elif kind == "directory":
        target.mkdir()
    elif kind == "dangling":
        target.symlink_to(tmp_path / "gone")
    else:
        target.symlink_to(kind)
    with pytest.raises(AdapterError) as caught:
        read_adapter(directory)
    error = caught.value
    assert error.code == "E012"
    expected = "is a symbolic link to a missing file" if kind == "dangling" else "is not a regular file"
    assert error.message == f"{name} {expected}"
    assert str(target) in error.notes[0]
    if kind in ("fifo", "directory", "/dev/zero"):
        assert error.notes[0].endswith({"fifo": "a FIFO (named pipe)", "directory": "a directory",
                                        "/dev/zero": "a character device"}[kind])


def oversized(tmp_path: Path, name: str) -> Path:
    from pemlang.sourcefiles import MAX_SOURCE_BYTES

    path = tmp_path / name
    with path.open("wb") as f:  # a sparse file: MAX_SOURCE_BYTES + 1 zero bytes
        f.truncate(MAX_SOURCE_BYTES + 1)
    return path


def test_read_source_stops_at_the_cap(tmp_path: Path) -> None:
    from pemlang.diagnostics import PemError, render
    from pemlang.sourcefiles import MAX_SOURCE_BYTES, read_source

    path = tmp_path / "at_cap.pem"
    path.write_bytes(b"# " + b"x" * (MAX_SOURCE_BYTES - 3) + b"\n")  # exactly the cap: read
    assert len(read_source(path).text) == MAX_SOURCE_BYTES
    for target in (oversized(tmp_path, "big.pem"), Path("/dev/zero")):  # a device never ends
        with pytest.raises(PemError) as caught:
            read_source(target)
        (diag,) = caught.value.diagnostics
        assert diag.code == "E001" and diag.location() == str(target)
        assert diag.message == f"{target} is larger than 16 MiB: not a pemlang program or config"
        assert diag.hints and "error[E001]" in render(diag)


def test_invalid_utf8_in_a_large_file_is_found_quickly(tmp_path: Path) -> None:
    import time

    from pemlang.diagnostics import PemError
    from pemlang.sourcefiles import MAX_SOURCE_BYTES, read_source

    path = tmp_path / "binary.pem"
    path.write_bytes(b"x = 1\n" * (MAX_SOURCE_BYTES // 6 - 1) + b"\xff" + b"\xfe" * 9)  # 16 MiB in all
    started = time.perf_counter()
    with pytest.raises(PemError) as caught:
        read_source(path)
    assert time.perf_counter() - started < 3
    (diag,) = caught.value.diagnostics
    assert diag.location() == f"{path}:{MAX_SOURCE_BYTES // 6}:1"
    assert diag.source is not None and len(diag.source.line_text(MAX_SOURCE_BYTES // 6)) == 10


@pytest.mark.parametrize("name", ["big.pem", "big.yaml", "big.json", "big.toml", "noext"])
def test_every_reader_refuses_an_oversized_file_with_e001(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                         name: str) -> None:
    import pemlang
    from pemlang import repl
    from pemlang.cli import main
    from pemlang.diagnostics import PemError

    path = oversized(tmp_path, name)
    expected = f"error[E001]: {path} is larger than 16 MiB"
    for command in (["check", str(path)], ["run", str(path), "--device", "cpu"], ["plan", str(path)]):
        assert main(command) == 1, command
        err = capsys.readouterr().err
        assert expected in err and "internal error" not in err, (command, err)
    reads = [lambda: pemlang.load(path), lambda: repl.Session(device="cpu").load(path)]
    reads.append((lambda: pemlang.from_config(path)) if name != "big.pem" and name != "noext"
                 else (lambda: pemlang.compile(file=path)))
    for read in reads:
        with pytest.raises(PemError) as caught:
            read()
        assert caught.value.diagnostics[0].code == "E001"


MARKUP = "[/][link=mailto:x@evil.example]click[/link][bold red]"


def test_inspect_prints_paths_and_recorded_text_as_text(adapters: Path, tmp_path: Path,
                                                        capsys: pytest.CaptureFixture[str]) -> None:
    """Rich markup in a path or a recorded base is printed as it is written (no MarkupError, no
    hyperlink, no style), and control characters in a path are shown as escapes, never sent raw."""
    import pemlang
    from pemlang.cli import main

    directory = tmp_path / f"evil{MARKUP}\x1b[31mred\x07"
    shutil.copytree(adapters / "llama_r8", directory)
    config = json.loads((directory / CONFIG).read_text())
    config["base_model_name_or_path"] = f"org/{MARKUP}"
    (directory / CONFIG).write_text(json.dumps(config))
    assert main(["inspect", str(directory)]) == 0
    out, err = capsys.readouterr()
    assert err == "" and "\x1b" not in out and "\x07" not in out
    assert f"evil{MARKUP}\\x1b[31mred\\x07" in out  # the path, each control character made visible
    assert f"org/{MARKUP}" in out
    # A pemlang output records its inputs' paths (shown under "made by pemlang"): also as text.
    [written] = pemlang.compile("2*a", inputs={"a": directory}, device="cpu").save(tmp_path / "out")
    assert main(["inspect", str(written)]) == 0
    out, err = capsys.readouterr()
    assert err == "" and "\x1b" not in out and f"evil{MARKUP}\\x1b[31mred\\x07" in out, out
    # A diagnostic quoting the path shows the control characters as escapes too.
    assert main(["inspect", f"{directory}-missing"]) == 1
    out, err = capsys.readouterr()
    assert f"no such directory: {directory}-missing".replace("\x1b", "\\x1b").replace("\x07", "\\x07") in err
    assert "\x1b" not in err and "\x07" not in err
