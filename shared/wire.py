"""Binary wire format of model updates (device -> coordinator) and models (downloads).

The public surface of the codecs; the code lives in

* :mod:`fedge.shared.wire_update` -- updates: ``encode_update``, ``decode_update``,
  ``peek_update_header``, ``update_overhead_bytes``, ``DecodedUpdate``;
* :mod:`fedge.shared.wire_model` -- models: ``encode_model``, ``decode_model``;
* :mod:`fedge.shared.wirelayout` -- prefix, descriptors, varints, the bounds-checked reader;
* :mod:`fedge.shared.wire_sections` -- index and value sections behind the descriptors;
* :mod:`fedge.shared.wiremetrics` -- the metrics block of an update;
* :mod:`fedge.shared.wireerror` -- :class:`WireFormatError` and its codes.

There is one format version (docs/wire-format.md has the byte layout). Plain binary only (no
object serialization, no JSON arrays). Decoders validate everything and raise
:class:`WireFormatError` with a stable code; encoders raise ``ValueError`` for invalid input.
"""

from __future__ import annotations

from fedge.shared.limits import DEFAULT_LIMITS, Limits
from fedge.shared.wire_model import decode_model, encode_model
from fedge.shared.wire_update import (
    DecodedTensor,
    DecodedUpdate,
    UpdateHeader,
    decode_update,
    encode_update,
    peek_update_header,
    update_overhead_bytes,
)
from fedge.shared.wireerror import CODES, WireFormatError
from fedge.shared.wirelayout import FORMAT_VERSION, MAGIC
from fedge.shared.wiremetrics import METRIC_KEYS

__all__ = [
    "CODES",
    "DEFAULT_LIMITS",
    "FORMAT_VERSION",
    "MAGIC",
    "METRIC_KEYS",
    "DecodedTensor",
    "DecodedUpdate",
    "Limits",
    "UpdateHeader",
    "WireFormatError",
    "decode_model",
    "decode_update",
    "encode_model",
    "encode_update",
    "peek_update_header",
    "update_overhead_bytes",
]
