"""Adapters on the Hugging Face Hub: `hf://org/name[/sub/folder][@revision]` wherever a directory
is accepted.

An id is resolved with `huggingface_hub` into its standard cache (honouring `HF_HOME`,
`HF_HUB_CACHE`, `HF_HUB_OFFLINE` and `HF_TOKEN`): only `adapter_config.json` and the weights file
are fetched, never the rest of the repository. The result is the snapshot directory, whose commit
sha pins exactly what was read (`hf://org/name@<sha>` goes into the output's provenance).
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .diagnostics import first_line

PREFIX = "hf://"
_REPO_PART = r"[A-Za-z0-9][A-Za-z0-9._-]*"
_PATTERN = re.compile(rf"hf://(?P<repo>(?:{_REPO_PART}/)?{_REPO_PART})(?P<sub>(?:/[^@/]+)*)(?:@(?P<rev>[^@/\s]+))?")
_COMMIT = re.compile(r"[0-9a-f]{40}")


class HubError(Exception):
    """An id that cannot be resolved: a message and hints for the diagnostic at the input's string."""

    def __init__(self, message: str, hints: tuple[str, ...] = ()):
        super().__init__(message)
        self.message = message
        self.hints = hints


@dataclass(frozen=True)
class HubRef:
    repo: str
    subfolder: str | None
    revision: str | None

    def pinned(self, commit: str) -> str:
        """The id at the commit that was read: what provenance records."""
        return f"{PREFIX}{self.repo}{'/' + self.subfolder if self.subfolder else ''}@{commit}"


def is_hub(text: str) -> bool:
    return isinstance(text, str) and text.startswith(PREFIX)


def is_repo_id(text: str) -> bool:
    """Whether `text` has the form of a Hub repository id, `org/name` (what `--base` may name)."""
    return re.fullmatch(f"{_REPO_PART}/{_REPO_PART}", text) is not None


def parse(text: str) -> HubRef:
    """`hf://org/name[/sub][@rev]` → HubRef; HubError saying the expected form otherwise."""
    match = _PATTERN.fullmatch(text.strip())
    ident = text.strip()[len(PREFIX):].split("@")[0]
    if match is not None and "/" in ident and "/" not in match["repo"]:
        match = None  # `hf://org/λ`: a two-part id whose name is not a repository name, not repo `org` + subfolder
    if match is None:
        raise HubError(f"{text[:200]!r} is not a Hub id (ORG and NAME are letters, digits, '-', '_' and '.')",
                       ("write hf://ORG/NAME, hf://ORG/NAME/SUBFOLDER or hf://ORG/NAME@REVISION",))
    sub = match["sub"].strip("/") or None
    if sub is not None and any(part in ("", ".", "..") for part in sub.split("/")):
        raise HubError(f"{text!r}: a subfolder cannot contain '.' or '..' parts")
    return HubRef(match["repo"], sub, match["rev"])


@dataclass(frozen=True)
class Resolved:
    ref: HubRef
    directory: Path  # the local snapshot directory (its subfolder) holding the adapter's files
    commit: str

    @property
    def pinned(self) -> str:
        """The id at the commit that was read (what provenance records)."""
        return self.ref.pinned(self.commit)


def locate(text: str, *, allow_pickle: bool = False, headers_only: bool = False) -> Resolved:
    """`hf://…` → its adapter's local directory (see `resolve`); HubError otherwise."""
    return resolve(parse(text), allow_pickle=allow_pickle, headers_only=headers_only)


def resolve(ref: HubRef, *, allow_pickle: bool = False, headers_only: bool = False) -> Resolved:
    """Fetch (or find in the cache) the adapter's config and weights; HubError with a hint for
    every way that fails (not found, gated, offline and not cached, no adapter files).

    `headers_only` (what `check` needs): when the weights are not cached, only their safetensors
    header is read, by HTTP range requests (huggingface_hub's safetensors-metadata helper), into a
    stand-in file in a temporary directory: the header, then a hole as long as the tensor data."""
    try:
        from huggingface_hub import errors as hub_errors
    except ImportError:  # pragma: no cover - a dependency of peft
        raise HubError("hf:// inputs need huggingface_hub", ("pip install huggingface_hub",)) from None
    where = f"{ref.repo}" + (f"/{ref.subfolder}" if ref.subfolder else "") + (f"@{ref.revision}" if ref.revision else "")

    def fetch(filename: str) -> Path:
        reach(ref.repo, f"{ref.subfolder}/{filename}" if ref.subfolder else filename, ref.revision)
        return _download(ref, filename)

    try:
        config = fetch("adapter_config.json")
        if headers_only and not _cached(ref, config):
            return _header_stand_in(ref, config)
        try:
            fetch("adapter_model.safetensors")
        except hub_errors.EntryNotFoundError:
            if not allow_pickle:
                raise
            fetch("adapter_model.bin")
    except (hub_errors.HfHubHTTPError, hub_errors.EntryNotFoundError, hub_errors.SafetensorsParsingError, Unreachable,
            OSError, ValueError) as exc:
        raise _failure(exc, ref, where, (hub_errors.LocalEntryNotFoundError,),
                       missing=(f"{where} holds no adapter (adapter_config.json and adapter_model.safetensors)",
                                "name the subfolder that holds it: hf://ORG/NAME/SUBFOLDER")) from None
    return Resolved(ref, config.parent, _commit_of(config, ref))


# What a merged model needs of its base on the Hub (`output x into "hf://…"`): its config, its
# tokenizer and its safetensors weights, never the rest of the repository (pickles, other formats).
MODEL_FILES = ("config.json", "generation_config.json", "model.safetensors", "model.safetensors.index.json",
               "model-*.safetensors", "tokenizer*", "special_tokens_map.json", "added_tokens.json", "vocab.*",
               "merges.txt", "*.tiktoken", "spiece.model", "sentencepiece*.model", "chat_template.*",
               "preprocessor_config.json")


def locate_model(text: str, *, headers_only: bool = False) -> Resolved:
    """`hf://org/name[/sub][@rev]` → the snapshot directory of a base model in the Hub cache, with
    only MODEL_FILES fetched (or found cached); HubError as for adapters. `headers_only` (`check`,
    `plan`): where the weights are not cached, a stand-in with only their headers (see
    _model_header_stand_in) instead of gigabytes of downloads."""
    from huggingface_hub import errors as hub_errors
    from huggingface_hub import snapshot_download

    ref = parse(text)
    where = f"{ref.repo}" + (f"/{ref.subfolder}" if ref.subfolder else "") + (f"@{ref.revision}" if ref.revision else "")
    patterns = [f"{ref.subfolder}/{p}" if ref.subfolder else p for p in MODEL_FILES]
    try:
        reach(ref.repo, f"{ref.subfolder}/config.json" if ref.subfolder else "config.json", ref.revision)
        stand_in = _model_header_stand_in(ref, patterns) if headers_only else None
        if stand_in is not None:
            return stand_in
        snapshot = Path(snapshot_download(ref.repo, revision=ref.revision, allow_patterns=patterns,
                                          etag_timeout=_timeout()))
    except (hub_errors.HfHubHTTPError, hub_errors.EntryNotFoundError, Unreachable, OSError, ValueError) as exc:
        raise _failure(exc, ref, where, (hub_errors.LocalEntryNotFoundError, FileNotFoundError)) from None
    commit = snapshot.name if _COMMIT.fullmatch(snapshot.name) else (ref.revision or "unknown")
    return Resolved(ref, snapshot / ref.subfolder if ref.subfolder else snapshot, commit)


def _failure(exc: BaseException, ref: HubRef, where: str, not_cached: tuple[type[BaseException], ...], *,
             missing: tuple[str, str] | None = None) -> HubError:
    """What a failed fetch from the Hub says, with its hint: gated, no such repository or revision,
    not cached while offline or unreachable, the files asked for missing (`missing`: message and
    hint, where that has a meaning of its own), or the error's own first line."""
    from huggingface_hub import errors as hub_errors

    login = "log in: `huggingface-cli login` (or set HF_TOKEN)"
    if isinstance(exc, hub_errors.GatedRepoError):
        return HubError(f"{where} is gated: its owner must grant you access", (f"accept its terms on the Hub, then {login}",))
    if isinstance(exc, hub_errors.RepositoryNotFoundError):
        return HubError(f"no repository {ref.repo} on the Hub (or it is private)",
                        (f"check the name; for a private repository {login}",))
    if isinstance(exc, hub_errors.RevisionNotFoundError):
        return HubError(f"{ref.repo} has no revision {ref.revision!r}", ("give a branch, tag or commit of the repository",))
    if isinstance(exc, not_cached):
        if _offline():
            return HubError(f"{where} is not in the Hugging Face cache, and downloading is off (HF_HUB_OFFLINE)",
                            ("unset HF_HUB_OFFLINE to download it, or fetch it once where there is a connection",))
        return HubError(f"{where} could not be downloaded (no connection?) and is not in the cache", UNREACHABLE_HINTS)
    if isinstance(exc, Unreachable):
        return HubError(f"{where} could not be downloaded ({exc}) and is not in the cache", UNREACHABLE_HINTS)
    if missing is not None and isinstance(exc, hub_errors.EntryNotFoundError):
        return HubError(missing[0], (missing[1],))
    return HubError(f"cannot fetch {where}: {first_line(exc)}")


UNREACHABLE_HINTS = ("check the connection (and HF_ENDPOINT, if set); to work from the cache alone, without "
                     "trying the network, set HF_HUB_OFFLINE=1",
                     "or set HF_HUB_CACHE to a cache that holds it")
DEFAULT_TIMEOUT = 5.0  # seconds for the one attempt to reach the Hub (HF_HUB_ETAG_TIMEOUT, when set, instead)


class Unreachable(Exception):
    """The Hub could not be reached (refused, timed out, no such host): what the HTTP client said."""


def _timeout() -> float:
    from huggingface_hub import constants

    if constants.HF_HUB_ETAG_TIMEOUT != constants.DEFAULT_ETAG_TIMEOUT:
        return float(constants.HF_HUB_ETAG_TIMEOUT)  # the user's own setting
    return DEFAULT_TIMEOUT


def reach(repo: str, filename: str, revision: str | None = None) -> None:
    """One short attempt to reach the Hub for a file that is not in the cache: Unreachable at once
    when there is no connection. (huggingface_hub itself, finding neither the network nor the file
    in the cache, retries for ~23 s with backoff before it gives up.) Answers of the Hub (not
    found, gated, …) are raised as huggingface_hub raises them; nothing is done offline or for a
    file already cached (huggingface_hub then falls back to the cache without retrying)."""
    from huggingface_hub import errors as hub_errors
    from huggingface_hub import get_hf_file_metadata, hf_hub_url, try_to_load_from_cache

    if _offline() or isinstance(try_to_load_from_cache(repo, filename, revision=revision), str):
        return
    try:
        get_hf_file_metadata(hf_hub_url(repo, filename, revision=revision), timeout=_timeout())
    except hub_errors.HfHubHTTPError:
        raise  # the Hub answered
    except Exception as exc:  # noqa: BLE001 - refused, timed out, no such host: whatever the HTTP client raises
        raise _unreachable(exc) from None


def _unreachable(exc: BaseException) -> Unreachable:
    """What the HTTP client raised (refused, timed out, dropped), as Unreachable."""
    return Unreachable(first_line(exc) or type(exc).__name__)


def locate_all(texts: Iterable[str], *, allow_pickle: bool = False, headers_only: bool = False,
               ) -> dict[str, Resolved | HubError]:
    """Each distinct `hf://…` of `texts` located (see `locate`) or its HubError, the ids resolved
    concurrently: each is a few network round trips, and a program may have many."""
    from concurrent.futures import ThreadPoolExecutor

    wanted = list(dict.fromkeys(text for text in texts if is_hub(text)))

    def one(text: str) -> Resolved | HubError:
        try:
            return locate(text, allow_pickle=allow_pickle, headers_only=headers_only)
        except HubError as exc:
            return exc

    if len(wanted) < 2:
        return {text: one(text) for text in wanted}
    with ThreadPoolExecutor(max_workers=min(8, len(wanted)), thread_name_prefix="pemlang-hub") as pool:
        return dict(zip(wanted, pool.map(one, wanted), strict=True))


def _download(ref: HubRef, filename: str) -> Path:
    """One file of `ref` (in its subfolder, at its revision) from the Hub cache, fetched if need be."""
    from huggingface_hub import hf_hub_download

    return Path(hf_hub_download(ref.repo, filename, subfolder=ref.subfolder, revision=ref.revision,
                                etag_timeout=_timeout()))


def _commit_of(config: Path, ref: HubRef) -> str:
    snapshot = config.parent
    for _ in (ref.subfolder or "").split("/") if ref.subfolder else ():
        snapshot = snapshot.parent
    return snapshot.name if _COMMIT.fullmatch(snapshot.name) else (ref.revision or "unknown")


def _cached(ref: HubRef, config: Path) -> bool:
    """Whether the weights of the commit `config` came from are in the cache already."""
    from huggingface_hub import try_to_load_from_cache

    name = f"{ref.subfolder}/adapter_model.safetensors" if ref.subfolder else "adapter_model.safetensors"
    return isinstance(try_to_load_from_cache(ref.repo, name, revision=_commit_of(config, ref)), str)


_STAND_INS: list[object] = []  # temporary directories, removed when the process ends


def _header_stand_in(ref: HubRef, config: Path) -> Resolved:
    """The adapter's directory with its config and, for the weights, only their header read by
    HTTP range: written to a temporary directory as a sparse file of the full length."""
    import shutil

    commit = _commit_of(config, ref)
    name = f"{ref.subfolder}/adapter_model.safetensors" if ref.subfolder else "adapter_model.safetensors"
    parsed = _read_header(ref.repo, name, commit)
    directory = _stand_in_directory(ref, commit)
    shutil.copyfile(config, directory / "adapter_config.json")
    _write_header(directory / "adapter_model.safetensors", parsed)
    return Resolved(ref, directory, commit)


def _model_header_stand_in(ref: HubRef, patterns: list[str]) -> Resolved | None:
    """A base model's directory as `check` needs it when its weights are not cached: config.json
    and the index fetched, each weight file only its header (HTTP range requests), as a sparse
    file of the full length. None where the weights are cached already, where the Hub cannot be
    asked (offline), or where the base has no safetensors weights: the caller fetches the snapshot
    as `run` does, with the same diagnostics. `patterns`: the files `run` fetches (MODEL_FILES)."""
    import json
    import shutil
    from concurrent.futures import ThreadPoolExecutor

    from huggingface_hub import errors as hub_errors
    from huggingface_hub import try_to_load_from_cache
    from huggingface_hub.utils import filter_repo_objects

    if _offline():
        return None

    config = _download(ref, "config.json")
    commit = _commit_of(config, ref)
    try:
        index: Path | None = _download(ref, "model.safetensors.index.json")
    except hub_errors.EntryNotFoundError:
        index = None
    if index is None:
        names = ["model.safetensors"]
    else:
        try:
            index_json = json.loads(index.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return None  # read_base of the snapshot says what is wrong with it
        weight_map = index_json.get("weight_map") if isinstance(index_json, dict) else None
        if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
            return None
        names = sorted(set(weight_map.values()))
        if any("/" in name or name.startswith(".") for name in names):
            return None
    full = [f"{ref.subfolder}/{name}" if ref.subfolder else name for name in names]
    if len(list(filter_repo_objects(full, allow_patterns=patterns))) != len(full):
        return None  # weight files `run` does not fetch (not model*.safetensors): its diagnostic, not a stand-in's
    if all(isinstance(try_to_load_from_cache(ref.repo, name, revision=commit), str) for name in full):
        return None
    try:
        with ThreadPoolExecutor(max_workers=min(HEADER_READERS, len(full))) as pool:  # round trips overlap
            parsed = list(pool.map(lambda name: _read_header(ref.repo, name, commit), full))
    except (hub_errors.EntryNotFoundError, hub_errors.SafetensorsParsingError):
        return None  # no such weight file (a pickled base, a torn index), or a bad header: as `run` sees it
    directory = _stand_in_directory(ref, commit)
    shutil.copyfile(config, directory / "config.json")
    if index is not None:
        shutil.copyfile(index, directory / "model.safetensors.index.json")
    for name, header in zip(names, parsed, strict=True):
        _write_header(directory / name, header)
    return Resolved(ref, directory, commit)


HEADER_READERS = 8  # weight files' headers read at once (a 70B base has 30 shards, some 100s)
MAX_STAND_IN = 1 << 40  # bytes: more than any file on the Hub; a header claiming more is damaged


def _read_header(repo: str, filename: str, revision: str) -> Any:
    """huggingface_hub's parse of a weight file's header by HTTP range, checked for what a stand-in
    needs: SafetensorsParsingError for a header it cannot stand for (huggingface_hub checks little:
    a tensor entry that is not an object, offsets that are not two numbers, metadata that is not an
    object), Unreachable when the HTTP client fails (timed out, connection dropped)."""
    from huggingface_hub import HfApi
    from huggingface_hub import errors as hub_errors

    damaged = hub_errors.SafetensorsParsingError(f"{filename}: the safetensors header is malformed")
    try:
        parsed = HfApi().parse_safetensors_file_metadata(repo, filename, revision=revision)
    except (hub_errors.HfHubHTTPError, hub_errors.EntryNotFoundError, hub_errors.SafetensorsParsingError):
        raise
    except (TypeError, AttributeError, ValueError, IndexError, KeyError):
        raise damaged from None
    except Exception as exc:  # noqa: BLE001 - whatever the HTTP client raises (timeouts, dropped connections)
        raise _unreachable(exc) from None
    if not isinstance(parsed.metadata, dict):
        raise damaged
    for info in parsed.tensors.values():
        offsets = info.data_offsets
        if (len(offsets) != 2 or not all(type(o) is int for o in offsets)
                or not 0 <= offsets[0] <= offsets[1] <= MAX_STAND_IN):
            raise damaged
    return parsed


def _stand_in_directory(ref: HubRef, commit: str) -> Path:
    """A new directory for a stand-in, in a temporary directory removed when the process ends."""
    import tempfile

    scratch = tempfile.TemporaryDirectory(prefix="pemlang-hub-headers-")
    _STAND_INS.append(scratch)  # kept alive (and so not removed) until the process ends
    directory = Path(scratch.name) / ref.repo.replace("/", "--") / commit / (ref.subfolder or "")
    directory.mkdir(parents=True)
    return directory


def _write_header(path: Path, parsed: Any) -> None:
    """A safetensors file with the header huggingface_hub parsed, then a hole as long as its data."""
    import json
    import struct

    header: dict[str, object] = {"__metadata__": dict(parsed.metadata or {})} if parsed.metadata else {}
    end = 0
    for key, info in parsed.tensors.items():
        header[key] = {"dtype": info.dtype, "shape": list(info.shape), "data_offsets": list(info.data_offsets)}
        end = max(end, int(info.data_offsets[1]))
    text = json.dumps(header, separators=(",", ":")).encode()
    with path.open("wb") as f:
        f.write(struct.pack("<Q", len(text)) + text)
        f.truncate(8 + len(text) + end)  # a hole: no tensor data is downloaded or stored


def _offline() -> bool:
    try:
        from huggingface_hub import constants

        return bool(constants.HF_HUB_OFFLINE)
    except ImportError:  # pragma: no cover
        return False
