"""Task targeting words both sides use: decline reason codes and capability report keys.

A device reports what it can do (``PUT /device/capabilities``, docs/protocol.md) and says at
once when it cannot work on an assignment (``POST /device/assignments/{id}/decline``) with
one of :data:`DECLINE_REASONS`; the coordinator matches tasks' requirements against the
report (docs/rounds.md, "Eligibility").
"""

from __future__ import annotations

#: Why a device declines an assignment.
#:
#: - ``no_trainer``: the trainer the task names is not installed on the device;
#: - ``data_mismatch``: the device's data does not fit the model (feature shape, labels);
#: - ``bad_config``: the task's model, compression or training settings cannot be used;
#: - ``model_unavailable``: the base model could not be downloaded or decoded;
#: - ``training_failed``: training or encoding the update failed;
#: - ``other``: anything else (the detail says what).
DECLINE_REASONS: tuple[str, ...] = (
    "no_trainer",
    "data_mismatch",
    "bad_config",
    "model_unavailable",
    "training_failed",
    "other",
)

#: Label kinds a device's data can have: integer class labels or real-valued targets.
LABEL_KINDS: tuple[str, ...] = ("class", "value")

#: The longest decline detail a device sends (longer text is cut by the agent).
MAX_DECLINE_DETAIL = 500
