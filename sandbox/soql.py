"""A tiny SOQL subset: ``SELECT f, … FROM Obj [WHERE c AND …] [ORDER BY f [ASC|DESC], …] [LIMIT n]
[OFFSET n]`` with ``= != <> < <= > >= LIKE IN NOT IN`` against string / number / boolean / null /
date / dateTime literals. Conditions on the system columns are pushed into SQLite; the rest are
evaluated in Python. Anything else is a ``MALFORMED_QUERY`` naming the unsupported part.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

_TOKEN = re.compile(
    r"\s*(?:(?P<str>'(?:[^'\\]|\\.)*')|(?P<dt>\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}(?:\.\d+)?(?:Z|[+-]\d{2}:?\d{2}))"
    r"|(?P<date>\d{4}-\d{2}-\d{2})|(?P<num>-?\d+(?:\.\d+)?)|(?P<op><=|>=|!=|<>|=|<|>)|(?P<punct>[(),])"
    r"|(?P<word>[A-Za-z_][A-Za-z0-9_.]*))",
)


class SoqlError(ValueError):
    """Carries the Salesforce error code (MALFORMED_QUERY or INVALID_FIELD) and message."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


@dataclass
class Cond:
    field: str
    op: str
    value: Any  # a literal, or a list of literals for IN / NOT IN
    kind: str = "value"  # value | datetime | date | string


@dataclass
class Query:
    fields: list[str]
    obj: str
    where: list[Cond] = field(default_factory=list)
    order: list[tuple[str, bool]] = field(default_factory=list)  # (field, descending)
    limit: int | None = None
    offset: int = 0


def _tokens(text: str) -> list[tuple[str, str]]:
    out: list[tuple[str, str]] = []
    pos = 0
    text = text.strip()
    while pos < len(text):
        m = _TOKEN.match(text, pos)
        if not m or m.end() == pos:
            raise SoqlError("MALFORMED_QUERY", f"unexpected token at: {text[pos : pos + 30]!r}")
        kind = m.lastgroup or ""
        out.append((kind, m.group(kind)))
        pos = m.end()
    return out


class _Parser:
    def __init__(self, text: str) -> None:
        self.toks = _tokens(text)
        self.i = 0

    def peek(self, word: str | None = None) -> bool:
        if self.i >= len(self.toks):
            return False
        return word is None or self.toks[self.i][1].upper() == word

    def take(self, word: str | None = None) -> tuple[str, str]:
        if self.i >= len(self.toks):
            raise SoqlError("MALFORMED_QUERY", f"unexpected end of query, expected {word or 'more'}")
        tok = self.toks[self.i]
        if word is not None and tok[1].upper() != word:
            raise SoqlError("MALFORMED_QUERY", f"expected {word} near {tok[1]!r}")
        self.i += 1
        return tok

    def ident(self) -> str:
        kind, val = self.take()
        if kind != "word":
            raise SoqlError("MALFORMED_QUERY", f"expected a field name near {val!r}")
        if "." in val:
            raise SoqlError("MALFORMED_QUERY", f"relationship field {val!r} is not supported by the sandbox")
        return val

    def literal(self) -> tuple[Any, str]:
        kind, val = self.take()
        if kind == "str":
            return re.sub(r"\\(.)", r"\1", val[1:-1]), "string"
        if kind == "dt":
            return val, "datetime"
        if kind == "date":
            return val, "date"
        if kind == "num":
            return float(val) if "." in val else int(val), "value"
        if kind == "word" and val.lower() in ("true", "false"):
            return val.lower() == "true", "value"
        if kind == "word" and val.lower() == "null":
            return None, "value"
        raise SoqlError("MALFORMED_QUERY", f"unsupported literal {val!r} (date literals like TODAY are not supported)")

    def parse(self) -> Query:
        self.take("SELECT")
        fields = [self.ident()]
        while self.peek(","):
            self.take(",")
            fields.append(self.ident())
        self.take("FROM")
        q = Query(fields, self.ident())
        if self.peek("WHERE"):
            self.take("WHERE")
            q.where.append(self.cond())
            while self.peek("AND"):
                self.take("AND")
                q.where.append(self.cond())
            if self.peek("OR"):
                raise SoqlError("MALFORMED_QUERY", "OR is not supported by the sandbox's SOQL subset (use AND)")
        if self.peek("ORDER"):
            self.take("ORDER")
            self.take("BY")
            q.order.append(self.order_item())
            while self.peek(","):
                self.take(",")
                q.order.append(self.order_item())
        if self.peek("LIMIT"):
            self.take("LIMIT")
            q.limit = int(self.take()[1])
        if self.peek("OFFSET"):
            self.take("OFFSET")
            q.offset = int(self.take()[1])
        if self.i < len(self.toks):
            raise SoqlError("MALFORMED_QUERY", f"unexpected token {self.toks[self.i][1]!r}")
        return q

    def order_item(self) -> tuple[str, bool]:
        name = self.ident()
        desc = False
        if self.peek("ASC") or self.peek("DESC"):
            desc = self.take()[1].upper() == "DESC"
        if self.peek("NULLS"):
            self.take("NULLS")
            self.take()
        return name, desc

    def cond(self) -> Cond:
        name = self.ident()
        if self.peek("NOT"):
            self.take("NOT")
            self.take("IN")
            return Cond(name, "NOT IN", self.values())
        if self.peek("IN"):
            self.take("IN")
            return Cond(name, "IN", self.values())
        if self.peek("LIKE"):
            self.take("LIKE")
            value, kind = self.literal()
            return Cond(name, "LIKE", value, kind)
        kind, op = self.take()
        if kind != "op":
            raise SoqlError("MALFORMED_QUERY", f"expected an operator after {name}, got {op!r}")
        value, vkind = self.literal()
        return Cond(name, "!=" if op == "<>" else op, value, vkind)

    def values(self) -> list[Any]:
        self.take("(")
        vals = [self.literal()[0]]
        while self.peek(","):
            self.take(",")
            vals.append(self.literal()[0])
        self.take(")")
        return vals


def parse(text: str) -> Query:
    return _Parser(text).parse()


def _cmp(a: Any, op: str, b: Any) -> bool:
    if op in ("IN", "NOT IN"):
        hit = any(_cmp(a, "=", v) for v in b)
        return hit if op == "IN" else not hit
    if isinstance(a, str) and isinstance(b, str):
        a, b = a.lower(), b.lower()
    if op == "LIKE":
        pattern = "^" + re.escape(str(b)).replace("%", ".*").replace("_", ".") + "$"
        return a is not None and re.match(pattern, str(a), re.IGNORECASE | re.S) is not None
    if op == "=":
        return bool(a == b)
    if op == "!=":
        return bool(a != b)
    if a is None or b is None:
        return False
    try:
        return bool({"<": a < b, "<=": a <= b, ">": a > b, ">=": a >= b}[op])
    except TypeError:
        return False


def matches(values: dict[str, Any], conds: list[Cond]) -> bool:
    """Evaluate the conditions on typed values (datetimes as epoch ms) keyed by canonical name."""
    return all(_cmp(values.get(c.field), c.op, c.value) for c in conds)
