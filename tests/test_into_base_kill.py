"""Writing a model merged into its base (`output EXPR into "BASE" -> "DIR"`, SPEC §5.2) when things go
wrong: `kill -9` mid-write, a full disk mid-write, two writers of one DIR at once.

After every kill the destination is the old model or the new one, whole, never partial (and the
base is never touched); the next run removes the staging the dead writer left. A tiny base takes
milliseconds to write, so a kill at a random moment would nearly always land in the imports: each
kill here lands at a chosen point of the write instead. The run is `pemlang run` in a forked
child (the imports are the test's, so each run costs milliseconds) whose chosen call (the n-th
copy_file_range, pwrite, fsync, file copy, or the swap) sends the child SIGKILL, exactly `kill -9`;
the parent checks that the child died of it, so a point the run never reaches fails the test."""

from __future__ import annotations

import contextlib
import errno
import io
import os
import shutil
import signal
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from peft_factory import lora, save_base
from test_kill import assert_lock_free, leftovers

from pemlang.cli import main


@pytest.fixture(scope="module")
def made(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A sharded tiny Llama base (several weight files, an index) and a LoRA made on it by PEFT."""
    root = tmp_path_factory.mktemp("into_kill")
    save_base(root / "base", max_shard_size="20KB")
    lora(root / "a", 1, targets=("q_proj", "v_proj", "down_proj"))
    return root


def program(made: Path, tmp_path: Path) -> Path:
    path = tmp_path / "p.pem"
    path.write_text(f'mode exact\ninput a = "{made / "a"}"\nparam k = 1\n'
                    f'output k*a into "{made / "base"}" -> "m"\n', encoding="utf-8")
    return path


def run(path: Path, k: int) -> tuple[int, str]:
    err = io.StringIO()
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(err):
        status = main(["run", str(path), "--device", "cpu", "--force", "--set", f"k={k}"])
    return status, err.getvalue()


def snapshot(directory: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(directory.iterdir())}


def weight_files(made: Path) -> int:
    """The base's weight files: the writer's first pwrite calls are their headers, one each."""
    return len(list((made / "base").glob("*.safetensors")))


def patch_nth(owner: object, name: str, nth: int, action: Callable[[], None], *, after: bool = False) -> None:
    """Make the n-th call of owner.name run `action` first (or, with `after`, once the real call returned)."""
    real = getattr(owner, name)
    calls = [0]

    def patched(*args, **kwargs):  # type: ignore[no-untyped-def]
        calls[0] += 1
        if calls[0] == nth and not after:
            action()
        result = real(*args, **kwargs)
        if calls[0] == nth and after:
            action()
        return result

    setattr(owner, name, patched)


def forked_run(path: Path, k: int, setup: Callable[[], None] = lambda: None) -> int:
    """Start `pemlang run … --set k=K` in a forked child that first runs `setup` (which installs its
    kill point); returns the child's pid."""
    pid = os.fork()
    if pid == 0:  # the child: never back into pytest
        code = 99
        try:
            import torch

            torch.set_num_threads(1)  # no OpenMP team in a forked child
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, 1)
            os.dup2(devnull, 2)
            setup()
            code = main(["run", str(path), "--device", "cpu", "--force", "--set", f"k={k}"])
        finally:
            os._exit(code)
    return pid


def wait(pid: int) -> int:
    """The child's exit code, or minus the signal that killed it."""
    _, status = os.waitpid(pid, 0)
    return -os.WTERMSIG(status) if os.WIFSIGNALED(status) else os.WEXITSTATUS(status)


def kill_myself() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def flush_often_and_kill_at(nth: int) -> None:
    """In the child: flush every 1000 bytes written, and die at the n-th flush."""
    from pemlang import intobase

    intobase.FLUSH_BYTES = 1000
    patch_nth(os, "fdatasync", nth, kill_myself)


def test_kill_9_at_every_stage_of_the_write_leaves_the_old_or_the_new_model(made: Path, tmp_path: Path) -> None:
    from pemlang import writer

    path = program(made, tmp_path)
    base_before = snapshot(made / "base")
    files = weight_files(made)
    assert files >= 3  # sharded: the kill points below fall between and inside the files
    assert run(path, 2)[0] == 0
    new = snapshot(tmp_path / "m")
    assert run(path, 1)[0] == 0
    old = snapshot(tmp_path / "m")
    assert old != new and {n for n in old if n.endswith(".safetensors")} == {n for n in base_before if n.endswith(".safetensors")}
    atomic = writer.exchange_supported(tmp_path)
    # (what, how the kill point is installed, the model DIR must hold right after the kill)
    points: list[tuple[str, Callable[[], None], dict[str, bytes]]] = [
        ("copying the first file's untouched tensors", lambda: patch_nth(os, "copy_file_range", 1, kill_myself), old),
        ("copying a later file's", lambda: patch_nth(os, "copy_file_range", files + 1, kill_myself), old),
        ("writing the merged tensors", lambda: patch_nth(os, "pwrite", files + 2, kill_myself), old),
        ("putting part of a file on disk", lambda: flush_often_and_kill_at(3), old),
        ("flushing the first file", lambda: patch_nth(os, "fsync", 1, kill_myself), old),
        ("copying the base's other files", lambda: patch_nth(shutil, "copyfile", 1, kill_myself), old),
        ("before the swap, staging complete", lambda: patch_nth(writer, "_swap", 1, kill_myself), old),
    ]
    if atomic:
        points.append(("right after the exchange, the old model not yet removed",
                       lambda: patch_nth(writer, "_exchange", 1, kill_myself, after=True), new))
    for what, setup, expected in points:
        status = wait(forked_run(path, 2, setup))
        assert status == -signal.SIGKILL, (what, status)  # the point was reached
        assert snapshot(tmp_path / "m") == expected, what
        assert_lock_free(tmp_path)
        assert leftovers(tmp_path), what  # what the dead writer staged is still there …
        if expected is new:  # back to the old model for the next point
            assert run(path, 1)[0] == 0
            assert snapshot(tmp_path / "m") == old
    assert run(path, 2)[0] == 0  # … until the next run, which removes it
    assert snapshot(tmp_path / "m") == new
    assert leftovers(tmp_path) == []
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m", "p.pem"]
    assert snapshot(made / "base") == base_before


@pytest.mark.parametrize(("owner", "name", "nth"), [(os, "copy_file_range", 2), (os, "pwrite", 2),
                                                    (os, "fdatasync", 2), (shutil, "copyfile", 1)],
                         ids=["copying-untouched-tensors", "writing-merged-tensors", "flushing-part-of-a-file",
                              "copying-other-files"])
@pytest.mark.parametrize("over_old", [False, True], ids=["new", "over-old"])
def test_a_full_disk_mid_write_is_E018_and_leaves_nothing(made: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                          owner: object, name: str, nth: int, over_old: bool) -> None:
    """ENOSPC from the kernel copy of the untouched tensors, from writing the second merged tensor
    (after each file's header), from putting part of a file on disk (where a full disk shows when the
    file system allocates late), or from copying config.json and the like: E018 naming DIR, no
    staging left, an old model untouched."""
    from pemlang import intobase

    monkeypatch.setattr(intobase, "FLUSH_BYTES", 1000)  # flushed every few writes: the tiny base has many
    path = program(made, tmp_path)
    if over_old:
        assert run(path, 1)[0] == 0
        old = snapshot(tmp_path / "m")

    def full() -> None:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(owner, name, getattr(owner, name))  # restored after the test
    patch_nth(owner, name, nth if name != "pwrite" else weight_files(made) + nth, full)
    status, err = run(path, 2)
    assert status == 1 and "error[E018]" in err and os.strerror(errno.ENOSPC) in err, err
    assert f"{tmp_path / 'm'}" in err and "internal error" not in err and "Traceback" not in err, err
    if over_old:
        assert sorted(p.name for p in tmp_path.iterdir()) == ["m", "p.pem"]
        assert snapshot(tmp_path / "m") == old
    else:
        assert sorted(p.name for p in tmp_path.iterdir()) == ["p.pem"]


def test_advice_the_file_system_does_not_take_loses_nothing(made: Path, tmp_path: Path,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    """posix_fadvise is advice: where it fails (ESPIPE, EINVAL on some file systems) the model is
    written all the same, the same bytes."""
    from pemlang import intobase

    path = program(made, tmp_path)
    assert run(path, 2)[0] == 0
    expected = snapshot(tmp_path / "m")

    def refuse(*args: object) -> None:
        raise OSError(errno.ESPIPE, os.strerror(errno.ESPIPE))

    monkeypatch.setattr(intobase, "FLUSH_BYTES", 1000)
    monkeypatch.setattr(os, "posix_fadvise", refuse)
    assert run(path, 2)[0] == 0
    assert snapshot(tmp_path / "m") == expected


def test_concurrent_writers_of_one_dir_take_turns(made: Path, tmp_path: Path) -> None:
    """A second writer of DIR that starts while the first is in the middle of writing waits for it:
    both succeed, the second's model is the one left, whole, and no staging remains."""
    path = program(made, tmp_path)
    assert run(path, 3)[0] == 0
    third = snapshot(tmp_path / "m")
    assert run(path, 2)[0] == 0
    second = snapshot(tmp_path / "m")
    shutil.rmtree(tmp_path / "m")
    signal_read, signal_write = os.pipe()

    def pause_mid_write() -> None:  # tell the parent, then hold the first merged tensor's write a while
        def pause() -> None:
            os.write(signal_write, b"x")
            time.sleep(1.0)

        patch_nth(os, "pwrite", weight_files(made) + 1, pause)

    first = forked_run(path, 2, pause_mid_write)
    assert os.read(signal_read, 1) == b"x"  # the first writer is mid-write, holding DIR's parent
    began = time.monotonic()
    later = forked_run(path, 3)
    assert wait(later) == 0
    waited = time.monotonic() - began
    assert wait(first) == 0
    os.close(signal_read)
    os.close(signal_write)
    assert waited > 0.5, waited  # the second writer waited for the first one's turn
    assert snapshot(tmp_path / "m") == third != second
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m", "p.pem"]
    assert_lock_free(tmp_path)
