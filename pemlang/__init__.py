"""pemlang: a compiler for the arithmetic of parameter-efficient modules (LoRA, (IA)3).

Importing the package is cheap: torch is imported only by the backend, when tensors are read.
"""

from .about import __version__ as __version__

_API = {"compile": "api", "load": "api", "Program": "api", "CompileError": "diagnostics", "Evaluation": "api",
        "from_config": "api", "PemConfig": "config",
        "PemError": "diagnostics", "Diagnostic": "diagnostics", "Dropped": "plan"}


def __getattr__(name: str):  # type: ignore[no-untyped-def]
    """The public API, imported on first use so that `import pemlang` stays cheap."""
    if name in _API:
        import importlib

        return getattr(importlib.import_module(f".{_API[name]}", __name__), name)
    raise AttributeError(f"module 'pemlang' has no attribute {name!r}")
