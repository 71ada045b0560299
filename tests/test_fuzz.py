"""Fuzzing the front end: generated and mutated programs give diagnostics, never internal errors.

Every program goes through parse and check against the real example adapters (read once through
the API's adapter cache); when the checker accepts it, through lowering and the plan printer too.
Any exception other than a diagnostic fails the test with the program that raised it. Three
sources of programs, together over 10,000 of them:

- programs written from the grammar (every operator and its aliases, calls with odd arguments,
  numbers from tiny to 1e400, Unicode names, comments, stray characters);
- the examples/*.pem texts (seeded random) with bytes flipped, deleted, duplicated and tokens inserted, read as
  files (so invalid UTF-8 meets the reader);
- deep nesting, long chains and huge numbers.
"""

from __future__ import annotations

import io
import random
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from rich.console import Console

from pemlang import ast
from pemlang.api import AdapterCache
from pemlang.check import check_parsed
from pemlang.diagnostics import Diagnostic, PemError, render
from pemlang.lower import lower
from pemlang.parser import parse_program
from pemlang.plan import format_plan
from pemlang.source import Source
from pemlang.sourcefiles import decode_source

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
EXAMPLE_TEXTS = sorted(p.read_text(encoding="utf-8") for p in EXAMPLES.glob("*.pem"))

LORA = ["theta1", "theta2", "instruct", "toxic", "amazon_cls"]
IA3 = ["ia3_theta1", "ia3_theta2"]
HEADER = "".join(f'input {name} = "adapters/{name}"\n' for name in LORA + IA3)


def fuzz_settings(examples: int):  # type: ignore[no-untyped-def]
    return settings(max_examples=examples, deadline=None, derandomize=True, database=None,
                    suppress_health_check=list(HealthCheck))


class Front:
    """Runs one program through every stage a user's program meets before tensors are read."""

    def __init__(self, root: Path):
        self.base_dir = root / "examples"
        self.read = AdapterCache()
        self.count = 0
        self.accepted = 0
        self.printed: set[tuple[str, tuple[tuple[str, float], ...]]] = set()

    def source(self, source: Source) -> None:
        self.count += 1
        try:
            program, syntax = parse_program(source)
            checked = check_parsed(source, program, syntax, base_dir=self.base_dir, read=self.read,
                                   writes=False)
            for diagnostic in checked.diagnostics:
                self._well_formed(diagnostic, source)
            if checked.ok:
                self.accepted += 1
                plan = lower(checked)
                # Printing is slow (rich tables): print each distinct accepted program once.
                key = (ast.format_program(program), tuple(sorted(checked.params.items())))
                if key not in self.printed:
                    self.printed.add(key)
                    format_plan(plan, Console(file=io.StringIO(), width=160))
        except Exception as exc:  # noqa: BLE001 - any exception is the failure being looked for
            pytest.fail(f"internal error {type(exc).__name__}: {exc}\nprogram:\n{source.text!r}")

    def text(self, text: str) -> None:
        self.source(Source(text, "fuzz.pem"))

    def file(self, data: bytes, filename: str = "mutant.pem") -> None:
        try:
            source = decode_source(data, filename)
        except PemError as exc:
            self.count += 1
            for diagnostic in exc.diagnostics:
                assert diagnostic.code == "E001"
                render(diagnostic)
            return
        self.source(source)

    @staticmethod
    def _well_formed(diagnostic: Diagnostic, source: Source) -> None:
        rendered = render(diagnostic)
        assert rendered.startswith(("error[", "warning[")), rendered
        if diagnostic.span is not None and diagnostic.source is source:
            assert 0 <= diagnostic.span.start <= diagnostic.span.end <= len(source.text), rendered


@pytest.fixture(scope="module")
def front(example_root: Path) -> Front:
    return Front(example_root)


# -- programs from the grammar ------------------------------------------------------------------

NAMES = st.one_of(st.sampled_from(["theta1", "theta2", "instruct", "toxic"]),
                  st.sampled_from(LORA + IA3 + ["λ", "θ_tox", "x", "y", "undefined", "svd", "Λ2", "名前", "rank"]))
NUMBERS = st.one_of(
    st.sampled_from(["0", "1", "2", "0.5", ".5", "2.", "1e-3", "1e400", "1e-400", "1e-320", "1e39",
                     "3.4028235e38", "3.5e38", "1e308", "0.0", "123456789012345678901234567890", "00"]),
    st.floats(allow_nan=False, allow_infinity=False).map(lambda x: repr(abs(x))),
    st.integers(0, 10**30).map(str),
)
PLUS = st.sampled_from(["+", "⊕"])
MINUS = st.sampled_from(["-", "⊖", "−"])
TIMES = st.sampled_from(["*", "·", "×"])
DIVIDE = st.sampled_from(["/", "÷"])
OPERATORS = st.one_of(PLUS, MINUS, TIMES, DIVIDE)
SPACE = st.sampled_from(["", " ", "  ", "\t", " # comment\n  "])


def _call(parts: tuple[str, list[str], list[tuple[str, str]]]) -> str:
    function, args, kwargs = parts
    return f"{function}({', '.join(args + [f'{k}={v}' for k, v in kwargs])})"


EXPRESSIONS = st.recursive(
    st.one_of(NAMES, NUMBERS),
    lambda inner: st.one_of(
        st.tuples(inner, SPACE, OPERATORS, SPACE, inner).map("".join),
        st.tuples(MINUS, inner).map("".join),
        inner.map(lambda e: f"({e})"),
        st.tuples(st.sampled_from(["svd", "svd", "prune", "theta1"]), st.lists(inner, max_size=2),
                  st.lists(st.tuples(st.sampled_from(["rank", "rank", "r", "rank"]),
                                     st.one_of(NUMBERS, st.sampled_from(["-1", "1.5", "0", "theta1", "1e400"]),
                                               inner)),
                           max_size=2)).map(_call),
    ),
    max_leaves=10,
)
PATHS = st.one_of(st.sampled_from(LORA + IA3).map(lambda n: f"adapters/{n}"),
                  st.sampled_from(["adapters", "nowhere", "", "adapters/theta1/adapter_config.json",
                                   "x\\\\y", "/proc/self/x", "fuzz.pem/x", "adapters/base"]),
                  st.text(st.characters(blacklist_characters='"\\\n'), max_size=12).map(lambda t: f"out/{t}"))
# Mostly-valid linear combinations, so that many programs reach lowering and the plan printer.
TERMS = st.tuples(st.sampled_from(["0.5", "2", "1e-3", ".25", "λ", "(1 - λ)", "3e38", "0"]), TIMES,
                  st.sampled_from(["theta1", "theta2", "instruct", "toxic", "svd(theta1, rank=2)",
                                   "svd(theta1 - theta2, rank=1)"])).map("".join)
COMBINATIONS = st.tuples(TERMS, st.lists(st.tuples(st.one_of(PLUS, MINUS), TERMS).map(" ".join), max_size=4)).map(
    lambda t: " ".join([t[0], *t[1]]))
STATEMENTS = st.one_of(
    st.tuples(COMBINATIONS, st.integers(0, 3)).map(lambda t: f'output {t[0]} -> "out/o{t[1]}"'),
    st.tuples(COMBINATIONS, st.sampled_from(["x", "y", "θ_tox"])).map(lambda t: f"{t[1]} = {t[0]}"),
    st.tuples(NAMES, EXPRESSIONS).map(lambda t: f"{t[0]} = {t[1]}"),
    st.tuples(NAMES, EXPRESSIONS).map(lambda t: f"param {t[0]} = {t[1]}"),
    st.tuples(NAMES, PATHS).map(lambda t: f'input {t[0]} = "{t[1]}"'),
    st.tuples(EXPRESSIONS, PATHS).map(lambda t: f'output {t[0]} -> "{t[1]}"'),
    st.sampled_from(["mode paper", "mode exact", "mode fast", "heads drop", "heads mix", "heads from amazon_cls",
                     "heads from theta1", "heads from nobody", "# just a comment", ""]),
    EXPRESSIONS,
)
STRAY = st.sampled_from(["$", "'", '"', "(", ")", ",", "=", "->", "\\", "\r", "\x00", "\ufeff", "é", "🙂", "\n"])


@st.composite
def grammar_programs(draw: st.DrawFn) -> str:
    lines = draw(st.lists(STATEMENTS, max_size=4))
    if draw(st.booleans()):
        lines.insert(0, f"param λ = {draw(NUMBERS)}")
    mode = draw(st.sampled_from(["mode exact\n", "mode exact\n", "mode paper\n", ""]))
    text = mode + (HEADER if draw(st.integers(0, 4)) else "") + "\n".join(lines) + "\n"
    for _ in range(draw(st.sampled_from([0, 0, 0, 1, 2]))):
        at = draw(st.integers(0, len(text)))
        text = text[:at] + draw(STRAY) + text[at:]
    return text


GRAMMAR_PROGRAMS = 2850


def test_programs_from_the_grammar_give_only_diagnostics(front: Front) -> None:
    before = front.count

    @fuzz_settings(GRAMMAR_PROGRAMS)
    @given(grammar_programs())
    def one(text: str) -> None:
        front.text(text)

    one()
    ran = front.count - before
    print(f"\n{ran} programs from the grammar, {front.accepted} accepted so far")
    assert ran >= GRAMMAR_PROGRAMS


# -- mutations of the examples -------------------------------------------------------------------

TOKENS = [b"+", b"-", b"*", b"/", b"(", b")", b"svd(", b", rank=", b"1e400", b"\xe2\x8a\x95", b"\xc3", b"\xff",
          b"\x00", b"\n", b"\r", b"#", b'"', b"output ", b"input ", b"param ", b"mode exact\n", b"heads drop\n",
          b"theta1", b"\xce\xbb"]


def mutate(rng: random.Random, text: str) -> bytes:
    """`text` with 1-4 bytes flipped, ranges deleted or duplicated, or tokens inserted."""
    data = bytearray(text.encode("utf-8"))
    for _ in range(rng.randint(1, 4)):
        at = rng.randint(0, len(data))
        kind = rng.choice(["flip", "delete", "duplicate", "insert"])
        if kind == "flip" and at < len(data):
            data[at] ^= 1 << rng.randint(0, 7)
        elif kind == "delete":
            del data[at : at + rng.randint(1, 8)]
        elif kind == "duplicate":
            data[at:at] = data[at : at + rng.randint(1, 40)]
        else:
            data[at:at] = rng.choice(TOKENS)
    return bytes(data)


MUTANTS = 7000


def test_mutated_examples_give_only_diagnostics(front: Front) -> None:
    # Plain seeded mutations (hypothesis's per-example overhead would dominate here): deterministic.
    rng = random.Random(8)
    before = front.count
    for _ in range(MUTANTS):
        front.file(mutate(rng, rng.choice(EXAMPLE_TEXTS)))  # the bytes of a file, as read_source decodes them
    ran = front.count - before
    print(f"\n{ran} mutated examples, {front.accepted} accepted so far")
    assert ran == MUTANTS


# -- depth and size ------------------------------------------------------------------------------

WRAPPERS = ["(", "-(", "svd(", "theta1 + (", "2*(", "⊖("]


@st.composite
def deep_programs(draw: st.DrawFn) -> str:
    depth = draw(st.integers(150, 450))
    rng = random.Random(draw(st.integers(0, 2**32)))  # one draw, not one per level: hypothesis is slow
    wrappers = [rng.choice(WRAPPERS) for _ in range(depth)]
    closers = "".join(", rank=2)" if w == "svd(" else ")" for w in reversed(wrappers))
    deep = "".join(wrappers) + "theta2" + closers
    chain = draw(st.sampled_from([" + ", " - ", " ⊕ ", "*1 + "])).join(
        ["theta1", "theta2"] * draw(st.integers(1, 600)))
    number = draw(NUMBERS)
    body = draw(st.sampled_from([f"output {deep} -> \"out/deep\"",
                                 f"output {number}*({chain}) -> \"out/chain\"",
                                 f"param p = {' + '.join([number] * draw(st.integers(1, 1500)))}\n"
                                 "output p*theta1 -> \"out/p\"",
                                 f"output {'-' * depth}theta1 -> \"out/neg\""]))
    return f"mode {draw(st.sampled_from(['paper', 'exact']))}\n{HEADER}{body}\n"


DEEP_PROGRAMS = 150


def test_deep_and_huge_programs_give_only_diagnostics(front: Front) -> None:
    before = front.count

    @fuzz_settings(DEEP_PROGRAMS)
    @given(deep_programs())
    def one(text: str) -> None:
        front.text(text)

    one()
    ran = front.count - before
    print(f"\n{ran} deep or huge programs, {front.accepted} accepted so far")
    assert ran >= DEEP_PROGRAMS
