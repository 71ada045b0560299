"""Long runs: progress a log can see when stderr is not a terminal; memory that does not creep up
with the layers (the writer holds one layer in flight, glibc gives a layer's freed tensors back);
benchmarks that write where the user says and clean up after themselves."""

from __future__ import annotations

import io
import os
import re
import struct
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

from pemlang import writer
from pemlang.display import LayerProgress, progress_seconds

REPO = Path(__file__).resolve().parent.parent


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_piped_progress_prints_a_line_every_interval_and_one_at_the_end() -> None:
    out, clock = io.StringIO(), Clock()  # a StringIO is not a terminal
    with LayerProgress(10, "layers", stream=out, interval=5.0, clock=clock) as advance:
        assert advance is not None
        for step in range(10):
            clock.now += 2.0  # each layer takes 2 s: a line at 6 s (3 layers done), 12 s (6), 18 s (9)
            advance()
            assert step >= 0
    assert out.getvalue().splitlines() == [
        "layers 3/10 (30%), 6 s", "layers 6/10 (60%), 12 s", "layers 9/10 (90%), 18 s", "layers 10/10 (100%), 20 s"]


def test_piped_progress_of_a_quick_run_prints_nothing() -> None:
    out, clock = io.StringIO(), Clock()
    with LayerProgress(400, "points", stream=out, interval=5.0, clock=clock) as advance:
        for _ in range(400):
            clock.now += 0.001
            advance()  # type: ignore[misc]
    assert out.getvalue() == ""


@pytest.mark.parametrize(("value", "expected"), [("", 5.0), ("0", 0.0), ("2.5", 2.5), ("-1", 5.0), ("nan", 5.0),
                                                 ("inf", 5.0), ("1e400", 5.0), ("soon", 5.0)])
def test_the_interval_comes_from_the_environment(monkeypatch: pytest.MonkeyPatch, value: str, expected: float) -> None:
    monkeypatch.setenv("PEMLANG_PROGRESS_SECONDS", value)
    assert progress_seconds() == expected


def test_a_piped_run_shows_its_progress_in_the_log(adapters: Path, tmp_path: Path) -> None:
    program = tmp_path / "mix.pem"
    program.write_text(f'input a = "{adapters}/llama_r8"\ninput b = "{adapters}/llama_r8_b"\n'
                       'output 0.5*a + 0.5*b -> "out"\n')
    result = subprocess.run([sys.executable, "-m", "pemlang.cli", "run", str(program)], capture_output=True, text=True,
                            env={**os.environ, "PYTHONPATH": str(REPO), "PEMLANG_PROGRESS_SECONDS": "0"})
    assert result.returncode == 0, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.startswith("layers ")]
    total = int(re.match(r"layers \d+/(\d+)", lines[0]).group(1))  # type: ignore[union-attr]
    assert [int(re.match(r"layers (\d+)/", line).group(1)) for line in lines] == list(range(1, total + 1))  # type: ignore[union-attr]
    assert total > 1


def test_the_writer_holds_one_layer_in_flight(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Handing over layer 3 waits until layer 2's bytes are written; layer 2 may still be in flight
    while layer 3 is computed, and nothing older."""
    real = writer._pwrite_all
    released = {1: threading.Event(), 2: threading.Event()}
    started: list[int] = []

    def slow(fd, data, offset, ready=None, destination=None):  # type: ignore[no-untyped-def]
        layer = int(struct.unpack("<f", bytes(data))[0])
        started.append(layer)
        if layer in released:
            assert released[layer].wait(10)
        return real(fd, data, offset, ready, destination)

    monkeypatch.setattr(writer, "_pwrite_all", slow)
    entries = {f"t{i}": ("F32", [1]) for i in (1, 2, 3)}
    background = writer._Background()
    staged = writer.StagedAdapter(tmp_path, entries, {"format": "pt"}, background)
    tensor = {i: torch.tensor([float(i)]) for i in (1, 2, 3)}
    staged.put({"t1": tensor[1]})
    released[1].set()
    staged.put({"t2": tensor[2]})  # layer 1 is written: this returns at once, layer 2 in flight
    handed = threading.Event()
    thread = threading.Thread(target=lambda: (staged.put({"t3": tensor[3]}), handed.set()))
    thread.start()
    time.sleep(0.3)
    assert not handed.is_set()  # layer 3 waits for layer 2's write
    released[2].set()
    thread.join(10)
    assert handed.is_set()
    background.drain()
    staged.close()
    background.close()
    assert started == [1, 2, 3]


MALLOC_PROBE = """
import sys, torch
def rss():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096 / 2**20
from pemlang.backend.torch_backend import release_freed_memory
big = torch.ones(24 << 18)  # 24 MiB; freeing it raised glibc's own threshold to 24 MiB
del big
held = [torch.ones(12 << 18) for _ in range(4)]  # a layer's worth of 12 MiB tensors
small = torch.ones(1000)  # allocated after them, so a heap could not shrink below them
during = rss()
del held
release_freed_memory()  # what the backend does when a layer is done
print(during - rss())
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's allocator")
def test_a_layers_freed_tensors_go_back_to_the_system() -> None:
    """glibc kept the 48 MiB in its heap (RSS crept up layer after layer at 70B shapes); the
    backend gives them back when a layer is done."""
    result = subprocess.run([sys.executable, "-c", MALLOC_PROBE], capture_output=True, text=True,
                            env={**os.environ, "PYTHONPATH": str(REPO)})
    assert result.returncode == 0, result.stderr
    assert float(result.stdout) >= 40


def test_the_benchmarks_write_where_they_are_told_and_remove_their_fixtures(tmp_path: Path) -> None:
    committed = REPO / "benchmarks" / "results" / "memory-tinyllama.md"
    before = committed.read_bytes()
    out, cache = tmp_path / "results", tmp_path / "cache"
    result = subprocess.run([sys.executable, str(REPO / "benchmarks" / "run_all.py"), "--only", "memory",
                             "--layers", "1", "--out", str(out), "--cache", str(cache)],
                            capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(REPO)}, timeout=600)
    assert result.returncode == 0, result.stdout + result.stderr
    assert (out / "memory-tinyllama.md").is_file() and (out / "memory-tinyllama.png").is_file()
    assert not cache.exists()  # the generated adapters are gone
    assert "removed the fixtures" in result.stdout
    assert committed.read_bytes() == before  # the repository's results are untouched


def test_the_benchmark_cache_is_never_the_repository(tmp_path: Path) -> None:
    for cache in (REPO, REPO / "benchmarks", REPO / "benchmarks" / "results"):
        result = subprocess.run([sys.executable, str(REPO / "benchmarks" / "run_all.py"), "--only", "memory",
                                 "--out", str(tmp_path / "r"), "--cache", str(cache)], capture_output=True, text=True)
        assert result.returncode == 2 and "name a directory of its own" in result.stderr
    assert (REPO / "benchmarks" / "results").is_dir()
