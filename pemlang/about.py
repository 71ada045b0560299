"""What pemlang is: its version, and where to report a bug (said with every internal error)."""

__version__ = "0.1.0"

ISSUES_URL = "https://github.com/pemlang/pemlang/issues"
