"""A device's durable state through one secure-aggregation round.

Every message a device sends in a round depends on secrets and random draws it must not lose
or redraw: a restarted device that advertised other keys, sent other shares, masked its input
again with a fresh rounding, or answered a second, different unmask request would break the
round or, worse, reveal both secrets of a neighbour. So :class:`DeviceRound` writes its
secrets and every message it sends (and the incoming message it answered) to one file,
atomically and durably (``fedge.shared.durable``), **before** the message is handed to the
network; each step is idempotent: asked again with the same incoming message, it returns the
stored answer; asked with a different one, it refuses (``inconsistent_sets``).

File layout (little-endian)::

    magic "FSAS" | version u16 (1) | reserved u16 (0) | crc32 u32 of the rest
    round digest 32 | index u32 | c_sk 32 | s_sk 32 | b_seed 32
    then 7 sections, each ``length u32 | bytes`` (length 0: not reached yet):
    advert, advert list, shares out, shares in, masked, unmask request, unmask response

The agent's round loop (:mod:`fedge.edge_agent.secagg_round`) keeps one per round it takes
part in: the device side of "restart in every phase" (docs/secure-aggregation.md, "Engine
integration").
"""

from __future__ import annotations

import struct
import zlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from fedge.shared.durable import write_bytes_atomic
from fedge.shared.secagg import RoundConfig, SecAggError, protocol
from fedge.shared.secagg.messages import Advert
from fedge.shared.wireerror import WireFormatError

__all__ = ["SECTIONS", "DeviceRound"]

_MAGIC = b"FSAS"
_VERSION = 1
_HEAD = struct.Struct("<4sHHI")
_FIXED = struct.Struct("<32sI32s32s32s")
#: The stored messages, in file order.
SECTIONS = (
    "advert",
    "advert_list",
    "shares_out",
    "shares_in",
    "masked",
    "unmask_request",
    "unmask_response",
)
#: No section may be larger (a masked upload of 2**26 values).
_MAX_SECTION = 1 << 28
STATE_FILE_MODE = 0o600


@dataclass
class DeviceRound:
    """One device's secrets and sent messages for one round, kept in ``path``."""

    cfg: RoundConfig
    path: Path
    secrets: protocol.DeviceSecrets
    messages: dict[str, bytes] = field(default_factory=dict)

    # -- life cycle -------------------------------------------------------------------------

    @classmethod
    def start(
        cls, cfg: RoundConfig, index: int, path: str | Path, entropy: Callable[[int], bytes]
    ) -> DeviceRound:
        """Fresh secrets for the round, saved before anything is sent."""
        state = cls(cfg, Path(path), protocol.new_secrets(cfg, index, entropy))
        state.save()
        return state

    @classmethod
    def load(cls, cfg: RoundConfig, path: str | Path) -> DeviceRound:
        """The state saved at ``path``; ``WireFormatError`` for a torn or altered file or one
        of another round."""
        data = Path(path).read_bytes()
        if len(data) < _HEAD.size + _FIXED.size:
            raise WireFormatError("truncated", "secure-aggregation state file is incomplete")
        magic, version, reserved, crc = _HEAD.unpack_from(data, 0)
        if magic != _MAGIC:
            raise WireFormatError("bad_magic", "not a secure-aggregation state file")
        if version != _VERSION or reserved != 0:
            raise WireFormatError("unsupported_version", f"state file version {version}")
        if zlib.crc32(data[_HEAD.size :]) != crc:
            raise WireFormatError("checksum_mismatch", "secure-aggregation state file is corrupt")
        digest, index, c_sk, s_sk, b_seed = _FIXED.unpack_from(data, _HEAD.size)
        if digest != cfg.digest:
            raise WireFormatError("bad_header", "the state file belongs to another round")
        at = _HEAD.size + _FIXED.size
        messages = {}
        for name in SECTIONS:
            if len(data) < at + 4:
                raise WireFormatError("truncated", f"state file: {name} length missing")
            (length,) = struct.unpack_from("<I", data, at)
            if length > _MAX_SECTION or len(data) < at + 4 + length:
                raise WireFormatError("truncated", f"state file: {name} is incomplete")
            if length:
                messages[name] = data[at + 4 : at + 4 + length]
            at += 4 + length
        if at != len(data):
            raise WireFormatError("trailing_bytes", "bytes after the state file's sections")
        secrets = protocol.DeviceSecrets(
            index,
            X25519PrivateKey.from_private_bytes(c_sk),
            X25519PrivateKey.from_private_bytes(s_sk),
            b_seed,
        )
        return cls(cfg, Path(path), secrets, messages)

    def to_bytes(self) -> bytes:
        body = [
            _FIXED.pack(
                self.cfg.digest,
                self.secrets.index,
                self.secrets.c_sk.private_bytes_raw(),
                self.secrets.s_sk_bytes(),
                self.secrets.b_seed,
            )
        ]
        for name in SECTIONS:
            blob = self.messages.get(name, b"")
            body += [struct.pack("<I", len(blob)), blob]
        rest = b"".join(body)
        return _HEAD.pack(_MAGIC, _VERSION, 0, zlib.crc32(rest)) + rest

    def save(self) -> None:
        write_bytes_atomic(self.path, self.to_bytes(), mode=STATE_FILE_MODE)

    # -- the four steps, each idempotent -------------------------------------------------------

    def _step(self, incoming: str | None, data: bytes | None, outgoing: str) -> bytes | None:
        """The stored answer when this step ran before with the same incoming message."""
        if incoming is not None:
            seen = self.messages.get(incoming)
            if seen is not None and seen != data:
                raise SecAggError(
                    "inconsistent_sets", f"a different {incoming} after this device answered one"
                )
        return self.messages.get(outgoing)

    def _record(self, incoming: str | None, data: bytes | None, outgoing: str, out: bytes) -> bytes:
        if incoming is not None and data is not None:
            self.messages[incoming] = data
        self.messages[outgoing] = out
        self.save()  # durable before the caller sends it
        return out

    def advertise(self, signing_key: Ed25519PrivateKey) -> bytes:
        done = self._step(None, None, "advert")
        if done is not None:
            return done
        return self._record(
            None, None, "advert", protocol.advertise(self.cfg, self.secrets, signing_key)
        )

    def _adverts(self, verify_keys: Mapping[int, Ed25519PublicKey]) -> dict[int, Advert]:
        return protocol.accept_adverts(
            self.cfg, self.secrets.index, self.messages["advert_list"], verify_keys
        )

    def share(
        self,
        advert_list: bytes,
        verify_keys: Mapping[int, Ed25519PublicKey],
        entropy: Callable[[int], bytes],
    ) -> bytes:
        done = self._step("advert_list", advert_list, "shares_out")
        if done is not None:
            return done
        adverts = protocol.accept_adverts(self.cfg, self.secrets.index, advert_list, verify_keys)
        out = protocol.share_secrets(self.cfg, self.secrets, adverts, entropy)
        return self._record("advert_list", advert_list, "shares_out", out)

    def mask(
        self,
        shares_in: bytes,
        quantized: np.ndarray,
        verify_keys: Mapping[int, Ed25519PublicKey],
    ) -> bytes:
        done = self._step("shares_in", shares_in, "masked")
        if done is not None:
            return done
        adverts = self._adverts(verify_keys)
        held = protocol.open_shares(self.cfg, self.secrets, adverts, shares_in)
        out = protocol.mask_input(self.cfg, self.secrets, adverts, held, quantized)
        return self._record("shares_in", shares_in, "masked", out)

    def answer(self, request: bytes, verify_keys: Mapping[int, Ed25519PublicKey]) -> bytes:
        """The unmask response; at most one per round, whatever restarts happen."""
        done = self._step("unmask_request", request, "unmask_response")
        if done is not None:
            return done
        if "masked" not in self.messages:
            raise SecAggError("inconsistent_sets", "an unmask request before this device uploaded")
        adverts = self._adverts(verify_keys)
        held = protocol.open_shares(self.cfg, self.secrets, adverts, self.messages["shares_in"])
        out = protocol.answer_unmask(self.cfg, self.secrets, held, request)
        return self._record("unmask_request", request, "unmask_response", out)
