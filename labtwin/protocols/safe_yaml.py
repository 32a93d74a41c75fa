"""One bounded YAML reader for the files a user hands labtwin: protocols, campaigns and the lab file.

``yaml.safe_load`` is safe against code, not against size: a 2 KB alias bomb expands to a billion strings in
whatever walks the result, a list nested 10 000 deep overflows the recursion of a recursive walker, ``.inf`` and
``1e400`` read as infinity, a 5 000-digit integer raises a bare ValueError, and a duplicated key silently keeps the
last value (issue 14). This reader refuses each of those with one line naming the file, the line and the field,
and its cost is bounded by the caps below, whatever the file holds:

- the file is at most ``MAX_FILE_BYTES``;
- at most ``MAX_NODES`` values (scalars, lists, mappings), counted while parsing and again with every alias
  expanded, so an alias bomb is refused after ``MAX_NODES`` steps, never expanded (an alias inside itself too);
- nesting at most ``MAX_DEPTH`` deep; the composer and the walk here are iterative, so depth costs no recursion;
- no non-finite float, no integer longer than ``MAX_INT_DIGITS`` digits, no key twice in one mapping, keys scalar.

Parsing uses libyaml's event stream where PyYAML has it (pure-Python events are ~10x slower: 1 MB of tokens took
16 s) and composes the nodes here, so the node count stops the parse as soon as it is reached.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

MAX_FILE_BYTES = 1_048_576
MAX_NODES = 100_000
MAX_DEPTH = 1_000
MAX_INT_DIGITS = 30

_FLOAT = "tag:yaml.org,2002:float"
_INT = "tag:yaml.org,2002:int"
_MERGE = "tag:yaml.org,2002:merge"
_Loader: type = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


class YamlError(ValueError):
    """A YAML file refused; the message is one line naming the file (and line, and field where known)."""

    def __init__(self, message: str, line: int | None = None, problem: str = "", syntax: bool = False) -> None:
        super().__init__(message)
        self.line = line
        self.problem = problem or message
        self.syntax = syntax  # the parser's own complaint (``problem`` is its words), not one of the bounds


@dataclass(frozen=True)
class YamlDocument:
    """The file's data and the line (1-based) of every mapping key and list item, by its path."""

    data: Any
    lines: dict[tuple, int]


def dotted(path: tuple, most: int = 16) -> str:
    """``("method", 0, "rest")`` -> ``method[0].rest``: the form the protocol errors name fields in. A path of more
    than ``most`` parts keeps its head and tail around "...", so a refusal of deep nesting stays readable."""
    parts = list(path)
    if len(parts) > most:
        parts = [*parts[: most // 2], "...", *parts[-(most // 2) :]]
    out = ""
    for part in parts:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out or "(file)"


def _refuse(source: str, line: int | None, path: tuple, problem: str) -> YamlError:
    where = f"{source}:{line}" if line else source
    field = f" {dotted(path)}:" if path else ""
    return YamlError(f"{where}:{field} {problem}", line, problem)


def read_yaml_file(path: str | Path, what: str = "a YAML file") -> YamlDocument:
    """Read and parse one file within the caps; ``what`` names the kind of file in the refusals."""
    path = Path(path)
    try:
        size = path.stat().st_size
        if size > MAX_FILE_BYTES:
            raise YamlError(
                f"{path}: {size} bytes; {what} is at most {MAX_FILE_BYTES} bytes (1 MB): "
                "write long sequences with repeat or loop instead of listing them"
            )
        with path.open("rb") as handle:
            raw = handle.read(MAX_FILE_BYTES + 1)
    except IsADirectoryError:
        raise YamlError(f"{path}: is a directory: {what} is a YAML file") from None
    except OSError as exc:
        raise YamlError(f"{path}: cannot be read: {exc.strerror}: {what} is a YAML file") from None
    if len(raw) > MAX_FILE_BYTES:
        raise YamlError(f"{path}: more than {MAX_FILE_BYTES} bytes; {what} is at most 1 MB")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise YamlError(f"{path}: not a text file (byte {exc.start} is not UTF-8): {what} is a YAML file") from None
    return parse_yaml(text, str(path))


def parse_yaml(text: str, source: str = "<yaml>") -> YamlDocument:
    """Parse one YAML document within the caps (an empty document is ``None``)."""
    if len(text) > MAX_FILE_BYTES:
        raise YamlError(f"{source}: {len(text)} characters; a YAML file here is at most {MAX_FILE_BYTES}")
    loader = _Loader(text)
    try:
        root = _compose(loader, source)
        if root is None:
            return YamlDocument(None, {})
        lines = _check(loader, root, source)
        try:
            data = loader.construct_document(root)
        except (yaml.YAMLError, ValueError, TypeError, OverflowError) as exc:
            mark = getattr(exc, "problem_mark", None)
            line = mark.line + 1 if mark is not None else None
            raise _refuse(source, line, (), f"not valid YAML: {getattr(exc, 'problem', None) or exc}") from None
        return YamlDocument(data, lines)
    except yaml.YAMLError as exc:
        raise _syntax_error(text, source, exc) from None
    finally:
        dispose = getattr(loader, "dispose", None)
        if dispose is not None:
            dispose()


def _syntax_error(text: str, source: str, exc: yaml.YAMLError) -> YamlError:
    """The parser's complaint with its line. libyaml words it tersely; for a small file PyYAML's own parser
    (slower, so only then) says what it expected and what it got, as users of ``yaml.safe_load`` know it. Not for
    deep flow nesting: PyYAML's scanner is quadratic in it (``[`` x 1024 took 1.2 s), libyaml's words do there."""
    if _Loader is not yaml.SafeLoader and len(text) <= 65_536 and _flow_depth(text) <= 32:
        try:
            for _ in yaml.parse(text, Loader=yaml.SafeLoader):
                pass
        except yaml.YAMLError as python_exc:
            exc = python_exc
    mark = getattr(exc, "problem_mark", None)
    line = mark.line + 1 if mark is not None else None
    problem = getattr(exc, "problem", None) or "cannot be parsed"
    at = f" (line {line})" if line else ""
    return YamlError(f"{source}: not valid YAML: {problem}{at}", line, problem, syntax=True)


def _flow_depth(text: str) -> int:
    """The deepest ``[``/``{`` nesting, counting brackets inside quotes too (an upper bound is what is needed)."""
    depth = deepest = 0
    for char in text:
        if char in "[{":
            depth += 1
            deepest = max(deepest, depth)
        elif char in "]}":
            depth -= 1
    return deepest


def _resolved(loader: Any, kind: type, event: Any, value: Any) -> str:
    tag = event.tag
    if tag is None or tag == "!":
        return loader.resolve(kind, value, event.implicit)
    return tag


def _compose(loader: Any, source: str) -> yaml.Node | None:
    """Nodes from the parser's events, without recursion, counting them as they come (PyYAML's composer recurses
    once per level and never stops counting)."""
    loader.get_event()  # stream start
    if loader.check_event(yaml.StreamEndEvent):
        return None
    loader.get_event()  # document start
    anchors: dict[str, yaml.Node] = {}
    open_: list[tuple[yaml.Node, list]] = []
    open_ids: set[int] = set()  # the collections being composed: an alias to one of them is inside itself
    root: yaml.Node | None = None
    count = 0
    while True:
        event = loader.get_event()
        line = event.start_mark.line + 1 if event.start_mark is not None else None
        if isinstance(event, yaml.DocumentEndEvent):
            break
        node: yaml.Node | None = None
        if isinstance(event, (yaml.SequenceEndEvent, yaml.MappingEndEvent)):
            node, children = open_.pop()
            open_ids.discard(id(node))
            node.end_mark = event.end_mark
            if isinstance(node, yaml.MappingNode):
                node.value = list(zip(children[0::2], children[1::2], strict=True))
            else:
                node.value = children
        elif isinstance(event, yaml.AliasEvent):
            if event.anchor not in anchors:
                raise _refuse(source, line, (), f"alias *{event.anchor} names no anchor (&{event.anchor}) before it")
            node = anchors[event.anchor]
            if id(node) in open_ids:
                raise _refuse(
                    source, line, (), f"alias *{event.anchor} is inside its own anchor &{event.anchor}: it never ends"
                )
        else:
            count += 1
            if count > MAX_NODES:
                raise _refuse(source, line, (), f"more than {MAX_NODES} values: a file here is not that large")
            if len(open_) >= MAX_DEPTH:
                raise _refuse(source, line, (), f"nested more than {MAX_DEPTH} levels deep")
            start: Any = event.start_mark  # libyaml's marks are its own class, with the same line and column
            end: Any = event.end_mark
            if isinstance(event, yaml.ScalarEvent):
                tag = _resolved(loader, yaml.ScalarNode, event, event.value)
                node = yaml.ScalarNode(tag, event.value, start, end, style=event.style)
            elif isinstance(event, yaml.SequenceStartEvent):
                tag = _resolved(loader, yaml.SequenceNode, event, None)
                node = yaml.SequenceNode(tag, [], start, None, flow_style=event.flow_style)
            elif isinstance(event, yaml.MappingStartEvent):
                tag = _resolved(loader, yaml.MappingNode, event, None)
                node = yaml.MappingNode(tag, [], start, None, flow_style=event.flow_style)
            else:  # pragma: no cover - the parser emits no other event inside a document
                raise _refuse(source, line, (), f"unexpected YAML event {type(event).__name__}")
            if event.anchor is not None:
                anchors[event.anchor] = node
            if not isinstance(event, yaml.ScalarEvent):
                open_.append((node, []))
                open_ids.add(id(node))
                continue
        if open_:
            open_[-1][1].append(node)
        else:
            root = node
    if not loader.check_event(yaml.StreamEndEvent):
        event = loader.peek_event()
        raise _refuse(source, event.start_mark.line + 1, (), "more than one YAML document (---): give one")
    loader.get_event()
    return root


def _check(loader: Any, root: yaml.Node, source: str) -> dict[tuple, int]:
    """Walk the document as its reader will see it, aliases expanded, within MAX_NODES and MAX_DEPTH; refuse
    duplicate and non-scalar keys, non-finite floats and overlong integers; note every path's line."""
    lines: dict[tuple, int] = {}
    stack: list[tuple[yaml.Node, tuple]] = [(root, ())]
    seen = 0
    while stack:
        node, path = stack.pop()
        line = node.start_mark.line + 1 if node.start_mark is not None else None
        seen += 1
        if seen > MAX_NODES:
            raise _refuse(
                source,
                line,
                path,
                f"aliases expand to more than {MAX_NODES} values (an alias bomb, or an alias inside itself): "
                "write the values out or use repeat",
            )
        if len(path) > MAX_DEPTH:
            raise _refuse(source, line, path[:8], f"nested more than {MAX_DEPTH} levels deep (through aliases)")
        if isinstance(node, yaml.ScalarNode):
            if node.tag == _FLOAT:
                value = loader.construct_yaml_float(node)
                if not math.isfinite(value):
                    raise _refuse(source, line, path, f"{node.value} is not a finite number: give a finite value")
            elif node.tag == _INT and len(node.value.lstrip("+-0")) > MAX_INT_DIGITS:
                raise _refuse(
                    source, line, path, f"an integer of {len(node.value)} digits: at most {MAX_INT_DIGITS} here"
                )
        elif isinstance(node, yaml.SequenceNode):
            for k, item in enumerate(node.value):
                here = (*path, k)
                if item.start_mark is not None:
                    lines.setdefault(here, item.start_mark.line + 1)
                stack.append((item, here))
        elif isinstance(node, yaml.MappingNode):
            first: dict[tuple[str, str], int] = {}
            for key, value in node.value:
                key_line = key.start_mark.line + 1 if key.start_mark is not None else None
                if not isinstance(key, yaml.ScalarNode):
                    raise _refuse(source, key_line, path, "a key must be a plain name, not a list or mapping")
                if key.tag == _MERGE:
                    stack.append((value, path))
                    continue
                ident = (key.tag, key.value)
                if ident in first:
                    raise _refuse(
                        source,
                        key_line,
                        (*path, key.value),
                        f"key {key.value!r} given twice (first on line {first[ident]}): keep one",
                    )
                first[ident] = key_line or 0
                here = (*path, key.value)
                if key_line is not None:
                    lines.setdefault(here, key_line)
                stack.append((key, here))
                stack.append((value, here))
    return lines
