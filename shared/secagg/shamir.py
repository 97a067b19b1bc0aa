"""Shamir secret sharing of 32-byte secrets over the prime field GF(2**521 - 1).

A secret ``S`` (read as a 256-bit big-endian integer, so always below the prime) is the
constant term of a random polynomial ``f`` of degree ``t - 1``; share ``j`` is ``(x_j,
f(x_j))`` with ``x_j >= 1`` (the recipient's cohort index + 1). Any ``t`` shares give ``S``
by Lagrange interpolation at 0; fewer reveal nothing about it. Field elements travel as 66
big-endian bytes.

Arithmetic is on Python integers: a round shares two secrets with a few dozen neighbours, so
the work is ``O(t * shares)`` big-integer multiplications per secret, none per model
coordinate.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping

from fedge.shared.secagg.errors import SecAggError

__all__ = ["ELEMENT_BYTES", "PRIME", "reconstruct", "split"]

#: The Mersenne prime 2**521 - 1.
PRIME = (1 << 521) - 1
#: Bytes of one field element on the wire.
ELEMENT_BYTES = 66
_SECRET_BYTES = 32


def split(
    secret: bytes, xs: list[int], threshold: int, entropy: Callable[[int], bytes]
) -> dict[int, bytes]:
    """Shares ``{x: f(x)}`` of a 32-byte ``secret`` for the distinct points ``xs`` (>= 1).

    ``entropy(n)`` returns ``n`` random bytes (``os.urandom`` in production; a seeded source in
    tests). Coefficients are drawn 80 bytes at a time and reduced, so their bias is below
    ``2**-119``.
    """
    if len(secret) != _SECRET_BYTES:
        raise ValueError(f"a shared secret has {_SECRET_BYTES} bytes")
    if not 1 <= threshold <= len(xs):
        raise SecAggError("bad_config", f"threshold {threshold} for {len(xs)} shares")
    if len(set(xs)) != len(xs) or any(not 1 <= x < PRIME for x in xs):
        raise ValueError("share points must be distinct and in [1, p)")
    coeffs = [int.from_bytes(secret, "big")]
    coeffs += [int.from_bytes(entropy(80), "big") % PRIME for _ in range(threshold - 1)]
    out = {}
    for x in xs:
        acc = 0
        for c in reversed(coeffs):  # Horner: t steps per share
            acc = (acc * x + c) % PRIME
        out[x] = acc.to_bytes(ELEMENT_BYTES, "big")
    return out


@functools.lru_cache(maxsize=256)
def _weights_at_zero(xs: tuple[int, ...]) -> tuple[int, ...]:
    """Lagrange weights ``w_i = prod_{j != i} x_j / (x_j - x_i)`` mod p: ``f(0) = sum w_i y_i``.

    The numerators and denominators are products of small integers, formed exactly and
    reduced once; cached, since most secrets of a round are rebuilt from the same points."""
    out = []
    for i, xi in enumerate(xs):
        num = den = 1
        for j, xj in enumerate(xs):
            if i != j:
                num *= xj
                den *= xj - xi
        out.append(num % PRIME * pow(den % PRIME, -1, PRIME) % PRIME)
    return tuple(out)


def reconstruct(shares: Mapping[int, bytes], threshold: int, *, what: str) -> bytes:
    """The secret from the ``threshold`` shares ``{x: f(x)}`` with the smallest x.

    Fewer shares raise ``below_threshold``; a malformed share or a result that is not a
    32-byte value raises ``bad_share``. Wrong but well-formed shares give a wrong secret: the
    caller checks it against the commitment the owner published (its public key, or the hash
    of its seed). ``what`` names the secret in error messages.
    """
    if len(shares) < threshold:
        raise SecAggError(
            "below_threshold", f"{what}: {len(shares)} shares arrived, {threshold} are needed"
        )
    xs, ys = [], []
    for x, raw in sorted(shares.items())[:threshold]:
        if len(raw) != ELEMENT_BYTES:
            raise SecAggError("bad_share", f"{what}: a share has {len(raw)} bytes")
        y = int.from_bytes(raw, "big")
        if y >= PRIME or not 1 <= x < PRIME:
            raise SecAggError("bad_share", f"{what}: share {x} is not a field element")
        xs.append(x)
        ys.append(y)
    weights = _weights_at_zero(tuple(xs))
    secret = sum(w * y for w, y in zip(weights, ys, strict=True)) % PRIME
    if secret >> (8 * _SECRET_BYTES):
        raise SecAggError("bad_share", f"{what}: the shares do not interpolate to a secret")
    return secret.to_bytes(_SECRET_BYTES, "big")
