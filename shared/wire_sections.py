"""The sections of a blob: joining them behind the header on encode, decoding value sections.

After the last descriptor come, for each tensor in order, its index bytes then its value
bytes: little-endian float32 or float16 values, or (quantized) the float32 scales followed
by the packed codes. Decoding checks every value and scale (``non_finite``,
``negative_scale``) and every code (``invalid_code``); the section lengths were checked
against the descriptors before (:func:`fedge.shared.wirelayout.read_descriptors`).
"""

from __future__ import annotations

import numpy as np

from fedge.shared.quantize import Quantized, dequantize, max_code, unpack_codes
from fedge.shared.wireerror import WireFormatError
from fedge.shared.wirelayout import VALUE_F16, VALUE_F32, Descriptor

__all__ = ["decode_values", "join_sections"]


def join_sections(head: list[bytes], sections: list[np.ndarray]) -> bytes:
    """Concatenate header bytes and contiguous array sections with a single copy."""
    views = [np.ascontiguousarray(s).data.cast("B") for s in sections]
    return b"".join([*head, *views])


def decode_values(view: memoryview, d: Descriptor, *, bits: int, chunk: int) -> np.ndarray:
    """The float32 values of ``d``'s value section ``view`` (``WireFormatError`` if any is
    invalid)."""
    what = f"tensor {d.name!r}"
    if d.value_coding in (VALUE_F32, VALUE_F16):
        raw = np.frombuffer(view, dtype="<f4" if d.value_coding == VALUE_F32 else "<f2")
        values = raw.astype(np.float32)
        if not np.isfinite(values).all():
            raise WireFormatError("non_finite", f"{what}: NaN or infinite value")
        return values
    nchunks = -(-d.nnz // chunk)
    scales = np.frombuffer(view[: 4 * nchunks], dtype="<f4").astype(np.float32)
    if not np.isfinite(scales).all():
        raise WireFormatError("non_finite", f"{what}: NaN or infinite scale")
    if (scales < 0).any():
        raise WireFormatError("negative_scale", f"{what}: negative scale")
    packed = np.frombuffer(view[4 * nchunks :], dtype=np.uint8)
    codes, padding_zero = unpack_codes(packed, bits, d.nnz)
    if not padding_zero:
        raise WireFormatError("invalid_code", f"{what}: padding bits after the last code are set")
    if d.nnz and int(codes.max()) > max_code(bits):
        raise WireFormatError("invalid_code", f"{what}: code above {max_code(bits)}")
    return dequantize(Quantized(bits=bits, chunk=chunk, codes=codes, scales=scales))
