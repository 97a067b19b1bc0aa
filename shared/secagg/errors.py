"""The one error type of the secure-aggregation protocol steps (not of its decoders: a
malformed message raises :class:`fedge.shared.wireerror.WireFormatError`)."""

from __future__ import annotations

__all__ = ["CODES", "SecAggError"]

#: Every code a protocol step raises, with what it means.
CODES: dict[str, str] = {
    "bad_config": "parameters the protocol refuses (threshold, degree, grid, cohort size)",
    "overflow": "the cohort's sum could leave the integer range of Z_2^32 (refused up front)",
    "bad_signature": "a key advertisement is not signed by the device it names",
    "bad_key": "a public key is malformed or of small order (X25519 agreement fails)",
    "bad_ciphertext": "an encrypted share bundle does not decrypt (tampered, misrouted, replayed "
    "into another round)",
    "bad_share": "a share is malformed, for the wrong device, or inconsistent with the others",
    "inconsistent_sets": "the coordinator's lists of survivors and dropped devices contradict "
    "each other or what the device saw",
    "below_threshold": "fewer than t shares of a secret arrived: the round cannot be unmasked",
    "unknown_device": "a message names a device that is not in the round's cohort or graph",
}


class SecAggError(ValueError):
    """A protocol step failed. ``code`` is one of :data:`CODES`; ``detail`` says what."""

    def __init__(self, code: str, detail: str) -> None:
        if code not in CODES:
            raise ValueError(f"unknown secure-aggregation error code {code!r}")
        super().__init__(f"{code}: {detail}")
        self.code = code
        self.detail = detail
