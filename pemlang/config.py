"""Programs embedded in configs (see 'Configs' in the README): a pydantic model, and its reading from YAML, JSON or TOML.

A training or serving config carries a block such as

    merge:
      inputs: {amazon_cls: adapters/amazon_cls, yelp_lm: adapters/yelp_lm, amazon_lm: adapters/amazon_lm}
      params: {λ: 0.5}
      heads: from amazon_cls
      expression: λ*amazon_cls + (1 - λ)*(yelp_lm - amazon_lm)
      output: out/yelp_cls

(`pemlang run train.yaml --key merge`). Instead of `expression` + `output`, a block may give
`outputs` (a list of {expression, path}) or `program` (the text of a .pem program; `params` then
override its params as `--set` does). Paths are relative to the config file.

Every diagnostic names the config file and the line of the offending field: validation errors
point at the field, and the expression or program text, parsed as its own source, is mapped back
onto the lines of the file where it is written.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, BeforeValidator, ConfigDict, Field, FiniteFloat, ValidationError
from pydantic_core import PydanticCustomError

from .backend import DEVICE_FORMS, DEVICE_PATTERN, device_problem
from .check import KEYWORDS, NAME_PATTERN
from .diagnostics import Diagnostic, PemError, error
from .source import CONFIG_SUFFIXES, Source, Span
from .sourcefiles import read_source

SCHEMA_PATH = Path(__file__).with_name("config.schema.json")

Key = tuple[str | int, ...]


def _not_a_boolean(value: Any) -> Any:
    """pydantic reads true/false as 1/0 where a float is expected; YAML reads yes/no/on/off as booleans too.
    A number field refuses them."""
    if isinstance(value, bool):
        raise PydanticCustomError("bool_not_number", "expected a number, got a boolean")
    return value


# A number in a config: finite, and never a boolean (`λ: yes` is not λ = 1).
Number = Annotated[FiniteFloat, BeforeValidator(_not_a_boolean)]


def _device_index(value: str | None) -> str | None:
    """A `device:` of the pattern's form whose index no GPU can have (cuda:2147483648) is refused."""
    problem = device_problem(value) if value is not None else None
    if problem is not None:
        raise PydanticCustomError("device_index", problem.replace("{", "{{").replace("}", "}}"))
    return value


class OutputSpec(BaseModel):
    """One output of a config: an expression and the adapter directory it is written to."""

    model_config = ConfigDict(extra="forbid")

    expression: str = Field(description="an expression over the inputs, params and functions, as in a .pem program "
                            "(see 'A program' in the README)")
    path: str = Field(description="the output adapter directory, relative to the config file")
    into: str | None = Field(None, min_length=1, description="a base model directory (or hf://ORG/NAME[@REV]) to "
                             "merge the output into: `path` is then a full model (see 'Merging into the base "
                             "model' in the README)")


class PemConfig(BaseModel):
    """A pemlang program as a config block (see 'Configs' in the README). Give exactly one of
    `expression`, `outputs` or `program`."""

    model_config = ConfigDict(extra="forbid", title="pemlang config")

    mode: Literal["paper", "exact"] = Field("paper", description="paper: the paper's operators; exact: the weight update "
                                            "itself (see 'Two meanings of `+`' in the README)")
    inputs: dict[str, str] = Field(default_factory=dict,
                                   description="name → PEFT adapter directory, relative to the config file")
    bases: dict[str, str] = Field(default_factory=dict,
                                  description="input name → the base model it was trained on, when its config records "
                                              "another name for the same model (like `input x = \"dir\" base \"org/name\"`)")
    params: dict[str, Number] = Field(default_factory=dict,
                                     description="name → value; with `program`, overrides its params")
    heads: str | None = Field(None, pattern=r"^\s*(drop|from\s+\S+)\s*$",
                              description="modules_to_save policy: `drop` or `from NAME` "
                                          "(see 'Two meanings of `+`' in the README)")
    expression: str | None = Field(None, description="one expression (with `output`, or evaluated via the API)")
    output: str | None = Field(None, description="the directory `expression` is written to")
    into: str | None = Field(None, min_length=1, description="with `output`: a base model directory (or "
                             "hf://ORG/NAME[@REV]) to merge `expression` into, `output` then a full model (see "
                             "'Merging into the base model' in the README)")
    outputs: list[OutputSpec] | None = Field(None, description="several outputs: [{expression, path[, into]}]")
    program: str | None = Field(None, description="the text of a .pem program")
    device: Annotated[str | None, AfterValidator(_device_index)] = Field(
        None, pattern=DEVICE_PATTERN, description="auto, cpu, cuda or cuda:N (default auto)")
    dtype: Literal["float32", "float16", "bfloat16"] | None = Field(
        None, description="dtype to write; default: the inputs' dtype")
    max_rank: Annotated[int, Field(ge=1), BeforeValidator(_not_a_boolean)] | None = Field(
        None, description="refuse an output whose rank is above this at any layer (a serving stack's limit, "
                                "e.g. vLLM's max_lora_rank); `svd(x, rank=R)` or `svd(x, energy=e, max_rank=N)` "
                                "fits an output under it")


DTYPES = {"float32": "F32", "float16": "F16", "bfloat16": "BF16"}  # config names → safetensors names


def json_schema() -> dict[str, Any]:
    """The published JSON schema of a config block (committed as pemlang/config.schema.json)."""
    schema = PemConfig.model_json_schema()
    schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
    return schema


def schema_text() -> str:
    return json.dumps(json_schema(), indent=2, ensure_ascii=False, sort_keys=True) + "\n"


# -- where things are in the file --------------------------------------------------------------------


@dataclass
class Located:
    """A config block read from a file, with the file's text and where each field is written."""

    config: PemConfig
    host: Source
    base_dir: Path
    prefix: Key = ()
    spans: dict[Key, tuple[Span, Span]] = field(default_factory=dict)  # path → (key span, value span)

    def key_span(self, path: Key) -> Span | None:
        """The span of a field's key (or of its nearest located parent)."""
        for n in range(len(path), -1, -1):
            hit = self.spans.get(self.prefix + path[:n])
            if hit is not None:
                return hit[0]
        return None

    def value_span(self, path: Key) -> Span | None:
        hit = self.spans.get(self.prefix + path)
        return hit[1] if hit is not None else self.key_span(path)

    def embed(self, path: Key, text: str, name: str, *, key: bool = False) -> Embedded:
        """A Source for a string field's text (or its key's) whose spans map back onto the file's lines."""
        return Embedded.of(text, self.host, self.key_span(path) if key else self.value_span(path), name)


@dataclass
class Embedded:
    """Text found in a host file: a Source of its own, and the host offset of each of its lines."""

    source: Source
    host: Source
    line_starts: list[int | None]
    fallback: Span | None

    @classmethod
    def of(cls, text: str, host: Source, where: Span | None, name: str) -> Embedded:
        starts: list[int | None] = []
        if where is not None:
            cursor, end = where.start, where.end
            for line in text.split("\n"):
                found = host.text.find(line, cursor, end) if line else cursor
                if found < 0 or "\n" in host.text[cursor:found].strip(" \t|>-\"'\r\n") and starts:
                    found = -1
                starts.append(found if found >= 0 else None)
                if found >= 0:
                    cursor = found + len(line)
        return cls(Source(text, name), host, starts, where)

    def offset(self, offset: int) -> int | None:
        before = self.source.text[:offset]
        line = before.count("\n")
        column = offset - (before.rfind("\n") + 1)
        start = self.line_starts[line] if line < len(self.line_starts) else None
        return None if start is None else start + column

    def span(self, span: Span) -> Span | None:
        start, end = self.offset(span.start), self.offset(span.end)
        if start is None:
            return self.fallback
        if end is None or end < start:
            end = start + 1
        return Span(start, end)


def relocate(diagnostics: Iterable[Diagnostic], embedded: Sequence[Embedded], host: Source) -> list[Diagnostic]:
    """Diagnostics about embedded texts, re-pointed at the host file; sorted by position."""
    out = []
    for d in diagnostics:
        for e in embedded:
            if d.source is e.source:
                d = replace(d, source=host, span=e.span(d.span) if d.span is not None else e.fallback)
                break
        out.append(d)
    return sorted(out, key=lambda d: (d.source is not host, d.span.start if d.span else 0))


def _yaml_spans(text: str) -> dict[Key, tuple[Span, Span]]:
    """Spans of every mapping key and sequence item, from PyYAML's composer (JSON is YAML too)."""
    import yaml

    spans: dict[Key, tuple[Span, Span]] = {}

    def walk(node: Any, path: Key) -> None:
        if isinstance(node, yaml.MappingNode):
            for key, value in node.value:
                child = (*path, str(key.value))
                spans[child] = (Span(key.start_mark.index, key.end_mark.index), _node_span(value))
                walk(value, child)
        elif isinstance(node, yaml.SequenceNode):
            for i, item in enumerate(node.value):
                spans[(*path, i)] = (_node_span(item), _node_span(item))
                walk(item, (*path, i))

    def _node_span(node: Any) -> Span:
        return Span(node.start_mark.index, max(node.end_mark.index, node.start_mark.index + 1))

    try:
        root = yaml.compose(text, Loader=_yaml_loader())
    except (yaml.YAMLError, ConfigProblem):
        return spans
    if root is not None:
        walk(root, ())
    return spans


_TOML_KEY = r'(?:[A-Za-z0-9_-]+|"(?:[^"\\]|\\.)*"|\'[^\']*\')'
_TOML_KEYS = re.compile(rf"\s*({_TOML_KEY}(?:\s*\.\s*{_TOML_KEY})*)\s*=\s*")
_TOML_TABLE = re.compile(rf"\s*(\[\[?)\s*({_TOML_KEY}(?:\s*\.\s*{_TOML_KEY})*)\s*\]\]?")


def _toml_key_parts(text: str) -> list[str]:
    parts = re.findall(_TOML_KEY, text)
    return [p[1:-1] if p[:1] in "\"'" else p for p in parts]


def _toml_value_end(text: str, start: int) -> int:
    """Where the TOML value starting at `start` ends (strings, arrays and inline tables spanned)."""
    for quote in ('"""', "'''"):
        if text.startswith(quote, start):
            end = text.find(quote, start + 3)
            return len(text) if end < 0 else end + 3
    if text[start:start + 1] in ('"', "'"):
        quote, i = text[start], start + 1
        while i < len(text) and text[i] not in (quote, "\n"):
            i += 2 if quote == '"' and text[i] == "\\" else 1
        return min(i + 1, len(text))
    if text[start:start + 1] in ("[", "{"):
        depth, i = 0, start
        while i < len(text):
            ch = text[i]
            if ch in "\"'":
                i = _toml_value_end(text, i)
                continue
            depth += ch in "[{"
            depth -= ch in "]}"
            i += 1
            if depth == 0:
                return i
        return len(text)
    end = text.find("\n", start)
    end = len(text) if end < 0 else end
    comment = text.find("#", start, end)
    return (comment if comment >= 0 else end) if text[start:end].strip() else start + 1


def _toml_spans(text: str) -> dict[Key, tuple[Span, Span]]:
    """Spans of TOML tables and keys, found by scanning the text (tomllib keeps no positions)."""
    spans: dict[Key, tuple[Span, Span]] = {}
    arrays: dict[Key, int] = {}

    def scan(start: int, end: int, table: Key, inline: bool) -> None:
        i = start
        while i < end:
            ch = text[i]
            if ch in " \t\r\n,":
                i += 1
            elif ch == "#":
                newline = text.find("\n", i, end)
                i = end if newline < 0 else newline
            elif (not inline and ch == "[" and (m := _TOML_TABLE.match(text, i))
                  and text[text.rfind("\n", 0, i) + 1:i].strip() == ""):
                path: Key = tuple(_toml_key_parts(m.group(2)))
                if m.group(1) == "[[":
                    index = arrays.get(path, -1) + 1
                    arrays[path] = index
                    spans.setdefault(path, (Span(m.start(2), m.end(2)), Span(m.start(2), m.end(2))))
                    path = (*path, index)
                spans[path] = (Span(m.start(2), m.end(2)), Span(m.start(2), m.end()))
                table = path
                i = m.end()
            elif m := _TOML_KEYS.match(text, i):
                path = (*table, *_toml_key_parts(m.group(1)))
                value_end = _toml_value_end(text, m.end())
                spans[path] = (Span(m.start(1), m.end(1)), Span(m.end(), value_end))
                if text[m.end():m.end() + 1] == "{":
                    scan(m.end() + 1, value_end - 1, path, True)
                i = value_end
            else:
                i += 1

    scan(0, len(text), (), False)
    return spans


# -- reading ----------------------------------------------------------------------------------------

MAX_DEPTH = 100  # nesting levels of a config file; a pemlang block needs four
MAX_NODES = 100_000  # values in a YAML document once its aliases are expanded


class ConfigProblem(Exception):
    """A config file refused while it is read, at a character offset, with a hint."""

    def __init__(self, message: str, offset: int, hint: str, end: int | None = None):
        super().__init__(message)
        self.message, self.offset, self.hint = message, offset, hint
        self.end = max(end if end is not None else offset + 1, offset + 1)


class TooComplex(ConfigProblem):
    """A config nested too deeply, or whose aliases expand too far, found before it is expanded."""


class DuplicateKey(ConfigProblem):
    """A key written twice in one mapping (YAML and JSON parsers keep the last silently)."""

    def __init__(self, key: object, offset: int, end: int):
        shown = f"`{key}`" if isinstance(key, str) and key.isprintable() else repr(key)
        super().__init__(f"the key {shown} is given twice in the same mapping", offset,
                         "remove one of them: which one wins would be a parser's accident", end)


_JSON_KEY_TOKENS = re.compile(r'("(?:[^"\\]|\\.)*")(\s*:)?|[\[\]{}]')


def _json_duplicate_key(text: str) -> DuplicateKey | None:
    """The second occurrence of a key in one JSON object of a valid JSON text, found by scanning tokens
    (no recursion; keys compared once their escapes are decoded)."""
    stack: list[set[str] | None] = []
    for m in _JSON_KEY_TOKENS.finditer(text):
        token = m.group()
        if token in ("{", "["):
            stack.append(set() if token == "{" else None)
        elif token in ("}", "]"):
            if stack:
                stack.pop()
        elif m.group(2) is not None and stack and (keys := stack[-1]) is not None:
            key = json.loads(m.group(1))
            if key in keys:
                return DuplicateKey(key, m.start(), m.end(1))
            keys.add(key)
    return None


def _json_pairs(duplicates: list[bool]) -> Callable[[list[tuple[str, Any]]], dict[str, Any]]:
    """An object_pairs_hook that notes whether any object repeats a key."""
    def pairs(items: list[tuple[str, Any]]) -> dict[str, Any]:
        made = dict(items)
        if len(made) != len(items):
            duplicates.append(True)
        return made
    return pairs


_DEEP_HINT = f"a pemlang block needs a few levels; configs nested deeper than {MAX_DEPTH} are refused"


def _check_depth(text: str) -> None:
    """JSON and TOML: refuse nesting deeper than MAX_DEPTH before a recursive parser meets it."""
    depth = 0
    tokens = re.compile(r'"""[\s\S]*?"""|\'\'\'[\s\S]*?\'\'\'|"(?:[^"\\\n]|\\.)*"|\'[^\'\n]*\'|#[^\n]*|[\[\]{}]')
    for m in tokens.finditer(text):
        bracket = m.group()
        if bracket in ("[", "{"):
            depth += 1
            if depth > MAX_DEPTH:
                raise TooComplex(f"the config is nested deeper than {MAX_DEPTH} levels", m.start(), _DEEP_HINT)
        elif bracket in ("]", "}"):
            depth = max(depth - 1, 0)


def _yaml_loader():  # type: ignore[no-untyped-def]
    """A SafeLoader that counts, while composing, how deep the document nests and how many values its
    aliases would expand to, and refuses either beyond its limit at the node or alias that crosses it
    (an alias bomb is refused before anything is expanded)."""
    import yaml

    class ConfigLoader(yaml.SafeLoader):
        def __init__(self, stream: str):
            super().__init__(stream)
            self.depth = 0
            self.expanded = 0  # values composed so far, an alias counting as the values it stands for
            self.sizes: dict[int, int] = {}

        def compose_mapping_node(self, anchor):  # type: ignore[no-untyped-def]
            node = super().compose_mapping_node(anchor)
            seen: set[Any] = set()
            for key, _ in node.value:  # as written: merge keys (`<<`) may be overridden, and are skipped
                if not isinstance(key, yaml.ScalarNode) or key.tag == "tag:yaml.org,2002:merge":
                    continue
                try:
                    value = (key.tag, self.construct_object(key))  # `1` and `01` are the same int
                except (yaml.YAMLError, TypeError, ValueError):
                    value = (key.tag, key.value)
                try:
                    if value in seen:
                        raise DuplicateKey(value[1], key.start_mark.index, key.end_mark.index)
                    seen.add(value)
                except TypeError:  # an unhashable key: PyYAML refuses it when constructing
                    continue
            return node

        def compose_node(self, parent, index):  # type: ignore[no-untyped-def]
            event = self.peek_event()
            if isinstance(event, yaml.AliasEvent):
                target = self.anchors.get(event.anchor)
                self.expanded += self.sizes.get(id(target), 1)
                if self.expanded > MAX_NODES:
                    raise TooComplex(f"aliases would expand the config to more than {MAX_NODES:,} values",
                                     event.start_mark.index,
                                     "write the values out, or alias fewer of them; pemlang refuses alias bombs")
                return super().compose_node(parent, index)
            self.depth += 1
            if self.depth > MAX_DEPTH:
                raise TooComplex(f"the config is nested deeper than {MAX_DEPTH} levels", event.start_mark.index,
                                 _DEEP_HINT)
            before = self.expanded
            try:
                node = super().compose_node(parent, index)
            finally:
                self.depth -= 1
            self.expanded += 1
            if self.expanded > MAX_NODES:
                raise TooComplex(f"the config has more than {MAX_NODES:,} values", event.start_mark.index,
                                 "give pemlang its block alone, or a smaller config")
            self.sizes[id(node)] = self.expanded - before
            return node

    return ConfigLoader



_BODY = {"expression", "outputs", "program"}


def is_config_path(path: str | Path) -> bool:
    return Path(path).suffix.lower() in CONFIG_SUFFIXES


def _at(host: Source, span: Span | None, message: str, *, notes: Iterable[str] = (),
        hints: Iterable[str] = ()) -> Diagnostic:
    return error("E025", message, host, span, notes=notes, hints=hints)


def read_config(path: str | Path, *, key: str | None = None, text: str | None = None) -> Located:
    """Read a config file (YAML, JSON, TOML) and validate its pemlang block; `key` is the dotted
    path of the block inside a larger config; `text`, the file's text when already read.
    Raises PemError (E025) with located diagnostics."""
    path = Path(path)
    text = read_source(path).text if text is None else text
    host = Source(text, str(path))
    suffix = path.suffix.lower()
    data: Any
    try:
        if suffix in (".toml", ".json"):
            _check_depth(text)
        if suffix == ".toml":
            try:
                import tomllib
            except ModuleNotFoundError:  # Python 3.10
                import tomli as tomllib  # type: ignore[no-redef]

            data = tomllib.loads(text)
        elif suffix == ".json":
            duplicates: list[bool] = []
            data = json.loads(text, object_pairs_hook=_json_pairs(duplicates))
            if duplicates and (duplicate := _json_duplicate_key(text)) is not None:
                raise duplicate
        else:
            import yaml

            data = yaml.load(text, Loader=_yaml_loader())  # a SafeLoader
    except ConfigProblem as exc:
        raise PemError([_at(host, Span(exc.offset, exc.end), exc.message, hints=[exc.hint])]) from None
    except Exception as exc:  # the parsers' own errors carry a line and column
        raise PemError([_parse_error(host, exc, suffix)]) from None
    spans = _toml_spans(text) if suffix == ".toml" else _yaml_spans(text)
    prefix: Key = ()
    if key:
        for part in key.split("."):
            if not isinstance(data, Mapping) or part not in data:
                where = Located(PemConfig(), host, path.parent, (), spans).key_span(prefix)
                have = ", ".join(map(str, data)) if isinstance(data, Mapping) else type(data).__name__
                raise PemError([_at(host, where, f"the config has no key `{'.'.join(map(str, (*prefix, part)))}`",
                                    notes=[f"{'.'.join(map(str, prefix)) or 'the top level'} has: {have or 'nothing'}"],
                                    hints=["--key names the pemlang block as a dotted path, e.g. `--key train.merge`"])])
            data, prefix = data[part], (*prefix, part)
    if not isinstance(data, Mapping):
        raise PemError([_at(host, spans.get(prefix, (None, None))[1], "a pemlang config block must be a mapping",
                            hints=["give inputs, params and an expression, outputs or program"])])
    try:
        config = PemConfig.model_validate(data)
    except ValidationError as exc:
        located = Located(PemConfig(), host, path.parent, prefix, spans)
        diagnostics = [_validation_diagnostic(located, e) for e in exc.errors()]
        nested = [k for k, v in data.items() if isinstance(v, Mapping) and not set(v).isdisjoint(_BODY)]
        if "peft_type" in data and set(data).isdisjoint(_BODY):  # an adapter's own adapter_config.json
            where = path.parent if path.name == "adapter_config.json" else path
            diagnostics = [_at(host, located.key_span(("peft_type",)), "this is a PEFT adapter's config, not a "
                               "pemlang config", hints=[f"`pemlang inspect {where}` shows the adapter; a pemlang "
                                                        "config names adapters under `inputs:` and says how to "
                                                        "combine them (`expression:` or `program:`)"])]
        elif nested and set(data).isdisjoint(_BODY):  # the block is one level down: say where
            block = ".".join(map(str, (*prefix, nested[0])))
            diagnostics = [_at(host, located.key_span((nested[0],)), f"the pemlang block is under `{block}`, not at "
                               f"{'`' + '.'.join(map(str, prefix)) + '`' if prefix else 'the top level'}",
                               hints=[f"pass --key {block} (the API: key=\"{block}\")"])]
        raise PemError(sorted(diagnostics, key=lambda d: d.span.start if d.span else -1)) from None
    located = Located(config, host, path.parent, prefix, spans)
    problems = structure_problems(config, located)
    if problems:
        raise PemError(problems)
    return located


def _parse_error(host: Source, exc: Exception, suffix: str) -> Diagnostic:
    line = getattr(getattr(exc, "problem_mark", None), "line", None)  # yaml: 0-based marks
    column = getattr(getattr(exc, "problem_mark", None), "column", None)
    if line is None and hasattr(exc, "lineno"):  # json.JSONDecodeError, tomllib.TOMLDecodeError (3.14)
        line, column = exc.lineno - 1, getattr(exc, "colno", 1) - 1
    if line is None and (m := re.search(r"line (\d+), column (\d+)", str(exc))):  # tomllib ≤ 3.13
        line, column = int(m.group(1)) - 1, int(m.group(2)) - 1
    span = None
    if line is not None and line < len(host._line_starts):
        start = host._line_starts[line] + (column or 0)
        span = Span(start, start + 1)
    message = getattr(exc, "problem", None) or getattr(exc, "msg", None) or str(exc).split(" (at line")[0]
    kind = {".toml": "TOML", ".json": "JSON"}.get(suffix, "YAML")
    return _at(host, span, f"the config is not valid {kind}: {message}")


def _validation_diagnostic(located: Located, e: Mapping[str, Any]) -> Diagnostic:
    loc = tuple(e["loc"])
    where = ".".join(map(str, loc)) or "the block"
    kind = e["type"]
    hints: list[str] = []
    if kind == "extra_forbidden":
        from .check import did_you_mean

        hints = did_you_mean(str(loc[-1]), list(PemConfig.model_fields if len(loc) == 1 else OutputSpec.model_fields))
        hints = hints or [f"a config block has: {', '.join(PemConfig.model_fields)}"]
        return _at(located.host, located.key_span(loc), f"unknown field `{where}`", hints=hints)
    if kind == "missing":
        return _at(located.host, located.key_span(loc[:-1]), f"missing field `{where}`")
    if kind == "string_pattern_mismatch" and loc == ("heads",):
        return _at(located.host, located.value_span(loc), "`heads` must be `drop` or `from NAME`",
                   notes=[f"got {e.get('input')!r}"], hints=["`heads: drop` or `heads: from amazon_cls`"])
    if kind == "string_pattern_mismatch" and loc == ("device",):
        return _at(located.host, located.value_span(loc), f"`device` must be one of {DEVICE_FORMS}",
                   notes=[f"got {e.get('input')!r}"], hints=["`device: cpu`, or `device: cuda:1` for the second GPU"])
    if kind == "device_index":
        return _at(located.host, located.value_span(loc), f"`device`: {e['msg']}",
                   hints=["`device: cpu`, or `device: cuda:1` for the second GPU"])
    if kind == "bool_not_number":
        yaml_words = located.host.filename.lower().endswith((".yaml", ".yml"))
        return _at(located.host, located.value_span(loc), f"`{where}`: expected a number, got a boolean",
                   notes=[f"got {e.get('input')!r}" + (" (YAML reads yes/no/on/off/true/false as booleans)"
                                                       if yaml_words else "")],
                   hints=["write the number itself, e.g. `1` or `0.5`"])
    if kind == "finite_number":
        return _at(located.host, located.value_span(loc), f"`{where}` must be a finite number",
                   notes=[f"got {e.get('input')!r}"], hints=["e.g. `0.5`; infinities and NaN are not parameters"])
    if kind == "literal_error" and loc == ("mode",):
        hints = ["`mode: paper` (the paper's operators) or `mode: exact` (the weight update)"]
    message = e["msg"][:1].lower() + e["msg"][1:]
    got = e.get("input")
    notes = [f"got {got!r}"] if got is not None and not isinstance(got, dict | list) else []
    return _at(located.host, located.value_span(loc), f"`{where}`: {message}", notes=notes, hints=hints)


def structure_problems(config: PemConfig, located: Located | None = None) -> list[Diagnostic]:
    """What pydantic's field types cannot say: which fields go together."""
    host = located.host if located else None

    def at(path: Key, message: str, hints: Iterable[str] = ()) -> Diagnostic:
        return error("E025", message, host, located.key_span(path) if located else None, hints=hints)

    given = [name for name in ("expression", "outputs", "program") if getattr(config, name) is not None]
    problems = []
    if len(given) != 1:
        problems.append(at((given[1],) if len(given) > 1 else (), "a config block needs exactly one of "
                           f"`expression`, `outputs` or `program`{f', not {len(given)}' if given else ''}",
                           hints=["`expression` + `output` for one output; `outputs: [{expression, path}]` for "
                                  "several; `program` for a whole .pem program"]))
    if config.output is not None and config.expression is None:
        problems.append(at(("output",), "`output` goes with `expression`",
                           hints=["with `outputs` or `program`, each output names its own directory"]))
    if config.into is not None and config.output is None:
        problems.append(at(("into",), "`into` goes with `expression` and `output`",
                           hints=["`outputs` entries take their own `into`; a `program` writes "
                                  "`output x into \"BASE\" -> \"DIR\"`"]))
    if config.program is not None and config.heads is not None:
        problems.append(at(("heads",), "`heads` goes in the program text with `program`",
                           hints=["write `heads drop` or `heads from NAME` as a statement of the program"]))
    for name in config.bases:
        if name not in config.inputs:
            problems.append(at(("bases", name), f"`bases` names `{name}`, which is not an input",
                               hints=[f"the inputs: {', '.join(config.inputs) or 'none'}"]))
    if config.program is not None and config.bases:
        problems.append(at(("bases",), "`bases` goes with `inputs`; with `program`, write the base in the program",
                           hints=['input x = "dir" base "org/name"']))
    for field_name, what in (("inputs", "an input"), ("params", "a param")):
        for name in getattr(config, field_name):
            if not re.fullmatch(NAME_PATTERN, name) or name in KEYWORDS:
                shown = f"`{name}`" if name.isprintable() else repr(name)
                problems.append(at((field_name, name), f"{shown} cannot be {what} name",
                                   hints=["a name is a letter or _ followed by letters, digits or _ (e.g. `yelp_lm`)"]))
    return problems


# -- checking ----------------------------------------------------------------------------------------


def check_config(located: Located, *, overrides: Sequence[Any] = (), force: bool = False,
                 allow_pickle: bool = False, read: Callable[..., Any] | None = None,
                 require_output: bool = True, writes: bool = True, max_rank: int | None = None,
                 max_rank_spelled: str = "--max-rank {}") -> Any:
    """Type-check a config block: a CheckedProgram whose diagnostics point into the config file.
    `max_rank` (the command line's --max-rank, the API's max_rank=, as `max_rank_spelled` says it)
    overrides the block's `max_rank`."""
    from . import ast
    from .check import Checker
    from .checked import Override
    from .parser import parse_expression, parse_program

    config, host = located.config, located.host
    embedded: list[Embedded] = []
    syntax: list[Diagnostic] = []

    def embed(path: Key, text: str, name: str, *, key: bool = False) -> Embedded:
        e = located.embed(path, text, f"{host.filename}:{'.'.join(map(str, path))}", key=key)
        embedded.append(e)
        return e

    main_source: Embedded | None = None
    program = None
    if config.program is not None:
        main_source = embed(("program",), config.program, "program")
        program, errors = parse_program(main_source.source)
        syntax += errors
    elif config.expression is not None:
        main_source = embed(("expression",), config.expression, "expression")
    options: dict[str, Any] = {"mode": config.mode, "base_dir": located.base_dir, "force": force,
                               "allow_pickle": allow_pickle, "writes": writes}
    if read is not None:
        options["read"] = read
    params = {}
    if config.program is not None:  # config params override the program's, as --set does
        for name, value in config.params.items():
            e = embed(("params", name), name, "params", key=True)
            params[name] = Override(name, value, e.source, what="`params`")
    checker = Checker(main_source.source if main_source else Source("", host.filename),
                      overrides=[*params.values(), *overrides], **options)
    checker.diagnostics.extend(syntax)
    checker.prefetch(config.inputs.values())
    for name, written in config.inputs.items():
        key, path_span = located.key_span(("inputs", name)), located.value_span(("inputs", name))
        if key is not None and host.snippet(key) in (f'"{name}"', f"'{name}'"):  # a quoted key
            key = Span(key.start + 1, key.end - 1)
        stated = config.bases.get(name)
        base_span = located.value_span(("bases", name)) if stated is not None else None
        if key is not None and path_span is not None and host.snippet(key) == name:
            checker.add_input(ast.Name(name, key), written, path_span, source=host, stated_base=stated,
                              base_span=base_span)
        else:
            e = embed(("inputs", name), f"{name}={written}", "inputs")
            checker.add_input(ast.Name(name, Span(0, len(name))), written, Span(len(name) + 1, len(e.source.text)),
                              source=e.source, stated_base=stated)
    if program is not None:
        checked = _limit_ranks(checker.program(program), config, max_rank, max_rank_spelled)
        return replace(checked, diagnostics=tuple(relocate(checked.diagnostics, embedded, host)))
    # params and heads become declarations of their own; their diagnostics point at the field.
    prelude = [(f"param {name} = {value!r}", located.key_span(("params", name))) for name, value in config.params.items()]
    if config.heads:
        prelude.append((f"heads {config.heads.strip()}", located.value_span(("heads",))))
    for line, where in prelude:
        e = Embedded(Source(line, "params"), host, [None], where)
        embedded.append(e)
        statements, errors = parse_program(e.source)
        checker.diagnostics.extend(errors)
        checker.source = e.source
        for stmt in statements.statements:
            checker.statement(stmt)
    outputs: list[tuple[Embedded, str | None, Key, str | None]] = []
    if config.expression is not None and main_source is not None:
        outputs.append((main_source, config.output, ("output",), config.into))
    for i, spec in enumerate(config.outputs or ()):
        outputs.append((embed(("outputs", i, "expression"), spec.expression, "expression"), spec.path,
                        ("outputs", i, "path"), spec.into))
    for e, directory, path, into in outputs:
        expr, errors = parse_expression(e.source)
        checker.diagnostics.extend(errors)
        if expr is None:
            continue
        checker.source = e.source
        if directory is None:
            checker.add_output(expr, None, expr.span, expr.span)
        else:  # `into:` beside the output's path: its diagnostics point at that line
            into_span = located.value_span((*path[:-1], "into")) if into is not None else None
            checker.add_output(expr, directory, located.value_span(path) or Span(0, 0), expr.span, path_source=host,
                               into=into, into_span=into_span or Span(0, 0), into_source=host)
    if main_source is not None:
        checker.source = main_source.source
    checker.finish(require_output=require_output and config.expression is None)
    checked = _limit_ranks(checker.result(), config, max_rank, max_rank_spelled)
    diagnostics = relocate(checked.diagnostics, embedded, host)
    if require_output and config.expression is not None and config.output is None:
        diagnostics.append(_at(host, located.key_span(("expression",)), "the config has an `expression` but no `output`",
                               hints=["add `output: DIR` to write it (the Python API can evaluate it without one)"]))
    return replace(checked, diagnostics=tuple(diagnostics))


def _limit_ranks(checked: Any, config: PemConfig, max_rank: int | None, spelled: str) -> Any:
    """E034 at every output above the rank limit: `max_rank` as the caller gave it (`spelled`:
    `--max-rank {}`), else the block's own."""
    from .lower import rank_limit

    limit = max_rank if max_rank is not None else config.max_rank
    if limit is None:
        return checked
    given = spelled.format(limit) if max_rank is not None else f"the config's max_rank {limit}"
    return replace(checked, diagnostics=(*checked.diagnostics, *rank_limit(checked, limit, given=given)))


def from_mapping(data: Any, *, base_dir: Path, name: str = "<config>") -> Located:
    """A config block the caller already holds (e.g. `yaml.safe_load(f)["merge"]`); diagnostics
    name the field but have no line. Raises PemError (E025)."""
    host = Source("", name)
    located = Located(PemConfig(), host, base_dir)
    if isinstance(data, PemConfig):
        config = data
    else:
        try:
            config = PemConfig.model_validate(data)
        except ValidationError as exc:
            raise PemError([_validation_diagnostic(located, e) for e in exc.errors()]) from None
    located.config = config
    problems = structure_problems(config, located)
    if problems:
        raise PemError(problems)
    return located
