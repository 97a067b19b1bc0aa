"""Key derivation and the keystream every mask and the shared support are expanded from.

A 32-byte seed is expanded by AES-256 in counter mode (initial counter block all zero) over a
zero plaintext: the keystream, read as little-endian uint32 words. This is the wire contract
(docs/secure-aggregation.md): every device and the coordinator must expand a seed to the same
vector on every platform, which numpy's generators do not promise across versions.
"""

from __future__ import annotations

import numpy as np
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

__all__ = ["SEED_BYTES", "derive", "keystream_u32", "keystream_u64"]

SEED_BYTES = 32
_ZERO_IV = bytes(16)


def derive(secret: bytes, *, salt: bytes, info: bytes, length: int = SEED_BYTES) -> bytes:
    """HKDF-SHA256 of ``secret``: ``salt`` binds the round, ``info`` the purpose."""
    return HKDF(algorithm=hashes.SHA256(), length=length, salt=salt, info=info).derive(secret)


def _keystream(seed: bytes, nbytes: int) -> bytes:
    if len(seed) != SEED_BYTES:
        raise ValueError(f"a keystream seed has {SEED_BYTES} bytes, got {len(seed)}")
    enc = Cipher(algorithms.AES(seed), modes.CTR(_ZERO_IV)).encryptor()
    return enc.update(bytes(nbytes)) + enc.finalize()


def keystream_u32(seed: bytes, n: int) -> np.ndarray:
    """``n`` uniform uint32 words from ``seed`` (AES-256-CTR keystream, little-endian)."""
    return np.frombuffer(_keystream(seed, 4 * n), dtype="<u4").astype(np.uint32, copy=False)


def keystream_u64(seed: bytes, n: int) -> np.ndarray:
    """``n`` uniform uint64 words from ``seed`` (the same keystream read 8 bytes at a time)."""
    return np.frombuffer(_keystream(seed, 8 * n), dtype="<u8").astype(np.uint64, copy=False)
