"""Building blocks shared by the schema modules."""

from __future__ import annotations

import json
import math
from typing import Annotated, Any, Generic, TypeVar

from pydantic import AfterValidator, BaseModel, ConfigDict, Field

T = TypeVar("T")

MAX_JSON_BYTES = 16_384
MAX_JSON_DEPTH = 8


class Strict(BaseModel):
    """Request bodies: unknown fields and non-finite numbers are errors, not silently kept."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)


class Page(BaseModel, Generic[T]):
    """One page of a list endpoint."""

    items: list[T]
    total: int = Field(description="Items matching the filter, over all pages")
    limit: int
    offset: int


def _storable(value: str) -> str:
    """Refuse what a database cannot store: NUL characters and lone surrogates."""
    if "\x00" in value:
        raise ValueError("must not contain NUL characters")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise ValueError("must be valid Unicode text") from None
    return value


def _printable(value: str) -> str:
    if any(ord(c) < 32 or ord(c) == 127 for c in value):
        raise ValueError("must not contain control characters")
    return _storable(value)


def _check_json(value: Any, depth: int = 0) -> None:
    if depth > MAX_JSON_DEPTH:
        raise ValueError(f"nested deeper than {MAX_JSON_DEPTH} levels")
    if isinstance(value, str):
        _storable(value)
    elif isinstance(value, dict):
        for k, v in value.items():
            _storable(k)
            _check_json(v, depth + 1)
    elif isinstance(value, list):
        for v in value:
            _check_json(v, depth + 1)
    elif isinstance(value, float) and not math.isfinite(value):
        raise ValueError("numbers must be finite")


def _json_object(value: dict[str, Any]) -> dict[str, Any]:
    _check_json(value)
    if len(json.dumps(value)) > MAX_JSON_BYTES:
        raise ValueError(f"larger than {MAX_JSON_BYTES} bytes as JSON")
    return value


#: A resource name: one printable line of 1..200 characters.
Name = Annotated[str, Field(min_length=1, max_length=200), AfterValidator(_printable)]
#: A device name: one printable line of 1..100 characters.
DeviceName = Annotated[str, Field(min_length=1, max_length=100), AfterValidator(_printable)]
#: An optional label: one printable line of at most 200 characters.
Label = Annotated[str, Field(max_length=200), AfterValidator(_printable)]

#: Free text (descriptions): newlines allowed, NUL refused (PostgreSQL cannot store it).
Text = Annotated[str, Field(max_length=10_000), AfterValidator(_storable)]
#: A free-form JSON object (capabilities, extra settings) of bounded size and depth.
JsonObject = Annotated[dict[str, Any], AfterValidator(_json_object)]
