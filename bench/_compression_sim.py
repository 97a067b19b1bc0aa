"""In-process federated simulation for ``bench/compression_accuracy.py``.

Every step is the product's own code; only the transport (HTTP, database, blob store) is left
out:

* data: ``fedge.edge_agent.sim.datasets.load_dataset`` (digits, stratified held-out test split) and
  ``fedge.edge_agent.sim.partition.dirichlet_partition`` (non-IID shards, one per device);
* device: ``fedge.edge_agent.trainers.NumpyTrainer`` trains a copy of the global model; the delta
  ``local - base`` is compressed with ``fedge.shared.compression.compress_round`` (top-k warm-up
  by base version, and the device's own error-feedback memory,
  ``fedge.edge_agent.residual_store.ResidualState``: residual, momentum velocity and the version
  they belong to, kept across rounds, when the policy has error feedback) and encoded with
  ``fedge.shared.wire.encode_update`` -- the same calls, with the same seeding (``[seed,
  assignment]`` for training, ``[seed, assignment, 1]`` for compression), as
  ``fedge.edge_agent.uploads.save_update``. The encoded length is the upload size (the update
  body; no HTTP or TLS bytes, there is no socket here). Round ``r`` (0-based) trains on model
  version ``r``: sync rounds, one version per round;
* server: ``fedge.shared.wire.decode_update`` (with the task's policy check) into the coordinator's
  ``fedge.coordinator.engine.aggregate.Accumulator`` with the weight from
  ``fedge.coordinator.engine.staleness.update_weight`` (sync rounds: staleness 0, weight =
  num_examples), then the strategy from ``fedge.coordinator.engine.strategies.make_strategy`` for
  the task's ``AggregationConfig`` -- what ``fedge.coordinator.engine.apply.compute`` does, minus
  reading blobs from the blob store.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from fedge.coordinator.engine.aggregate import Accumulator
from fedge.coordinator.engine.config import AggregationConfig
from fedge.coordinator.engine.staleness import update_weight
from fedge.coordinator.engine.strategies import OptimizerState, make_strategy
from fedge.edge_agent.data import LocalData
from fedge.edge_agent.residual_store import ResidualState
from fedge.edge_agent.sim.datasets import Dataset, load_dataset
from fedge.edge_agent.sim.demo_report import centralized_baseline
from fedge.edge_agent.sim.partition import dirichlet_partition, label_skew
from fedge.edge_agent.trainers import NumpyTrainer
from fedge.shared import architectures
from fedge.shared.compression import compress, compress_round
from fedge.shared.modelspec import Weights
from fedge.shared.policy import CompressionPolicy
from fedge.shared.wire import decode_update, encode_update, update_overhead_bytes

TASK_ID = 1


@dataclass(frozen=True)
class FleetConfig:
    """Everything that is the same for every setting of one benchmark run."""

    devices: int = 100
    per_round: int = 20
    rounds: int = 40
    alpha: float = 0.5
    hidden: tuple[int, ...] = (128,)
    test_fraction: float = 0.2
    training: dict[str, Any] = field(
        default_factory=lambda: {"epochs": 2, "batch_size": 16, "lr": 0.05}
    )
    aggregation: dict[str, Any] = field(default_factory=lambda: {"strategy": "fedavg"})
    chunk: int = 64
    scope: str = "tensor"

    def policy(
        self,
        topk: float,
        bits: int,
        ef: bool,
        *,
        momentum: float = 0.0,
        warmup: int = 0,
        decay: float = 1.0,
    ) -> CompressionPolicy:
        return CompressionPolicy(
            topk_fraction=topk,
            bits=bits,
            chunk=self.chunk,
            error_feedback=ef,
            scope=self.scope,  # type: ignore[arg-type]
            momentum=momentum,
            warmup_rounds=warmup,
            residual_decay=decay,
        )

    def policy_of(self, s: Setting) -> CompressionPolicy:
        return self.policy(
            s.topk, s.bits, s.ef, momentum=s.momentum, warmup=s.warmup, decay=s.decay
        )


@dataclass(frozen=True)
class Setting:
    """One compression setting (``topk=1, bits=32, ef=False`` is dense float32 FedAvg);
    ``momentum``, ``warmup`` and ``decay`` are the policy's ``momentum``, ``warmup_rounds``
    and ``residual_decay``."""

    topk: float
    bits: int
    ef: bool
    momentum: float = 0.0
    warmup: int = 0
    decay: float = 1.0

    @property
    def name(self) -> str:
        if self.topk == 1.0 and self.bits == 32:
            return "dense-f32"
        name = f"top{self.topk * 100:g}%-{self.bits}b-{'ef' if self.ef else 'noef'}"
        if self.momentum:
            name += f"-m{self.momentum:g}"
        if self.warmup:
            name += f"-w{self.warmup}"
        if self.decay != 1.0:
            name += f"-d{self.decay:g}"
        return name


DENSE = Setting(1.0, 32, False)


def model_config(fleet: FleetConfig, data: Dataset, seed: int) -> dict[str, Any]:
    return {
        "architecture": "mlp",
        "input_dim": data.input_dim,
        "num_classes": data.num_classes,
        "hidden": list(fleet.hidden),
        "seed": seed,
    }


def make_fleet(fleet: FleetConfig, seed: int) -> tuple[Dataset, list[LocalData], float]:
    """The rep's data: test split and one shard per device (same for every setting)."""
    rng = np.random.default_rng(seed)
    data = load_dataset("digits", test_fraction=fleet.test_fraction, rng=rng)
    parts = dirichlet_partition(data.y_train, fleet.devices, fleet.alpha, rng)
    empty_x = np.zeros((0, data.input_dim), np.float32)
    empty_y = np.zeros(0, np.int64)
    shards = [LocalData(data.X_train[p], data.y_train[p], empty_x, empty_y) for p in parts]
    return data, shards, label_skew(data.y_train, parts)


def selections(fleet: FleetConfig, seed: int) -> list[np.ndarray]:
    """Devices sampled for every round (uniform without replacement; same for all settings)."""
    rng = np.random.default_rng([seed, 7])
    return [
        np.sort(rng.choice(fleet.devices, size=fleet.per_round, replace=False))
        for _ in range(fleet.rounds)
    ]


def _compare(sent: Weights, true: Weights) -> tuple[float, float]:
    """Cosine and norm ratio of the aggregated decoded delta to the aggregate of this round's
    uncompressed deltas (with error feedback the sent one also carries older residuals)."""
    a = np.concatenate([v.ravel() for v in sent.values()])
    b = np.concatenate([true[k].ravel() for k in sent])
    na, nb = float(np.linalg.norm(a)), float(np.linalg.norm(b))
    if na == 0.0 or nb == 0.0:
        return 0.0, 0.0
    return float(a @ b) / (na * nb), na / nb


def run_federated(fleet: FleetConfig, setting: Setting, seed: int) -> dict[str, Any]:
    """Train for ``fleet.rounds`` sync rounds; per-round test accuracy and upload bytes."""
    started = time.process_time()
    data, shards, skew = make_fleet(fleet, seed)
    model = model_config(fleet, data, seed)
    spec = architectures.build_spec(model)
    weights: Weights = architectures.init_weights(model, np.random.default_rng(seed))
    policy = fleet.policy_of(setting)
    cfg = AggregationConfig.from_dict(
        {**fleet.aggregation, "mode": "sync", "clients_per_round": fleet.per_round}
    )
    strategy = make_strategy(cfg)
    state: OptimizerState = {}
    trainers = [NumpyTrainer(model, shard) for shard in shards]
    residuals: dict[int, ResidualState] = {}
    acc0 = architectures.evaluate(model, weights, data.X_test, data.y_test)
    accuracy, loss, upload, nnz = [acc0["accuracy"]], [acc0["loss"]], [], []
    residual_norm: list[float] = []
    cosine: list[float] = []
    norm_ratio: list[float] = []
    for rnd, chosen in enumerate(selections(fleet, seed)):
        total = Accumulator(spec)
        uncompressed = Accumulator(spec)  # diagnostics only: what dense uploads would average
        round_bytes = round_nnz = 0
        for device in chosen.tolist():
            assignment = rnd * fleet.devices + device
            result = trainers[device].train(
                weights, fleet.training, np.random.default_rng([seed, assignment])
            )
            delta = {t.name: result.weights[t.name] - weights[t.name] for t in spec.tensors}
            memory = None
            if policy.error_feedback:
                memory = residuals.setdefault(device, ResidualState.zeros(spec))
            rng = np.random.default_rng([seed, assignment, 1])
            compressed = compress_round(delta, policy, rng, memory, base_version=rnd)
            blob = encode_update(
                compressed,
                task_id=TASK_ID,
                base_version=rnd,
                num_examples=int(result.num_examples),
            )
            round_bytes += len(blob)
            round_nnz += compressed.nnz
            decoded = decode_update(blob, spec=spec, policy=policy)
            weight = update_weight(
                cfg.staleness, tau=0, num_examples=decoded.num_examples, weighting=cfg.weighting
            )
            total.add(decoded, weight)
            uncompressed.add_dense(delta, weight)
        mean = total.mean()
        c, ratio = _compare(mean, uncompressed.mean())
        cosine.append(c)
        norm_ratio.append(ratio)
        weights, state = strategy.step(weights, mean, state)
        ev = architectures.evaluate(model, weights, data.X_test, data.y_test)
        accuracy.append(ev["accuracy"])
        loss.append(ev["loss"])
        upload.append(round_bytes)
        nnz.append(round_nnz)
        if residuals:
            residual_norm.append(float(np.mean([r.norm() for r in residuals.values()])))
    return {
        "setting": setting.name,
        "seed": seed,
        "accuracy": accuracy,
        "loss": loss,
        "upload_bytes_per_round": upload,
        "nnz_per_round": nnz,
        "mean_residual_norm_per_round": residual_norm,
        "cosine_to_uncompressed_mean_per_round": cosine,
        "norm_ratio_to_uncompressed_mean_per_round": norm_ratio,
        "label_skew": skew,
        "num_params": spec.num_params,
        "num_updates": fleet.per_round * fleet.rounds,
        "cpu_s": time.process_time() - started,
    }


def run_centralized(fleet: FleetConfig, seed: int, *, rounds: int) -> dict[str, Any]:
    """The same model trained on the union of the devices' training data with the product's
    demo baseline (``fedge.edge_agent.sim.demo_report.centralized_baseline``): ``training.epochs``
    epochs per round, so ``rounds * epochs`` epochs in all."""
    started = time.process_time()
    data, _, _ = make_fleet(fleet, seed)
    model = model_config(fleet, data, seed)
    history = centralized_baseline(
        model,
        fleet.training,
        X_train=data.X_train,
        y_train=data.y_train,
        X_test=data.X_test,
        y_test=data.y_test,
        rounds=rounds,
        seed=seed,
    )
    return {
        "seed": seed,
        "rounds": rounds,
        "epochs": rounds * int(fleet.training.get("epochs", 1)),
        "accuracy": [row["accuracy"] for row in history],
        "loss": [row["loss"] for row in history],
        "cpu_s": time.process_time() - started,
    }


def wire_ceiling(
    hidden_sizes: list[int], settings: list[Setting], *, chunk: int, scope: str, seed: int
) -> list[dict[str, Any]]:
    """Bytes of one encoded update and the ratio to the dense float32 encoding, per model size
    and setting, for an N(0, 1) delta (no training: only the byte count matters here)."""
    out = []
    for hidden in hidden_sizes:
        fleet = FleetConfig(hidden=(hidden,), chunk=chunk, scope=scope)
        model = {"architecture": "mlp", "input_dim": 64, "num_classes": 10, "hidden": [hidden]}
        spec = architectures.build_spec(model)
        gen = np.random.default_rng(seed)
        delta = {t.name: gen.standard_normal(t.shape, dtype=np.float32) for t in spec.tensors}
        sizes = {}
        headers = {}
        for s in [DENSE, *settings]:
            policy = fleet.policy(s.topk, s.bits, False)
            c = compress(delta, policy, np.random.default_rng(seed))
            blob = encode_update(c, task_id=TASK_ID, base_version=0, num_examples=1)
            sizes[s] = len(blob)
            headers[s] = update_overhead_bytes(blob)
        for s in settings:
            out.append(
                {
                    "hidden": hidden,
                    "num_params": spec.num_params,
                    "setting": f"top{s.topk * 100:g}%-{s.bits}b",
                    "bytes": sizes[s],
                    "fixed_header_bytes": headers[s],
                    "dense_bytes": sizes[DENSE],
                    "ratio": sizes[DENSE] / sizes[s],
                }
            )
    return out
