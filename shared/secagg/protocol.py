"""The protocol steps of one secure-aggregation round (Bonawitz et al. 2017 on the SecAgg+
neighbour graph of Bell et al. 2020), as pure functions over the messages of
:mod:`fedge.shared.secagg.messages`.

Device ``u`` (``index`` in the cohort), per round:

1. :func:`new_secrets` and :func:`advertise`: fresh X25519 key pairs ``(c, s)``, a self-mask
   seed ``b``, and a signed advertisement of ``c_pk``, ``s_pk`` and a commitment to ``b``.
2. :func:`accept_adverts` (its neighbours' advertisements, signatures checked) and
   :func:`share_secrets`: Shamir shares of ``b`` and of ``s_sk`` for every advertised
   neighbour, each encrypted with AES-GCM under a key agreed from the ``c`` keys.
3. :func:`open_shares` (the shares its neighbours sent it) and :func:`mask_input`: the
   quantized input plus ``PRG(b)`` plus, for every neighbour ``v`` that shared, ``+PRG(s_uv)``
   if ``u < v`` and ``-PRG(s_uv)`` if ``u > v``, all mod 2**32.
4. :func:`answer_unmask`: for each neighbour the coordinator says uploaded, the share of its
   ``b``; for each it says did not, the share of its ``s_sk``; never both for one device.

The coordinator relays (:func:`route_shares`), then :func:`unmask` sums the masked inputs,
rebuilds the survivors' ``b`` and the dropped devices' ``s_sk`` from at least ``t`` shares,
checks each against its advertised commitment, and removes the masks that remain.
"""

from __future__ import annotations

import dataclasses
import hashlib
import struct
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import numpy as np
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from fedge.shared.secagg import shamir
from fedge.shared.secagg.config import RoundConfig
from fedge.shared.secagg.errors import SecAggError
from fedge.shared.secagg.messages import (
    SHARE_PLAINTEXT_BYTES,
    Advert,
    Kind,
    SealedShare,
    ShareKind,
    UnmaskRequest,
    decode_advert_list,
    decode_masked,
    decode_shares,
    decode_unmask_request,
    decode_unmask_response,
    encode_advert,
    encode_advert_list,
    encode_masked,
    encode_shares,
    encode_unmask_request,
    encode_unmask_response,
)
from fedge.shared.secagg.prg import derive, keystream_u32
from fedge.shared.signing import SignatureError, verify_signature

__all__ = [
    "DeviceSecrets",
    "HeldShares",
    "accept_adverts",
    "advertise",
    "answer_unmask",
    "check_advert",
    "commit",
    "mask_input",
    "new_secrets",
    "open_shares",
    "route_adverts",
    "route_shares",
    "share_secrets",
    "unmask",
    "unmask_requests",
]

Entropy = Callable[[int], bytes]
_PAIR = struct.Struct("<II")


def _raw(key: X25519PublicKey) -> bytes:
    return key.public_bytes(Encoding.Raw, PublicFormat.Raw)


@dataclass(frozen=True)
class DeviceSecrets:
    """A device's secrets for one round (never leave the device except as shares)."""

    index: int
    c_sk: X25519PrivateKey
    s_sk: X25519PrivateKey
    b_seed: bytes

    def s_sk_bytes(self) -> bytes:
        return self.s_sk.private_bytes_raw()


def new_secrets(cfg: RoundConfig, index: int, entropy: Entropy) -> DeviceSecrets:
    """Fresh round secrets; ``entropy`` is ``os.urandom`` except in tests."""
    if not 0 <= index < cfg.cohort:
        raise SecAggError("unknown_device", f"device {index} is not in the cohort")
    return DeviceSecrets(
        index,
        X25519PrivateKey.from_private_bytes(entropy(32)),
        X25519PrivateKey.from_private_bytes(entropy(32)),
        entropy(32),
    )


def commit(cfg: RoundConfig, b_seed: bytes) -> bytes:
    """The published commitment to a self-mask seed (hiding: the seed has 256 random bits)."""
    return hashlib.sha256(b"fedge-secagg commit v1" + cfg.digest + b_seed).digest()


def advertise(cfg: RoundConfig, secrets: DeviceSecrets, signing_key: Ed25519PrivateKey) -> bytes:
    """Step 1: the ``ADVERT`` message, signed with the device's enrolment key."""
    unsigned = Advert(
        secrets.index,
        _raw(secrets.c_sk.public_key()),
        _raw(secrets.s_sk.public_key()),
        commit(cfg, secrets.b_seed),
        b"",
    )
    signature = signing_key.sign(unsigned.signed_bytes(cfg.digest))
    return encode_advert(cfg, dataclasses.replace(unsigned, signature=signature))


def check_advert(cfg: RoundConfig, advert: Advert, verify_key: Ed25519PublicKey) -> None:
    """Refuse (``bad_signature``) an advertisement its device did not sign for this round."""
    try:
        verify_signature(verify_key, advert.signature, advert.signed_bytes(cfg.digest))
    except SignatureError as exc:
        raise SecAggError("bad_signature", f"advert of device {advert.index}: {exc}") from None


def route_adverts(
    cfg: RoundConfig, adverts: Mapping[int, Advert], verify_keys: Mapping[int, Ed25519PublicKey]
) -> dict[int, bytes]:
    """Coordinator: check every advertisement, then send each advertised device the list of
    its advertised neighbours' advertisements."""
    for a in adverts.values():
        check_advert(cfg, a, verify_keys[a.index])
    return {
        u: encode_advert_list(cfg, [adverts[v] for v in cfg.graph.neighbours[u] if v in adverts])
        for u in adverts
    }


def accept_adverts(
    cfg: RoundConfig,
    index: int,
    data: bytes,
    verify_keys: Mapping[int, Ed25519PublicKey],
) -> dict[int, Advert]:
    """Device: its neighbours' advertisements, each signature checked; fewer than ``t``
    neighbours means the round cannot be unmasked, so the device stops (``below_threshold``)."""
    out = {}
    neighbours = set(cfg.graph.neighbours[index])
    for a in decode_advert_list(cfg, data):
        if a.index not in neighbours:
            raise SecAggError("unknown_device", f"device {a.index} is not a neighbour of {index}")
        check_advert(cfg, a, verify_keys[a.index])
        out[a.index] = a
    if len(out) < cfg.threshold:
        raise SecAggError(
            "below_threshold", f"{len(out)} neighbours advertised keys, {cfg.threshold} needed"
        )
    return out


def _agree(private: X25519PrivateKey, public: bytes) -> bytes:
    try:
        return private.exchange(X25519PublicKey.from_public_bytes(public))
    except ValueError as exc:  # small-order point: the shared secret would be all zero
        raise SecAggError("bad_key", f"key agreement failed: {exc}") from None


def _pair_info(label: bytes, u: int, v: int) -> bytes:
    return label + _PAIR.pack(min(u, v), max(u, v))


def _channel(cfg: RoundConfig, secrets: DeviceSecrets, peer: Advert) -> AESGCM:
    shared = _agree(secrets.c_sk, peer.c_pk)
    info = _pair_info(b"fedge-secagg channel v1", secrets.index, peer.index)
    return AESGCM(derive(shared, salt=cfg.digest, info=info))


def _nonce(sender: int, recipient: int) -> bytes:
    # One message per direction per pair per round, and a fresh key per round: never reused.
    return _PAIR.pack(sender, recipient) + bytes(4)


def share_secrets(
    cfg: RoundConfig, secrets: DeviceSecrets, adverts: Mapping[int, Advert], entropy: Entropy
) -> bytes:
    """Step 2: ``SHARES_OUT``, one sealed bundle (shares of ``b`` and ``s_sk``) per advertised
    neighbour; share points are cohort index + 1."""
    peers = sorted(adverts)
    xs = [v + 1 for v in peers]
    b_shares = shamir.split(secrets.b_seed, xs, cfg.threshold, entropy)
    s_shares = shamir.split(secrets.s_sk_bytes(), xs, cfg.threshold, entropy)
    sealed = []
    for v in peers:
        plain = _PAIR.pack(secrets.index, v) + b_shares[v + 1] + s_shares[v + 1]
        ct = _channel(cfg, secrets, adverts[v]).encrypt(_nonce(secrets.index, v), plain, cfg.digest)
        sealed.append(SealedShare(v, ct))
    return encode_shares(cfg, Kind.SHARES_OUT, secrets.index, sealed)


def route_shares(cfg: RoundConfig, outgoing: Mapping[int, bytes]) -> dict[int, bytes]:
    """Coordinator: regroup the sealed bundles by recipient (``SHARES_IN`` per recipient).
    A bundle to a non-neighbour, or a message from another device than its sender, is refused
    with ``unknown_device``."""
    inbox: dict[int, list[SealedShare]] = {}
    for sender, data in outgoing.items():
        device, sealed = decode_shares(cfg, Kind.SHARES_OUT, data)
        if device != sender:
            raise SecAggError("unknown_device", f"device {sender} sent shares as {device}")
        for s in sealed:
            if not cfg.graph.are_neighbours(sender, s.peer):
                raise SecAggError("unknown_device", f"{s.peer} is not a neighbour of {sender}")
            inbox.setdefault(s.peer, []).append(SealedShare(sender, s.ciphertext))
    return {v: encode_shares(cfg, Kind.SHARES_IN, v, inbox[v]) for v in sorted(inbox)}


@dataclass(frozen=True)
class HeldShares:
    """The shares a device holds of one neighbour's secrets."""

    b_share: bytes
    s_share: bytes


def open_shares(
    cfg: RoundConfig, secrets: DeviceSecrets, adverts: Mapping[int, Advert], data: bytes
) -> dict[int, HeldShares]:
    """Step 3a: decrypt the bundles addressed to this device. A bundle that does not decrypt
    (tampered, or sealed for another pair or round) raises ``bad_ciphertext``; fewer than ``t``
    senders, ``below_threshold``."""
    device, sealed = decode_shares(cfg, Kind.SHARES_IN, data)
    if device != secrets.index:
        raise SecAggError("unknown_device", f"shares for device {device} sent to {secrets.index}")
    held = {}
    for s in sealed:
        peer = adverts.get(s.peer)
        if peer is None:
            raise SecAggError("unknown_device", f"shares from {s.peer}, which did not advertise")
        try:
            plain = _channel(cfg, secrets, peer).decrypt(
                _nonce(s.peer, secrets.index), s.ciphertext, cfg.digest
            )
        except InvalidTag:
            raise SecAggError("bad_ciphertext", f"the bundle from {s.peer} is corrupt") from None
        if len(plain) != SHARE_PLAINTEXT_BYTES or _PAIR.unpack_from(plain) != (
            s.peer,
            secrets.index,
        ):
            raise SecAggError("bad_share", f"the bundle from {s.peer} names other devices")
        held[s.peer] = HeldShares(
            plain[8 : 8 + shamir.ELEMENT_BYTES], plain[8 + shamir.ELEMENT_BYTES :]
        )
    if len(held) < cfg.threshold:
        raise SecAggError(
            "below_threshold", f"{len(held)} neighbours sent shares, {cfg.threshold} needed"
        )
    return held


def _self_mask(cfg: RoundConfig, b_seed: bytes) -> np.ndarray:
    return keystream_u32(derive(b_seed, salt=cfg.digest, info=b"fedge-secagg self mask v1"), cfg.k)


def _pair_mask(
    cfg: RoundConfig, s_sk: X25519PrivateKey, u: int, v: int, s_pk_v: bytes
) -> np.ndarray:
    shared = _agree(s_sk, s_pk_v)
    seed = derive(shared, salt=cfg.digest, info=_pair_info(b"fedge-secagg mask v1", u, v))
    return keystream_u32(seed, cfg.k)


def mask_input(
    cfg: RoundConfig,
    secrets: DeviceSecrets,
    adverts: Mapping[int, Advert],
    held: Mapping[int, HeldShares],
    quantized: np.ndarray,
) -> bytes:
    """Step 3b: the ``MASKED`` upload of a quantized input (uint32, ``k`` values) masked with
    the self mask and a pairwise mask for each neighbour that shared (``held``)."""
    q = np.asarray(quantized)
    if q.dtype != np.uint32 or q.shape != (cfg.k,):
        raise ValueError(f"the quantized input must be uint32 of shape ({cfg.k},)")
    y = q + _self_mask(cfg, secrets.b_seed)
    u = secrets.index
    for v in sorted(held):
        m = _pair_mask(cfg, secrets.s_sk, u, v, adverts[v].s_pk)
        if u < v:
            y += m
        else:
            y -= m
    return encode_masked(cfg, u, y)


def unmask_requests(cfg: RoundConfig, shared: set[int], uploaded: set[int]) -> dict[int, bytes]:
    """Coordinator: for every device that uploaded, its neighbours' status among those that
    shared secrets (uploaded: survivor; shared but no upload: dropped)."""
    if not uploaded <= shared:
        raise SecAggError("inconsistent_sets", "an upload from a device that shared no secrets")
    out = {}
    for u in sorted(uploaded):
        near = [v for v in cfg.graph.neighbours[u] if v in shared]
        req = UnmaskRequest(
            tuple(v for v in near if v in uploaded), tuple(v for v in near if v not in uploaded)
        )
        out[u] = encode_unmask_request(cfg, req)
    return out


def answer_unmask(
    cfg: RoundConfig, secrets: DeviceSecrets, held: Mapping[int, HeldShares], data: bytes
) -> bytes:
    """Step 4: the ``UNMASK_RESPONSE``. The device checks that the lists cover exactly the
    neighbours it holds shares of, that it is itself counted as a survivor (it uploaded), and
    that at least ``t`` neighbours survived, before revealing anything. A device must answer
    at most once per round (the caller keeps that state): answering two different lists could
    reveal both secrets of one neighbour."""
    req = decode_unmask_request(cfg, data)
    listed = set(req.survivors) | set(req.dropped)
    if listed != set(held):
        raise SecAggError(
            "inconsistent_sets", "the lists do not match the shares this device holds"
        )
    if len(req.survivors) + 1 < cfg.threshold:
        raise SecAggError(
            "below_threshold", f"{len(req.survivors)} neighbours uploaded, too few to unmask"
        )
    entries = [(v, ShareKind.SELF_MASK_SEED, held[v].b_share) for v in req.survivors]
    entries += [(v, ShareKind.MASK_KEY, held[v].s_share) for v in req.dropped]
    return encode_unmask_response(cfg, secrets.index, entries)


def unmask(
    cfg: RoundConfig,
    adverts: Mapping[int, Advert],
    shared: set[int],
    masked: Mapping[int, bytes],
    responses: Mapping[int, bytes],
) -> tuple[np.ndarray, list[int]]:
    """Coordinator: the exact uint32 sum of the quantized inputs of the devices whose masked
    upload is in ``masked`` (all of them in ``shared``, the devices that sent shares), and the
    sorted list of those devices.

    ``responses`` are the unmask answers that arrived (from any subset of the uploaders). Each
    survivor's ``b`` and each dropped device's ``s_sk`` is rebuilt from the shares its
    neighbours returned (``below_threshold`` if fewer than ``t``) and checked against its
    advertisement (``bad_share`` if it does not match: a device returned a wrong share)."""
    uploaded = set(masked)
    if not uploaded <= shared:
        raise SecAggError("inconsistent_sets", "an upload from a device that shared no secrets")
    if not uploaded:
        raise SecAggError("below_threshold", "no device uploaded")
    total = np.zeros(cfg.k, dtype=np.uint32)
    for u in sorted(uploaded):
        device, values = decode_masked(cfg, masked[u])
        if device != u:
            raise SecAggError("unknown_device", f"device {u} uploaded as {device}")
        total += values
    b_shares: dict[int, dict[int, bytes]] = {u: {} for u in uploaded}
    s_shares: dict[int, dict[int, bytes]] = {u: {} for u in shared - uploaded}
    for responder, data in responses.items():
        device, entries = decode_unmask_response(cfg, data)
        if device != responder or responder not in uploaded:
            raise SecAggError("unknown_device", f"unexpected unmask answer from {responder}")
        for owner, kind, share in entries:
            table = b_shares if kind is ShareKind.SELF_MASK_SEED else s_shares
            if owner not in table or not cfg.graph.are_neighbours(responder, owner):
                raise SecAggError("bad_share", f"{responder} answered for {owner} out of turn")
            table[owner][responder + 1] = share
    for u, shares in sorted(b_shares.items()):
        b_seed = shamir.reconstruct(shares, cfg.threshold, what=f"self-mask seed of {u}")
        if commit(cfg, b_seed) != adverts[u].b_commit:
            raise SecAggError("bad_share", f"the rebuilt self-mask seed of {u} is wrong")
        total -= _self_mask(cfg, b_seed)
    for u, shares in sorted(s_shares.items()):
        raw = shamir.reconstruct(shares, cfg.threshold, what=f"mask key of {u}")
        s_sk = X25519PrivateKey.from_private_bytes(raw)
        if _raw(s_sk.public_key()) != adverts[u].s_pk:
            raise SecAggError("bad_share", f"the rebuilt mask key of {u} is wrong")
        for v in cfg.graph.neighbours[u]:
            if v in uploaded:
                m = _pair_mask(cfg, s_sk, u, v, adverts[v].s_pk)
                # v added +m if v < u, -m if v > u: take it back out.
                if v < u:
                    total -= m
                else:
                    total += m
    return total, sorted(uploaded)
