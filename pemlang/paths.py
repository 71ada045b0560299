"""Paths as a program, config or option writes them: where they lead (`~` expanded, relative to
the file's directory), and why the operating system could not use one."""

from __future__ import annotations

import errno
import os
from pathlib import Path

from .diagnostics import display_path


def resolve_written(base_dir: Path, written: str) -> Path:
    """A path as written in a program, config or option: `~` expanded, relative to `base_dir`."""
    return Path(os.path.abspath(base_dir / os.path.expanduser(written)))


def unusable(path: Path) -> str | None:
    """Why the operating system cannot take `path` at all (a NUL, a name too long), if it cannot."""
    if "\0" in str(path):
        return "the path contains a NUL character"
    try:
        os.lstat(path)
        path.resolve()  # a loop of symbolic links raises here (RuntimeError before Python 3.13)
    except (FileNotFoundError, NotADirectoryError):
        return None  # not there (yet): that is for the caller to judge
    except OSError as exc:
        if exc.errno == errno.ENAMETOOLONG:
            return "the path is too long for the file system"
        if exc.errno == errno.ELOOP:
            return "the path goes round a loop of symbolic links"
        return f"the path cannot be used ({exc.strerror or exc})"
    except RuntimeError:
        return "the path goes round a loop of symbolic links"
    except ValueError as exc:  # a name the file system's encoding cannot hold
        return f"the path cannot be used ({exc})"
    return None


def unwritable(path: Path, real: Path) -> str | None:
    """Why a directory could not be created (or replaced) at `path`, as far as can be seen now."""
    if path.is_symlink() and not path.exists():
        return f"{display_path(path)} is a symbolic link to {os.readlink(path)}, which does not exist"
    if len(real.parts) > 1 and real.parts[1] in ("proc", "sys", "dev"):
        return f"{display_path(path)} is inside /{real.parts[1]}, which holds no ordinary files"
    ancestor = real.parent
    while not ancestor.exists() and ancestor != ancestor.parent:
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        return f"{display_path(ancestor)} is a file, not a directory"
    if not os.access(ancestor, os.W_OK | os.X_OK):
        return f"{display_path(ancestor)} is not writable"
    return None


def shorten(text: str, limit: int = 120) -> str:
    return text if len(text) <= limit else f"{text[: limit // 2]}…{text[-limit // 2 :]} ({len(text)} characters)"
