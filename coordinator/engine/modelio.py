"""Reading and writing model weights and optimizer state through the blob store."""

from __future__ import annotations

from fedge.coordinator.blobstore import BlobStore
from fedge.coordinator.engine.strategies import OptimizerState, state_from_bytes, state_to_bytes
from fedge.shared.modelspec import ModelSpec, Weights
from fedge.shared.wire import decode_model, encode_model


def load_weights(blobs: BlobStore, digest: str, spec: ModelSpec) -> Weights:
    """The float32 weights stored under ``digest`` (checked against ``spec``)."""
    return decode_model(blobs.get(digest), spec=spec)


def store_weights(blobs: BlobStore, weights: Weights) -> tuple[str, int]:
    """Write a dense float32 model blob (durably); its digest and size."""
    data = encode_model(weights, dtype="f32")
    return blobs.put(data), len(data)


def load_state(blobs: BlobStore, digest: str | None) -> OptimizerState:
    return {} if digest is None else state_from_bytes(blobs.get(digest))


def store_state(blobs: BlobStore, state: OptimizerState) -> str | None:
    return blobs.put(state_to_bytes(state)) if state else None
