"""Adapters on the Hugging Face Hub: `hf://org/name[/sub/folder][@revision]` wherever a directory
is accepted.

An id is resolved with `huggingface_hub` into its standard cache (honouring `HF_HOME`,
`HF_HUB_CACHE`, `HF_HUB_OFFLINE` and `HF_TOKEN`): only `adapter_config.json` and the weights file
are fetched, never the rest of the repository. The result is the snapshot directory, whose commit
sha pins exactly what was read (`hf://org/name@<sha>` goes into the output's provenance).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

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


def parse(text: str) -> HubRef:
    """`hf://org/name[/sub][@rev]` → HubRef; HubError saying the expected form otherwise."""
    match = _PATTERN.fullmatch(text.strip())
    if match is None:
        raise HubError(f"{text!r} is not a Hub id", ("write hf://ORG/NAME, hf://ORG/NAME/SUBFOLDER or hf://ORG/NAME@REVISION",))
    sub = match["sub"].strip("/") or None
    if sub is not None and any(part in ("", ".", "..") for part in sub.split("/")):
        raise HubError(f"{text!r}: a subfolder cannot contain '.' or '..' parts")
    return HubRef(match["repo"], sub, match["rev"])


@dataclass(frozen=True)
class Resolved:
    ref: HubRef
    directory: Path  # the local snapshot directory (its subfolder) holding the adapter's files
    commit: str


def resolve(ref: HubRef, *, allow_pickle: bool = False) -> Resolved:
    """Fetch (or find in the cache) the adapter's config and weights; HubError with a hint for
    every way that fails (not found, gated, offline and not cached, no adapter files)."""
    try:
        from huggingface_hub import errors as hub_errors
        from huggingface_hub import hf_hub_download
    except ImportError:  # pragma: no cover - a dependency of peft
        raise HubError("hf:// inputs need huggingface_hub", ("pip install huggingface_hub",)) from None
    where = f"{ref.repo}" + (f"/{ref.subfolder}" if ref.subfolder else "") + (f"@{ref.revision}" if ref.revision else "")

    def fetch(filename: str) -> Path:
        return Path(hf_hub_download(ref.repo, filename, subfolder=ref.subfolder, revision=ref.revision))

    try:
        config = fetch("adapter_config.json")
        try:
            fetch("adapter_model.safetensors")
        except hub_errors.EntryNotFoundError:
            if not allow_pickle:
                raise
            fetch("adapter_model.bin")
    except hub_errors.GatedRepoError:
        raise HubError(f"{where} is gated: its owner must grant you access",
                       ("accept its terms on the Hub, then log in: `huggingface-cli login` (or set HF_TOKEN)",)) from None
    except hub_errors.RepositoryNotFoundError:
        raise HubError(f"no repository {ref.repo} on the Hub (or it is private)",
                       ("check the name; for a private repository log in: `huggingface-cli login` (or set HF_TOKEN)",)
                       ) from None
    except hub_errors.RevisionNotFoundError:
        raise HubError(f"{ref.repo} has no revision {ref.revision!r}", ("give a branch, tag or commit of the repository",)
                       ) from None
    except hub_errors.LocalEntryNotFoundError:
        raise HubError(f"{where} is not in the Hugging Face cache, and downloading is off (HF_HUB_OFFLINE)"
                       if _offline() else f"{where} could not be downloaded (no connection?) and is not in the cache",
                       ("unset HF_HUB_OFFLINE to download it, or fetch it once where there is a connection",)
                       if _offline() else ("check the connection, or set HF_HUB_CACHE to a cache that holds it",)
                       ) from None
    except hub_errors.EntryNotFoundError:
        raise HubError(f"{where} holds no adapter (adapter_config.json and adapter_model.safetensors)",
                       ("name the subfolder that holds it: hf://ORG/NAME/SUBFOLDER",)) from None
    except (hub_errors.HfHubHTTPError, OSError, ValueError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise HubError(f"cannot fetch {where}: {first[:300]}") from None
    directory = config.parent
    snapshot = directory
    for _ in (ref.subfolder or "").split("/") if ref.subfolder else ():
        snapshot = snapshot.parent
    commit = snapshot.name if _COMMIT.fullmatch(snapshot.name) else (ref.revision or "unknown")
    return Resolved(ref, directory, commit)


def _offline() -> bool:
    try:
        from huggingface_hub import constants

        return bool(constants.HF_HUB_OFFLINE)
    except ImportError:  # pragma: no cover
        return False
