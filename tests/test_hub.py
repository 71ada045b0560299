"""Hub inputs (`hf://org/name[/sub][@rev]`) resolved offline from a Hugging Face cache laid out as
huggingface_hub lays it out (refs/, snapshots/<sha>/ links into blobs/), with HF_HUB_OFFLINE=1:
`check`, `run`, the API and provenance (the commit that was read), revisions, subfolders, and the
diagnostics for what cannot be resolved."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors import safe_open

import pemlang

REPO = Path(__file__).resolve().parent.parent
SHA_A = "a" * 40
SHA_B = "b" * 40


def cache_repo(cache: Path, repo: str, sha: str, files: dict[str, Path], refs: tuple[str, ...] = ("main",)) -> None:
    """Put `files` (path in the repo → local file) into `cache` as commit `sha` of `repo`."""
    root = cache / f"models--{repo.replace('/', '--')}"
    for ref in refs:
        (root / "refs").mkdir(parents=True, exist_ok=True)
        (root / "refs" / ref).write_text(sha)
    for inside, source in files.items():
        data = source.read_bytes()
        blob = root / "blobs" / hashlib.sha256(data).hexdigest()
        blob.parent.mkdir(parents=True, exist_ok=True)
        blob.write_bytes(data)
        link = root / "snapshots" / sha / inside
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(blob, link.parent))


def adapter_files(directory: Path, prefix: str = "") -> dict[str, Path]:
    return {f"{prefix}{name}": directory / name for name in ("adapter_config.json", "adapter_model.safetensors")}


@pytest.fixture()
def cache(adapters: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    from huggingface_hub import constants

    cache = tmp_path / "hf-cache"
    cache_repo(cache, "tiny-org/adapter-a", SHA_A, adapter_files(adapters / "llama_r8"), refs=("main", "v1"))
    cache_repo(cache, "tiny-org/adapter-b", SHA_B, adapter_files(adapters / "llama_r8_b"))
    cache_repo(cache, "tiny-org/several", SHA_B, {**adapter_files(adapters / "llama_r8", "first/"),
                                                  **adapter_files(adapters / "llama_r8_c", "second/")})
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return cache


def _inputs(path: Path) -> list[dict[str, str]]:
    with safe_open(path / "adapter_model.safetensors", "pt") as f:
        return json.loads(f.metadata()["pemlang.inputs"])


def test_run_merges_two_cached_hub_adapters(cache: Path, adapters: Path, tmp_path: Path) -> None:
    program = tmp_path / "hub.pem"
    program.write_text('input a = "hf://tiny-org/adapter-a"\ninput b = "hf://tiny-org/adapter-b@main"\n'
                       'output 0.5*a + 0.5*b -> "out/merged"\n')
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    checked = subprocess.run([sys.executable, "-m", "pemlang.cli", "check", str(program)], text=True,
                             capture_output=True, env=env)
    assert checked.returncode == 0, checked.stderr
    done = subprocess.run([sys.executable, "-m", "pemlang.cli", "run", str(program), "--device", "cpu"], text=True,
                          capture_output=True, env=env)
    assert done.returncode == 0, done.stderr
    out = tmp_path / "out" / "merged"
    recorded = {i["name"]: i for i in _inputs(out)}
    assert recorded["a"]["path"] == f"hf://tiny-org/adapter-a@{SHA_A}"
    assert recorded["b"]["path"] == f"hf://tiny-org/adapter-b@{SHA_B}"
    digest = hashlib.sha256((adapters / "llama_r8" / "adapter_model.safetensors").read_bytes()).hexdigest()
    assert recorded["a"]["sha256"] == digest
    # the same merge from local directories gives the same tensors
    local = pemlang.compile("0.5*a + 0.5*b", inputs={"a": adapters / "llama_r8", "b": adapters / "llama_r8_b"})
    from safetensors.torch import load_file

    expected = local.evaluate()["0.5*a + 0.5*b"]
    written = load_file(out / "adapter_model.safetensors")
    assert written.keys() == expected.keys() and all((written[k] == expected[k]).all() for k in written)
    card = (out / "README.md").read_text()
    assert f"hf://tiny-org/adapter-a@{SHA_A}" in card


@pytest.mark.parametrize("written, commit", [
    ("hf://tiny-org/adapter-a@v1", SHA_A),
    (f"hf://tiny-org/adapter-a@{SHA_A}", SHA_A),
    ("hf://tiny-org/several/second", SHA_B),
])
def test_revisions_and_subfolders(cache: Path, adapters: Path, written: str, commit: str) -> None:
    program = pemlang.compile("x", inputs={"x": written})
    inputs = program.plan().inputs
    assert inputs["x"].written.endswith(f"@{commit}") and inputs["x"].written.startswith(written.split("@")[0])
    expected = "llama_r8_c" if "second" in written else "llama_r8"
    assert (inputs["x"].path / "adapter_model.safetensors").read_bytes() == \
        (adapters / expected / "adapter_model.safetensors").read_bytes()


@pytest.mark.parametrize("written, message, hint", [
    ("hf://tiny-org/missing", "is not in the Hugging Face cache, and downloading is off (HF_HUB_OFFLINE)",
     "unset HF_HUB_OFFLINE"),
    ("hf://tiny-org/adapter-a@v9", "is not in the Hugging Face cache", "unset HF_HUB_OFFLINE"),
    ("hf://tiny-org/several", "is not in the Hugging Face cache", "unset HF_HUB_OFFLINE"),
    ("hf://", "is not a Hub id", "hf://ORG/NAME"),
    ("hf://a/b/../c", "'.' or '..'", ""),
])
def test_what_cannot_be_resolved(cache: Path, written: str, message: str, hint: str) -> None:
    with pytest.raises(pemlang.CompileError) as caught:
        pemlang.compile("x", inputs={"x": written})
    [error] = caught.value.diagnostics
    assert error.code == "E012" and message in error.message, error.message
    assert hint in " ".join(error.hints)


def test_inspect_a_hub_adapter(cache: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from pemlang.cli import main

    assert main(["inspect", "hf://tiny-org/adapter-a@v1"]) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"hf://tiny-org/adapter-a@{SHA_A}  (cached at ") and "tiny-org/tiny-llama" in out
    assert main(["inspect", "hf://tiny-org/nothing"]) == 1
    assert "error[E012]" in capsys.readouterr().err


# -- check reads headers only: a local HTTP server in the Hub's URL scheme, with Range support --------


class _FakeHub:
    """Serves `files` ({(repo, path): bytes}) at /{repo}/resolve/{revision}/{path} as the Hub does
    (HEAD and GET, X-Repo-Commit, ETag, Range requests), counting the bytes sent per path."""

    def __init__(self, files: dict[tuple[str, str], bytes], commit: str,
                 errors: dict[str, tuple[int, str]] | None = None, delay: float = 0.0):
        import http.server
        import threading
        import time

        hub = self
        self.files, self.commit, self.sent = files, commit, {}
        self.errors = errors or {}  # repo → (HTTP status, X-Error-Code) as the Hub answers
        self.in_flight = self.most_in_flight = 0  # requests being answered at once (each takes `delay` s)
        lock = threading.Lock()

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *args: object) -> None:
                return None

            def _find(self) -> tuple[str, bytes] | None:
                parts = self.path.split("?")[0].strip("/").split("/")
                if len(parts) < 5 or parts[2] != "resolve":
                    return None
                repo, path = "/".join(parts[:2]), "/".join(parts[4:])
                data = hub.files.get((repo, path))
                return (path, data) if data is not None else None

            def _answer(self, body: bool) -> None:
                with lock:
                    hub.in_flight += 1
                    hub.most_in_flight = max(hub.most_in_flight, hub.in_flight)
                try:
                    time.sleep(delay)
                    self._reply(body)
                finally:
                    with lock:
                        hub.in_flight -= 1

            def _reply(self, body: bool) -> None:
                parts = self.path.split("?")[0].strip("/").split("/")
                if parts[:2] == ["api", "models"]:  # snapshot_download's repository info and listing
                    entries = [{"type": "file", "path": p, "rfilename": p, "size": len(d),
                                "oid": hashlib.sha1(d).hexdigest()}
                               for (r, p), d in hub.files.items() if r == "/".join(parts[2:4])]
                    listed = json.dumps(entries if parts[4:5] == ["tree"] else
                                        {"id": "/".join(parts[2:4]), "sha": hub.commit, "siblings": entries}).encode()
                    self.send_response(200)
                    self.send_header("Content-Length", str(len(listed)))
                    self.end_headers()
                    if body:
                        self.wfile.write(listed)
                    return
                repo = "/".join(self.path.strip("/").split("/")[:2])
                if repo in hub.errors:
                    status, code = hub.errors[repo]
                    self.send_response(status)
                    self.send_header("X-Error-Code", code)
                    self.send_header("X-Error-Message", code)
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                found = self._find()
                if found is None:
                    self.send_response(404)
                    self.send_header("X-Error-Code", "EntryNotFound")
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                path, data = found
                start, stop = 0, len(data) - 1
                wanted = self.headers.get("Range")
                if wanted and wanted.startswith("bytes="):
                    first, _, last = wanted[6:].partition("-")
                    start, stop = int(first), min(int(last) if last else len(data) - 1, len(data) - 1)
                    self.send_response(206)
                    self.send_header("Content-Range", f"bytes {start}-{stop}/{len(data)}")
                else:
                    self.send_response(200)
                chunk = data[start:stop + 1]
                self.send_header("Content-Length", str(len(chunk)))
                self.send_header("X-Repo-Commit", hub.commit)
                self.send_header("ETag", '"' + hashlib.sha256(data).hexdigest() + '"')
                self.end_headers()
                if body:
                    self.wfile.write(chunk)
                    hub.sent[path] = hub.sent.get(path, 0) + len(chunk)

            def do_HEAD(self) -> None:  # noqa: N802
                self._answer(False)

            def do_GET(self) -> None:  # noqa: N802
                self._answer(True)

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()


def _big_adapter(directory: Path, hidden: int = 2048, rank: int = 16) -> Path:
    """A LoRA adapter of one Llama-shaped layer, large enough (1 MiB) that its header is a small part."""
    import torch
    from safetensors.torch import save_file

    generator = torch.Generator().manual_seed(0)
    tensors = {}
    for module in ("q_proj", "k_proj", "v_proj", "o_proj"):
        key = f"base_model.model.model.layers.0.self_attn.{module}"
        tensors[f"{key}.lora_A.weight"] = torch.randn(rank, hidden, generator=generator)
        tensors[f"{key}.lora_B.weight"] = torch.randn(hidden, rank, generator=generator)
    directory.mkdir(parents=True)
    save_file(tensors, str(directory / "adapter_model.safetensors"), metadata={"format": "pt"})
    (directory / "adapter_config.json").write_text(json.dumps({
        "peft_type": "LORA", "r": rank, "lora_alpha": 2 * rank, "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj"],
        "base_model_name_or_path": "bench/llama", "task_type": "CAUSAL_LM", "bias": "none"}))
    return directory


def test_check_reads_only_the_header_of_weights_not_cached(tmp_path: Path) -> None:
    adapter = _big_adapter(tmp_path / "big")
    weights = (adapter / "adapter_model.safetensors").read_bytes()
    files = {("org/big", name): (adapter / name).read_bytes() for name in ("adapter_config.json", "adapter_model.safetensors")}
    files[("org/big", "sub/adapter_config.json")] = files[("org/big", "adapter_config.json")]
    files[("org/big", "sub/adapter_model.safetensors")] = weights
    hub = _FakeHub(files, SHA_A)
    try:
        program = tmp_path / "p.pem"
        program.write_text('input a = "hf://org/big"\ninput b = "hf://org/big/sub"\noutput a - b -> "out/d"\n')
        env = _hub_env(tmp_path, hub.url)
        done = subprocess.run([sys.executable, "-m", "pemlang.cli", "check", str(program)], text=True,
                              capture_output=True, env=env, timeout=120)
        assert done.returncode == 0, done.stderr
        assert done.stdout.startswith("ok: ")
        # the weights: at most the first 100 kB each (huggingface_hub's first range request), not 1 MiB
        assert len(weights) > 1_000_000
        assert 0 < hub.sent["adapter_model.safetensors"] <= 100_001
        assert 0 < hub.sent["sub/adapter_model.safetensors"] <= 100_001
        assert not list((tmp_path / "cache").rglob("adapter_model.safetensors"))  # nothing of them cached
        # `run` downloads them (into the cache) and records the commit
        ran = subprocess.run([sys.executable, "-m", "pemlang.cli", "run", str(program), "--device", "cpu"], text=True,
                             capture_output=True, env=env, timeout=120)
        assert ran.returncode == 0, ran.stderr
        assert {i["path"] for i in _inputs(tmp_path / "out" / "d")} == {f"hf://org/big@{SHA_A}",
                                                                        f"hf://org/big/sub@{SHA_A}"}
        assert len(list((tmp_path / "cache").rglob("adapter_model.safetensors"))) == 2
    finally:
        hub.close()


def _big_base(directory: Path, *, sharded: bool) -> Path:
    """A tiny Llama base as transformers saves it, with a 1 MiB extra tensor in (each of) its weight
    files so that a header is a small part of the file; sharded: two files and an index."""
    import torch
    from peft_factory import save_base
    from safetensors.torch import load_file, save_file

    save_base(directory, max_shard_size="60KB" if sharded else None)
    files = sorted(directory.glob("*.safetensors"))
    for number, path in enumerate(files):
        tensors = load_file(str(path))
        tensors[f"extra.padding.{number}"] = torch.zeros(256, 1024)
        save_file(tensors, str(path), metadata={"format": "pt"})
    if sharded:
        index = json.loads((directory / "model.safetensors.index.json").read_text())
        for number, path in enumerate(files):
            index["weight_map"][f"extra.padding.{number}"] = path.name
        (directory / "model.safetensors.index.json").write_text(json.dumps(index))
    return directory


@pytest.mark.parametrize("sharded", [False, True], ids=["one-file", "sharded"])
def test_check_of_a_hub_base_reads_only_the_headers_of_its_weights(tmp_path: Path, sharded: bool) -> None:
    """`output x into "hf://…"`: check and plan fetch config.json (and the index) and read each
    weight file's header by HTTP range, never the weights, and show what run would write; nothing of
    the weights lands in the cache. The same shards, tensors and changes as check of the base on disk."""
    from peft_factory import lora

    base = _big_base(tmp_path / "base", sharded=sharded)
    adapter = lora(tmp_path / "a", 1)
    weights = {p.name: p.read_bytes() for p in base.glob("*.safetensors")}
    assert len(weights) == (2 if sharded else 1) and all(len(b) > 1_000_000 for b in weights.values())
    files = {("org/base", p.name): p.read_bytes() for p in base.iterdir()}
    hub = _FakeHub(files, SHA_A, delay=0.1 if sharded else 0.0)  # each answer slow: the shards' headers overlap
    try:
        env = _hub_env(tmp_path, hub.url)
        shown = {}
        for where in ("hf://org/base", str(base)):
            program = tmp_path / "p.pem"
            program.write_text(f'mode exact\ninput a = "{adapter}"\noutput a into "{where}" -> "out/m"\n')
            for command in ("check", "plan"):
                done = subprocess.run([sys.executable, "-m", "pemlang.cli", command, str(program)], text=True,
                                      capture_output=True, env=env, timeout=120)
                assert done.returncode == 0, done.stderr
                shown[where, command] = done.stdout.replace(f"{where}@{SHA_A}", "BASE").replace(where, "BASE")
        assert "writes " + ("2 weight files" if sharded else "1 weight file") in shown["hf://org/base", "check"]
        for command in ("check", "plan"):  # the same, the base's commit aside
            assert shown["hf://org/base", command] == shown[str(base), command]
        for name in weights:  # check and plan: at most huggingface_hub's first range request (100 kB) each
            assert 0 < hub.sent[name] <= 2 * 100_001 < len(weights[name]), (name, hub.sent)
        assert not list((tmp_path / "cache").rglob("*.safetensors"))  # nothing of the weights cached
        assert not (tmp_path / "out").exists()
        assert hub.most_in_flight == (2 if sharded else 1)  # two shards' headers read at once
    finally:
        hub.close()


def _header(header: object) -> bytes:
    import struct

    text = json.dumps(header).encode()
    return struct.pack("<Q", len(text)) + text + bytes(64)


_F32 = {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}


@pytest.mark.parametrize("file, data, message", [
    ("model.safetensors", _header({"x": 5}), "an entry has exactly dtype, shape and data_offsets"),
    ("model.safetensors", _header([1, 2]), "the header is not a JSON object"),
    ("model.safetensors", _header({"__metadata__": 5, "x": _F32}), "__metadata__ is not a map of strings to strings"),
    ("model.safetensors", _header({"x": {**_F32, "data_offsets": 16}}), "malformed data_offsets 16"),
    ("model.safetensors", _header({"x": {**_F32, "data_offsets": [0]}}), "malformed data_offsets [0]"),
    ("model.safetensors", _header({"x": {**_F32, "data_offsets": [0, 2**62]}}), "do not fit F32[4]"),
    ("model.safetensors.index.json", b"[1]", "has no weight_map of tensor names to files"),
    ("model.safetensors.index.json", json.dumps({"weight_map": {"x": "pytorch_model-1.safetensors"}}).encode(),
     "weight file pytorch_model-1.safetensors is missing"),  # run does not fetch it: check must not pass it
], ids=["entry", "list", "metadata", "offsets-int", "offsets-one", "offsets-huge", "index-list", "index-names"])
def test_check_of_a_damaged_hub_base_says_what_run_says(tmp_path: Path, file: str, data: bytes, message: str) -> None:
    """A hub base whose header or index is damaged: check says what run says about the snapshot (an
    error at the `into`), never an internal error, and never passes what run would refuse."""
    from peft_factory import lora, save_base

    base = save_base(tmp_path / "base")
    adapter = lora(tmp_path / "a", 1)
    files = {("org/base", p.name): p.read_bytes() for p in base.iterdir()}
    files[("org/base", file)] = data
    if file.endswith(".json") and b"pytorch_model" in data:
        files[("org/base", "pytorch_model-1.safetensors")] = files.pop(("org/base", "model.safetensors"))
    hub = _FakeHub(files, SHA_A)
    try:
        program = tmp_path / "p.pem"
        program.write_text(f'mode exact\ninput a = "{adapter}"\noutput a into "hf://org/base" -> "out/m"\n')
        env = _hub_env(tmp_path, hub.url)
        for command in ("check", "run"):
            done = subprocess.run([sys.executable, "-m", "pemlang.cli", command, str(program)], text=True,
                                  capture_output=True, env=env, timeout=120)
            assert done.returncode == 1 and "error[E035]" in done.stderr and message in done.stderr, (command, done.stderr)
    finally:
        hub.close()


def test_a_hub_that_stops_answering_a_header_request_is_unreachable(monkeypatch: pytest.MonkeyPatch) -> None:
    """The HTTP client's own errors (a read timed out, a dropped connection) while reading a header
    by range are Unreachable (a diagnostic with the connection hints), not an internal error."""
    from huggingface_hub import HfApi

    from pemlang import hub

    class ReadTimeout(Exception):  # as the HTTP client under huggingface_hub raises it (not an OSError)
        pass

    def stalled(*args: object, **kwargs: object) -> None:
        raise ReadTimeout("timed out")

    monkeypatch.setattr(HfApi, "parse_safetensors_file_metadata", stalled)
    with pytest.raises(hub.Unreachable, match="timed out"):
        hub._read_header("org/base", "model.safetensors", SHA_A)


@pytest.mark.parametrize("written, message, hint", [
    ("hf://org/nothing", "no repository org/nothing on the Hub (or it is private)", "huggingface-cli login"),
    ("hf://org/gated", "is gated", "huggingface-cli login"),
    ("hf://org/big@v9", "has no revision 'v9'", "branch, tag or commit"),
    ("hf://org/empty", "holds no adapter", "hf://ORG/NAME/SUBFOLDER"),
])
def test_hub_errors_online(tmp_path: Path, written: str, message: str, hint: str) -> None:
    adapter = _big_adapter(tmp_path / "big")
    files = {("org/big", name): (adapter / name).read_bytes() for name in ("adapter_config.json", "adapter_model.safetensors")}
    files[("org/empty", "README.md")] = b"nothing here"
    hub = _FakeHub(files, SHA_A, errors={"org/nothing": (404, "RepoNotFound"), "org/gated": (403, "GatedRepo")})
    if "@v9" in written:
        hub.errors["org/big"] = (404, "RevisionNotFound")
    try:
        program = tmp_path / "p.pem"
        program.write_text(f'input a = "{written}"\noutput a -> "out/a"\n')
        env = _hub_env(tmp_path, hub.url)
        done = subprocess.run([sys.executable, "-m", "pemlang.cli", "check", str(program)], text=True,
                              capture_output=True, env=env, timeout=120)
    finally:
        hub.close()
    assert done.returncode == 1 and "error[E012]" in done.stderr, done.stderr
    assert message in done.stderr and hint in done.stderr, done.stderr
    assert "p.pem:1:11" in done.stderr  # at the input's string


def test_eval_and_configs_take_hub_ids(cache: Path, tmp_path: Path) -> None:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    done = subprocess.run([sys.executable, "-m", "pemlang.cli", "eval", "--input", "a=hf://tiny-org/adapter-a@v1",
                           "--input", "b=hf://tiny-org/adapter-b", "--out", str(tmp_path / "e"), "--device", "cpu",
                           "a - b"], text=True, capture_output=True, env=env)
    assert done.returncode == 0, done.stderr
    assert {i["path"] for i in _inputs(tmp_path / "e")} == {f"hf://tiny-org/adapter-a@{SHA_A}",
                                                          f"hf://tiny-org/adapter-b@{SHA_B}"}
    config = tmp_path / "merge.yaml"
    config.write_text("inputs:\n  a: hf://tiny-org/adapter-a\n  b: hf://tiny-org/several/first\n"
                      f"expression: 0.5*a + 0.5*b\noutput: {tmp_path / 'c'}\n")
    done = subprocess.run([sys.executable, "-m", "pemlang.cli", "run", str(config), "--device", "cpu"], text=True,
                          capture_output=True, env=env)
    assert done.returncode == 0, done.stderr
    assert f"hf://tiny-org/several/first@{SHA_B}" in {i["path"] for i in _inputs(tmp_path / "c")}
    config.write_text(config.read_text().replace("adapter-a", "adapter-zzz"))
    done = subprocess.run([sys.executable, "-m", "pemlang.cli", "check", str(config)], text=True, capture_output=True,
                          env=env)
    assert done.returncode == 1 and "merge.yaml:2:6" in done.stderr and "HF_HUB_OFFLINE" in done.stderr


def test_a_directory_of_several_named_adapters(tmp_path: Path) -> None:
    """PEFT's save_pretrained of a model with two adapters writes the default one at the top and the
    other in a subfolder named after it: each is an input, by its path."""
    import warnings

    import torch
    from peft import LoraConfig, get_peft_model

    from tests.peft_factory import base_model, randomize

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = get_peft_model(base_model("llama"), LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
        model.add_adapter("other", LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
        randomize(model, 3)
        model.save_pretrained(tmp_path / "both")
    assert (tmp_path / "both" / "other" / "adapter_model.safetensors").exists()
    program = pemlang.compile("0.5*x + 0.5*y", inputs={"x": tmp_path / "both", "y": tmp_path / "both" / "other"})
    tensors = program.evaluate()["0.5*x + 0.5*y"]
    key = next(k for k in tensors if k.endswith("q_proj.lora_B.weight"))
    layer = model.base_model.model.model.layers[0].self_attn.q_proj
    assert key.startswith("base_model.model.model.layers.0.")
    expected = 0.5 * layer.lora_B["default"].weight + 0.5 * layer.lora_B["other"].weight
    assert torch.allclose(tensors[key], expected.detach())


def test_repl_inspects_a_hub_id(cache: Path, tmp_path: Path) -> None:
    from tests.test_repl import drive

    out = drive(":inspect hf://tiny-org/adapter-a@v1\n:inspect hf://tiny-org/none\n", tmp_path / "history")
    assert "tiny-org/tiny-llama" in out and "not in the Hugging Face cache" in out


@pytest.mark.parametrize("written", ["hf://org/λ", "hf://org/ a", "hf://org/-a"])
def test_names_that_are_not_repositories(cache: Path, written: str) -> None:
    with pytest.raises(pemlang.CompileError) as caught:
        pemlang.compile("x", inputs={"x": written})
    assert "is not a Hub id" in caught.value.diagnostics[0].message


# -- no connection: one short attempt per id, all ids at once ------------------------------------------


def _hub_env(tmp_path: Path, endpoint: str, **extra: str) -> dict[str, str]:
    """The environment of a child pemlang that talks to the Hub at `endpoint`, with its own cache
    under `tmp_path` and none of this machine's HF_ settings."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("HF_")}
    env.update(PYTHONPATH=str(REPO), HF_ENDPOINT=endpoint, HF_HUB_CACHE=str(tmp_path / "cache"),
               HF_HUB_DISABLE_TELEMETRY="1", HF_HUB_DISABLE_XET="1", **extra)
    return env


def _offline_env(tmp_path: Path, **extra: str) -> dict[str, str]:
    """No HF_HUB_OFFLINE, and a Hub endpoint where nothing listens (port 9, discard): every
    connection is refused, as on a machine without network."""
    return _hub_env(tmp_path, "http://127.0.0.1:9", **extra)


def test_no_connection_fails_fast_and_names_hf_hub_offline(tmp_path: Path) -> None:
    """huggingface_hub alone retries ~23 s per id (five backoffs) before giving up; pemlang makes one
    attempt per id and says how to work from the cache."""
    import time

    program = tmp_path / "p.pem"
    program.write_text('input a = "hf://org/a"\ninput b = "hf://org/b@v1"\ninput c = "hf://org/c/sub"\n'
                       'output a + b + c -> "out/abc"\n')
    started = time.monotonic()
    done = subprocess.run([sys.executable, "-m", "pemlang.cli", "check", str(program)], text=True,
                          capture_output=True, env=_offline_env(tmp_path), timeout=300)
    elapsed = time.monotonic() - started
    assert done.returncode == 1 and done.stderr.count("error[E012]") == 3, done.stderr
    assert "org/a could not be downloaded" in done.stderr and "is not in the cache" in done.stderr
    assert "set HF_HUB_OFFLINE=1" in done.stderr
    assert "Retrying" not in done.stderr  # huggingface_hub's backoff never started
    assert elapsed < 15, f"{elapsed:.1f} s"


def test_no_connection_inspect_fails_fast(tmp_path: Path) -> None:
    import time

    started = time.monotonic()
    done = subprocess.run([sys.executable, "-m", "pemlang.cli", "inspect", "hf://org/a"], text=True,
                          capture_output=True, env=_offline_env(tmp_path), timeout=300)
    assert done.returncode == 1 and "error[E012]" in done.stderr and "HF_HUB_OFFLINE=1" in done.stderr, done.stderr
    assert time.monotonic() - started < 15


def test_hub_inputs_are_resolved_together(tmp_path: Path) -> None:
    """Three ids of one program: their requests to a Hub that takes 0.3 s per answer overlap."""
    adapter = _big_adapter(tmp_path / "big", hidden=64, rank=4)
    files = {}
    for repo in ("org/one", "org/two", "org/three"):
        files.update({(repo, name): (adapter / name).read_bytes()
                      for name in ("adapter_config.json", "adapter_model.safetensors")})
    hub = _FakeHub(files, SHA_A, delay=0.3)
    try:
        program = tmp_path / "p.pem"
        program.write_text('input a = "hf://org/one"\ninput b = "hf://org/two"\ninput c = "hf://org/three"\n'
                           'output a + b - c -> "out/d"\n')
        env = {**_offline_env(tmp_path), "HF_ENDPOINT": hub.url}
        done = subprocess.run([sys.executable, "-m", "pemlang.cli", "check", str(program)], text=True,
                              capture_output=True, env=env, timeout=300)
    finally:
        hub.close()
    assert done.returncode == 0, done.stderr
    assert hub.most_in_flight >= 2


def _tune(tmp_path: Path, adapters: Path, base: str) -> subprocess.CompletedProcess[str]:
    program = tmp_path / "mix.pem"
    program.write_text(f'input a = "{adapters / "llama_r8"}"\ninput b = "{adapters / "llama_r8_b"}"\n'
                       f'param lam = 0.5\noutput lam*a + (1 - lam)*b -> "{tmp_path / "out"}"\n')
    return subprocess.run([sys.executable, "-m", "pemlang.cli", "tune", str(program), "--base", base, "--objective",
                           "math:fabs", "--param", "lam=0:1:0.5", "--no-save", "--study", str(tmp_path / "s.db")],
                          text=True, capture_output=True, env=_offline_env(tmp_path), cwd=tmp_path, timeout=300)


@pytest.mark.parametrize("base, message", [
    ("typo", "no such directory: typo"),  # not `org/name`: never taken for a Hub id
    ("org/model", "org/model could not be downloaded"),  # a Hub id, with no connection
])
def test_tune_base_fails_fast_without_a_connection(tmp_path: Path, adapters: Path, base: str, message: str) -> None:
    import time

    started = time.monotonic()
    done = _tune(tmp_path, adapters, base)
    elapsed = time.monotonic() - started
    assert done.returncode == 1 and "error[E032]" in done.stderr and message in done.stderr, done.stderr
    assert "Retrying" not in done.stderr and "Traceback" not in done.stderr
    assert elapsed < 30, f"{elapsed:.1f} s"


def test_load_into_a_hub_id_fails_fast_without_a_connection(tmp_path: Path, adapters: Path) -> None:
    import time

    script = ("import pemlang\n"
              f"program = pemlang.compile('a', inputs={{'a': {str(adapters / 'llama_r8')!r}}}, device='cpu')\n"
              "try:\n    program.load_into('org/model')\n"
              "except pemlang.CompileError as exc:\n    print(exc.diagnostics[0].code, exc.diagnostics[0].message)\n"
              "    print(*exc.diagnostics[0].hints)\n")
    started = time.monotonic()
    done = subprocess.run([sys.executable, "-c", script], text=True, capture_output=True, env=_offline_env(tmp_path),
                          timeout=300)
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("E032 org/model could not be downloaded") and "HF_HUB_OFFLINE=1" in done.stdout
    assert time.monotonic() - started < 20


def test_cached_ids_work_at_once_without_a_connection(cache: Path, tmp_path: Path) -> None:
    """Without HF_HUB_OFFLINE and without a connection, what the cache holds is used (huggingface_hub
    falls back to it after one refused attempt), and what it does not hold fails fast."""
    import time

    program = tmp_path / "p.pem"
    program.write_text('input a = "hf://tiny-org/adapter-a"\ninput b = "hf://tiny-org/adapter-b@main"\n'
                       'output 0.5*a + 0.5*b -> "out/merged"\n')
    env = {**_offline_env(tmp_path), "HF_HUB_CACHE": str(cache)}
    started = time.monotonic()
    done = subprocess.run([sys.executable, "-m", "pemlang.cli", "run", str(program), "--device", "cpu"], text=True,
                          capture_output=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr
    assert {i["path"] for i in _inputs(tmp_path / "out" / "merged")} == {f"hf://tiny-org/adapter-a@{SHA_A}",
                                                                        f"hf://tiny-org/adapter-b@{SHA_B}"}
    assert "Retrying" not in done.stderr and time.monotonic() - started < 30
