"""The agent's part of a secure-aggregation round (docs/secure-aggregation.md).

After training, a device of a secure round does not upload its update: it takes part in the
round's four phases over ``/device/secagg/{round}/``. Every message it sends is made by
:class:`~fedge.edge_agent.secagg_state.DeviceRound`, which writes the round's secrets and the
message durably before it is posted, so a restarted agent (it gets the same assignment again,
trains the same update again, and comes back here) posts byte for byte what it posted before
and answers one unmask request at most.

What the device sends is its error-feedback-corrected update on the round's shared support,
clipped and quantized onto the round's grid (:func:`fedge.shared.secagg.quantized_input`);
what was not sent stays in a residual of its own (:class:`SecureResidual`, one file per task),
advanced once per round: the file names the round it was last advanced by.

Waiting for a phase to open is polling (``poll_s`` between asks, until the coordinator
answers, refuses with 409, or the agent stops).
"""

from __future__ import annotations

import logging
import os
import struct
import threading
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from fedge.edge_agent.client import CoordinatorClient, Work
from fedge.edge_agent.errors import ApiError
from fedge.edge_agent.secagg_state import DeviceRound
from fedge.shared.durable import write_bytes_atomic
from fedge.shared.modelspec import ModelSpec, Weights
from fedge.shared.secagg import Grid, RoundConfig, SecAggError, flatten, quantized_input
from fedge.shared.signing import public_key_from_b64
from fedge.shared.wireerror import WireFormatError

__all__ = ["RoundGone", "SecureResidual", "forget", "round_config", "take_part"]

log = logging.getLogger(__name__)

#: 409 codes after which this device has no part in the round any more.
GONE_CODES = frozenset({"round_ended", "not_in_phase", "phase_closed"})
_RESIDUAL_MAGIC = b"FSAR"
_RESIDUAL_HEAD = struct.Struct("<4sI32sI")  # magic, crc32 of the rest, round digest, count


class RoundGone(Exception):
    """This device is out of the round (it failed, or the device missed a phase)."""


def round_config(info: dict[str, Any], spec: ModelSpec) -> RoundConfig:
    """The round's parameters from the coordinator's config answer (``ValueError`` when they
    do not fit the task's model or name a support this agent cannot derive)."""
    if info.get("support") != "random":
        raise ValueError(f"unknown secure-aggregation support {info.get('support')!r}")
    cfg = RoundConfig(
        task_id=int(info["task_id"]),
        round=int(info["round"]),
        seed=bytes.fromhex(str(info["seed"])),
        cohort=int(info["cohort"]),
        degree=int(info["degree"]),
        threshold=int(info["threshold"]),
        size=int(info["size"]),
        k=int(info["k"]),
        grid=Grid(bound=float(info["bound"]), bits=int(info["bits"])),
    )
    if cfg.size != spec.num_params:
        raise ValueError(f"the round's model has {cfg.size} values, the task's {spec.num_params}")
    return cfg


@dataclass
class SecureResidual:
    """The error-feedback residual of secure rounds of one task (flat float32), and the digest
    of the round that last advanced it."""

    path: Path

    def load(self, size: int) -> tuple[np.ndarray, bytes]:
        """``(residual, digest)``; zeros and no digest when there is none (or it is unusable:
        the residual is then lost, which costs accuracy, never correctness)."""
        try:
            data = self.path.read_bytes()
        except FileNotFoundError:
            return np.zeros(size, dtype=np.float32), b""
        head = _RESIDUAL_HEAD.size
        if len(data) != head + 4 * size:
            log.warning("secure residual %s has the wrong size; starting from zero", self.path)
            return np.zeros(size, dtype=np.float32), b""
        magic, crc, digest, count = _RESIDUAL_HEAD.unpack_from(data)
        if magic != _RESIDUAL_MAGIC or count != size or zlib.crc32(data[8:]) != crc:
            log.warning("secure residual %s is corrupt; starting from zero", self.path)
            return np.zeros(size, dtype=np.float32), b""
        values = np.frombuffer(data, dtype="<f4", count=size, offset=head).astype(np.float32)
        return values, digest

    def save(self, residual: np.ndarray, digest: bytes) -> None:
        values = np.ascontiguousarray(residual, dtype="<f4")
        rest = digest + struct.pack("<I", values.size) + values.tobytes()
        data = _RESIDUAL_MAGIC + struct.pack("<I", zlib.crc32(rest)) + rest
        write_bytes_atomic(self.path, data, mode=0o600)


def state_dir(directory: Path) -> Path:
    return directory / "secagg"


def take_part(
    client: CoordinatorClient,
    work: Work,
    *,
    directory: Path,
    key: Ed25519PrivateKey,
    spec: ModelSpec,
    delta: Weights,
    error_feedback: bool,
    seed: int,
    stop: threading.Event,
    go_on: Callable[[str], bool] = lambda _message: True,
    poll_s: float = 0.2,
    entropy: Callable[[int], bytes] = os.urandom,
) -> None:
    """Take part in the secure round of ``work`` with the update ``delta``.

    Raises :class:`RoundGone` when the device is out of the round, ``AgentError`` on network
    trouble (the caller retries later: everything sent is kept), ``InterruptedError`` when
    ``stop`` is set. ``go_on(message)`` is asked before each post; ``False`` leaves the round
    (:class:`RoundGone`) without posting it."""
    if work.round_id is None:
        raise ValueError("a secure-aggregation assignment without a round")
    rid = work.round_id
    info = client.secagg_config(rid)
    cfg = round_config(info, spec)
    index = int(info["index"])
    keys = {i: public_key_from_b64(str(k)) for i, k in enumerate(info["public_keys"])}
    folder = state_dir(directory)
    path = folder / f"round-{work.task_id}-{rid}.state"
    try:
        round_state = (
            DeviceRound.load(cfg, path)
            if path.exists()
            else DeviceRound.start(cfg, index, path, entropy)
        )
    except WireFormatError as exc:
        # Something was posted from this file maybe: never redraw the secrets.
        raise RoundGone(f"the saved round state is unusable ({exc}); leaving the round") from exc

    def fetch(what: str) -> bytes:
        while True:
            if stop.is_set():
                raise InterruptedError("agent stopping")
            data = _gone_on_409(lambda: client.secagg_get(rid, what))
            if data is not None:
                return data
            stop.wait(poll_s)

    def post(message: str, data: bytes) -> None:
        if not go_on(message):
            raise RoundGone(f"going silent before posting {message}")
        _gone_on_409(lambda: client.secagg_post(rid, message, data))

    try:
        post("advert", round_state.advertise(key))
        post("shares", round_state.share(fetch("adverts"), keys, entropy))
        shares_in = fetch("shares")
        store = SecureResidual(folder / f"residual-{work.task_id}.bin")
        residual, advanced_by = store.load(cfg.size) if error_feedback else (None, b"")
        rng = np.random.default_rng([seed, work.assignment_id, 2])
        q, new_residual = quantized_input(cfg, flatten(delta, spec), residual, rng)
        # After a restart the stored upload is answered again (the same shares in): what is
        # quantized now is then unused, and a residual this round advanced already stays.
        masked = round_state.mask(shares_in, q, keys)
        if error_feedback and advanced_by != cfg.digest:
            store.save(new_residual, cfg.digest)
        post("masked", masked)
        post("unmask", round_state.answer(fetch("unmask"), keys))
    except SecAggError as exc:
        raise RoundGone(f"secure aggregation refused: {exc}") from exc
    path.unlink(missing_ok=True)  # the round is over for this device


def _gone_on_409(call: Callable[[], Any]) -> Any:
    try:
        return call()
    except ApiError as exc:
        if (exc.status == 409 and exc.code in GONE_CODES) or exc.status == 404:
            raise RoundGone(f"{exc.code}: {exc.detail}") from exc
        raise


def forget(directory: Path, work: Work) -> None:
    """Remove the state of a round this device is out of."""
    if work.round_id is not None:
        (state_dir(directory) / f"round-{work.task_id}-{work.round_id}.state").unlink(
            missing_ok=True
        )
