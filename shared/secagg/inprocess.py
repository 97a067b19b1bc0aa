"""One whole round in one process: every message encoded, relayed and decoded as it would be
over the network, with the drop-outs the caller asks for.

This is the reference of the message flow for the round engine (docs/secure-aggregation.md),
and what the tests and ``bench/secagg.py`` run. It counts the bytes of every message each
device sends and receives, and the coordinator's CPU time per phase.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import numpy as np
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from fedge.shared.secagg import protocol
from fedge.shared.secagg.config import RoundConfig
from fedge.shared.secagg.messages import decode_advert

__all__ = ["Dropouts", "RoundResult", "run_round"]


@dataclass(frozen=True)
class Dropouts:
    """Devices that go silent after a phase: after advertising keys (send no shares), after
    sharing (upload nothing: their pairwise masks stay in their neighbours' uploads), after
    uploading (answer no unmask request)."""

    after_advert: frozenset[int] = frozenset()
    after_shares: frozenset[int] = frozenset()
    after_upload: frozenset[int] = frozenset()


@dataclass
class RoundResult:
    total: np.ndarray
    included: list[int]
    sent_bytes: dict[int, int] = field(default_factory=dict)
    received_bytes: dict[int, int] = field(default_factory=dict)
    coordinator_cpu_s: dict[str, float] = field(default_factory=dict)


def run_round(
    cfg: RoundConfig,
    inputs: Mapping[int, np.ndarray],
    signing_keys: Mapping[int, Ed25519PrivateKey],
    entropy: Callable[[int], bytes],
    dropouts: Dropouts = Dropouts(),
    *,
    tamper: Callable[[str, int, bytes], bytes] | None = None,
) -> RoundResult:
    """Run a round for the devices in ``inputs`` (cohort index -> quantized uint32 input).

    ``tamper(phase, device, message)`` may replace any message the coordinator relays to a
    device (``"adverts"``, ``"shares"``, ``"unmask"``) or receives from one (``"masked"``,
    ``"response"``), to test that tampering is caught. Protocol errors propagate."""
    keep: Callable[[str, int, bytes], bytes] = tamper or (lambda _p, _d, m: m)
    sent = dict.fromkeys(inputs, 0)
    received = dict.fromkeys(inputs, 0)
    cpu: dict[str, float] = {}
    verify: dict[int, Ed25519PublicKey] = {u: k.public_key() for u, k in signing_keys.items()}

    def coordinator(phase: str, fn: Callable[[], object]) -> object:
        start = time.process_time()
        out = fn()
        cpu[phase] = cpu.get(phase, 0.0) + time.process_time() - start
        return out

    # 1. key advertisement
    secrets = {u: protocol.new_secrets(cfg, u, entropy) for u in sorted(inputs)}
    advert_msgs = {u: protocol.advertise(cfg, secrets[u], signing_keys[u]) for u in secrets}
    for u, m in advert_msgs.items():
        sent[u] += len(m)
    adverts = {}

    def collect_adverts() -> dict[int, bytes]:
        adverts.update({u: decode_advert(cfg, m) for u, m in advert_msgs.items()})
        return protocol.route_adverts(cfg, adverts, verify)

    lists = coordinator("adverts", collect_adverts)
    assert isinstance(lists, dict)
    # 2. share distribution
    alive = [u for u in secrets if u not in dropouts.after_advert]
    neighbour_adverts = {}
    outgoing = {}
    for u in alive:
        msg = keep("adverts", u, lists[u])
        received[u] += len(msg)
        neighbour_adverts[u] = protocol.accept_adverts(cfg, u, msg, verify)
        outgoing[u] = protocol.share_secrets(cfg, secrets[u], neighbour_adverts[u], entropy)
        sent[u] += len(outgoing[u])
    inbox = coordinator("shares", lambda: protocol.route_shares(cfg, outgoing))
    assert isinstance(inbox, dict)
    # 3. masked upload
    alive = [u for u in alive if u not in dropouts.after_shares]
    held = {}
    masked = {}
    for u in alive:
        msg = keep("shares", u, inbox[u])
        received[u] += len(msg)
        held[u] = protocol.open_shares(cfg, secrets[u], neighbour_adverts[u], msg)
        upload = protocol.mask_input(cfg, secrets[u], neighbour_adverts[u], held[u], inputs[u])
        sent[u] += len(upload)
        masked[u] = keep("masked", u, upload)
    shared = set(outgoing)
    requests = coordinator("unmask", lambda: protocol.unmask_requests(cfg, shared, set(masked)))
    assert isinstance(requests, dict)
    # 4. unmasking
    responses = {}
    for u in sorted(masked):
        if u in dropouts.after_upload:
            continue
        msg = keep("unmask", u, requests[u])
        received[u] += len(msg)
        answer = protocol.answer_unmask(cfg, secrets[u], held[u], msg)
        sent[u] += len(answer)
        responses[u] = keep("response", u, answer)
    result = coordinator("unmask", lambda: protocol.unmask(cfg, adverts, shared, masked, responses))
    assert isinstance(result, tuple)
    total, included = result
    return RoundResult(total, included, sent, received, cpu)
