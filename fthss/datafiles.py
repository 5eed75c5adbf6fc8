"""Reading records from data files, and what to do with a bad one.

Every record is named by where it came from: `file:line` in a JSONL file, `file: record i` in a
JSON list. A bad record raises its loader's error (a `ValueError` subclass whose message names
the place and the field), unless the caller passes `on_bad`: then the error goes to `on_bad`
and the record is skipped (`--skip-bad`; `SkipReport` prints and counts them). A file that
cannot be read, or a JSON document that does not parse, is never skipped: it holds no record
to skip.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any, TypeVar

OnBad = Callable[[ValueError], None]
T = TypeVar("T")


class SkipReport:
    """An `on_bad` for `--skip-bad`: each skipped record's error to stderr, and a count."""

    def __init__(self):
        self.skipped = 0

    def __call__(self, error: ValueError) -> None:
        self.skipped += 1
        print(f"skipped {error}", file=sys.stderr)


def _skip_or_raise(error: ValueError, on_bad: OnBad | None) -> None:
    if on_bad is None:
        raise error
    on_bad(error)


def parse_each(items: Iterable[tuple[str, Any]], parse: Callable[[Any, str], T],
               error: type[ValueError] | tuple[type[ValueError], ...],
               on_bad: OnBad | None = None) -> list[T]:
    """`parse(value, where)` for every `(where, value)`; a record whose parse raises `error` (a
    class or a tuple of them) is skipped through `on_bad`, or the error raised when there is
    none."""
    parsed = []
    for where, value in items:
        try:
            parsed.append(parse(value, where))
        except error as err:
            _skip_or_raise(err, on_bad)
    return parsed


def _read_bytes(path: Path, error: type[ValueError]) -> bytes:
    try:
        return path.read_bytes()
    except OSError as err:
        raise error(f"{path}: cannot read: {err.strerror or err}") from err


def _decode(data: bytes, path: Path, first_line: int, error: type[ValueError]) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as err:
        line = first_line + data.count(b"\n", 0, err.start)
        raise error(f"{path}:{line}: not UTF-8 text (byte {data[err.start]:#04x})") from err


def _loads(text: str, path: Path, first_line: int, error: type[ValueError]) -> Any:
    """JSON text that starts at line `first_line` of `path`."""
    try:
        return json.loads(text, object_pairs_hook=_Object)
    except json.JSONDecodeError as err:
        raise error(f"{path}:{first_line + err.lineno - 1}: malformed JSON: {err.msg}") from err
    except ValueError as err:  # an integer of more digits than Python converts
        raise error(f"{path}:{first_line}: malformed JSON: {err}") from err
    except RecursionError as err:  # the parser recurses once per nested [ or {
        raise error(f"{path}:{first_line}: malformed JSON: nested too deeply") from err


def jsonl_records(path: str | Path, error: type[ValueError],
                  on_bad: OnBad | None = None) -> Iterator[tuple[str, Any]]:
    """`(where, value)` for every non-blank line of a JSONL file, `where` being `path:line`. A
    line that is not UTF-8 JSON, or holds text that is not valid Unicode, raises `error` naming
    it (or goes to `on_bad`). Lines end at `\\n` only: a JSON string may hold U+2028 or a form
    feed, where `str.splitlines` would cut."""
    path = Path(path)
    for line_no, line in enumerate(_read_bytes(path, error).split(b"\n"), 1):
        if not line.strip():
            continue
        where = f"{path}:{line_no}"
        try:
            value = _loads(_decode(line, path, line_no, error), path, line_no, error)
            check_record(value, where, error)
        except error as err:
            _skip_or_raise(err, on_bad)
            continue
        yield where, value


class _Object(dict):
    """A JSON object as read: a dict, and the keys it held more than once (`json` keeps only
    the last value of each, silently; `check_record` refuses them)."""

    def __init__(self, pairs: list[tuple[str, Any]]):
        super().__init__(pairs)
        self.duplicates = [k for k, _ in pairs] if len(self) < len(pairs) else []


def check_record(value: Any, where: str, error: type[ValueError]) -> None:
    """Raise `error` naming the field if the JSON `value` (as read here) holds a key given
    twice, or a string or key that is not valid Unicode: JSON's `\\ud800` escapes decode to lone
    surrogates, which no tokenizer takes and no file can hold as UTF-8. Walked with a stack: a
    value may be nested as deep as the parser allowed."""
    stack = [("", value)]
    while stack:
        field, item = stack.pop()
        if isinstance(item, str):
            if not is_valid_unicode(item):
                raise error(f"{where}: {field or 'the record'}: not valid Unicode text (a lone "
                            f"surrogate: {item!r:.60})")
        elif isinstance(item, dict):
            twice = sorted({k for k in getattr(item, "duplicates", [])
                            if item.duplicates.count(k) > 1})
            if twice:
                at = f"{field}: " if field else ""
                raise error(f"{where}: {at}key {twice[0]!r:.60} is given more than once")
            for key, child in item.items():
                if not is_valid_unicode(key):
                    raise error(f"{where}: {field + '.' if field else ''}key {key!r:.60}: not "
                                "valid Unicode text (a lone surrogate)")
                stack.append((f"{field}.{key}" if field else key, child))
        elif isinstance(item, list):
            stack.extend((f"{field}[{i}]", child) for i, child in enumerate(item))


def is_valid_unicode(text: str) -> bool:
    """Whether `text` can be written as UTF-8 (it holds no lone surrogate)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def json_document(path: str | Path, error: type[ValueError]) -> Any:
    """A whole JSON file; a malformed one raises `error` naming the line."""
    path = Path(path)
    return _loads(_decode(_read_bytes(path, error), path, 1, error), path, 1, error)
