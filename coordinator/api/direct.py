"""Hot device routes served without FastAPI's parameter machinery when a request is
well-formed (:mod:`fedge.coordinator.api.upload_route`, :mod:`fedge.coordinator.api.
work_route`).

A :class:`DirectRoute` sits in front of the FastAPI route of the same path, which still
documents it in the OpenAPI schema, and takes a request only when its method is the route's,
its path's id is 1 to 10 decimal digits with a value in ``1..MAX_ID`` (when the path has one)
and every query parameter is a known one, given at most once, whose value the route's parser
takes as the FastAPI route would take it unchanged. Anything else is not matched here and the
FastAPI route answers it as before (its 422 or 405).
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any
from urllib.parse import parse_qsl

from starlette.routing import BaseRoute, Match, NoMatchFound
from starlette.types import Scope

from fedge.coordinator.api.deps import MAX_ID

#: A query value's parser: the parsed value, or None when the direct route must not take it.
Parser = Callable[[str], Any]
_DIGITS = re.compile(r"^[0-9]{1,10}$")


def int_in(low: int, high: int) -> Parser:
    """Decimal digits only (no sign, no spaces), with a value in ``low..high``."""

    def parse(value: str) -> int | None:
        if not _DIGITS.match(value):
            return None
        number = int(value)
        return number if low <= number <= high else None

    return parse


def matching(pattern: str) -> Parser:
    """The value itself when it matches ``pattern`` (the FastAPI route's own pattern)."""
    regex = re.compile(pattern)
    return lambda value: value if regex.match(value) else None


#: ``0``, ``1``, ``true`` or ``false`` (what FastAPI takes unchanged for a bool).
BOOLS: Parser = {"0": False, "1": True, "false": False, "true": True}.get


def parse_query(
    raw: bytes, spec: dict[str, tuple[str, Parser]], defaults: dict[str, Any]
) -> dict[str, Any] | None:
    """The query's parameters when every one is in ``spec`` (query name -> keyword name and
    parser), well-formed and given once, with ``defaults`` for the missing ones; None
    otherwise."""
    params = dict(defaults)
    if not raw:
        return params
    seen: set[str] = set()
    for name, value in parse_qsl(raw.decode("latin-1"), keep_blank_values=True):
        if name in seen or name not in spec:
            return None
        seen.add(name)
        keyword, parser = spec[name]
        parsed = parser(value)
        if parsed is None:
            return None
        params[keyword] = parsed
    return params


class DirectRoute(BaseRoute):
    """A route in front of the FastAPI route of ``path`` (see the module docstring).
    ``regex`` matches the request path, with the id (if any) as its one group; the matched
    request's scope carries ``(id or None, parameters)`` under ``fedge.direct``."""

    path: str
    method: str
    regex: re.Pattern[str]
    query_spec: dict[str, tuple[str, Parser]]
    query_defaults: dict[str, Any]

    def matches(self, scope: Scope) -> tuple[Match, Scope]:
        if scope["type"] != "http" or scope["method"] != self.method:
            return Match.NONE, {}
        found = self.regex.match(scope["path"])
        if found is None or scope.get("root_path"):
            return Match.NONE, {}
        path_params: dict[str, str] = {}
        ident: int | None = None
        if found.groups():
            ident = int(found.group(1))
            if not 1 <= ident <= MAX_ID:
                return Match.NONE, {}
            path_params = {name: found.group(1) for name in found.groupdict()}
        params = parse_query(scope.get("query_string", b""), self.query_spec, self.query_defaults)
        if params is None:
            return Match.NONE, {}
        return Match.FULL, {"path_params": path_params, "fedge.direct": (ident, params)}

    def url_path_for(self, name: str, /, **path_params: Any) -> Any:
        raise NoMatchFound(name, path_params)
