"""Points where whoever builds an :class:`~fedge.edge_agent.agent.Agent` may step into its work.

The agent calls these at fixed moments of an assignment and knows nothing about what a hook
stands for. Every method of :class:`AgentHooks` has a do-nothing default, which is what a real
device runs (``fedge agent run`` passes none). The fleet simulation subclasses it to inject
its faults from outside the agent (:class:`fedge.edge_agent.sim.faults.FaultHooks`); a test may use
it to act at a chosen instant.

Hooks run in the agent's thread. One that blocks should wait on the event it is given, so
that a cancellation or :meth:`~fedge.edge_agent.agent.Agent.stop` ends the wait at once.
"""

from __future__ import annotations

import threading

from fedge.edge_agent.client import Work


class AgentHooks:
    """The defaults: go ahead at every point, at once."""

    def keep_assignment(self, work: Work) -> bool:
        """Called once the base model of ``work`` is in hand, before training starts.

        ``False`` makes the agent walk away from the assignment: it neither trains nor
        uploads it (``Outcome.DROPPED``, counted in ``AgentStats.dropped``) and leaves it
        alone until the coordinator cancels it.
        """
        return True

    def training_entropy(self, work: Work) -> tuple[int, ...]:
        """What seeds the training of ``work`` besides the agent's own seed (its
        generator is ``default_rng([seed, *entropy])``): the assignment id, unique per
        assignment. A simulation that wants the same training in two runs whose assignment ids
        differ returns something both runs share (see
        :class:`fedge.edge_agent.sim.faults.FaultHooks`)."""
        return (work.assignment_id,)

    def before_training(self, work: Work, interrupted: threading.Event) -> None:
        """Called right before training, while the agent already watches for the
        assignment's cancellation. ``interrupted`` is set on cancellation or stop; the agent
        then stops at once whatever the hook did."""

    def before_first_upload(self, work: Work, stop: threading.Event) -> bool:
        """Called once a fresh update for ``work`` is safely in the outbox, before its first
        upload attempt (updates uploaded from the outbox later do not pass here). ``stop`` is
        set when the agent is asked to stop; the update then stays in the outbox.

        Return ``True`` when the hook held the upload back (counted in
        ``AgentStats.late_uploads``).
        """
        return False

    def secagg_post(self, work: Work, message: str) -> bool:
        """Secure aggregation: called before the device posts ``message`` (``advert``,
        ``shares``, ``masked``, ``unmask``) of the round of ``work``. ``False`` makes the
        device go silent in the round from there on (it posts nothing more and leaves the
        assignment alone until the coordinator ends it)."""
        return True


NO_HOOKS = AgentHooks()
