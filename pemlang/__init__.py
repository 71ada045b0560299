"""pemlang: a compiler for the arithmetic of parameter-efficient modules (LoRA, (IA)3).

Importing the package is cheap: torch is imported only by the backend, when tensors are read.
"""

__version__ = "0.1.0"
