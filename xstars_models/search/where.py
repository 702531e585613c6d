"""``--where``: a small, safe subset of SQL over the dataset's columns, compiled to a
``pyarrow.compute`` expression (nothing is evaluated as code, and no SQL engine is needed).
Written here because the filter must become a pyarrow expression applied while parts are read,
before ranking: an SQL engine such as DuckDB would be a second query layer (and dependency) over
the same files, and a general SQL parser would still leave this grammar's checks and the
column types (datetime in UTC, the bbox covering) to this module.

Grammar (keywords in any case)::

    filter     := or
    or         := and ("OR" and)*
    and        := not ("AND" not)*
    not        := "NOT" not | "(" filter ")" | test
    test       := COLUMN op VALUE
                | COLUMN ["NOT"] "IN" "(" VALUE ("," VALUE)* ")"
                | COLUMN ["NOT"] "BETWEEN" VALUE "AND" VALUE
                | COLUMN "IS" ["NOT"] "NULL"
                | "BBOX" "(" WEST "," SOUTH "," EAST "," NORTH ")"
    op         := "=" | "!=" | "<>" | "<" | "<=" | ">" | ">="

Columns: ``sensor``, ``scene_id``, ``crs`` (text: ``'quoted'``, ``''`` for a quote), ``row``,
``col`` (whole numbers), ``datetime`` (an ISO 8601 date or date and time, ``'2024-06-01'`` or
``'2024-06-01T10:30:00Z'``, UTC when it has no offset; a date alone is its midnight, UTC).
``bbox(W, S, E, N)`` keeps the tiles whose footprint's bounding box (degrees of longitude and
latitude) meets that box.
"""

from __future__ import annotations

import datetime as _dt
import re
from typing import Any

from ..errors import InvalidOptionError

__all__ = ["COLUMNS", "as_expression", "parse_where"]

# The filterable columns and the kind of value each compares with.
COLUMNS = {"sensor": "text", "scene_id": "text", "crs": "text", "row": "int", "col": "int", "datetime": "time"}
_TOKEN = re.compile(
    r"\s*(?:(?P<text>'(?:[^']|'')*')|(?P<number>[-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?)"
    r"|(?P<word>[A-Za-z_][A-Za-z0-9_]*)|(?P<op><=|>=|<>|!=|=|<|>)|(?P<punct>[(),]))"
)
_OPS = {"=": "__eq__", "!=": "__ne__", "<>": "__ne__", "<": "__lt__", "<=": "__le__", ">": "__gt__", ">=": "__ge__"}
_DATE = re.compile(r"\d{4}-\d{2}-\d{2}")


def as_expression(where: Any) -> Any:
    """``where`` as a ``pyarrow.compute.Expression``: a string is parsed (:func:`parse_where`), an
    expression kept.

    Raises:
        InvalidOptionError: (``field="where"``) a filter that does not parse, or neither.
    """
    import pyarrow.compute as pc

    if isinstance(where, pc.Expression):
        return where
    if isinstance(where, str):
        return parse_where(where)
    raise InvalidOptionError(
        f"where must be a filter string such as \"sensor = 'aerial'\" or a pyarrow.compute expression, got "
        f"{type(where).__name__}.",
        field="where",
    )


def parse_where(text: str) -> Any:
    """The ``pyarrow.compute`` expression of the filter ``text`` (see the module's grammar).

    Raises:
        InvalidOptionError: (``field="where"``) text outside the grammar, an unknown column, or a
            value of the wrong kind for its column; the message shows where.
    """
    return _Parser(text).parse()


class _Parser:
    def __init__(self, text: str) -> None:
        self.text = text
        self.tokens: list[tuple[str, str, int]] = []
        position = 0
        while position < len(text):
            match = _TOKEN.match(text, position)
            if match is None or match.end() == position:
                if not text[position:].strip():
                    break
                raise self.error(f"unexpected {text[position:].strip()[:12]!r}", position)
            kind = match.lastgroup or ""
            self.tokens.append((kind, match.group(kind), match.start(kind)))
            position = match.end()
        self.at = 0

    def error(self, what: str, position: int | None = None) -> InvalidOptionError:
        if position is None:
            position = self.tokens[self.at][2] if self.at < len(self.tokens) else len(self.text)
        columns = ", ".join(COLUMNS)
        return InvalidOptionError(
            f"where {self.text!r}: {what} at character {position + 1}. Filters compare the columns {columns} with "
            "values (sensor = 'aerial', datetime >= '2024-06-01', row IN (1, 2)), and bbox(west, south, east, north) "
            "in degrees; combine them with AND, OR, NOT and parentheses.",
            field="where",
        )

    def peek(self) -> tuple[str, str]:
        if self.at >= len(self.tokens):
            return "end", ""
        kind, value, _ = self.tokens[self.at]
        return kind, value.upper() if kind == "word" else value

    def take(self, kind: str, value: str | None = None) -> str:
        found_kind, found = self.peek()
        if found_kind != kind or (value is not None and found != value):
            raise self.error(f"expected {value or kind}, found {found or 'the end'!r}")
        self.at += 1
        return self.tokens[self.at - 1][1]

    def accept(self, kind: str, value: str) -> bool:
        if self.peek() == (kind, value):
            self.at += 1
            return True
        return False

    def parse(self) -> Any:
        if not self.tokens:
            raise self.error("an empty filter")
        expression = self.disjunction()
        if self.at != len(self.tokens):
            raise self.error(f"unexpected {self.tokens[self.at][1]!r}")
        return expression

    def disjunction(self) -> Any:
        expression = self.conjunction()
        while self.accept("word", "OR"):
            expression = expression | self.conjunction()
        return expression

    def conjunction(self) -> Any:
        expression = self.negation()
        while self.accept("word", "AND"):
            expression = expression & self.negation()
        return expression

    def negation(self) -> Any:
        if self.accept("word", "NOT"):
            return ~self.negation()
        if self.accept("punct", "("):
            expression = self.disjunction()
            self.take("punct", ")")
            return expression
        return self.test()

    def test(self) -> Any:
        import pyarrow.compute as pc

        kind, word = self.peek()
        if kind == "word" and word == "BBOX":
            return self.bbox()
        start = self.at
        name = self.take("word").lower()
        if name not in COLUMNS:
            self.at = start
            raise self.error(f"unknown column {self.tokens[start][1]!r}")
        column = pc.field(name)
        if self.accept("word", "IS"):
            negated = self.accept("word", "NOT")
            self.take("word", "NULL")
            return ~column.is_null() if negated else column.is_null()
        negated = self.accept("word", "NOT")
        if self.accept("word", "IN"):
            self.take("punct", "(")
            values = [self.value(name)]
            while self.accept("punct", ","):
                values.append(self.value(name))
            self.take("punct", ")")
            found = column.isin(values)
        elif self.accept("word", "BETWEEN"):
            low = self.value(name)
            self.take("word", "AND")
            found = (column >= low) & (column <= self.value(name))
        elif negated:
            raise self.error("expected IN or BETWEEN after NOT")
        else:
            op = self.take("op")
            return getattr(column, _OPS[op])(self.value(name))
        return ~found if negated else found

    def bbox(self) -> Any:
        import pyarrow.compute as pc

        self.take("word")
        self.take("punct", "(")
        edges = [self.number()]
        for _ in range(3):
            self.take("punct", ",")
            edges.append(self.number())
        self.take("punct", ")")
        west, south, east, north = edges
        if not (west <= east and south <= north):
            raise self.error(f"bbox({west}, {south}, {east}, {north}) needs west <= east and south <= north")
        return ((pc.field("bbox", "xmax") >= west) & (pc.field("bbox", "xmin") <= east)
                & (pc.field("bbox", "ymax") >= south) & (pc.field("bbox", "ymin") <= north))

    def number(self) -> float:
        return float(self.take("number"))

    def value(self, column: str) -> Any:
        import pyarrow as pa

        kind, _ = self.peek()
        expected = COLUMNS[column]
        raw = self.tokens[self.at][1] if self.at < len(self.tokens) else ""
        if expected == "int" and kind == "number" and re.fullmatch(r"[-+]?\d+", raw):
            self.at += 1
            return pa.scalar(int(raw), pa.int32())
        if expected in ("text", "time") and kind == "text":
            self.at += 1
            text = raw[1:-1].replace("''", "'")
            return text if expected == "text" else pa.scalar(_timestamp(text, self), pa.timestamp("us", tz="UTC"))
        wanted = {"int": "a whole number", "text": "a 'quoted' text", "time": "a 'quoted' ISO 8601 date"}[expected]
        raise self.error(f"{column} compares with {wanted}, found {raw or 'the end'!r}")


def _timestamp(text: str, parser: _Parser) -> _dt.datetime:
    value = text.strip()
    if _DATE.fullmatch(value):
        value += "T00:00:00"
    try:
        # Python 3.10's fromisoformat takes no 'Z'.
        parsed = _dt.datetime.fromisoformat(re.sub(r"[Zz]$", "+00:00", value))
    except ValueError:
        parser.at -= 1
        raise parser.error(f"{text!r} is not an ISO 8601 date ('2024-06-01') or date and time "
                           "('2024-06-01T10:30:00Z')") from None
    return parsed.replace(tzinfo=_dt.timezone.utc) if parsed.tzinfo is None else parsed.astimezone(_dt.timezone.utc)
