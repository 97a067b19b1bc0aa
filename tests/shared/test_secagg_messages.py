"""Decoders of the secure-aggregation messages refuse truncated, oversized and malformed input
before allocating (fedge.shared.secagg.messages)."""

from __future__ import annotations

import struct
from collections.abc import Callable

import numpy as np
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from fedge.shared.secagg import Grid, RoundConfig
from fedge.shared.secagg import messages as m
from fedge.shared.secagg.inprocess import run_round
from fedge.shared.wireerror import WireFormatError

Decoder = Callable[[RoundConfig, bytes], object]


@pytest.fixture(scope="module")
def captured() -> tuple[RoundConfig, dict[str, tuple[Decoder, bytes]]]:
    """One message of every kind from a real 4-device round."""
    gen = np.random.default_rng(61)
    cfg = RoundConfig(
        task_id=3,
        round=9,
        seed=gen.bytes(32),
        cohort=4,
        degree=3,
        threshold=2,
        size=40,
        k=10,
        grid=Grid(bound=1.0, bits=8),
    )
    keys = {u: Ed25519PrivateKey.from_private_bytes(gen.bytes(32)) for u in range(4)}
    inputs = {u: cfg.grid.quantize(gen.normal(0, 0.3, 10), gen) for u in range(4)}
    seen: dict[str, bytes] = {}

    def grab(phase: str, device: int, msg: bytes) -> bytes:
        seen.setdefault(phase, msg)
        return msg

    run_round(cfg, inputs, keys, gen.bytes, tamper=grab)
    secrets = m.decode_advert_list(cfg, seen["adverts"])
    advert = m.encode_advert(cfg, secrets[0])
    return cfg, {
        "advert": (m.decode_advert, advert),
        "advert_list": (m.decode_advert_list, seen["adverts"]),
        "shares_in": (lambda c, d: m.decode_shares(c, m.Kind.SHARES_IN, d), seen["shares"]),
        "masked": (m.decode_masked, seen["masked"]),
        "unmask_request": (m.decode_unmask_request, seen["unmask"]),
        "unmask_response": (m.decode_unmask_response, seen["response"]),
    }


KINDS = ["advert", "advert_list", "shares_in", "masked", "unmask_request", "unmask_response"]


@pytest.mark.parametrize("kind", KINDS)
def test_every_truncation_and_extension_is_refused(
    captured: tuple[RoundConfig, dict[str, tuple[Decoder, bytes]]], kind: str
) -> None:
    cfg, table = captured
    decode, msg = table[kind]
    decode(cfg, msg)  # the real message decodes
    for cut in range(len(msg)):
        with pytest.raises(WireFormatError) as err:
            decode(cfg, msg[:cut])
        assert err.value.code in {"truncated", "bad_magic"}, (cut, err.value.code)
    with pytest.raises(WireFormatError) as err:
        decode(cfg, msg + b"\0")
    assert err.value.code == "trailing_bytes"


@pytest.mark.parametrize("kind", KINDS)
def test_header_fields_are_checked(
    captured: tuple[RoundConfig, dict[str, tuple[Decoder, bytes]]], kind: str
) -> None:
    cfg, table = captured
    decode, msg = table[kind]
    for offset, value, code in [
        (0, b"X", "bad_magic"),
        (4, b"\x02", "unsupported_version"),
        (5, bytes([(msg[5] % 7) + 1]), "wrong_kind"),
        (6, b"\x01", "bad_header"),
        (8, bytes([msg[8] ^ 1]), "bad_header"),  # round digest
    ]:
        bad = msg[:offset] + value + msg[offset + 1 :]
        with pytest.raises(WireFormatError) as err:
            decode(cfg, bad)
        assert err.value.code == code


def test_huge_counts_are_refused_before_allocating(
    captured: tuple[RoundConfig, dict[str, tuple[Decoder, bytes]]],
) -> None:
    cfg, table = captured
    at = m.HEADER_BYTES
    _, adverts = table["advert_list"]
    with pytest.raises(WireFormatError) as err:
        m.decode_advert_list(cfg, adverts[:at] + struct.pack("<I", 2**32 - 1))
    assert err.value.code == "limit_exceeded"
    _, shares = table["shares_in"]
    with pytest.raises(WireFormatError) as err:
        m.decode_shares(cfg, m.Kind.SHARES_IN, shares[: at + 4] + struct.pack("<I", 5))
    assert err.value.code == "limit_exceeded"  # more entries than devices in the cohort
    _, masked = table["masked"]
    with pytest.raises(WireFormatError) as err:
        m.decode_masked(cfg, masked[: at + 4] + struct.pack("<I", 2**31) + masked[at + 8 :])
    assert err.value.code == "count_mismatch"


def test_indices_outside_the_cohort_and_duplicates_are_refused(
    captured: tuple[RoundConfig, dict[str, tuple[Decoder, bytes]]],
) -> None:
    cfg, table = captured
    at = m.HEADER_BYTES
    _, masked = table["masked"]
    with pytest.raises(WireFormatError) as err:
        m.decode_masked(cfg, masked[:at] + struct.pack("<I", 4) + masked[at + 4 :])
    assert err.value.code == "index_out_of_range"
    req = m.encode_unmask_request(cfg, m.UnmaskRequest((1, 2), (2,)))
    with pytest.raises(WireFormatError) as err:
        m.decode_unmask_request(cfg, req)
    assert err.value.code == "duplicate_index"
    _, response = table["unmask_response"]
    entry = 4 + 1 + 66
    bad_kind = response[: at + 8 + 4] + b"\x09" + response[at + 8 + 5 :]
    assert len(bad_kind) == len(response) and (len(response) - at - 8) % entry == 0
    with pytest.raises(WireFormatError) as err:
        m.decode_unmask_response(cfg, bad_kind)
    assert err.value.code == "bad_header"


@pytest.mark.parametrize(("n", "degree"), [(6, 5), (12, 4)])
def test_bytes_per_device_match_the_documented_layout(n: int, degree: int) -> None:
    """docs/secure-aggregation.md: with d neighbours and k values a device sends
    348 + 231 d + 4 k bytes and receives 140 + 328 d."""
    gen = np.random.default_rng(62)
    cfg = RoundConfig(
        task_id=3,
        round=1,
        seed=gen.bytes(32),
        cohort=n,
        degree=degree,
        threshold=degree // 2 + 1,
        size=100,
        k=17,
        grid=Grid(bound=1.0, bits=8),
    )
    keys = {u: Ed25519PrivateKey.from_private_bytes(gen.bytes(32)) for u in range(n)}
    inputs = {u: np.zeros(17, np.uint32) for u in range(n)}
    result = run_round(cfg, inputs, keys, gen.bytes)
    assert set(result.sent_bytes.values()) == {348 + 231 * degree + 4 * 17}
    assert set(result.received_bytes.values()) == {140 + 328 * degree}


@pytest.mark.parametrize("kind", KINDS)
def test_random_corruption_raises_only_wire_errors(
    captured: tuple[RoundConfig, dict[str, tuple[Decoder, bytes]]], kind: str
) -> None:
    """300 seeded corruptions of each real message (flipped bytes past the header, cuts,
    insertions): each decodes or raises WireFormatError, never anything else."""
    cfg, table = captured
    decode, msg = table[kind]
    gen = np.random.default_rng([63, KINDS.index(kind)])
    refused = 0
    for _ in range(300):
        data = bytearray(msg)
        for _ in range(int(gen.integers(1, 4))):
            at = int(gen.integers(m.HEADER_BYTES, len(data)))
            how = int(gen.integers(3))
            if how == 0:
                data[at] = int(gen.integers(256))
            elif how == 1:
                del data[at:]
            else:
                data[at:at] = gen.bytes(int(gen.integers(1, 8)))
            if len(data) <= m.HEADER_BYTES:
                break
        try:
            decode(cfg, bytes(data))
        except WireFormatError:
            refused += 1
    assert refused > 0  # most cuts and insertions change the length
