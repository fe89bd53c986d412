"""Forecasts of load and PV: perfect, noisy with a seeded error model, or persistence.

Noise comes from one fixed table of standard normals read at an offset drawn at reset from the
environment's own generator. That makes the error of every (episode, step, lead, prosumer)
reproducible from the seed, identical between a single environment and the same environment
inside a batch, and costs one gather per step for the whole batch instead of a generator call
per environment.
"""

from __future__ import annotations

import functools

import numpy as np

from envs.params import FloatArray, IntArray

NOISE_TABLE_SIZE = 1 << 20


@functools.cache
def noise_table() -> FloatArray:
    """The shared table of standard normal draws (fixed seed: part of the error model)."""
    return np.random.default_rng(0x5EED).standard_normal(NOISE_TABLE_SIZE)


def lead_scale(horizon: int, noise_std: float) -> FloatArray:
    """Relative error std per lead: grows with sqrt(lead), reaching noise_std at the horizon."""
    return noise_std * np.sqrt(np.arange(1, horizon + 1) / horizon)


def forecast(
    profile: FloatArray,
    slot: IntArray,
    last: FloatArray,
    horizon: int,
    mode: str,
    scale: FloatArray,
    noise_offset: IntArray,
) -> FloatArray:
    """Forecast `profile` (T, n) for slots slot .. slot+horizon-1; returns (B, n, horizon).

    `last` (B, n) is the latest measured value, which persistence repeats. `noise_offset` (B,)
    selects each environment's stretch of the noise table for this step.
    """
    n = profile.shape[1]
    if mode == "persistence":
        return np.repeat(last[:, :, None], horizon, axis=2)
    idx = slot[:, None] + np.arange(horizon)[None, :]
    truth = profile[idx].transpose(0, 2, 1)  # (B, n, horizon)
    if mode == "perfect":
        return truth
    k = n * horizon
    pos = (noise_offset[:, None] + np.arange(k)[None, :]) % NOISE_TABLE_SIZE
    eps = noise_table()[pos].reshape(-1, n, horizon)
    return np.maximum(truth * (1.0 + eps * scale), 0.0)
