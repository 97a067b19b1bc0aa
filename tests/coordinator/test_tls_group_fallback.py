"""Where this Python's ssl module cannot select the configured ECDHE group (Debian bookworm's
python3.11 cannot select X25519: ``UNKNOWN_GROUP``), the server falls back to P-256 and says
so, instead of failing to start."""

from __future__ import annotations

import logging
import ssl

import pytest

from fedge.coordinator import tls


class _NoX25519Context(ssl.SSLContext):
    """A context that refuses X25519 the way such a Python does."""

    chosen: list[str]

    def set_ecdh_curve(self, name: str, /) -> None:
        if name == "X25519":
            raise ssl.SSLError(1, "[EC: UNKNOWN_GROUP] unknown group")
        self.chosen.append(name)
        super().set_ecdh_curve(name)


def _context() -> _NoX25519Context:
    context = _NoX25519Context(ssl.PROTOCOL_TLS_SERVER)
    context.chosen = []
    return context


def test_an_unselectable_group_falls_back_to_p256_with_a_warning(caplog) -> None:
    context = _context()
    with caplog.at_level(logging.WARNING, logger="fedge.coordinator.tls"):
        assert tls.set_group(context, "X25519") == "P-256"
    assert context.chosen == ["prime256v1"]
    assert "cannot select the TLS group X25519" in caplog.text


def test_a_selectable_group_is_taken_as_configured() -> None:
    context = _context()
    assert tls.set_group(context, "P-384") == "P-384"
    assert context.chosen == ["secp384r1"]


def test_the_fallback_group_itself_failing_is_an_error() -> None:
    class _Nothing(ssl.SSLContext):
        def set_ecdh_curve(self, name: str, /) -> None:
            raise ssl.SSLError(1, "unknown group")

    with pytest.raises(ssl.SSLError):
        tls.set_group(_Nothing(ssl.PROTOCOL_TLS_SERVER), "P-256")
