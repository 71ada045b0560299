"""The writer's contract: one guard before every write, atomic replacement, a lock between
concurrent writers, stale staging cleaned, and OS errors turned into diagnostics."""

from __future__ import annotations

import contextlib
import errno
import io
import os
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import pemlang
from pemlang.cli import main

ROOT = Path(__file__).resolve().parent.parent

ADAPTER_FILES = ["README.md", "adapter_config.json", "adapter_model.safetensors"]  # a written adapter


def cli(*args: str) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        status = main(list(args))
    return status, out.getvalue(), err.getvalue()


def weights(directory: Path) -> dict[str, torch.Tensor]:
    return load_file(str(directory / "adapter_model.safetensors"))


def program(tmp_path: Path, text: str, name: str = "p.pem") -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


# -- one guard for every write ------------------------------------------------------------------


def test_a_sweep_never_overwrites_its_own_input_even_with_force(adapters: Path, tmp_path: Path) -> None:
    first = program(tmp_path, f'input a = "{adapters}/llama_r8"\nparam λ = 1\noutput λ*a -> "out/mix"\n', "p1.pem")
    status, _, err = cli("run", str(first), "--sweep", "λ=0.5", "--device", "cpu")
    assert status == 0, err
    [written] = (tmp_path / "out").iterdir()
    before = (written / "adapter_model.safetensors").read_bytes()
    second = program(tmp_path, f'input prev = "out/{written.name}"\nparam λ = 1\noutput λ*prev -> "out/mix"\n',
                     "p2.pem")
    for extra in ([], ["--force"]):
        status, _, err = cli("run", str(second), "--sweep", "λ=0.5", "--device", "cpu", *extra)
        assert status == 1 and "error[E018]" in err and "input `prev`" in err, err
        assert (written / "adapter_model.safetensors").read_bytes() == before


def test_api_save_with_force_never_writes_an_input(adapters: Path, tmp_path: Path) -> None:
    import shutil

    shutil.copytree(adapters / "llama_r8", tmp_path / "a")
    before = (tmp_path / "a" / "adapter_model.safetensors").read_bytes()
    mix = pemlang.compile("2*a", inputs={"a": tmp_path / "a"}, device="cpu")
    for target in (tmp_path / "a", tmp_path, tmp_path / "a" / "inner"):
        with pytest.raises(pemlang.CompileError, match="E018"):
            mix.save(target, force=True)
    assert (tmp_path / "a" / "adapter_model.safetensors").read_bytes() == before
    assert not (tmp_path / "a" / "inner").exists()


def test_api_write_refuses_an_existing_directory_without_force(adapters: Path, tmp_path: Path) -> None:
    mix = pemlang.compile("2*a", inputs={"a": adapters / "llama_r8"}, device="cpu")
    (tmp_path / "o").mkdir()
    with pytest.raises(pemlang.CompileError, match="already exists"):
        mix.save(tmp_path / "o")
    mix.save(tmp_path / "o", force=True)
    assert (tmp_path / "o" / "adapter_model.safetensors").exists()


# -- unwritable destinations: a diagnostic, never an internal error --------------------------------


def test_a_parent_that_is_a_file_is_a_diagnostic(adapters: Path, tmp_path: Path) -> None:
    (tmp_path / "blocker").write_text("a file")
    path = program(tmp_path, f'input a = "{adapters}/llama_r8"\noutput 2*a -> "blocker/out"\n')
    status, _, err = cli("run", str(path), "--device", "cpu")
    assert status == 1 and "error[E018]" in err and "blocker" in err and "internal error" not in err, err


@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EACCES, errno.EROFS, errno.ENAMETOOLONG])
def test_os_errors_while_writing_are_diagnostics_naming_the_path(adapters: Path, tmp_path: Path, code: int,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """What slips past the checks (the disk fills, a mount turns read-only) is E018 with the path,
    also when it happens in the middle of a streamed output (here at the third tensor written)."""
    path = program(tmp_path, f'input a = "{adapters}/llama_r8"\noutput 2*a -> "out"\n')
    real = os.pwrite
    calls = []

    def failing(fd: int, data: bytes, offset: int) -> int:
        calls.append(offset)
        if len(calls) == 3:
            raise OSError(code, os.strerror(code))
        return real(fd, data, offset)

    monkeypatch.setattr(os, "pwrite", failing)
    status, _, err = cli("run", str(path), "--device", "cpu")
    assert status == 1 and "error[E018]" in err and "out" in err and os.strerror(code) in err, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["p.pem"]


def test_a_full_disk_under_the_in_memory_writer_names_the_destination(adapters: Path, tmp_path: Path,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """The writer of an adapter held in memory (the API's save, the REPL's :save, sweeps) turns a
    full disk into E018 naming the destination, as the streaming writer does (it was a TypeError)."""
    from pemlang.writer import WriteError, write_adapter

    def full(fd: int, data: bytes, offset: int) -> int:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "pwrite", full)
    tensors = {"base_model.model.x.lora_A.weight": torch.ones(2, 3)}
    with pytest.raises(WriteError) as caught:
        write_adapter(tmp_path / "out", tensors, {"peft_type": "LORA"}, {"format": "pt"})
    [diagnostic] = caught.value.diagnostics
    assert (diagnostic.code, diagnostic.message) == ("E018", f"cannot write output {tmp_path / 'out'}: "
                                                             f"{os.strerror(errno.ENOSPC)}")
    assert sorted(p.name for p in tmp_path.iterdir()) == []
    mix = pemlang.compile("2*a", inputs={"a": adapters / "llama_r8"}, device="cpu")
    with pytest.raises(pemlang.CompileError, match="E018") as failed:
        mix.save(tmp_path / "saved")
    assert f"cannot write output {tmp_path / 'saved'}: {os.strerror(errno.ENOSPC)}" in str(failed.value)
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_an_unwritable_second_output_writes_nothing(adapters: Path, tmp_path: Path) -> None:
    (tmp_path / "blocker").write_text("a file")
    path = program(tmp_path, f'input a = "{adapters}/llama_r8"\noutput 2*a -> "first"\n'
                             'output 3*a -> "blocker/second"\n')
    status, _, err = cli("run", str(path), "--device", "cpu")
    assert status == 1 and "error[E018]" in err and "internal error" not in err, err
    assert not (tmp_path / "first").exists()


# -- atomic replacement, stale staging, concurrent writers --------------------------------------------


def test_force_swaps_in_one_step(adapters: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """With RENAME_EXCHANGE the destination never goes missing: the old one is not renamed away."""
    from pemlang import writer

    if not writer.exchange_supported(tmp_path):
        pytest.skip("this file system has no renameat2(RENAME_EXCHANGE)")
    path = program(tmp_path, f'input a = "{adapters}/llama_r8"\noutput 2*a -> "out"\n')
    assert cli("run", str(path), "--device", "cpu")[0] == 0
    renamed: list[tuple[str, str]] = []
    real = os.rename
    monkeypatch.setattr(os, "rename", lambda a, b: (renamed.append((str(a), str(b))), real(a, b))[1])
    path.write_text(f'input a = "{adapters}/llama_r8"\noutput 3*a -> "out"\n', encoding="utf-8")
    status, _, err = cli("run", str(path), "--device", "cpu", "--force")
    assert status == 0, err
    assert not [r for r in renamed if Path(r[0]).name == "out"]  # the old directory never left its place
    a = weights(adapters / "llama_r8")
    for key, value in weights(tmp_path / "out").items():
        assert torch.allclose(value.float(), 3 * a[key].float(), atol=1e-6) or "lora_A" in key
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "p.pem"]


def test_the_fallback_without_exchange_still_replaces(adapters: Path, tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    from pemlang import writer

    path = program(tmp_path, f'input a = "{adapters}/llama_r8"\noutput 2*a -> "out"\n')
    assert cli("run", str(path), "--device", "cpu")[0] == 0
    monkeypatch.setattr(writer, "_exchange", lambda a, b: False)
    assert cli("run", str(path), "--device", "cpu", "--force")[0] == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "p.pem"]
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ADAPTER_FILES


def test_stale_staging_of_a_dead_writer_is_removed(adapters: Path, tmp_path: Path) -> None:
    # What a killed run leaves: claimed staging dirs beside the destination, for it and for another
    # name; an empty unclaimed one (killed between mkdtemp and the claim); a claim whose directory
    # was already removed; a symbolic link an exchange left where an output was a link.
    for stale in (".out.4242-abcd1234.pemlang-tmp", ".other.77-zz9_x.pemlang-tmp", ".out.99-q1.pemlang-old"):
        (tmp_path / stale).mkdir()
        (tmp_path / stale / "adapter_model.safetensors").write_bytes(b"partial")
        (tmp_path / (stale + ".claim")).touch()
    (tmp_path / ".out.5-empty.pemlang-tmp").mkdir()
    (tmp_path / ".gone.6-x.pemlang-tmp.claim").touch()
    (tmp_path / "target").mkdir()
    (tmp_path / "target" / "keep").write_text("the link's target is never removed")
    (tmp_path / ".lnk.7-y.pemlang-tmp").symlink_to(tmp_path / "target")
    (tmp_path / ".lnk.7-y.pemlang-tmp.claim").touch()
    (tmp_path / ".mine.pemlang-tmp.txt").write_text("not ours")  # a user's file that merely looks alike
    path = program(tmp_path, f'input a = "{adapters}/llama_r8"\noutput 2*a -> "out"\n')
    status, _, err = cli("run", str(path), "--device", "cpu")
    assert status == 0, err
    assert sorted(p.name for p in tmp_path.iterdir()) == [".mine.pemlang-tmp.txt", "out", "p.pem", "target"]
    assert (tmp_path / "target" / "keep").exists()


def test_an_input_named_like_staging_is_never_removed(adapters: Path, tmp_path: Path) -> None:
    """Only what a writer claimed is cleaned: a user's directory matching the staging pattern (here
    the run's own input, beside its output) is left alone."""
    lookalike = tmp_path / ".in1.123-abc.pemlang-tmp"
    shutil.copytree(adapters / "llama_r8", lookalike)
    before = sorted(p.name for p in lookalike.iterdir())
    path = program(tmp_path, f'input a = "{lookalike}"\noutput 2*a -> "out"\n')
    status, _, err = cli("run", str(path), "--device", "cpu")
    assert status == 0, err
    assert sorted(p.name for p in lookalike.iterdir()) == before


def test_an_input_whose_weights_are_a_symlink_is_never_written(adapters: Path, tmp_path: Path) -> None:
    """The Hugging Face cache layout: the input directory holds links into a store. An output in
    the store, where the link points, would replace the input's weights."""
    store = tmp_path / "store" / "real"
    shutil.copytree(adapters / "llama_r8", store)
    linked = tmp_path / "linked"
    linked.mkdir()
    shutil.copy(store / "adapter_config.json", linked)
    (linked / "adapter_model.safetensors").symlink_to(store / "adapter_model.safetensors")
    digest = (store / "adapter_model.safetensors").read_bytes()
    status, _, err = cli("eval", "--input", f"a={linked}", "--input", f"b={adapters}/llama_r8_b",
                         "--out", str(store), "--force", "0.5*a + 0.5*b")
    assert status == 1 and "error[E018]" in err and "overwrite input `a`" in err, err
    assert (store / "adapter_model.safetensors").read_bytes() == digest


def test_force_over_a_symlinked_output_leaves_nothing_behind(adapters: Path, tmp_path: Path) -> None:
    """--force replaces the link with the new directory; the link's target is untouched and no
    staging entry is left."""
    (tmp_path / "target").mkdir()
    (tmp_path / "target" / "keep").write_text("x")
    (tmp_path / "outlink").symlink_to(tmp_path / "target")
    status, _, err = cli("eval", "--input", f"a={adapters}/llama_r8", "--input", f"b={adapters}/llama_r8_b",
                         "--out", str(tmp_path / "outlink"), "--force", "0.5*a + 0.5*b")
    assert status == 0, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["outlink", "target"]
    assert (tmp_path / "outlink").is_dir() and not (tmp_path / "outlink").is_symlink()
    assert sorted(p.name for p in (tmp_path / "target").iterdir()) == ["keep"]


def test_staging_held_by_a_live_writer_is_left_alone(tmp_path: Path) -> None:
    from pemlang import writer

    with writer.locked(tmp_path):
        staging = tmp_path / f".x.{os.getpid()}-abc.pemlang-tmp"
        staging.mkdir()
        other = threading.Thread(target=writer.remove_stale_staging, args=(tmp_path,), kwargs={"wait": False})
        other.start()
        other.join()
        assert staging.exists()
    writer.remove_stale_staging(tmp_path)
    assert not staging.exists()


def test_concurrent_writers_of_one_destination(adapters: Path, tmp_path: Path) -> None:
    """Two processes replacing one directory at once: both succeed, the result is one of theirs whole."""
    path = program(tmp_path, f'input a = "{adapters}/llama_r8"\nparam k = 1\noutput k*a -> "out"\n')
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    runs = [subprocess.Popen([sys.executable, "-m", "pemlang.cli", "run", str(path), "--device", "cpu", "--force",
                              "--set", f"k={k}"], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            for k in (2, 3)]
    results = [(r.wait(), r.stderr.read() if r.stderr else "") for r in runs]  # type: ignore[union-attr]
    assert all(status == 0 for status, _ in results), results
    a = weights(adapters / "llama_r8")
    got = weights(tmp_path / "out")
    key = next(k for k in a if "lora_B" in k)
    assert any(torch.allclose(got[key].float(), k * a[key].float(), atol=1e-6) for k in (2, 3))
    for k in a:  # A and B come from the same run
        factor = 2 if torch.allclose(got[key].float(), 2 * a[key].float(), atol=1e-6) else 3
        assert torch.allclose(got[k].float(), factor * a[k].float(), atol=1e-6)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "p.pem"]


def test_a_second_writer_without_force_gets_a_diagnostic(adapters: Path, tmp_path: Path,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """The destination appears (another writer) after the checks: E018 under the lock, no crash."""
    from pemlang import writer

    path = program(tmp_path, f'input a = "{adapters}/llama_r8"\noutput 2*a -> "out"\n')
    real = writer.locked

    @contextlib.contextmanager
    def racing(directory: Path):  # type: ignore[no-untyped-def]
        (tmp_path / "out").mkdir(exist_ok=True)
        with real(directory):
            yield

    monkeypatch.setattr(writer, "locked", racing)
    status, _, err = cli("run", str(path), "--device", "cpu")
    assert status == 1 and "error[E018]" in err and "internal error" not in err, err
    assert list((tmp_path / "out").iterdir()) == []
