"""The agent loop: wait for work, train on local data, upload a compressed update, repeat.

One assignment goes through these steps (docs/agent.md tells the story for operators):

1. upload whatever the outbox still holds (updates computed before a crash or an outage);
2. long-poll ``GET /device/work`` for an assignment;
3. fetch the base model (cached per version, revalidated with its ETag);
4. train a copy on local data, while a background long-poll watches for cancellation;
5. delta = local - base; compress it with the task's policy and the error-feedback residual;
6. commit the encoded update (with its idempotency key and both residuals) to the outbox,
   then make the new residual current (see :mod:`fedge.edge_agent.outbox` for why in that order);
   the training and evaluation metrics travel inside the update (its metrics block);
7. upload it; remove it from the outbox on success, or discard it (restoring the residual)
   when the coordinator refuses it for good, e.g. 409 stale_update.

Steps 5-7 live in :mod:`fedge.edge_agent.uploads`. Whoever builds the agent may step in at fixed
points through :class:`~fedge.edge_agent.hooks.AgentHooks` (the fleet simulation injects its faults
there); a real device runs with the do-nothing defaults.

Errors that a later attempt may cure (network, 5xx, 429, clock skew) keep the outbox entry and
pause the loop (:mod:`fedge.edge_agent.pauses`): an idle device of a paced fleet a random part
of its pacing interval, a device that holds work for an open round a short, jittered backoff
within the round's deadline; a revoked or unknown device stops the agent with
:class:`FatalAgentError`.
"""

from __future__ import annotations

import hashlib
import logging
import threading
import time
from collections.abc import Callable, Mapping, Sequence

import numpy as np

from fedge.edge_agent import secagg_round
from fedge.edge_agent.capabilities import capabilities_report
from fedge.edge_agent.client import CoordinatorClient, Work
from fedge.edge_agent.data import LocalData
from fedge.edge_agent.errors import AgentError, ApiError, AuthError, DeviceRevoked
from fedge.edge_agent.hooks import NO_HOOKS, AgentHooks
from fedge.edge_agent.outbox import OutboxEntry, PendingUpdateExists
from fedge.edge_agent.outcome import AgentStats, Outcome
from fedge.edge_agent.pauses import WorkRetry, deadline_s, paced_retry_s
from fedge.edge_agent.state import State
from fedge.edge_agent.trainers import (
    BUILTIN_TRAINERS,
    Trainer,
    TrainerFactory,
    task_trainer_factory,
)
from fedge.edge_agent.transport import KEEPALIVE_S
from fedge.edge_agent.uploads import FATAL_CODES, local_delta, save_update, upload_entry
from fedge.edge_agent.watcher import CancelWatcher
from fedge.shared.architectures import generated_weights
from fedge.shared.broadcast import blob_kind, rebuild
from fedge.shared.modelspec import ModelSpec, Weights
from fedge.shared.policy import CompressionPolicy, PolicyError
from fedge.shared.wire import WireFormatError, decode_model, encode_model
from fedge.shared.wirelayout import KIND_MODEL

__all__ = ["Agent", "AgentStats", "FatalAgentError", "Outcome", "WorkRetry", "paced_retry_s"]

log = logging.getLogger(__name__)


def _in_spec_order(spec: ModelSpec, weights: Mapping[str, np.ndarray]) -> Weights:
    """``weights`` ordered as ``spec`` (ValueError when names or shapes differ)."""
    missing = [name for name in spec.names if name not in weights]
    if missing or len(weights) != len(spec.names):
        raise ValueError(f"trained weights do not match the model spec (missing {missing})")
    ordered = {name: weights[name] for name in spec.names}
    spec.check(ordered)
    return ordered


class _CannotTrain(Exception):
    """This device has no trainer for a task (``reason``: a decline reason code)."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(detail)
        self.reason = reason


class FatalAgentError(RuntimeError):
    """The coordinator no longer accepts this device (revoked or unknown)."""


class Agent:
    """Runs one device. Thread-safe :meth:`stop`; everything else runs in the caller's thread."""

    def __init__(
        self,
        *,
        state: State,
        client: CoordinatorClient,
        data: LocalData,
        trainer_factory: TrainerFactory | None = None,
        seed: int = 0,
        hooks: AgentHooks | None = None,
        poll_wait: float = 30.0,
        cancel_poll_wait: float | None = None,
        cancel_watch_after_s: float = 2.0,
        error_pause_s: float = 5.0,
        work_retry: WorkRetry | None = None,
        before_upload: Callable[[OutboxEntry], None] | None = None,
        stop_event: threading.Event | None = None,
        trainers: Sequence[str] | None = None,
        report_capabilities: bool = True,
        secagg_poll_s: float = 0.2,
    ) -> None:
        self.state = state
        self.client = client
        self.data = data
        self.trainer_factory = trainer_factory
        self.seed = seed
        self.hooks = hooks if hooks is not None else NO_HOOKS
        self.poll_wait = poll_wait
        self.cancel_poll_wait = poll_wait if cancel_poll_wait is None else cancel_poll_wait
        # Training shorter than this is not watched for cancellation (saves a request a round).
        self.cancel_watch_after_s = cancel_watch_after_s
        self.error_pause_s = error_pause_s
        #: The retries of a device that holds work for an open round (:class:`WorkRetry`).
        self.work_retry = work_retry if work_retry is not None else WorkRetry()
        # Failures in a row while holding work, and the assignment a failure interrupted
        # (the loop gets it again from the coordinator).
        self._failures = 0
        self._unfinished: Work | None = None
        #: Secure aggregation: the pause between asks for a phase that has not opened.
        self.secagg_poll_s = secagg_poll_s
        # Spreads a paced device's retries after an outage (:func:`paced_retry_s`) and
        # jitters the retries of a device that holds work (:class:`WorkRetry`).
        self._rng = np.random.default_rng([seed, 0x7E7])
        self.before_upload = before_upload
        self.stats = AgentStats()
        # (base version, bytes) of every accepted upload, for traffic reports
        self.uploads: list[tuple[int, int]] = []
        self._stop = stop_event if stop_event is not None else threading.Event()
        self._interrupt: threading.Event | None = None
        self._trainers: dict[int, Trainer] = {}
        self._given_up: set[int] = set()
        # (task, version) of the newest model this agent holds: polls announce it, so a work
        # answer can carry the delta chain to its base model.
        self._held: tuple[int, int] | None = None
        self.idle = True  # True while only waiting (safe to abandon at once)
        #: Whether the agent takes another assignment after the one in hand (``run``'s
        #: ``max_rounds``): only then does an upload ask for the next one.
        self.wants_more = True
        # The trainer names this agent reports: the built-in ones when it uses the trainer
        # each task names, else what the caller says its own factory provides.
        if trainers is None:
            trainers = BUILTIN_TRAINERS if trainer_factory is None else ()
        self.trainers = tuple(trainers)
        # Report once per run (again after a failure a later attempt may cure).
        self._report_pending = report_capabilities

    # -- control ---------------------------------------------------------------------------

    def stop(self) -> None:
        """Ask the loop to end; training stops at the next minibatch."""
        self._stop.set()
        interrupt = self._interrupt
        if interrupt is not None:
            interrupt.set()

    @property
    def stopping(self) -> bool:
        return self._stop.is_set()

    def _pause(self, seconds: float) -> None:
        self._stop.wait(seconds)

    def _sleep_until_reconnect(self) -> None:
        """A paced coordinator said when to come back: sleep until then, holding no
        connection when the sleep outlasts the keep-alive (docs/protocol.md, "Pace
        steering"). Without a reconnect time the next poll follows at once (long-poll)."""
        delay = self.client.reconnect_s
        if delay is None or delay <= 0:
            return
        if delay > KEEPALIVE_S:
            self.client.drop_connection()
        log.debug("coordinator paces this device: next check-in in %.0f s", delay)
        self._pause(delay)

    # -- the loop --------------------------------------------------------------------------

    def run(self, *, max_rounds: int | None = None, once: bool = False) -> AgentStats:
        """Upload pending updates, then work until stopped or until ``max_rounds``
        assignments (1 with ``once``) were handled and uploaded. Raises
        :class:`FatalAgentError` when the device is revoked or unknown."""
        limit = 1 if once else max_rounds
        handled = 0
        log.info("agent started; coordinator %s", self.client.base_url)
        self.idle = False
        while not self.stopping:
            try:
                # Updates saved before a crash or an outage go first, also when no new
                # assignment is wanted (``max_rounds=0`` only uploads what is pending).
                self.flush_outbox()
                self._report_capabilities()
                if limit is not None and handled >= limit:
                    break
                self.idle = True
                log.debug("waiting up to %.0f s for work", self.poll_wait)
                work = self.client.get_work(self.poll_wait, have=self._held)
            except AgentError as exc:
                self._check_fatal(exc)
                self._pause_after_failure(exc)
                continue
            finally:
                self.idle = False
            if work is None or work.cancelled:
                # Nothing (or nothing any more) to work on: the device is idle again.
                self._unfinished, self._failures = None, 0
            if work is None:
                self._sleep_until_reconnect()
                continue
            if work.cancelled:
                continue
            if work.assignment_id in self._given_up:
                self._wait_until_cancelled(work)
                continue
            try:
                self.wants_more = limit is None or handled + 1 < limit
                outcome = self.handle(work)
            except AgentError as exc:
                self._check_fatal(exc)
                log.warning("assignment %d interrupted: %s", work.assignment_id, exc)
                self._unfinished = work
                self._pause_after_failure(exc)
                continue
            self._unfinished, self._failures = None, 0
            if outcome is not Outcome.STOPPED:
                handled += 1
            more = limit is None or handled < limit
            if outcome is Outcome.UPLOADED and more and not self.client.holds_next:
                # A paced coordinator's upload answer says when to check in (not at once).
                self._sleep_until_reconnect()
        self.idle = True
        log.info("agent stopped after %d assignment(s)", handled)
        return self.stats

    def held_deadline(self) -> tuple[bool, float | None]:
        """Whether the agent holds work for a round (an update in its outbox, or an
        assignment a failed request interrupted), and the earliest deadline it knows of it
        (seconds since the epoch; ``None``: not known, e.g. an update saved by an older
        agent)."""
        deadlines: list[float | None] = [e.deadline for e in self.state.outbox.entries()]
        if self._unfinished is not None:
            deadlines.append(deadline_s(self._unfinished.deadline))
        known = [d for d in deadlines if d is not None]
        return bool(deadlines), min(known) if known else None

    def _pause_after_failure(self, exc: AgentError) -> None:
        """Wait after a request that failed (docs/agent.md, "Outages"). Holding work: the
        short, jittered backoff of :attr:`work_retry` within the round's deadline, a bounded
        number of times in a row; after that (and when idle) the idle fleet's pause, a random
        part of the pacing interval (:func:`paced_retry_s`), so an outage is not followed by
        a herd of retries."""
        holds, deadline = self.held_deadline()
        if holds:
            self._failures += 1
            remaining = None if deadline is None else deadline - time.time()
            pause = self.work_retry.pause_s(self._failures, remaining, self._rng)
            if pause is not None:
                log.warning(
                    "cannot reach the coordinator (%s) while holding work; retry %d in %.1f s",
                    exc,
                    self._failures,
                    pause,
                )
                self._pause(pause)
                return
            interval = self.client.paced_interval_s
        else:
            self._failures = 0
            interval = self.client.reconnect_s
        pause = paced_retry_s(interval, self.error_pause_s, self._rng)
        log.warning("cannot reach the coordinator (%s); trying again in %.0f s", exc, pause)
        self._pause(pause)

    def capabilities(self) -> dict[str, object]:
        """What this agent reports it can do (:mod:`fedge.edge_agent.capabilities`)."""
        return capabilities_report(
            self.data, trainers=self.trainers, poll_interval_s=self.poll_wait
        )

    def _report_capabilities(self) -> None:
        """Send the capability report if it is due. A coordinator that refuses it for good
        (4xx, e.g. one that predates reports) is not asked again this run; network trouble
        propagates, so the loop pauses and the report is tried again."""
        if not self._report_pending:
            return
        try:
            self.client.report_capabilities(self.capabilities())
        except ApiError as exc:
            self._check_fatal(exc)
            if isinstance(exc, AuthError) or exc.status is None or exc.status >= 500:
                raise
            log.warning("the coordinator refused the capability report: %s", exc)
        self._report_pending = False

    def _check_fatal(self, exc: AgentError) -> None:
        if isinstance(exc, DeviceRevoked) or exc.code in FATAL_CODES:
            raise FatalAgentError(
                f"the coordinator refuses this device ({exc.code}: {exc.detail}); "
                "enroll it again with a new token"
            ) from exc

    # -- one assignment --------------------------------------------------------------------

    def handle(self, work: Work) -> Outcome:
        """Work on one assignment from model download to upload."""
        self.stats.assignments += 1
        log.info(
            "got assignment %d: task %d, round %s, model version %d",
            work.assignment_id,
            work.task_id,
            work.round_id,
            work.base_version,
        )
        try:
            spec = ModelSpec.from_dict(work.spec)
            policy = CompressionPolicy.from_dict(work.compression)
        except (ValueError, PolicyError) as exc:
            return self._give_up(work, "bad_config", f"cannot work on it: {exc}")
        try:
            trainer = self._trainer_for(work)
        except _CannotTrain as exc:
            return self._give_up(work, exc.reason, str(exc))
        try:
            base = self._fetch_model(work, spec)
        except ValueError as exc:
            return self._give_up(work, "model_unavailable", f"cannot use the model: {exc}")
        except ApiError as exc:
            if isinstance(exc, AuthError) or exc.status is None or exc.status >= 500:
                raise
            return self._give_up(
                work, "model_unavailable", f"the coordinator refused the model download: {exc}"
            )
        if not self.hooks.keep_assignment(work):
            log.info("walking away from assignment %d", work.assignment_id)
            self.stats.dropped += 1
            self._given_up.add(work.assignment_id)
            self._wait_until_cancelled(work)
            return Outcome.DROPPED
        interrupt = self._new_interrupt()
        watcher = CancelWatcher(
            self.client,
            work.assignment_id,
            wait=self.cancel_poll_wait,
            on_cancel=interrupt,
            delay_s=self.cancel_watch_after_s,
        )
        started = time.monotonic()
        try:
            with watcher:
                self.hooks.before_training(work, interrupt)
                rng = np.random.default_rng([self.seed, *self.hooks.training_entropy(work)])
                result = trainer.train(base, work.training, rng, should_stop=interrupt.is_set)
                local = _in_spec_order(spec, result.weights)
            train_time = time.monotonic() - started
            if watcher.cancelled.is_set():
                log.info(
                    "assignment %d was cancelled: stopped training, dropping it",
                    work.assignment_id,
                )
                self.stats.cancelled += 1
                return Outcome.CANCELLED
            if self.stopping or result.stopped:
                log.info("stopping: assignment %d left unfinished", work.assignment_id)
                return Outcome.STOPPED
            metrics = dict(result.metrics)
            metrics.update(trainer.evaluate(local))
        except Exception as exc:  # a broken trainer must not take the agent down
            log.exception("training failed on assignment %d", work.assignment_id)
            return self._give_up(work, "training_failed", f"training failed: {exc!r}")
        finally:
            self._interrupt = None
        metrics["train_time_s"] = train_time
        log.info(
            "trained on %d examples in %.2f s (loss %.4f)",
            result.num_examples,
            train_time,
            metrics.get("train_loss", float("nan")),
        )
        if work.secure_aggregation:
            return self._secure_round(work, spec, policy, base, local)
        try:
            entry = save_update(
                self.state,
                work,
                spec=spec,
                policy=policy,
                base=base,
                local=local,
                num_examples=int(result.num_examples),
                metrics=metrics,
                seed=self.seed,
            )
        except (ValueError, PendingUpdateExists) as exc:  # e.g. a diverged model (NaN)
            return self._give_up(work, "training_failed", f"cannot make an update: {exc}")
        if self.hooks.before_first_upload(work, self._stop):
            if self.stopping:
                return Outcome.STOPPED
            self.stats.late_uploads += 1
        # A sync round's next assignment exists only once the round has been aggregated,
        # after this upload: asking for it would cost the query's bytes on every upload.
        outcome = self._upload(entry, next_work=work.mode == "async")
        if outcome is Outcome.DISCARDED:
            self._leave_refused(work)
        return outcome

    def _secure_round(
        self, work: Work, spec: ModelSpec, policy: CompressionPolicy, base: Weights, local: Weights
    ) -> Outcome:
        """Take part in the phases of a secure-aggregation round instead of uploading
        (:mod:`fedge.edge_agent.secagg_round`). Network trouble propagates: the loop pauses,
        gets the same assignment again and resumes from the saved round state."""
        try:
            delta = local_delta(work, spec=spec, base=base, local=local)
            secagg_round.take_part(
                self.client,
                work,
                directory=self.state.directory,
                key=self.state.load_key(),
                spec=spec,
                delta=delta,
                error_feedback=policy.error_feedback,
                seed=self.seed,
                stop=self._stop,
                go_on=lambda message: self.hooks.secagg_post(work, message),
                poll_s=self.secagg_poll_s,
            )
        except InterruptedError:
            return Outcome.STOPPED
        except secagg_round.RoundGone as exc:
            log.warning("out of the secure round of assignment %d: %s", work.assignment_id, exc)
            secagg_round.forget(self.state.directory, work)
            self.stats.failed += 1
            self._given_up.add(work.assignment_id)
            return Outcome.FAILED
        except ValueError as exc:
            return self._give_up(work, "bad_config", f"cannot take part in the round: {exc}")
        log.info("secure round of assignment %d done", work.assignment_id)
        self.stats.uploaded += 1
        return Outcome.UPLOADED

    def _trainer_for(self, work: Work) -> Trainer:
        """The trainer for the task: the agent's own factory when one was given, else the one
        the task names (``softmax``/``mlp`` built in, or an installed ``module:factory``).
        :class:`_CannotTrain` says why there is none (no such trainer, data that does not fit
        the model)."""
        trainer = self._trainers.get(work.task_id)
        if trainer is None:
            factory = self.trainer_factory
            if factory is None:
                try:
                    factory = task_trainer_factory(work.training)
                except (ValueError, ImportError) as exc:
                    raise _CannotTrain("no_trainer", f"no trainer for the task: {exc}") from exc
            try:
                trainer = factory(work.model, self.data)
            except (ValueError, TypeError, KeyError) as exc:
                raise _CannotTrain(
                    "data_mismatch", f"the local data does not fit the model: {exc}"
                ) from exc
            self._trainers[work.task_id] = trainer
        return trainer

    def _give_up(self, work: Work, code: str, reason: str) -> Outcome:
        """Leave an assignment this device cannot work on, and tell the coordinator at once
        (a signed decline with ``code``) so its round need not wait for this device."""
        log.error("giving up assignment %d: %s", work.assignment_id, reason)
        self.stats.failed += 1
        self._given_up.add(work.assignment_id)
        try:
            self.client.decline(work.assignment_id, code, reason)
            self.stats.declined += 1
        except AgentError as exc:
            self._check_fatal(exc)
            log.warning("could not decline assignment %d: %s", work.assignment_id, exc)
        return Outcome.FAILED

    def _leave_refused(self, work: Work) -> None:
        """The coordinator refused this assignment's update for good (e.g. 422
        ``update_out_of_range``) but may keep the assignment open: training again would make
        the same kind of update, so leave it and decline it, and the round need not wait."""
        self._given_up.add(work.assignment_id)
        try:
            self.client.decline(
                work.assignment_id, "other", "the coordinator refused this assignment's update"
            )
            self.stats.declined += 1
        except AgentError as exc:  # e.g. 409: the refusal ended the assignment already
            self._check_fatal(exc)
            log.info("assignment %d not declined: %s", work.assignment_id, exc)

    def _wait_until_cancelled(self, work: Work) -> None:
        """Stay away from an assignment until the coordinator cancels it (or a while passes)."""
        interrupt = self._new_interrupt()
        try:
            with CancelWatcher(
                self.client, work.assignment_id, wait=self.cancel_poll_wait, on_cancel=interrupt
            ):
                interrupt.wait(max(self.cancel_poll_wait, 1.0) * 4)
        finally:
            self._interrupt = None

    def _new_interrupt(self) -> threading.Event:
        """An event set by :meth:`stop` or by a cancellation, for the work at hand."""
        interrupt = threading.Event()
        self._interrupt = interrupt
        if self.stopping:
            interrupt.set()
        return interrupt

    # -- model -----------------------------------------------------------------------------

    def _fetch_model(self, work: Work, spec: ModelSpec) -> Weights:
        """The base model: from the cache when the coordinator says it is unchanged (304),
        rebuilt from the deltas since an older cached version when the coordinator sends
        those, else downloaded whole."""
        weights = self._model_of(work, spec)
        self._held = (work.task_id, work.base_version)
        return weights

    def _model_of(self, work: Work, spec: ModelSpec) -> Weights:
        task, version = work.task_id, work.base_version
        if work.model_delta is not None and work.model_delta_from is not None:
            rebuilt = self._rebuild(work, spec, work.model_delta_from, work.model_delta)
            if rebuilt is not None:
                return rebuilt
        cached = self.state.cached_model(task, version)
        if cached is None:
            older = self.state.newest_cached_version(task, below=version)
            generated = self._generated_version_zero(work) if older is None else None
            if older is not None:
                rebuilt = self._fetch_delta(work, spec, older)
                if rebuilt is not None:
                    return rebuilt
            elif generated is not None and version > 0:
                # The chain from the generated version 0 when that is smaller than the model;
                # the digest of the rebuilt weights confirms version 0 on the way.
                rebuilt = self._fetch_delta(work, spec, 0, base=generated[0])
                if rebuilt is not None:
                    return rebuilt
            elif generated is not None:
                cached = generated
        for attempt in range(2):
            etag = cached[1] if cached is not None else None
            data, new_etag = self.client.download_model(task, version, etag=etag)
            if data is None and cached is not None:
                log.info("model v%d unchanged; using the cached copy", version)
                data = cached[0]
                if self.state.cached_model(task, version) is None:  # generated, now confirmed
                    self.state.cache_model(task, version, data, cached[1])
            elif data is None:
                raise AgentError("bad_response", "304 Not Modified without a cached model")
            else:
                log.info("downloaded model v%d (%d bytes)", version, len(data))
                self.state.cache_model(task, version, data, new_etag)
            try:
                weights: Weights = decode_model(data, spec=spec)
                return weights
            except WireFormatError as exc:
                if attempt == 0 and cached is not None:
                    log.warning("cached model v%d is unreadable (%s); downloading", version, exc)
                    self.state.drop_cached_model(task, version)
                    cached = None
                    continue
                raise ValueError(f"model v{version} does not decode: {exc}") from exc
        raise AssertionError("unreachable")  # pragma: no cover

    def _generated_version_zero(self, work: Work) -> tuple[bytes, str] | None:
        """Version 0 of a built-in model generated here from the task's seed, with the ETag
        the coordinator gives it when it broadcasts exactly these weights: the download then
        answers 304 Not Modified and carries no model (any other version 0 comes down whole)."""
        try:
            weights = generated_weights(work.model)
        except ValueError:
            return None
        if weights is None:
            return None
        data = encode_model(weights)
        return data, f'"{hashlib.sha256(data).hexdigest()}"'

    def _fetch_delta(
        self, work: Work, spec: ModelSpec, have: int, *, base: bytes | None = None
    ) -> Weights | None:
        """The model of ``work`` from version ``have`` (cached, or the encoded ``base``) and
        what the coordinator sends for it (a delta chain, or the full model when that is
        smaller); ``None`` when the base or the chain is unusable, so the caller downloads the
        full model."""
        task, version = work.task_id, work.base_version
        if base is None and self.state.cached_model(task, have) is None:
            return None
        held = None if base is None else hashlib.sha256(base).hexdigest()
        data, etag = self.client.download_model(task, version, have=have, held=held)
        if data is None:  # no If-None-Match was sent: a 304 here is not ours
            return None
        if blob_kind(data) != KIND_MODEL:
            return self._rebuild(work, spec, have, data, base=base)
        try:
            weights: Weights = decode_model(data, spec=spec)
        except WireFormatError as exc:
            log.warning("model v%d does not decode (%s); downloading it again", version, exc)
            return None
        log.info("downloaded model v%d (%d bytes)", version, len(data))
        self.state.cache_model(task, version, data, etag)
        return weights

    def _rebuild(
        self, work: Work, spec: ModelSpec, have: int, chain: bytes, *, base: bytes | None = None
    ) -> Weights | None:
        """Apply ``chain`` to the model of version ``have`` (cached, or the encoded ``base``)
        and cache the result; ``None`` (the chain refused, or no usable base) when it cannot
        be done."""
        task, version = work.task_id, work.base_version
        cached = self.state.cached_model(task, have) if base is None else (base, "")
        if cached is None:
            return None
        try:
            held = decode_model(cached[0], spec=spec)
        except WireFormatError as exc:
            log.warning("cached model v%d is unreadable (%s); dropping it", have, exc)
            self.state.drop_cached_model(task, have)
            return None
        try:
            weights = rebuild(held, chain, spec, task_id=task, have=have, want=version)
        except WireFormatError as exc:
            log.warning(
                "the model update v%d -> v%d was refused (%s); downloading the full model",
                have,
                version,
                exc,
            )
            self.stats.refused_deltas += 1
            return None
        log.info("model v%d rebuilt from v%d and %d delta bytes", version, have, len(chain))
        data = encode_model(weights)
        self.state.cache_model(task, version, data, f'"{hashlib.sha256(data).hexdigest()}"')
        return weights

    # -- update ----------------------------------------------------------------------------

    def flush_outbox(self) -> None:
        """Upload every pending update (oldest first). Network trouble propagates."""
        for entry in self.state.outbox.entries():
            if self.stopping:
                return
            log.info("uploading saved update for assignment %d", entry.assignment_id)
            self._upload(entry)

    def _upload(self, entry: OutboxEntry, *, next_work: bool = False) -> Outcome:
        """Upload ``entry``; with ``next_work`` (the update just trained, when the agent
        goes on working) the answer may carry the next assignment, which the loop's next
        ``get_work`` then returns without a request."""
        if self.before_upload is not None:
            self.before_upload(entry)
        return upload_entry(
            self.state,
            self.client,
            entry,
            stats=self.stats,
            uploads=self.uploads,
            next_work=next_work and self.wants_more and not self.stopping,
            have=self._held,
        )
