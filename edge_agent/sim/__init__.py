"""The fleet simulation: many simulated devices, each a real agent, against a real coordinator.

``fedge demo`` (:mod:`.demo`, :mod:`.demo_report`), the in-process fleet (:mod:`.fleet`), the
simulated faults it injects from outside the agent through
:class:`fedge.edge_agent.hooks.AgentHooks` (:mod:`.faults`), the coordinator subprocess it drives
(:mod:`.local_coordinator`) and the datasets and shards it trains on (:mod:`.datasets`,
:mod:`.partition`).

This subpackage may import the agent core; nothing in the agent core imports it (a device runs
no simulation code; ``tests/test_import_direction.py`` guards the rule).
"""
