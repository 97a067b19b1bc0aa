"""A small CNN federated on 8x8 digit images (docs/agent.md, "Federate your PyTorch model")."""

import numpy as np
from sklearn.datasets import load_digits
from torch import nn

from fedge.edge_agent.torch_adapter import federate


def build() -> nn.Module:
    """The model: the task's tensors are its state_dict entries."""
    return nn.Sequential(
        nn.Conv2d(1, 16, kernel_size=3, padding=1),  # [n, 1, 8, 8] -> [n, 16, 8, 8]
        nn.BatchNorm2d(16),
        nn.ReLU(),
        nn.MaxPool2d(2),  # -> [n, 16, 4, 4]
        nn.Flatten(),
        nn.Linear(16 * 4 * 4, 10),
    )


def macro_f1(y_true: np.ndarray, outputs: np.ndarray) -> dict[str, float]:
    """An extra metric: averaged over the devices and shown per round."""
    y_pred = outputs.argmax(axis=1)
    classes = np.arange(outputs.shape[1])
    tp = ((y_pred[:, None] == classes) & (y_true[:, None] == classes)).sum(axis=0)
    predicted = (y_pred[:, None] == classes).sum(axis=0)
    actual = (y_true[:, None] == classes).sum(axis=0)
    f1 = 2 * tp / np.maximum(predicted + actual, 1)
    return {"macro_f1": float(f1[actual > 0].mean())}


# The task's training.trainer: "digits_cnn:trainer".
trainer = federate(build, metrics=macro_f1)


def data() -> tuple[np.ndarray, np.ndarray]:
    """This device's data (fedge agent run --data digits_cnn:data): images [n, 1, 8, 8]."""
    X, y = load_digits(return_X_y=True)
    return (X / 16.0).reshape(-1, 1, 8, 8).astype(np.float32), y
