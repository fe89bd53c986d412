"""The one interface every controller satisfies, learned or not: observation in, action out."""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import numpy as np


@runtime_checkable
class Policy(Protocol):
    """`predict` maps encoded observations (obs_dim,) or (B, obs_dim) to actions of that batch.

    Observations and actions use `envs.codec`'s layout, so the same object drives the
    environment, the evaluator and the live bridge.
    """

    name: str

    def predict(self, obs: np.ndarray) -> np.ndarray: ...
