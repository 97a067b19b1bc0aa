"""Secure aggregation over a shared sparse support with quantized, masked inputs.

Pure protocol code (numpy and cryptography only): the round's public parameters
(:class:`RoundConfig`), the shared support (seeded random-k, or from the published
aggregates), the fixed integer grid, Shamir sharing,
the SecAgg+ neighbour graph, the message encodings and the protocol steps. The design, the
threat model and the message layouts are in docs/secure-aggregation.md.
"""

from fedge.shared.secagg.config import MAX_COHORT, RoundConfig
from fedge.shared.secagg.errors import SecAggError
from fedge.shared.secagg.graph import Graph, plan_degree
from fedge.shared.secagg.grid import Grid
from fedge.shared.secagg.support import (
    aggregate_score,
    aggregate_support,
    flatten,
    project,
    shared_support,
    unflatten,
)
from fedge.shared.secagg.update import mean_update, quantized_input

__all__ = [
    "MAX_COHORT",
    "Graph",
    "Grid",
    "RoundConfig",
    "SecAggError",
    "aggregate_score",
    "aggregate_support",
    "flatten",
    "mean_update",
    "plan_degree",
    "project",
    "quantized_input",
    "shared_support",
    "unflatten",
]
