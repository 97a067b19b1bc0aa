"""Hard limits a decoder enforces before it allocates anything.

Every count and size an encoded blob declares (tensors, dimensions, names, elements) is checked
against a :class:`Limits` before any array is built, so a small malicious input cannot make a
server allocate gigabytes. The defaults fit models up to a quarter of a billion parameters;
services with tighter budgets pass their own instance.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

__all__ = ["DEFAULT_LIMITS", "MAX_CHUNK", "MAX_TENSOR_ELEMENTS", "Limits"]

#: No tensor may have more elements than this, whatever the limits say (2**31).
MAX_TENSOR_ELEMENTS = 1 << 31

#: Largest quantization chunk (values per scale) any policy or blob may declare.
MAX_CHUNK = 1 << 20


@dataclass(frozen=True, kw_only=True)
class Limits:
    """Upper bounds on what an encoded model or update may declare.

    ``max_tensor_elements`` bounds one tensor, ``max_total_elements`` the whole model (and so
    the memory ``to_dense`` needs: 4 bytes per element). ``max_chunk`` bounds the quantization
    chunk length.
    """

    max_tensors: int = 4096
    max_ndim: int = 8
    max_name_bytes: int = 256
    max_tensor_elements: int = 1 << 28
    max_total_elements: int = 1 << 28
    max_chunk: int = MAX_CHUNK

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"Limits.{f.name} must be a positive integer, got {value!r}")
        # Index arithmetic in the decoders relies on this (sums of gaps stay within int64).
        if self.max_tensor_elements > MAX_TENSOR_ELEMENTS:
            raise ValueError(f"Limits.max_tensor_elements must be at most {MAX_TENSOR_ELEMENTS}")


DEFAULT_LIMITS = Limits()
