"""The one error type of the binary codecs, with a stable code per kind of failure.

Servers map :class:`WireFormatError` to a 4xx response ``{"error": code, "detail": detail}``;
the codes below are part of the wire-format contract (docs/wire-format.md) and never change
meaning.
"""

from __future__ import annotations

__all__ = ["CODES", "WireFormatError"]

#: Every code a decoder raises, with what it means.
CODES: dict[str, str] = {
    "bad_magic": "the input does not start with the fedge magic bytes",
    "unsupported_version": "the format version is not one this decoder reads",
    "wrong_kind": "a blob of another kind (update, model, model delta, delta chain) than expected",
    "truncated": "the input ends before a declared field or section",
    "trailing_bytes": "bytes follow the last declared section",
    "limit_exceeded": "a declared count or size is larger than the decoder's limits",
    "bad_header": "a fixed header field holds an invalid value",
    "bad_varint": "a variable-length integer is longer than 10 bytes, overflows 64 bits, or is "
    "not in its shortest form",
    "bad_descriptor": "a tensor descriptor is inconsistent (name, sizes, counts)",
    "unknown_encoding": "a tensor uses an index or value encoding this decoder does not know",
    "non_finite": "a value or scale is NaN or infinite",
    "negative_scale": "a quantization scale is negative",
    "invalid_code": "a quantization code is outside the grid, or padding bits are set",
    "bad_index_coding": "a compressed index stream is malformed",
    "count_mismatch": "an index stream holds a different number of indices than declared",
    "index_out_of_range": "an index is not smaller than the tensor size",
    "indices_not_sorted": "indices are not in increasing order",
    "duplicate_index": "an index occurs twice",
    "shape_mismatch": "names, order or shapes differ from the expected model spec",
    "policy_mismatch": "the update does not obey the task's compression policy",
    "checksum_mismatch": "a stored checksum does not match the data, or a rebuilt model does "
    "not match the digest its delta announced",
    "chain_mismatch": "a model delta does not lead from the version held to the one wanted",
    "bad_metrics": "the metrics block of an update is malformed or a metric is out of range",
}


class WireFormatError(ValueError):
    """Invalid encoded data. ``code`` is one of :data:`CODES`; ``detail`` says what exactly."""

    def __init__(self, code: str, detail: str) -> None:
        if code not in CODES:
            raise ValueError(f"unknown wire error code {code!r}")
        super().__init__(f"{code}: {detail}")
        self.code = code
        self.detail = detail
